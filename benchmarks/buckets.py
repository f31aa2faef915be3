"""Buckets on the object store driver: observe and plan with many Swift containers;
writes a section of docs/benchmarks.md.

    python -m benchmarks.buckets --write docs/benchmarks.md

A command, never a test. Needs the Swift all-in-one on 127.0.0.1:8080
(scripts/setup-swift.sh, part of `make services`). Each run uses its own tenant
`rcbench<hex>`, with no credentials in the host config, so its buckets go to the account
`AUTH_rcbench<hex>`, reached by the reseller admin (admin:admin); the host config and
state dir are in a temporary directory, removed at the end. Every container of that
account is deleted at the end with plain swiftclient (the account itself is left: a
deleted Swift account stays a tombstone that refuses new containers).

- `--count` (500) buckets in one Tenant (a quarter public-read, a fifth versioned, a third
  with a quota, half with metadata; all `deletionPolicy: Delete`), all made by one
  `reconciler apply` (timed).
- then `--repeat` (5) times: the driver's observe (in this process, a driver built afresh
  as `reconciler plan` builds it: one account listing, one HEAD per container, 8 at once),
  and a whole `reconciler plan` process over all of them (must plan no change).
- once more, untimed: the observe with every HTTP request counted (by kind, with its
  latency) and the CPU the Swift servers used meanwhile (from /proc, by their PID files).
- then `reconciler destroy` of everything, timed; a plain listing of the account must then
  be empty.

Before it starts it waits (5 minutes at most) until no test run or other reconciler
command runs; what it still saw is in the section's last line.

Figures are medians with min and max. With `--write FILE` only the part of FILE between
`<!-- buckets:begin -->` and `<!-- buckets:end -->` is replaced.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from benchmarks import _section
from benchmarks._section import log, run, spread_ms
from benchmarks._section import timed_cli as cli

BEGIN = "<!-- buckets:begin -->"
END = "<!-- buckets:end -->"
REPO = Path(__file__).resolve().parents[1]
PROXY = "http://127.0.0.1:8080"
AUTH_URL = PROXY + "/auth/v1.0"
ADMIN, ADMIN_KEY = "admin:admin", "admin"


def swift_answers() -> bool:
    try:
        with urllib.request.urlopen(PROXY + "/healthcheck", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Account:
    """The bench tenant's Swift account, seen by plain swiftclient as the reseller admin."""

    def __init__(self, tenant: str):
        import swiftclient

        self.name = "AUTH_" + tenant
        url, _ = swiftclient.get_auth(AUTH_URL, ADMIN, ADMIN_KEY, timeout=10)
        self.url = url.rstrip("/").rsplit("/", 1)[0] + "/" + self.name
        self.conn = swiftclient.Connection(AUTH_URL, ADMIN, ADMIN_KEY, auth_version="1", timeout=30,
                                           retries=2, os_options={"object_storage_url": self.url})

    def containers(self) -> list[str]:
        from swiftclient.exceptions import ClientException

        try:
            _, listing = self.conn.get_account(full_listing=True)
        except ClientException as exc:
            if exc.http_status == 404:  # never made: nothing in it
                return []
            raise
        return [c["name"] for c in listing]

    def empty(self) -> list[str]:
        """Delete every container (and its objects); the account stays. What is left."""
        from swiftclient.exceptions import ClientException

        for name in self.containers():
            try:
                _, objects = self.conn.get_container(name, full_listing=True)
                for obj in objects:
                    self.conn.delete_object(name, obj["name"])
                self.conn.delete_container(name)
            except ClientException as exc:
                log(f"cleanup: container {name}: {exc}")
        return self.containers()


