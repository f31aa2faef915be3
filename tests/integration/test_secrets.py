"""Secrets suite: userData and object-store credentials never leave the places that must
hold them.

Each secret is a unique canary string (with `+/=` in it, so that its URL-encoded form
differs from it). The whole life cycle runs through the real CLI, as a user runs it,
with the most verbose logs there are (`RECONCILER_LOG_LEVEL=debug`, JSON lines since
stderr is not a terminal): validate, plan (text, `--json`, `--out FILE`), apply, a
changed userData (update), status (text, `--json`), an apply that fails (an invalid
#cloud-config seed, a bucket name taken by an unmarked container, a userData that is
not a string), the daemon for one pass on a git repository (its log, its events, its
cache), destroy. The drivers are real: libvirt (a TCG guest with a NoCloud seed) and the
object store (Swift with a tenant's own credentials, and S3 on Swift's s3api).

Then every canary, in its raw, URL-encoded, JSON-escaped, hex and base64 forms (each
alignment), is searched, without our code, in:

- every stdout/stderr captured (the CLI and the daemon's log);
- every row of every table of STATE_DIR/journal.sqlite3 (plain sqlite3);
- every file under the test's root (state dir, saved plans, manifests, host config);
- `virsh dumpxml` (live and inactive), libvirt's own domain XML files and
  /var/log/libvirt/qemu/<domain>.log;
- what the object store keeps for us (container metadata, decoded by hand; the S3 mark
  object);
- the daemon's git cache (`git cat-file --batch-all-objects`: its objects are deflated).

Allowed holders: the seed given to the guest (seed.iso) and what it was built from
(seed.json), saved plans (they must carry the target), each 0600; the daemon's git cache,
in a 0700 directory; the user's own files (manifests, host config). Anything else is a
leak, and after destroy no copy of a userData is left outside the git cache. Tempauth
tokens (`AUTH_tk...`) count as secrets everywhere; the fixed keys of the Swift
all-in-one's test users (`testing`, `testing2`) are searched like canaries (they cannot be
unique: tempauth users are fixed). The second test gives wrong keys (canaries) and checks
that the errors name the user and the host config setting, never the key.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import sqlite3
import stat
import subprocess
import time
import zlib
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, quote_plus

import pytest

import figures
import objstore
from conftest import IMAGE, RECONCILER, HostEnv, domstate, host_env, ok, virsh, wait_for

pytestmark = [pytest.mark.reliability]

DEBUG = {"RECONCILER_LOG_LEVEL": "debug"}
TOKEN = re.compile(rb"AUTH_tk[0-9a-f]{8,}")
QEMU_LOGS = Path("/var/log/libvirt/qemu")
LIBVIRT_XML = (Path("/etc/libvirt/qemu"), Path("/run/libvirt/qemu"))
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNlY3JldHMtc3VpdGUtdGVzdC1rZXk= secrets@test"
HANG_GUARD = 120  # seconds any single step may take (a hang guard, not a timing assertion)
GIT_CACHE = "the daemon's git cache (git cat-file --batch-all-objects)"
GIT_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "rc test", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "rc test", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


@pytest.fixture(autouse=True)
def _real_host() -> None:
    from hostcheck import require_host

    require_host()
    objstore.require_swift()


# --- what a secret looks like, in every encoding we could write it in ------------------------


def _b64_pieces(raw: bytes) -> list[bytes]:
    """The base64 text of `raw` wherever it sits in a larger encoded blob: for each of the
    three alignments, the groups that only `raw` determines (both alphabets)."""
    out = []
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + raw)
        start, end = -(-k // 3) * 4, (k + len(raw)) // 3 * 4
        piece = encoded[start:end].rstrip(b"=")
        out += [piece, piece.replace(b"+", b"-").replace(b"/", b"_")]
    return out


@dataclass
class Secret:
    label: str
    value: str
    #: where it may be: a predicate on a place name
    allowed: Callable[[str], bool]
    #: a canary made for this run (else a fixed key of the test store, matched as a word)
    unique: bool = True
    forms: dict[str, bytes] = field(default_factory=dict)
    pattern: re.Pattern[bytes] | None = None

    def __post_init__(self) -> None:
        raw = self.value.encode()
        if not self.unique:  # e.g. `testing`, which `testing2` must not match
            self.pattern = re.compile(rb"(?<![A-Za-z0-9])" + re.escape(raw) + rb"(?![A-Za-z0-9])")
            return
        forms = {"raw": raw, "url": quote(self.value, safe="").encode(),
                 "url (/ kept)": quote(self.value).encode(), "form-url": quote_plus(self.value).encode(),
                 "json \\/": self.value.replace("/", "\\/").encode(), "hex": raw.hex().encode()}
        forms.update({k + " (lower-case %xx)": re.sub(rb"%[0-9A-F]{2}", lambda m: m.group().lower(), v)
                      for k, v in list(forms.items()) if k.startswith(("url", "form-url"))})
        forms.update({f"base64 #{i}": p for i, p in enumerate(_b64_pieces(raw))})
        self.forms = forms

    def found_in(self, data: bytes) -> str | None:
        if self.pattern is not None:
            return "raw" if self.pattern.search(data) else None
        return next((name for name, form in self.forms.items() if form in data), None)


def canary(label: str) -> str:
    return f"rc{label}{secrets.token_hex(8)}+/="


@dataclass(repr=False)
class Evidence:
    """Every place searched, and every secret found in one."""

    env: HostEnv
    secrets: list[Secret] = field(default_factory=list)
    places: set[str] = field(default_factory=set)
    hits: dict[tuple[str, str], str] = field(default_factory=dict)  # (secret, place) -> form
    outputs: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # file place -> its mode when last read

    def __repr__(self) -> str:  # short in failures: no canary values
        return f"Evidence({len(self.secrets)} secrets, {len(self.places)} places, {len(self.hits)} hits)"

    def add(self, label: str, value: str, allowed: Callable[[str], bool], unique: bool = True) -> str:
        self.secrets.append(Secret(label, value, allowed, unique))
        return value

    def scan(self, place: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.places.add(place)
        for s in self.secrets:
            form = s.found_in(data)
            if form is not None:
                self.hits.setdefault((s.label, place), form)
        if TOKEN.search(data):
            self.hits.setdefault(("an AUTH_tk token", place), "raw")

    # --- the CLI -----------------------------------------------------------------------

    def cli(self, what: str, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        """`reconciler ARGS` at debug level; both streams searched; exit `code` (None: any),
        never a traceback."""
        started = time.monotonic()
        result = self.env.cli(*args, env=DEBUG, timeout=HANG_GUARD)
        print(f"{time.monotonic() - started:6.2f} s  reconciler {what}: exit {result.returncode}")
        n = len(self.outputs) + 1
        self.outputs.append(what)
        self.scan(f"output {n} `{what}` stdout", result.stdout)
        self.scan(f"output {n} `{what}` stderr", result.stderr)
        if code is not None:
            ok(result, code)
        assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
        return result

    def apply(self, what: str, folder: Path, code: int = 0, *,
              over_readable: bool = False) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
        """plan --json --out FILE of `folder`, checked to touch nothing outside this test's
        tenants (as conftest's HostEnv.apply), then `apply FILE`: the plan as printed
        (JSON), and apply's result. `over_readable`: FILE exists before, world-readable,
        and a reader holds it open meanwhile (what it reads then is searched too)."""
        plan_file = self.env.root / f"plan-{len(self.outputs) + 1}.json"
        reader = None
        if over_readable:
            plan_file.write_text("{}\n")
            plan_file.chmod(0o644)
            reader = open(plan_file, "rb")
        try:
            result = self.cli(f"plan --json --out ({what})", "plan", "--json", "--out", str(plan_file),
                              str(folder))
            if reader is not None:
                self.scan(f"a reader of {plan_file.name}, opened while it was 0644", reader.read())
        finally:
            if reader is not None:
                reader.close()
        changes = json.loads(result.stdout)["changes"]
        foreign = [f"{c['action']} {c['kind']} {c['tenant']}/{c['name']}" for c in changes
                   if c["action"] != "noop" and not c["tenant"].startswith(self.env.tenant)]
        assert not foreign, f"the plan would change resources of other tests: {foreign}"
        assert stat.S_IMODE(plan_file.stat().st_mode) == 0o600, oct(plan_file.stat().st_mode)
        return json.loads(result.stdout), self.cli(f"apply FILE ({what})", "apply", str(plan_file), code=code)

    # --- the host --------------------------------------------------------------------

    def scan_files(self, root: Path) -> list[Path]:
        """Search every file under `root` (their modes kept, as found); those holding a
        unique canary now."""
        holding = []
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                self.modes[f"file {path}"] = stat.S_IMODE(path.stat().st_mode)
                self.scan(f"file {path}", data)
                if any(s.unique and s.found_in(data) for s in self.secrets):
                    holding.append(path)
        return holding

    def scan_journal(self) -> None:
        path = self.env.state_dir / "journal.sqlite3"
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            assert {"applies", "changes", "events", "daemon", "resources"} <= set(tables), tables
            for table in tables:
                rows = db.execute(f'SELECT * FROM "{table}"').fetchall()
                self.scan(f"journal table {table}", "\n".join(repr(r) for r in rows))

    def scan_domain(self, domain: str) -> None:
        for flags in ((), ("--inactive",), ("--security-info",)):
            result = virsh("dumpxml", *flags, domain)
            self.scan(f"virsh dumpxml {' '.join(flags)} {domain}".replace("  ", " "), result.stdout)
        for folder in LIBVIRT_XML:
            path = folder / f"{domain}.xml"
            if path.exists():
                self.scan(f"file {path}", path.read_bytes())

    def scan_qemu_log(self, domain: str) -> None:
        path = QEMU_LOGS / f"{domain}.log"
        assert path.exists(), f"libvirt wrote no {path}"
        self.scan(f"file {path}", path.read_bytes())

    # --- the verdict -------------------------------------------------------------------

    def leaks(self) -> list[str]:
        allowed = {s.label: s.allowed for s in self.secrets}
        return sorted(f"{label} ({form}) in {place}" for (label, place), form in self.hits.items()
                      if not allowed.get(label, lambda _p: False)(place))

    def holders(self) -> dict[str, list[str]]:
        """Allowed places holding a secret: place -> secrets."""
        out: dict[str, list[str]] = {}
        allowed = {s.label: s.allowed for s in self.secrets}
        for (label, place), _form in self.hits.items():
            if allowed.get(label, lambda _p: False)(place):
                out.setdefault(place, []).append(label)
        return out

    def canaries(self) -> int:
        return sum(1 for s in self.secrets if s.unique)


# --- manifests -----------------------------------------------------------------------------


def instance_doc(tenant: str, user_data: str | None, keys: tuple[str, ...] = (), *,
                 raw_user_data: str | None = None) -> str:
    spec = {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1, "restartPolicy": "Never"}
    text = ("---\napiVersion: reconciler/v1\nkind: Instance\n"
            f"metadata: {{name: vm, tenant: {tenant}}}\nspec:\n"
            + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in spec.items()))
    if keys:
        text += f"  sshAuthorizedKeys: {json.dumps(list(keys))}\n"
    if raw_user_data is not None:
        text += raw_user_data
    elif user_data is not None:
        text += "  userData: |\n" + "".join(f"    {line}\n" for line in user_data.splitlines())
    return text


def doc(kind: str, tenant: str | None, name: str, spec: dict[str, Any]) -> str:
    meta = {"name": name, **({"tenant": tenant} if tenant else {})}
    return (f"---\napiVersion: reconciler/v1\nkind: {kind}\nmetadata: {json.dumps(meta)}\n"
            f"spec: {json.dumps(spec)}\n")


def cloud_config(secret: str, valid: bool = True) -> str:
    if valid:
        return f"#cloud-config\nchpasswd: {{expire: false}}\npassword: {secret}\n"
    return f"#cloud-config\npassword: [{secret}\n"  # an unclosed flow sequence


def write_folder(env: HostEnv, name: str, text: str) -> Path:
    folder = env.root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cloud.yaml").write_text(text)
    return folder


def commit_all(folder: Path) -> None:
    for args in (("init", "-q", "-b", "main"), ("add", "-A"), ("commit", "-q", "-m", "the cloud")):
        subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, timeout=60,
                       env=GIT_ENV)


def user_file(env: HostEnv, place: str) -> bool:
    """The user's own files: the manifests (folders m-*) and the host config."""
    return place == f"file {env.host_config}" or place.startswith(f"file {env.root}/m-")


def saved_plan(env: HostEnv, place: str) -> bool:
    return re.fullmatch(rf"file {re.escape(str(env.root))}/plan-\d+\.json", place) is not None


def daemon_cache(env: HostEnv, place: str) -> bool:
    """The daemon's cache of a git source: its objects, its checkouts."""
    return place == GIT_CACHE or place.startswith(f"file {env.state_dir}/daemon/git/")


def seed_file(env: HostEnv, place: str) -> bool:
    return (place.startswith(f"file {env.instance_dir}/")
            and place.rsplit("/", 1)[-1] in ("seed.iso", "seed.json"))


def write_host_config(env: HostEnv, stores: dict[str, Any], mode: int = 0o600) -> None:
    config = json.loads(env.host_config.read_text())
    config["drivers"]["Bucket"] = "objectstore"
    config["objectStores"] = stores
    env.host_config.write_text(json.dumps(config, indent=2) + "\n")
    env.host_config.chmod(mode)


@pytest.fixture
def sec_env() -> Iterator[HostEnv]:
    """A test tenant (conftest's host_env, guests under TCG) and, afterwards, its containers
    removed from both test accounts (whatever a bug put where)."""
    with host_env(domain_type="qemu", shutdown_timeout=10) as env:
        try:
            yield env
        finally:
            for user in (objstore.TEST, objstore.TEST2):
                objstore.remove_containers(objstore.conn(user), env.tenant)
            left = [f"{user[0]}: {name}" for user in (objstore.TEST, objstore.TEST2)
                    for name in objstore.containers(objstore.conn(user)) if name.startswith(env.tenant)]
            assert not left, f"containers left behind: {left}"


# --- the store, read without our code ----------------------------------------------------


def container_record(conn: Any, name: str) -> str:
    """A container's headers, with our mark's chunks decoded by hand (base64url + zlib)."""
    headers = conn.head_container(name)
    chunks = sorted((k, v) for k, v in headers.items() if k.startswith("x-container-meta-rc-mark-"))
    chunks.sort(key=lambda kv: int(kv[0].rsplit("-", 1)[1]))
    packed = "".join(v for _, v in chunks)
    decoded = (zlib.decompress(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))).decode()
               if packed else "")
    assert decoded.startswith("{"), f"no mark on container {name}: {headers}"
    return json.dumps(dict(headers), sort_keys=True) + "\n" + decoded


