"""End to end: the real `reconciler` console script on a copy of the example cloud.

Every test runs the command line as a subprocess with the in-memory host config of the
`host_config_file` fixture, and checks what it prints, its exit code, and the object
files the in-memory drivers leave under STATE_DIR/memory/KIND/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
ANSI = re.compile(r"\x1b\[")
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)\s*$")
USER_DATA_TEXT = "hostname: web-1"  # a line of web-1's userData in the example

# Environment variables that would make rich colour its output even when piped.
_FORCING = ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "PY_COLORS")


def _command() -> list[str]:
    script = Path(sys.executable).with_name("reconciler")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "reconciler.cli.app"]


def cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
        stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """Run the console script (never on a terminal: stdin, stdout and stderr are pipes)."""
    environ = dict(os.environ) if env is None else env
    for name in _FORCING:
        environ.pop(name, None)
    return subprocess.run(
        [*_command(), *map(str, args)],
        env=environ, cwd=cwd, stdin=stdin, capture_output=True, text=True, timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr + result.stdout
    return result


# --- the host: object files of the in-memory drivers --------------------------------------


@dataclass
class HostObject:
    path: Path
    data: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return self.data["spec"]

    @property
    def orphaned(self) -> bool:
        return bool(self.data["mark"].get("orphaned"))


Key = tuple[str, str, str]  # (kind, tenant, name)


def host_objects(state_dir: Path) -> dict[Key, HostObject]:
    found: dict[Key, HostObject] = {}
    for path in sorted((state_dir / "memory").glob("*/*.json")):
        if path.name.startswith("."):
            continue
        data = json.loads(path.read_text())
        mark = data["mark"]
        key = (mark["kind"], mark["tenant"], mark["name"])
        assert key not in found, f"two host objects for {key}: {found[key].path} and {path}"
        assert mark["kind"] == path.parent.name
        found[key] = HostObject(path, data)
    return found


def object_files(state_dir: Path) -> list[Path]:
    return sorted(p for p in (state_dir / "memory").glob("*/*") if p.is_file())


def snapshot(state_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state_dir)): p.read_bytes() for p in object_files(state_dir)}


# --- the manifests -----------------------------------------------------------------------


def documents(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(folder.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def key_of(doc: dict[str, Any]) -> Key:
    meta = doc["metadata"]
    tenant = meta["name"] if doc["kind"] == "Tenant" else meta["tenant"]
    return (doc["kind"], tenant, meta["name"])


def display(key: Key) -> str:
    kind, tenant, name = key
    return f"Tenant {name}" if kind == "Tenant" else f"{kind} {tenant}/{name}"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"expected exactly one {old!r} in {path}"
    path.write_text(text.replace(old, new))


def remove_document(path: Path, kind: str, name: str) -> None:
    """Drop one document (by kind and name) from a multi-document YAML file, keeping the rest verbatim."""
    text = path.read_text()
    parts = re.split(r"(?m)^---\s*$", text)
    kept = [p for p in parts
            if not re.search(rf"(?m)^kind: {kind}\s*$", p) or not re.search(rf"(?m)^  name: {name}\s*$", p)]
    assert len(kept) == len(parts) - 1, f"{kind} {name} not found exactly once in {path}"
    path.write_text("---".join(kept))


# --- reading plans -------------------------------------------------------------------------

_HEAD = re.compile(r"^  # (?P<display>\S+ \S+) (?P<verb>will be .+?|must be replaced)(?:  \((?P<source>[^)]*)\))?$")
_SYMBOL = re.compile(r"^ *(?P<sym>-/\+|\+/-|[+~!-]) (?P<display>\S+ \S+)$")
_DIFF = re.compile(r"^ {7}~ (?P<path>[^:]+): (?P<old>.*?) -> (?P<new>.*?)(?:   # (?P<tags>.*))?$")
_NOTE = re.compile(r"^ {7}! (?P<note>.*)$")
_ATTR = re.compile(r"^ {7}\+ (?P<name>\w+) = (?P<value>.*)$")


@dataclass
class Block:
    display: str
    verb: str
    symbol: str = ""
    diffs: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # path -> (old, new, tags)
    notes: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


def parse_plan(text: str) -> dict[str, Block]:
    """The resources of a human plan, by display name."""
    blocks: dict[str, Block] = {}
    current: Block | None = None
    for line in text.splitlines():
        if m := _HEAD.match(line):
            current = Block(m["display"], m["verb"])
            assert current.display not in blocks, f"{current.display} listed twice"
            blocks[current.display] = current
        elif current is None:
            continue
        elif (m := _SYMBOL.match(line)) and m["display"] == current.display:
            current.symbol = m["sym"]
        elif m := _DIFF.match(line):
            current.diffs[m["path"]] = (m["old"], m["new"], m["tags"] or "")
        elif m := _NOTE.match(line):
            current.notes.append(m["note"])
        elif m := _ATTR.match(line):
            current.attributes[m["name"]] = m["value"]
    return blocks


def summary(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("Plan: ")]
    assert len(lines) == 1, text
    return lines[0]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def cloud(tmp_path: Path, example_manifests: Path) -> Path:
    """A private copy of the example cloud (the tests edit it)."""
    dest = tmp_path / "cloud"
    shutil.copytree(example_manifests, dest)
    return dest


@pytest.fixture
def expected_keys(cloud: Path) -> set[Key]:
    keys = [key_of(doc) for _, doc in documents(cloud)]
    assert len(keys) == len(set(keys))
    return set(keys)


@pytest.fixture
def applied(cloud: Path, host_config_file: Path, state_dir: Path, expected_keys: set[Key]) -> Path:
    """The example cloud, applied to the in-memory host."""
    result = ok(cli("apply", cloud, "--yes"))
    assert f"Apply complete: {len(expected_keys)} applied, 0 failed, 0 skipped" in result.stdout
    return cloud


def assert_no_changes(cloud: Path) -> None:
    result = ok(cli("plan", cloud, "--detailed-exitcode"), 0)
    assert "No changes. The host matches the manifests." in result.stdout
    assert parse_plan(result.stdout) == {}


# --- the whole loop ------------------------------------------------------------------------


def test_apply_creates_one_object_per_resource_then_plan_has_no_changes(
    cloud: Path, host_config_file: Path, state_dir: Path, expected_keys: set[Key]
) -> None:
    first = ok(cli("plan", cloud, "--detailed-exitcode"), 2)
    blocks = parse_plan(first.stdout)
    assert set(blocks) == {display(k) for k in expected_keys}
    assert {b.symbol for b in blocks.values()} == {"+"}
    assert summary(first.stdout) == f"Plan: {len(expected_keys)} to add, 0 to change, 0 to replace, 0 to destroy."
    assert not (state_dir / "memory").exists(), "plan must not touch the host"

    result = ok(cli("apply", cloud, "--yes"))
    assert f"Apply complete: {len(expected_keys)} applied, 0 failed, 0 skipped" in result.stdout
    assert len(object_files(state_dir)) == len(expected_keys)
    objects = host_objects(state_dir)
    assert set(objects) == expected_keys
    assert not any(o.orphaned for o in objects.values())
    # object files may hold userData: private
    for obj in objects.values():
        assert stat.S_IMODE(obj.path.stat().st_mode) & 0o077 == 0, obj.path

    assert_no_changes(cloud)
    # applying again is a no-op
    again = ok(cli("apply", cloud, "--yes"))
    assert "No changes" in again.stdout
    assert set(host_objects(state_dir)) == expected_keys


def test_in_place_changes_show_exactly_the_edited_fields(applied: Path, state_dir: Path) -> None:
    edit(applied / "globex" / "cloud.yaml", "mtu: 1400", "mtu: 1300")
    compute = applied / "acme" / "compute.yaml"
    text = compute.read_text()
    # web-1 is the first instance; only its memory changes
    compute.write_text(text.replace("memoryMiB: 128", "memoryMiB: 256", 1))

    result = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    blocks = parse_plan(result.stdout)
    assert set(blocks) == {"Network globex/batch", "Instance acme/web-1"}
    net, vm = blocks["Network globex/batch"], blocks["Instance acme/web-1"]
    assert (net.symbol, vm.symbol) == ("~", "~")
    assert net.verb == vm.verb == "will be updated in place"
    assert net.diffs == {"mtu": ("1400", "1300", "")}
    assert vm.diffs == {"memoryMiB": ("128", "256", "needs restart")}
    assert any("memoryMiB" in note and "restart" in note for note in vm.notes)
    assert summary(result.stdout) == "Plan: 0 to add, 2 to change, 0 to replace, 0 to destroy."

    as_json = json.loads(ok(cli("plan", applied, "--json")).stdout)
    acting = {(c["kind"], c["tenant"], c["name"]): c for c in as_json["changes"] if c["action"] != "noop"}
    assert set(acting) == {("Network", "globex", "batch"), ("Instance", "acme", "web-1")}
    assert [d["path"] for d in acting[("Network", "globex", "batch")]["diffs"]] == [["mtu"]]
    assert [(d["path"], d["old"], d["new"], d["policy"]) for d in acting[("Instance", "acme", "web-1")]["diffs"]] \
        == [(["memoryMiB"], 128, 256, "restart")]

    before = host_objects(state_dir)
    ok(cli("apply", applied, "--yes"))
    after = host_objects(state_dir)
    assert after[("Network", "globex", "batch")].spec["mtu"] == 1300
    assert after[("Instance", "acme", "web-1")].spec["memoryMiB"] == 256
    assert after[("Instance", "acme", "web-2")].spec == before[("Instance", "acme", "web-2")].spec
    # updated in place: the same host objects
    assert after[("Network", "globex", "batch")].path == before[("Network", "globex", "batch")].path
    assert_no_changes(applied)


def test_subnet_cidr_change_forces_replacement(applied: Path, state_dir: Path) -> None:
    edit(applied / "globex" / "cloud.yaml", "cidr: 10.20.1.0/24", "cidr: 10.20.5.0/24")
    result = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    blocks = parse_plan(result.stdout)
    # the instance on it gets an address in the new subnet, and the network its new port
    assert set(blocks) == {"Network globex/analytics", "Instance globex/app-1"}
    block = blocks["Network globex/analytics"]
    assert block.symbol == "-/+"
    assert block.verb == "must be replaced"
    assert block.diffs["subnets[0].cidr"] == ('"10.20.1.0/24"', '"10.20.5.0/24"', "forces replacement")
    assert set(block.diffs) == {"subnets[0].cidr", "ports.globex/app-1.ip"}
    losing = [n for n in block.notes if "loses its address" in n]
    assert len(losing) == 1 and "Instance globex/app-1" in losing[0], block.notes
    (ip_diff,) = blocks["Instance globex/app-1"].diffs.values()
    assert ip_diff[1].startswith('"10.20.5.')
    assert summary(result.stdout) == "Plan: 0 to add, 1 to change, 1 to replace, 0 to destroy."

    ok(cli("apply", applied, "--yes"))
    net = host_objects(state_dir)[("Network", "globex", "analytics")]
    assert [s["cidr"] for s in net.spec["subnets"]] == ["10.20.5.0/24"]
    assert_no_changes(applied)


def test_removing_an_instance_destroys_it(applied: Path, state_dir: Path) -> None:
    web2 = host_objects(state_dir)[("Instance", "acme", "web-2")].path
    remove_document(applied / "acme" / "compute.yaml", "Instance", "web-2")
    result = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    blocks = parse_plan(result.stdout)
    # its port leaves the network (DHCP reservation) and the group naming its group as a remote
    assert set(blocks) == {"Instance acme/web-2", "Network acme/web", "SecurityGroup acme/db"}
    assert blocks["Instance acme/web-2"].symbol == "-"
    assert blocks["Instance acme/web-2"].verb == "will be destroyed"
    assert set(blocks["Network acme/web"].diffs) == {"ports.acme/web-2"}
    assert summary(result.stdout) == "Plan: 0 to add, 2 to change, 0 to replace, 1 to destroy."

    ok(cli("apply", applied, "--yes"))
    assert not web2.exists()
    assert ("Instance", "acme", "web-2") not in host_objects(state_dir)
    assert_no_changes(applied)


def test_removing_a_retain_volume_orphans_it(applied: Path, state_dir: Path) -> None:
    compute = applied / "acme" / "compute.yaml"
    edit(compute, "  volumes:\n    - {volume: pgdata}\n", "")
    remove_document(compute, "Volume", "pgdata")
    result = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    blocks = parse_plan(result.stdout)
    assert set(blocks) == {"Volume acme/pgdata", "Instance acme/db-1"}
    assert blocks["Volume acme/pgdata"].symbol == "!"
    assert "orphaned" in blocks["Volume acme/pgdata"].verb
    assert blocks["Instance acme/db-1"].symbol == "~"
    assert set(blocks["Instance acme/db-1"].diffs) == {"volumes[0]"}
    assert "1 to orphan" in summary(result.stdout)

    ok(cli("apply", applied, "--yes"))
    volume = host_objects(state_dir)[("Volume", "acme", "pgdata")]
    assert volume.path.exists()
    assert volume.orphaned
    assert volume.spec["sizeGiB"] == 2
    assert host_objects(state_dir)[("Instance", "acme", "db-1")].spec["volumes"] == []
    assert_no_changes(applied)
    rows = {(r["kind"], r["tenant"], r["name"]): r for r in json.loads(ok(cli("status", "--json")).stdout)}
    assert rows[("Volume", "acme", "pgdata")]["state"] == "orphaned"


def test_destroy_removes_all_but_retained_objects(applied: Path, state_dir: Path) -> None:
    docs = documents(applied)
    retained = {key_of(d) for _, d in docs
                if d["kind"] in ("Volume", "Bucket") and (d.get("spec") or {}).get("deletionPolicy", "Retain") == "Retain"}
    assert ("Volume", "acme", "pgdata") in retained and ("Volume", "globex", "scratch") not in retained
    holders = {("Tenant", t, t) for _, t, _ in retained}

    result = ok(cli("destroy", applied, "--yes"))
    blocks = parse_plan(result.stdout)
    assert {d for d, b in blocks.items() if b.symbol == "!"} == {display(k) for k in retained | holders}
    assert all(b.symbol == "-" for d, b in blocks.items() if b.symbol != "!")

    left = host_objects(state_dir)
    assert set(left) == retained | holders
    assert all(obj.orphaned for obj in left.values())
    assert len(object_files(state_dir)) == len(left)

    rows = json.loads(ok(cli("status", "--json")).stdout)
    assert rows, "the retained objects are still on the host"
    assert {(r["kind"], r["tenant"], r["name"]) for r in rows} == retained | holders
    assert {r["state"] for r in rows} == {"orphaned"}


def test_destroy_twice_has_nothing_left_to_do(applied: Path, state_dir: Path) -> None:
    ok(cli("destroy", applied, "--yes"))
    before = snapshot(state_dir)
    again = ok(cli("destroy", applied, "--yes"))
    assert snapshot(state_dir) == before
    assert parse_plan(again.stdout) == {}, again.stdout


# --- drift ----------------------------------------------------------------------------------


def test_drift_is_shown_and_healed(applied: Path, state_dir: Path) -> None:
    obj = host_objects(state_dir)[("Instance", "acme", "web-2")]
    data = obj.data
    data["spec"]["powerState"] = "stopped"
    obj.path.write_text(json.dumps(data))

    result = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    blocks = parse_plan(result.stdout)
    assert set(blocks) == {"Instance acme/web-2"}
    old, new, tags = blocks["Instance acme/web-2"].diffs["powerState"]
    assert (old, new) == ('"stopped"', '"running"')
    assert "drift" in tags
    assert len(blocks["Instance acme/web-2"].diffs) == 1
    change = next(c for c in json.loads(ok(cli("plan", applied, "--json")).stdout)["changes"]
                  if c["name"] == "web-2")
    assert [(d["path"], d["cause"]) for d in change["diffs"]] == [(["powerState"], "drift")]

    status = {(r["kind"], r["tenant"], r["name"]): r for r in json.loads(ok(cli("status", "--json")).stdout)}
    assert status[("Instance", "acme", "web-2")]["state"] == "drifted"

    ok(cli("apply", applied, "--yes"))
    assert host_objects(state_dir)[("Instance", "acme", "web-2")].spec["powerState"] == "running"
    assert_no_changes(applied)


# --- saved plans ----------------------------------------------------------------------------


def test_saved_plan_is_private_and_applies_exactly_itself(
    cloud: Path, host_config_file: Path, state_dir: Path, tmp_path: Path, expected_keys: set[Key]
) -> None:
    saved = tmp_path / "f.json"
    saved.write_text("")
    saved.chmod(0o644)  # an existing file is made private too
    result = ok(cli("plan", cloud, "--out", saved, "--detailed-exitcode"), 2)
    assert "Saved the plan" in result.stdout
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert not (state_dir / "memory").exists()

    # the manifests change after the plan was saved: apply FILE applies the plan, not them
    edit(cloud / "globex" / "cloud.yaml", "mtu: 1400", "mtu: 1300")
    remove_document(cloud / "acme" / "compute.yaml", "Instance", "web-2")
    applied = ok(cli("apply", saved))  # a saved plan was reviewed already: no --yes needed
    assert f"Apply complete: {len(expected_keys)} applied" in applied.stdout
    objects = host_objects(state_dir)
    assert set(objects) == expected_keys
    assert objects[("Network", "globex", "batch")].spec["mtu"] == 1400

    # the manifests now differ from what was applied by exactly those edits
    blocks = parse_plan(ok(cli("plan", cloud, "--detailed-exitcode"), 2).stdout)
    assert set(blocks) == {"Network globex/batch", "Instance acme/web-2", "Network acme/web",
                           "SecurityGroup acme/db"}
    assert blocks["Instance acme/web-2"].symbol == "-"

    # an applied plan cannot be applied twice
    before = snapshot(state_dir)
    again = ok(cli("apply", saved), 1)
    assert "changed since the plan was made" in again.stderr
    assert snapshot(state_dir) == before


def test_saved_plan_is_refused_when_the_host_changed(
    applied: Path, state_dir: Path, tmp_path: Path
) -> None:
    edit(applied / "globex" / "cloud.yaml", "mtu: 1400", "mtu: 1300")
    saved = tmp_path / "plan.json"
    ok(cli("plan", applied, "--out", saved))

    obj = host_objects(state_dir)[("Network", "globex", "batch")]
    obj.data["spec"]["mtu"] = 9000  # someone changed it on the host since
    obj.path.write_text(json.dumps(obj.data))
    before = snapshot(state_dir)

    result = ok(cli("apply", saved, "--yes"), 1)
    message = result.stderr.strip()
    assert "host changed since the plan was made" in message
    assert "Network globex/batch" in message
    assert "nothing was applied" in message
    assert len(message.splitlines()) == 1
    assert snapshot(state_dir) == before


def test_saved_plan_without_changes(applied: Path, state_dir: Path, tmp_path: Path) -> None:
    saved = tmp_path / "noop.json"
    ok(cli("plan", applied, "--out", saved, "--detailed-exitcode"), 0)
    before = snapshot(state_dir)
    result = ok(cli("apply", saved))
    assert "No changes in this plan." in result.stdout
    assert snapshot(state_dir) == before


def test_a_file_that_is_not_a_plan_is_refused(applied: Path, state_dir: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"format": 99, "changes": []}')
    before = snapshot(state_dir)
    result = ok(cli("apply", bogus, "--yes"), 1)
    assert "not a usable saved plan" in result.stderr
    assert snapshot(state_dir) == before


# --- sensitive values -----------------------------------------------------------------------


def test_json_plan_hides_user_data_the_saved_plan_keeps_it(
    cloud: Path, host_config_file: Path, tmp_path: Path, expected_keys: set[Key]
) -> None:
    assert USER_DATA_TEXT in (cloud / "acme" / "compute.yaml").read_text()
    result = ok(cli("plan", cloud, "--json", "--detailed-exitcode"), 2)
    assert USER_DATA_TEXT not in result.stdout and "#cloud-config" not in result.stdout
    data = json.loads(result.stdout)
    assert data["summary"]["create"] == len(expected_keys)
    assert sum(data["summary"].values()) == len(data["changes"]) == len(expected_keys)
    assert data["errors"] == []
    assert all("target" not in c for c in data["changes"])

    saved = tmp_path / "plan.json"
    out = ok(cli("plan", cloud, "--json", "--out", saved))
    assert USER_DATA_TEXT not in out.stdout
    saved_text = saved.read_text()
    assert USER_DATA_TEXT in saved_text
    web1 = next(c for c in json.loads(saved_text)["changes"] if c["name"] == "web-1")
    assert USER_DATA_TEXT in web1["target"]["spec"]["userData"]


def test_human_plans_never_show_user_data(applied: Path, state_dir: Path, tmp_path: Path) -> None:
    # creation (on a fresh host)
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(f"stateDir: {tmp_path / 'fresh-state'}\ndrivers: memory\n")
    created = ok(cli("plan", applied, "--host-config", fresh))
    assert USER_DATA_TEXT not in created.stdout and "#cloud-config" not in created.stdout
    assert parse_plan(created.stdout)["Instance acme/web-1"].attributes["userData"] == "(sensitive)"

    # an update of userData
    edit(applied / "acme" / "compute.yaml", "hostname: web-1", "hostname: web-one")
    updated = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    assert "web-one" not in updated.stdout and USER_DATA_TEXT not in updated.stdout
    block = parse_plan(updated.stdout)["Instance acme/web-1"]
    assert block.diffs == {"userData": ("(sensitive)", "(sensitive)", "needs restart")}
    as_json = ok(cli("plan", applied, "--json"))
    assert "web-one" not in as_json.stdout and USER_DATA_TEXT not in as_json.stdout

    applying = ok(cli("apply", applied, "--yes"))
    assert "web-one" not in applying.stdout + applying.stderr
    assert "hostname: web-one" in host_objects(state_dir)[("Instance", "acme", "web-1")].spec["userData"]
    status = ok(cli("status"))
    assert "web-one" not in status.stdout


# --- terminals ------------------------------------------------------------------------------


@pytest.mark.parametrize("no_color", [True, False], ids=["NO_COLOR", "piped"])
def test_no_ansi_escapes_when_piped(
    cloud: Path, host_config_file: Path, tmp_path: Path, no_color: bool
) -> None:
    env = dict(os.environ)
    if not no_color:
        env.pop("NO_COLOR", None)
    env["TERM"] = "xterm-256color"
    # an error too, so stderr is covered
    outputs = [
        ok(cli("validate", cloud, env=env)),
        ok(cli("plan", cloud, env=env)),
        ok(cli("apply", cloud, "--yes", env=env)),
        ok(cli("status", env=env)),
        ok(cli("graph", cloud, env=env)),
        ok(cli("plan", tmp_path / "missing", env=env), 1),
    ]
    for result in outputs:
        assert not ANSI.search(result.stdout), result.args
        assert not ANSI.search(result.stderr), result.args
    assert outputs[-1].stderr.strip()


def test_apply_without_yes_off_a_terminal_refuses(
    cloud: Path, host_config_file: Path, state_dir: Path
) -> None:
    result = ok(cli("apply", cloud), 1)
    assert "Pass --yes" in result.stderr
    assert object_files(state_dir) == []
    # the same for destroy, once something exists
    ok(cli("apply", cloud, "--yes"))
    before = snapshot(state_dir)
    refused = ok(cli("destroy", cloud), 1)
    assert "Pass --yes" in refused.stderr
    assert snapshot(state_dir) == before


def test_apply_gives_up_when_the_host_lock_is_held(
    cloud: Path, host_config_file: Path, state_dir: Path
) -> None:
    from reconciler.lock import HostLock

    with HostLock(state_dir, 0, what="test holding the lock"):
        result = ok(cli("apply", cloud, "--yes", "--lock-timeout", "0"), 1)
    assert "holds the host lock" in result.stderr
    assert object_files(state_dir) == []
    ok(cli("apply", cloud, "--yes", "--parallelism", "1"))


# --- graph and status -----------------------------------------------------------------------


def expected_edges(folder: Path) -> set[tuple[str, str]]:
    """Dependency -> dependent, worked out from the documents themselves."""
    edges: set[tuple[str, str]] = set()
    for _, doc in documents(folder):
        key = key_of(doc)
        kind, tenant, _ = key
        spec = doc.get("spec") or {}
        me = display(key)

        def dep(k: str, name: str, t: str = tenant) -> None:
            edges.add((display((k, t, name)), me))

        if kind != "Tenant":
            dep("Tenant", tenant, tenant)
        if kind == "Instance":
            dep("Image", spec["image"])
            for nic in spec.get("networks", []):
                dep("Network", nic["network"])
                for group in nic.get("securityGroups", []):
                    dep("SecurityGroup", group)
            for att in spec.get("volumes", []):
                dep("Volume", att["volume"])
        elif kind == "Router":
            for net in spec.get("networks", []):
                dep("Network", net)
            if spec.get("external"):
                other, _, name = spec["external"].rpartition("/")
                dep("Network", name, other or tenant)
        for entry in doc["metadata"].get("dependsOn", []):
            k, _, name = entry.partition("/")
            dep(k, name, name if k == "Tenant" else tenant)
    return edges


def parse_graph(text: str, fmt: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    if fmt == "dot":
        assert text.startswith("digraph ")
        nodes = dict(re.findall(r'^  (n\d+) \[label="([^"]*)"\];$', text, re.M))
        pairs = re.findall(r"^  (n\d+) -> (n\d+);$", text, re.M)
    else:
        assert text.startswith("flowchart ")
        nodes = dict(re.findall(r'^  (n\d+)\["([^"]*)"\]$', text, re.M))
        pairs = re.findall(r"^  (n\d+) --> (n\d+)$", text, re.M)
    return nodes, {(nodes[a], nodes[b]) for a, b in pairs}


@pytest.mark.parametrize("fmt", ["dot", "mermaid"])
def test_graph_lists_every_resource_and_edge(
    cloud: Path, host_config_file: Path, expected_keys: set[Key], fmt: str
) -> None:
    result = ok(cli("graph", cloud, "--format", fmt))
    nodes, edges = parse_graph(result.stdout, fmt)
    assert sorted(nodes.values()) == sorted(display(k) for k in expected_keys)
    assert ("Tenant acme", "Network acme/web") in edges
    assert ("Network infra/public", "Router acme/edge") in edges
    assert ("Volume acme/pgdata", "Instance acme/db-1") in edges
    # security groups naming each other imply no order
    assert ("SecurityGroup acme/web", "SecurityGroup acme/db") not in edges
    assert edges == expected_edges(cloud)


def test_graph_default_format_is_dot(cloud: Path, host_config_file: Path) -> None:
    assert ok(cli("graph", cloud)).stdout == ok(cli("graph", cloud, "--format", "dot")).stdout


def test_status_json_rows_have_host_identities(applied: Path, expected_keys: set[Key]) -> None:
    rows = json.loads(ok(cli("status", "--json")).stdout)
    assert isinstance(rows, list)
    for row in rows:
        assert {"kind", "tenant", "name", "state", "host"} <= set(row)
        assert isinstance(row["host"], dict)
    by_key = {(r["kind"], r["tenant"], r["name"]): r for r in rows}
    assert set(by_key) == expected_keys
    assert {r["state"] for r in rows} == {"ready"}
    identity = {"Instance": "domain", "Network": "bridge", "Router": "namespace", "SecurityGroup": "nftSet",
                "Image": "image", "Volume": "volume", "Bucket": "container", "Tenant": "account"}
    for key, row in by_key.items():
        assert row["host"].get(identity[key[0]]), row
    assert by_key[("Instance", "acme", "web-1")]["host"]["domain"]
    assert by_key[("Network", "acme", "web")]["host"]["bridge"]
    # with explicit manifests too
    explicit = json.loads(ok(cli("status", applied, "--json")).stdout)
    assert {(r["kind"], r["tenant"], r["name"]) for r in explicit} == expected_keys


def test_human_status_shows_resources_and_recent_applies(applied: Path, state_dir: Path) -> None:
    edit(applied / "globex" / "cloud.yaml", "mtu: 1400", "mtu: 1300")
    ok(cli("apply", applied, "--yes"))
    result = ok(cli("status"))
    text = result.stdout
    assert "Recent applies" in text
    history = text.split("Recent applies", 1)[1]
    assert "23 created" in history
    assert "1 updated" in history
    rows = [line.split() for line in text.split("Recent applies", 1)[0].splitlines()]
    assert ["Instance", "acme", "web-1", "ready"] in [r[:4] for r in rows]
    assert ["Network", "globex", "batch", "ready"] in [r[:4] for r in rows]


def test_status_on_an_empty_host(host_config_file: Path) -> None:
    result = ok(cli("status"))
    assert "Nothing on this host is managed by reconciler yet." in result.stdout
    assert json.loads(ok(cli("status", "--json")).stdout) == []


# --- schemas --------------------------------------------------------------------------------


def test_checked_in_schemas_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    ok(cli("schema", "--out", out))
    generated = sorted(p.name for p in out.iterdir())
    checked_in = sorted(p.name for p in SCHEMAS.glob("*.json"))
    assert generated == checked_in, "schemas/ lacks or has extra files: run `make schemas`"
    stale = [name for name in generated if (out / name).read_bytes() != (SCHEMAS / name).read_bytes()]
    assert not stale, f"schemas/ is stale (run `make schemas`): {stale}"


def _modeline(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    m = MODELINE.match(first)
    assert m, f"{path} does not start with a `# yaml-language-server: $schema=` modeline: {first!r}"
    return m.group(1)


def example_files() -> list[Path]:
    files = sorted((ROOT / "manifests").rglob("*.yaml")) + sorted((ROOT / "manifests").rglob("*.yml"))
    assert files
    return files


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(ROOT / "manifests")))
def test_example_manifest_has_a_schema_modeline(path: Path) -> None:
    target = (path.parent / _modeline(path)).resolve()
    assert target.is_file(), f"{path}: modeline points at {target}, which does not exist"
    assert target.parent == SCHEMAS.resolve(), f"{path}: modeline points outside schemas/: {target}"
    schema = json.loads(target.read_text())
    if target.name != "manifest.json":
        # a per-kind schema only fits files with documents of that kind
        kinds = {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
        assert kinds == {schema["title"]}, f"{path}: {target.name} does not fit kinds {kinds}"


def _validator(schema_name: str) -> Any:
    try:
        import jsonschema  # noqa: F401
        from jsonschema import Draft202012Validator
    except ImportError:
        return None
    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    try:
        from referencing import Registry, Resource

        registry = Registry().with_resources((name, Resource.from_contents(s)) for name, s in schemas.items())
        return Draft202012Validator(schemas[schema_name], registry=registry)
    except ImportError:  # older jsonschema
        resolver = jsonschema.RefResolver(base_uri="", referrer=schemas[schema_name], store=schemas)
        return Draft202012Validator(schemas[schema_name], resolver=resolver)


def _check_known_fields(doc: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    """Without jsonschema: every field of the document is declared in the schema file."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return defs[ref.rsplit("/", 1)[1]] if ref else node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        for option in node.get("anyOf", []):
            if resolve(option).get("type") == "object" and isinstance(value, dict):
                node = resolve(option)
        if isinstance(value, dict) and "properties" in node:
            props = node["properties"]
            if node.get("additionalProperties") is False:
                extra = set(value) - set(props)
                assert not extra, f"{where}: {path}: fields not in the schema: {extra}"
            for name, sub in value.items():
                if name in props:
                    walk(sub, props[name], f"{path}.{name}")
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                walk(item, node["items"], f"{path}[{i}]")

    walk(doc, schema, "")


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(ROOT / "manifests")))
def test_example_documents_validate_against_their_schema(path: Path) -> None:
    from reconciler.models import KINDS, document_model

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    modeline_schema = (path.parent / _modeline(path)).resolve().name
    for i, doc in enumerate(docs):
        where = f"{path}#{i}"
        assert doc.get("kind") in KINDS, where
        own = f"{doc['kind'].lower()}.json"
        schema = json.loads((SCHEMAS / own).read_text())
        assert schema["properties"]["kind"]["const"] == doc["kind"]
        for name in {own, modeline_schema}:
            validator = _validator(name)
            if validator is not None:
                errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
                assert not errors, f"{where} against {name}: " + "; ".join(e.message for e in errors)
        if _validator(own) is None:
            # jsonschema is not installed: the models the schemas are generated from, and the schema's fields
            document_model(doc["kind"]).model_validate(doc)
            _check_known_fields(doc, schema, where)