def manifests(folder: Path, tenant: str, n: int) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    docs: list[dict[str, Any]] = [{"apiVersion": "reconciler/v1", "kind": "Tenant",
                                   "metadata": {"name": tenant}, "spec": {}}]
    for i in range(n):
        spec: dict[str, Any] = {"deletionPolicy": "Delete"}
        if i % 4 == 0:
            spec["acl"] = "public-read"
        if i % 5 == 0:
            spec["versioning"] = True
        if i % 3 == 0:
            spec["quota"] = {"bytes": 1024**3, "objects": 10000}
        if i % 2 == 0:
            spec["metadata"] = {"owner": f"team-{i % 7}", "purpose": "benchmark"}
        docs.append({"apiVersion": "reconciler/v1", "kind": "Bucket",
                     "metadata": {"name": f"b-{i:04d}", "tenant": tenant}, "spec": spec})
    (folder / "buckets.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def _planned_line(stderr: str) -> dict[str, Any] | None:
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("event") == "planned":
                return data
    return None


class Requests:
    """Counts the HTTP requests swiftclient sends (all go through requests.Session.request),
    by kind, with their wall times."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def __enter__(self) -> "Requests":
        import requests

        self._original = original = requests.Session.request
        counter = self

        def request(session: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            path = url.split("://", 1)[-1].split("?", 1)[0].split("/", 1)[-1].rstrip("/")
            if path.startswith("auth/"):
                what = "auth"
            elif path.count("/") == 1:  # v1/AUTH_x
                what = f"{method} account"
            else:
                what = f"{method} container"
            started = time.perf_counter()
            try:
                return original(session, method, url, *args, **kwargs)
            finally:
                took = time.perf_counter() - started
                with counter._lock:
                    counter.times[what].append(took)

        requests.Session.request = request  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        import requests

        requests.Session.request = self._original  # type: ignore[method-assign]


def other_work(tenant: str) -> set[str]:
    """Test runs and reconciler commands on this host other than ours."""
    found, me = set(), os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            text = " ".join(c.decode(errors="replace") for c in cmdline)
        except OSError:
            continue
        if "pytest" in text:
            found.add("pytest")
        elif "benchmarks." in text and "benchmarks.buckets" not in text:
            found.add("another benchmark")
        elif ".venv/bin/reconciler" in text and tenant not in text:
            found.add("another reconciler command")
    return found


class Watch:
    """Other work on the host during the run, and the load average."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.seen: dict[str, list[str]] = {}  # what ran -> when (the phases that saw it)
        self.load: list[float] = []
        self.sample("start")

    def sample(self, phase: str) -> None:
        """Called at the end of each phase: what runs now likely ran during it."""
        for what in other_work(self.tenant):
            self.seen.setdefault(what, []).append(phase)
        self.load.append(os.getloadavg()[0])

    def wait_quiet(self, limit_s: float) -> None:
        """Wait (up to `limit_s`) until no other test run or reconciler command runs."""
        deadline = time.monotonic() + limit_s
        while (busy := other_work(self.tenant)) and time.monotonic() < deadline:
            log(f"waiting for other work to end: {', '.join(sorted(busy))}")
            time.sleep(10)


SERVERS = ("proxy-server", "container-server", "account-server", "memcached")


def server_cpu() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each Swift server process of the
    all-in-one (by the PID files of scripts/setup-swift.sh); those not readable are left out."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in SERVERS:
        try:
            pid = Path(f"/run/swift-aio/{name}.pid").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _fresh_driver(config: Path) -> Any:
    from reconciler.drivers.registry import build_drivers
    from reconciler.hostconfig import load_host_config

    return build_drivers(load_host_config(config))["Bucket"]


def measure(n: int, repeat: int) -> dict[str, Any]:
    tenant = "rcbench" + secrets.token_hex(3)
    work = Path(tempfile.mkdtemp(prefix=f"{tenant}-"))
    account = Account(tenant)
    if account.containers():
        raise RuntimeError(f"account {account.name} already holds containers")
    watch = Watch(tenant)
    watch.wait_quiet(300)
    watch = Watch(tenant)
    try:
        config = work / "host.yaml"
        drivers = {k: "memory" for k in ("Tenant", "Network", "Router", "SecurityGroup", "Image", "Instance",
                                         "Volume")}
        drivers["Bucket"] = "objectstore"
        config.write_text(yaml.safe_dump({
            "stateDir": str(work / "state"),
            "drivers": drivers,
            "objectStores": {"local": {"driver": "swift", "default": True}},
        }))
        folder = manifests(work / "manifests", tenant, n)
        log(f"apply: {n} buckets in {account.name}")
        apply_s, result = cli(config, "apply", str(folder), "--yes", "--parallelism", "8")
        if result.returncode != 0:
            raise RuntimeError(f"apply failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        made = account.containers()
        assert len(made) == n, len(made)
        log(f"apply took {apply_s:.1f} s")
        watch.sample("apply")

        observe_s, observe_cpu, plan_s, plan_observe, plan_part = [], [], [], [], []
        for i in range(repeat):
            driver = _fresh_driver(config)  # not timed: what `reconciler plan` builds before observing
            cpu, started = time.process_time(), time.perf_counter()
            seen = driver.observe()
            observe_s.append(time.perf_counter() - started)
            observe_cpu.append(time.process_time() - cpu)
            assert len(seen.owned) == n and not seen.unowned, (len(seen.owned), len(seen.unowned))
            took, result = cli(config, "plan", str(folder), "--detailed-exitcode", log_level="info")
            if result.returncode != 0:
                raise RuntimeError(f"the no-op plan planned changes or failed:\n{result.stdout[-2000:]}"
                                   f"\n{result.stderr[-2000:]}")
            plan_s.append(took)
            planned = _planned_line(result.stderr)
            if planned is not None:
                plan_observe.append(planned["observe_s"])
                plan_part.append(planned["plan_s"])
            log(f"repeat {i + 1}: observe {observe_s[-1] * 1000:.0f} ms (CPU {observe_cpu[-1] * 1000:.0f} ms), "
                f"plan process {took:.2f} s")
            watch.sample(f"repeat {i + 1}")

        # once more, not timed: every request counted, with its own wall time
        driver = _fresh_driver(config)
        with Requests() as counted:
            servers_before, cpu = server_cpu(), time.process_time()
            started = time.perf_counter()
            driver.observe()
            counted_s = time.perf_counter() - started
            cpu_s = {"this process": time.process_time() - cpu}
            servers_after = server_cpu()
        cpu_s.update({k: servers_after[k] - v for k, v in servers_before.items() if k in servers_after})
        requests = {k: len(v) for k, v in sorted(counted.times.items())}
        latency = {k: statistics.median(v) for k, v in counted.times.items()}
        assert requests.get("GET account", 0) >= 1 and requests.get("HEAD container") == n, requests
        startup_s = [cli(config, "version")[0] for _ in range(3)]

        log("destroy")
        destroy_s, result = cli(config, "destroy", str(folder), "--yes", "--parallelism", "8")
        if result.returncode != 0:
            raise RuntimeError(f"destroy failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        left = account.containers()
        assert left == [], left[:10]
        watch.sample("destroy")
        import requests as _requests
        import swiftclient

        return {"n": n, "tenant": tenant, "account": account.name, "apply": apply_s, "destroy": destroy_s,
                "observe": observe_s, "observe_cpu": observe_cpu, "plan": plan_s, "plan_observe": plan_observe,
                "plan_part": plan_part, "startup": startup_s, "requests": requests, "latency": latency,
                "counted_s": counted_s, "cpu": cpu_s, "swift": swift_version(),
                "swiftclient": swiftclient.__version__, "requests_lib": _requests.__version__, "load": watch.load, "interference": watch.seen}
    finally:
        left = account.empty()
        if left:
            log(f"cleanup: {len(left)} containers left in {account.name}: {left[:5]}")
        shutil.rmtree(work, ignore_errors=True)


def swift_version() -> str:
    result = run("dpkg-query", "-W", "-f=${Version}", "swift", check=False)
    return result.stdout.strip() or "unknown"


def machine(r: dict[str, Any]) -> dict[str, str]:
    from benchmarks.plan import machine as planner_machine

    info = planner_machine()
    info.pop("libraries", None)
    info["object store"] = (f"OpenStack Swift {r['swift']} (Debian package), all-in-one on 127.0.0.1:8080 "
                            "(scripts/setup-swift.sh): proxy, account, container and object servers one "
                            "process each (`workers = 0`), tempauth with tokens in memcached, one device "
                            "(ext4 root filesystem), one replica")
    info["client"] = f"python-swiftclient {r['swiftclient']}, requests {r['requests_lib']}"
    return info


def _counts(requests: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in requests.items())


def report(r: dict[str, Any], command: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n = r["n"]
    req, lat = r["requests"], r["latency"]
    heads = req["HEAD container"]
    plan_rows = []
    if r["plan_observe"]:
        plan_rows = [f"| … of which observing (`observe_s` of its `planned` log line; the tenant is in memory) "
                     f"| {spread_ms(r['plan_observe'])} |",
                     f"| … of which planning (`plan_s`: plan, conflicts, host checks) | {spread_ms(r['plan_part'])} |"]
    return "\n".join([
        BEGIN,
        "## Buckets on the object store driver (Swift)",
        "",
        "Generated by `benchmarks/buckets.py`; a measurement, never a test. It rewrites only the part "
        "of this file between its markers.",
        "",
        "### How to reproduce",
        "",
        "From the project root, with the Swift all-in-one running (`scripts/setup-swift.sh`, part of "
        "`make services`):",
        "",
        *_section.reproduce(command, now, machine(r)),
        "",
        f"A new tenant `rcbench<hex>` per run, with no credentials in the host config (reseller mode): "
        f"its buckets are containers of the account `AUTH_rcbench<hex>`, reached by the reseller admin. "
        f"The host config and state dir are in a temporary directory; Bucket is realised by the "
        f"objectstore driver (one swift store `local`, the defaults: 8 requests at once), every other "
        f"kind in memory. {n} buckets in one Tenant, all `deletionPolicy: Delete`: a quarter "
        f"public-read, a fifth versioned, a third with a quota, half with two metadata keys. Each "
        f"figure is wall time: `observe()` of a Bucket driver built afresh in this process (building "
        f"it is not timed), and whole `reconciler` processes (start-up, loading the manifests, "
        f"observing, planning, acting). At the end every container of the account is deleted with "
        f"plain swiftclient (the account stays: a deleted Swift account is a tombstone).",
        "",
        f"### Observe and plan with {n} buckets",
        "",
        "| what | median | min | max |",
        "|---|---|---|---|",
        f"| driver `observe()`, {n} buckets (1 account listing + {n} container HEADs) | {spread_ms(r['observe'])} |",
        f"| … its CPU time in this process (all threads) | {spread_ms(r['observe_cpu'])} |",
        f"| whole `reconciler plan` process, {n} buckets, no change | {spread_ms(r['plan'])} |",
        *plan_rows,
        f"| `reconciler version`, for reference (interpreter and CLI start-up) | {spread_ms(r['startup'])} |",
        "",
        f"Requests of one observe, by construction: one account listing, then one HEAD per container "
        f"({n}), 8 at once. Counted once more (untimed, {r['counted_s'] * 1000:.0f} ms): {_counts(req)}. "
        f"The listing is swiftclient's full listing, which asks again after a page until it gets an "
        f"empty one (so 2 GETs below 10,000 containers); the auths are one to learn the storage URL, "
        f"then one per connection: swiftclient keeps a connection per worker thread, and this driver "
        f"was built afresh (a long-lived one keeps its workers' tokens from one observe to the next). Median latency seen by the client: account listing "
        f"{lat['GET account'] * 1000:.1f} ms, auth {lat.get('auth', 0) * 1000:.1f} ms, container HEAD "
        f"{lat['HEAD container'] * 1000:.1f} ms with 8 in flight ({heads} HEADs / 8 × that = "
        f"{heads / 8 * lat['HEAD container'] * 1000:.0f} ms). CPU used during that observe (by "
        f"`/proc`): {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in r['cpu'].items())}; "
        f"{sum(r['cpu'].values()) * 1000:.0f} ms in all, in {r['counted_s'] * 1000:.0f} ms of wall time "
        f"on {os.cpu_count()} cores.",
        "",
        f"Apply of all {n} from scratch (`apply --parallelism 8`; per bucket a HEAD (is it there "
        f"already?), one container PUT carrying the spec and the mark, a HEAD to read it back): "
        f"{r['apply']:.1f} s; destroy of all "
        f"(`destroy --parallelism 8`): {r['destroy']:.1f} s, after which a plain listing of the account "
        f"was empty.",
        "",
        ("Interference: other work ran on this host (" + "; ".join(
            f"{what}: seen at the end of {', '.join(when)}" for what, when in sorted(r["interference"].items()))
         + "); it competes for the two cores and the one Swift, so the figures of those phases are "
         "likely high; "
         if r["interference"] else "Interference: no other test run or reconciler command was seen; ")
        + f"1-minute load average seen: {min(r['load']):.1f} to {max(r['load']):.1f}.",
        END,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    if not swift_answers():
        print(f"benchmarks.buckets needs the Swift all-in-one on {PROXY} (scripts/setup-swift.sh)",
              file=sys.stderr)
        return 2
    results = measure(args.count, args.repeat)
    command = "python -m benchmarks.buckets " + " ".join(
        a for a in [f"--count {args.count}", f"--repeat {args.repeat}",
                    f"--write {args.write}" if args.write else ""] if a)
    section = report(results, command)
    print(section)
    if args.write:
        _section.write_section(args.write, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