def s3_mark(bucket: str) -> str:
    body = objstore.s3(objstore.TEST).get_object(Bucket=bucket, Key=".reconciler-mark")["Body"].read()
    return body.decode()


# --- the daemon ----------------------------------------------------------------------------


def daemon_facts(env: HostEnv) -> dict[str, Any]:
    path = env.state_dir / "journal.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            rows = db.execute("SELECT name, value FROM daemon").fetchall()
        except sqlite3.OperationalError:
            return {}
    return {name: json.loads(value) for name, value in rows}


def run_daemon_once(ev: Evidence, source: tuple[str, ...],
                    done: Callable[[dict[str, Any]], bool]) -> str:
    """`reconciler daemon SOURCE...` (`--source DIR` or `--git REPO`) at debug level until
    `done(facts)`; SIGTERM to our own child (by its PID), its whole log searched. Returns
    the log."""
    env = ev.env
    log_path = env.root / "daemon.log"
    full = {k: v for k, v in os.environ.items() if k != "RECONCILER_FAULTS"}
    full.update({"RECONCILER_HOST_CONFIG": str(env.host_config), "NO_COLOR": "1", **DEBUG})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(RECONCILER), "daemon", *source, "--metrics-address", "off", "--resync", "10m"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full)
    try:
        def finished() -> bool:
            assert proc.poll() is None, \
                f"the daemon exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            return done(daemon_facts(env))
        try:
            wait_for(finished, HANG_GUARD, what="the daemon's pass")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(HANG_GUARD)  # our child: wait() reaps it
    text = log_path.read_text(errors="replace")
    ev.scan("the daemon's log (stdout+stderr)", text)
    assert code == 0 and "Traceback" not in text, f"daemon exited {code}:\n{text[-4000:]}"
    return text