# --- validate and errors --------------------------------------------------------------------


def test_validate_the_example(cloud: Path, expected_keys: set[Key]) -> None:
    result = ok(cli("validate", cloud))
    assert result.stdout.strip() == f"Valid: {len(expected_keys)} resources."


def test_validate_reports_file_line_and_field(cloud: Path) -> None:
    edit(cloud / "globex" / "cloud.yaml", "mtu: 1400", "mtu: 100")
    result = ok(cli("validate", cloud), 1)
    lines = result.stderr.strip().splitlines()
    problem = [line for line in lines if "cloud.yaml" in line]
    assert len(problem) == 1
    assert re.search(r"globex/cloud\.yaml:\d+: Network globex/batch: spec\.mtu: ", problem[0]), problem[0]
    assert "1 error(s); nothing was changed." in lines[-1]


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    ok(result, 1)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "an error must say what is wrong"
    assert result.stdout.strip() == ""
    return "\n".join(lines)


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["apply", "--yes"], ["destroy", "--yes"], ["graph"],
                                     ["status"]])
def test_a_nonexistent_path_is_one_clear_error(
    command: list[str], host_config_file: Path, tmp_path: Path, state_dir: Path
) -> None:
    missing = tmp_path / "no-such-folder"
    message = _one_line_error(cli(*command[:1], missing, *command[1:]))
    first, *rest = message.splitlines()
    assert str(missing) in first and "no such file or folder" in first
    assert rest in ([], ["1 error(s); nothing was changed."]), message
    assert object_files(state_dir) == []