def applied_pass(facts: dict[str, Any]) -> bool:
    applied = facts.get("appliedRevision")
    return bool(applied) and applied == facts.get("attemptedRevision") and bool(facts.get("lastPassAt"))


# --- the tests -----------------------------------------------------------------------------


def test_user_data_and_store_keys_stay_in_the_seed_and_the_host_config(sec_env: HostEnv) -> None:
    """The life cycle of an instance with userData and two buckets (Swift with a tenant's
    own user, S3): five userData canaries and the two store keys are only where they must
    be, those places are private, and plans and status show `(sensitive)`."""
    env = sec_env
    t, t3 = env.tenant, f"{env.tenant}-s3"
    ev = Evidence(env)
    may_hold_user_data = lambda p: (seed_file(env, p) or saved_plan(env, p) or user_file(env, p)  # noqa: E731
                                    or daemon_cache(env, p))
    only_host_config = lambda p: p == f"file {env.host_config}"  # noqa: E731
    ud1 = ev.add("userData v1", canary("UDa"), may_hold_user_data)
    ud2 = ev.add("userData v2", canary("UDb"), may_hold_user_data)
    bad = ev.add("invalid userData", canary("UDbad"), lambda p: saved_plan(env, p) or user_file(env, p))
    not_str = ev.add("userData not a string", canary("UDmap"), lambda p: user_file(env, p))
    ud3 = ev.add("userData v3 (daemon)", canary("UDc"), may_hold_user_data)
    ev.add("Swift key of test2:tester2", objstore.TEST2[1], only_host_config, unique=False)
    ev.add("S3 secret of test:tester", objstore.TEST[1], only_host_config, unique=False)
    write_host_config(env, {
        "local": {"driver": "swift", "default": True, "authUrl": objstore.AUTH_URL,
                  "tenants": {t: {"user": objstore.TEST2[0], "key": objstore.TEST2[1]}}},
        "s3": {"driver": "s3", "endpoint": objstore.PROXY, "tagging": False, "readableAcl": False,
               "tenants": {t3: {"accessKey": objstore.TEST[0], "secretKey": objstore.TEST[1]}}},
    })
    domain = env.domain_name("vm")
    swift_bucket, s3_bucket, taken = f"{t}-b", f"{t3}-b", f"{t}-taken"
    gone = {"deletionPolicy": "Delete", "purgeOnDelete": True}
    buckets = (doc("Bucket", t, swift_bucket, gone) + doc("Bucket", t3, s3_bucket, {"store": "s3", **gone}))

    def cloud(instance: str, extra: str = "") -> str:
        return (doc("Tenant", None, t, {}) + doc("Tenant", None, t3, {})
                + doc("Image", t, "tiny", {"source": str(IMAGE)}) + instance + buckets + extra)

    # 1. create: validate, plan (text; JSON and saved by ev.apply), apply, status
    m1 = write_folder(env, "m-1", cloud(instance_doc(t, cloud_config(ud1))))
    assert "Valid: 6 resources" in ev.cli("validate", "validate", str(m1)).stdout
    text = ev.cli("plan", "plan", str(m1)).stdout
    assert "userData = (sensitive)" in text, text
    plan, _ = ev.apply("create", m1)
    assert all("target" not in c and "observed" not in c for c in plan["changes"]), plan
    assert domstate(domain) == "running"
    seed_dir = env.instance_dir / domain
    for name in ("seed.iso", "seed.json"):
        assert ud1.encode() in (seed_dir / name).read_bytes(), f"{name} does not hold the userData"
    rows = json.loads(ev.cli("status --json", "status", "--json").stdout)
    assert {(r["kind"], r["name"], r["state"]) for r in rows if r["tenant"] in (t, t3)} >= {
        ("Instance", "vm", "ready"), ("Bucket", swift_bucket, "ready"), ("Bucket", s3_bucket, "ready")}, rows

    # 2. update: a changed userData shows as (sensitive) changed, never as text
    m2 = write_folder(env, "m-2", cloud(instance_doc(t, cloud_config(ud2))))
    text = ev.cli("plan (update)", "plan", str(m2)).stdout
    assert "userData: (sensitive) -> (sensitive)" in text, text
    plan, _ = ev.apply("update", m2, over_readable=True)
    diffs = [d for c in plan["changes"] if c["kind"] == "Instance" for d in c["diffs"]]
    assert [(d["path"], d["old"], d["new"], d["sensitive"]) for d in diffs] == [
        (["userData"], "(sensitive)", "(sensitive)", True)], diffs
    assert ud2.encode() in (seed_dir / "seed.iso").read_bytes()
    assert ud1.encode() not in (seed_dir / "seed.iso").read_bytes() + (seed_dir / "seed.json").read_bytes()
    ev.scan_domain(domain)
    ev.scan_files(env.root)  # the seed as the running guest has it

    # 3. applies that fail: an invalid #cloud-config seed (at apply), a name taken by an
    #    unmarked container (at plan), a userData that is not a string (at load)
    m3 = write_folder(env, "m-3", cloud(instance_doc(t, cloud_config(bad, valid=False), (SSH_KEY,))))
    _, failed = ev.apply("invalid seed", m3, code=1)
    assert "userData starts with #cloud-config but is not valid YAML" in failed.stdout, failed.stdout
    status = ev.cli("status (failed)", "status").stdout
    assert re.search(r"Instance\s+\S+\s+vm\s+failed\s", status), status
    objstore.conn(objstore.TEST2).put_container(taken)
    m4 = write_folder(env, "m-4", cloud(instance_doc(t, cloud_config(ud2)),
                                        doc("Bucket", t, taken, {"deletionPolicy": "Delete"})))
    conflict = ev.cli("apply --yes (conflict)", "apply", "--yes", str(m4), code=1)
    assert "conflict" in conflict.stdout + conflict.stderr, conflict.stdout + conflict.stderr
    mapping = f"  userData:\n    password: {not_str}\n    keys: [{not_str}]\n"
    m5 = write_folder(env, "m-5", cloud(instance_doc(t, None, raw_user_data=mapping)))
    result = ev.cli("validate (userData a mapping)", "validate", str(m5), code=1)
    assert "spec.userData: input should be a valid string" in result.stderr, result.stderr

    # 4. the daemon, one pass: a new userData (and keys) applied from a commit of a local git
    #    repository (the daemon keeps a cache of it: every manifest, in git's objects)
    m6 = write_folder(env, "m-git", cloud(instance_doc(t, cloud_config(ud3), (SSH_KEY,))))
    commit_all(m6)
    run_daemon_once(ev, ("--git", str(m6), "--branch", "main"), applied_pass)
    cache = env.state_dir / "daemon" / "git"
    objects = subprocess.run(
        ["git", "-C", str(cache / "repo.git"), "cat-file", "--batch-all-objects", "--batch"],
        capture_output=True, check=True, timeout=60, env=GIT_ENV).stdout
    ev.scan(GIT_CACHE, objects)
    assert ud3.encode() in objects  # what the cache's 0700 must protect
    ev.modes[GIT_CACHE] = stat.S_IMODE(cache.stat().st_mode)
    assert ud3.encode() in (seed_dir / "seed.json").read_bytes(), "the daemon did not apply userData v3"
    status = ev.cli("status (after the daemon: its events)", "status").stdout
    assert "Recent events" in status, status
    ev.scan_domain(domain)
    ev.scan(f"Swift container {swift_bucket}",
            container_record(objstore.conn(objstore.TEST2), swift_bucket))
    ev.scan(f"S3 bucket {s3_bucket} mark", s3_mark(s3_bucket))
    ev.scan_files(env.root)

    # 5. destroy
    ev.cli("destroy --yes", "destroy", "--yes", str(m6))
    assert domain not in virsh("list", "--all", "--name").stdout.split()
    ev.scan_qemu_log(domain)
    ev.scan_journal()
    ev.scan_files(env.root)
    left = [p for p in ev.scan_files(env.state_dir) if not daemon_cache(env, f"file {p}")]
    assert not left, f"after destroy, these still hold a secret: {left}"

    holders = ev.holders()
    print(f"places checked: {len(ev.places)}; holders: {json.dumps(holders, indent=1)}")
    problems = []
    files_0600 = in_private_dir = 0
    for place, labels in holders.items():
        if user_file(env, place):
            continue
        if daemon_cache(env, place):  # protected by the cache directory (git writes 0644 files)
            if ev.modes[GIT_CACHE] & 0o077:
                problems.append(f"{place} holds {labels} in {cache}, mode {oct(ev.modes[GIT_CACHE])}")
            in_private_dir += 1
            continue
        if ev.modes[place] == 0o600:
            files_0600 += 1
        else:
            problems.append(f"{place[5:]} holds {labels} with mode {oct(ev.modes[place])}")
    print(f"holders: {files_0600} files 0600, {in_private_dir} in the daemon's 0700 git cache")
    assert sum(seed_file(env, p) for p in holders) == 2, f"no seed file held the userData: {holders}"
    leaks = ev.leaks()
    figures.record("secrets", canaries=ev.canaries(), places_checked=len(ev.places), leaks=len(leaks),
                   files_0600=files_0600)
    assert not leaks and not problems, \
        "secrets found where they must not be:\n" + "\n".join(leaks + problems)


def test_wrong_keys_are_never_echoed(sec_env: HostEnv) -> None:
    """Wrong credentials (canaries) for a tenant's Swift user, the reseller admin and an S3
    secret, each alone, then all at once for the daemon: plan, apply, status and the daemon
    fail with errors naming the user and the host config setting, never the key; nothing
    is created."""
    env = sec_env
    t, t2, t3 = env.tenant, f"{env.tenant}-adm", f"{env.tenant}-s3"
    ev = Evidence(env)
    only_host_config = lambda p: p == f"file {env.host_config}"  # noqa: E731
    tenant_key = ev.add("wrong Swift key of a tenant", canary("KEYt"), only_host_config)
    admin_key = ev.add("wrong reseller admin key", canary("KEYa"), only_host_config)
    s3_secret = ev.add("wrong S3 secret", canary("KEYs"), only_host_config)

    def swift(admin: str, tenant_creds: bool) -> dict[str, Any]:
        creds = {t: {"user": objstore.TEST2[0], "key": tenant_key}} if tenant_creds else {}
        return {"driver": "swift", "default": True, "authUrl": objstore.AUTH_URL,
                "user": objstore.ADMIN[0], "key": admin, "tenants": creds}

    s3 = {"driver": "s3", "endpoint": objstore.PROXY, "tagging": False, "readableAcl": False,
          "tenants": {t3: {"accessKey": objstore.TEST[0], "secretKey": s3_secret}}}
    tenants = {name: doc("Tenant", None, name, {}) for name in (t, t2, t3)}
    buckets = {t: doc("Bucket", t, f"{t}-b", {"deletionPolicy": "Delete"}),
               t2: doc("Bucket", t2, f"{t2}-b", {"deletionPolicy": "Delete"}),
               t3: doc("Bucket", t3, f"{t3}-b", {"store": "s3", "deletionPolicy": "Delete"})}
    cases = [  # (what, stores, tenant, what the error must say)
        ("tenant key", {"local": swift(objstore.ADMIN[1], True)}, t,
         f"authentication failed for tenant {t}'s user {objstore.TEST2[0]}: check its key in the host "
         "config (objectStores.local)"),
        ("admin key", {"local": swift(admin_key, False)}, t2,
         f"authentication failed for user {objstore.ADMIN[0]}: check its key in the host config "
         "(objectStores.local)"),
        ("S3 secret", {"s3": {**s3, "default": True}}, t3,
         f"authentication failed or access denied for tenant {t3}'s access key"),
    ]
    stderr = []
    for i, (what, stores, tenant, expected) in enumerate(cases):
        # world-readable, as a user may leave it: whether we warn is reported, not required
        write_host_config(env, stores, mode=0o644)
        folder = write_folder(env, f"m-{tenant}", tenants[tenant] + buckets[tenant])
        if i == 0:  # plan observes as apply does, and fails alike (once is enough)
            stderr.append(ev.cli(f"plan ({what} wrong)", "plan", str(folder), code=1).stderr)
        result = ev.cli(f"apply ({what} wrong)", "apply", "--yes", str(folder), code=1)
        assert expected in result.stdout + result.stderr, result.stdout + result.stderr
        stderr.append(result.stderr)
    # exit 1 today: status cannot observe the store
    result = ev.cli("status --json (S3 secret wrong)", "status", "--json", code=None)
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr
    warned = [line for err in stderr for line in err.splitlines()
              if "host config" in line and re.search(r"readable|0600|0644|permission|mode", line)]
    print(f"a world-readable host config with keys: {warned or 'no warning'}")

    # the daemon, with every key wrong: one pass fails, its log and events say why
    write_host_config(env, {"local": swift(admin_key, True), "s3": s3}, mode=0o600)
    folder = write_folder(env, "m-all", "".join(tenants.values()) + "".join(buckets.values()))
    log = run_daemon_once(ev, ("--source", str(folder)),
                          lambda f: bool(f.get("lastPassAt") or f.get("attemptedErrors")))
    assert "authentication failed" in log, log[-4000:]
    ev.cli("status (after the daemon)", "status", code=None)  # exit 1 today: observe fails
    path = env.state_dir / "journal.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        events = db.execute("SELECT message FROM events WHERE level = 'error'").fetchall()
    assert any("authentication failed for tenant" in m for (m,) in events), events

    names = [n for user in (objstore.TEST, objstore.TEST2) for n in objstore.containers(objstore.conn(user))]
    assert not [n for n in names if n.startswith(t)], names
    ev.scan_journal()
    ev.scan_files(env.root)
    leaks = ev.leaks()
    figures.record("secrets", canaries=ev.canaries(), places_checked=len(ev.places), leaks=len(leaks))
    assert not leaks, "secrets found where they must not be:\n" + "\n".join(leaks)