def test_a_host_config_with_invalid_settings_is_one_clear_error(cloud: Path, tmp_path: Path) -> None:
    bad = tmp_path / "host.yaml"
    bad.write_text("stateDir: /nonexistent/state\ndriverz: memory\n")
    env = dict(os.environ, RECONCILER_HOST_CONFIG=str(bad))
    message = _one_line_error(cli("plan", cloud, env=env))
    assert str(bad) in message and "driverz" in message


def test_a_host_config_that_is_not_yaml_is_one_clear_error(cloud: Path, tmp_path: Path) -> None:
    bad = tmp_path / "host.yaml"
    bad.write_text("stateDir: [unclosed\ndrivers: memory\n")
    env = dict(os.environ, RECONCILER_HOST_CONFIG=str(bad))
    message = _one_line_error(cli("plan", cloud, env=env))
    assert str(bad) in message
    assert "<unicode string>" not in message
    assert len(message.splitlines()) == 1, message


def test_a_missing_host_config_is_one_clear_error(cloud: Path, tmp_path: Path) -> None:
    env = dict(os.environ, RECONCILER_HOST_CONFIG=str(tmp_path / "nope.yaml"))
    message = _one_line_error(cli("plan", cloud, env=env))
    assert len(message.splitlines()) == 1
    assert "nope.yaml" in message and "does not exist" in message


@pytest.mark.parametrize("command", [["plan"], ["apply", "--yes"], ["destroy", "--yes"], ["status"]])
def test_real_drivers_are_one_clear_error(cloud: Path, tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "host.yaml"
    state = tmp_path / "real-state"
    config.write_text(f"stateDir: {state}\ndrivers: real\n")
    env = dict(os.environ, RECONCILER_HOST_CONFIG=str(config), NO_COLOR="1")
    args = [command[0]] + ([] if command[0] == "status" else [str(cloud)]) + command[1:]
    message = _one_line_error(cli(*args, env=env))
    assert len(message.splitlines()) == 1, message
    assert "not available in this version" in message
    assert "drivers: memory" in message
    assert not (state / "memory").exists()


@pytest.mark.parametrize("command", [
    ["validate", "{cloud}"], ["plan", "{cloud}"], ["apply", "{cloud}", "--yes"], ["destroy", "{cloud}", "--yes"],
    ["graph", "{cloud}"], ["status"], ["schema", "--out", "{tmp}/schemas"], ["version"],
])
def test_every_command_accepts_host_config(command: list[str], cloud: Path, tmp_path: Path) -> None:
    state = tmp_path / "own-state"
    config = tmp_path / "own-host.yaml"
    config.write_text(f"stateDir: {state}\ndrivers: memory\n")
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_HOST_CONFIG"}
    args = [a.format(cloud=cloud, tmp=tmp_path) for a in command]
    ok(cli(*args, "--host-config", config, env=env))
    if command[0] == "apply":
        # it used the state directory of that config, not the default
        assert len(list((state / "memory").rglob("*.json"))) > 0


# --- import: adopting an object without our mark ---------------------------------------


def test_import_adopts_an_unmarked_object_then_plan_shows_its_differences(
    applied: Path, state_dir: Path
) -> None:
    web2 = host_objects(state_dir)[("Instance", "acme", "web-2")]
    # someone made web-2's object by hand: same name, no mark, other values
    hand_made = {"spec": {**web2.spec, "vcpus": 3}}
    web2.path.write_text(json.dumps(hand_made))
    result = ok(cli("plan", applied), 1)
    assert "conflict" in (result.stdout + result.stderr)
    assert json.loads(web2.path.read_text()) == hand_made  # untouched by plan

    result = ok(cli("import", "Instance/acme/web-2", "-m", applied))
    assert "Imported Instance acme/web-2" in result.stdout
    assert json.loads(web2.path.read_text())["mark"]["name"] == "web-2"
    assert json.loads(web2.path.read_text())["spec"]["vcpus"] == 3  # only the mark was written

    result = ok(cli("plan", applied, "--detailed-exitcode"), 2)
    assert "vcpus: 3 -> " in result.stdout.replace("~ ", "")
    ok(cli("apply", applied, "--yes"))
    assert_no_changes(applied)


def test_import_refuses_what_it_cannot_adopt(applied: Path, state_dir: Path) -> None:
    before = snapshot(state_dir)
    result = ok(cli("import", "Instance/acme/web-2", "-m", applied), 1)
    assert "already managed" in result.stderr
    result = ok(cli("import", "Instance/acme/nope", "-m", applied), 1)
    assert "not in the manifests" in result.stderr
    result = ok(cli("import", "Bogus/acme/x", "-m", applied), 1)
    assert "is not KIND/TENANT/NAME" in result.stderr
    assert snapshot(state_dir) == before
