"""Faults: a host service stops (libvirtd, the object store) or dnsmasq is killed, before
an apply, in the middle of one, and while the daemon runs.

Each test builds a small cloud of one test tenant on the real drivers (Tenant in memory;
a Network with DHCP on netlink; a file Volume; an Instance of the test image on libvirt,
on the network and with the volume; a Bucket on Swift where the object store is in
play), injects the fault, and checks with independent tools (`virsh`, `ip`, `qemu-img`,
`qemu-io`, swiftclient, /proc) that:

- the changes that do not need the failed part are made;
- those that do are held ("Not planned", `unknown`) or fail as TransientError, with a
  message naming the failed part and why; no traceback anywhere; exit code 1;
- the daemon keeps running, holds them `failed` and retries with backoff, and converges
  by itself when the part is back; an apply afterwards converges; `plan` is then empty;
- nothing is lost: the volume's data and the bucket's objects are still there.

libvirtd is shared by every test using libvirt: the tests that stop it are `serial`
(run alone after the parallel suite) and always start it again. The object store is a
swift-proxy-server of the test's own on a port of its own (the all-in-one's servers
behind it), so stopping it takes nothing away from anyone. dnsmasq is the one our
apply started for the test's network.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import swiftclient

import figures
import objstore
from conftest import IMAGE, REPO, URI, dumpxml, domstate, ok, plan_is_zero, run, sha256_file, wait_for
from netns import NetEnv, alive, bridge_of, free_subnets, link, net_env
from reconciler.controller import Controller
from reconciler.hostconfig import load_host_config
from reconciler.models import Key
from reconciler.naming import host_name
from test_bucket_outage import Proxy
from test_daemon import DaemonProc, daemon_facts, events, journal, running_daemon, status_json, write

pytestmark = pytest.mark.reliability

BOOT_TIMEOUT = 120  # hang guards, generous for a loaded CI machine
CONVERGE_TIMEOUT = 90
LIBVIRTD_PID = Path("/run/libvirtd.pid")


# --- figures -----------------------------------------------------------------------------


@dataclass
class Tally:
    """The faults a test injected and those it survived (every assertion held)."""

    injected: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)

    def inject(self, case: str) -> None:
        self.injected.append(case)

    def survive(self, case: str) -> None:
        assert case in self.injected
        self.survived.append(case)


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally()
    yield t
    figures.record("faults", injected=len(t.injected), survived=len(t.survived), cases=t.injected)


# --- the cloud ---------------------------------------------------------------------------


def doc(kind: str, tenant: str | None, name: str, spec: dict[str, Any]) -> str:
    metadata = {"name": name, **({"tenant": tenant} if tenant else {})}
    return ("---\napiVersion: reconciler/v1\n"
            f"kind: {kind}\nmetadata: {json.dumps(metadata)}\nspec: {json.dumps(spec)}\n")


def cloud(t: str, nets: dict[str, str], vms: dict[str, str], volumes: Sequence[str] = ("data",),
          buckets: Sequence[str] = ()) -> str:
    """Networks (name -> cidr), volumes, buckets, and instances (name -> network; the
    first one also has the volume `data`). Volumes and buckets are Delete, so that the
    teardown's destroy removes them."""
    text = doc("Tenant", None, t, {})
    for net, cidr in nets.items():
        text += doc("Network", t, net, {"subnets": [{"cidr": cidr}]})
    for vol in volumes:
        text += doc("Volume", t, vol, {"sizeGiB": 1, "deletionPolicy": "Delete"})
    for bucket in buckets:
        text += doc("Bucket", t, bucket, {"deletionPolicy": "Delete", "purgeOnDelete": True})
    if vms:
        text += doc("Image", t, "tiny", {"source": str(IMAGE)})
    for i, (vm, net) in enumerate(vms.items()):
        spec: dict[str, Any] = {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1, "networks": [{"network": net}]}
        if i == 0:
            spec["volumes"] = [{"volume": "data"}]
        text += doc("Instance", t, vm, spec)
    return text


def host_config(env: NetEnv, store_port: int | None = None) -> None:
    """Network kinds on netlink, Image/Instance on libvirt (TCG), Volume on a file
    backend in env.volume_pool, Bucket on Swift behind `store_port` (else in memory)."""
    pool = env.volume_pool
    pool.mkdir(parents=True, exist_ok=True)
    pool.chmod(0o755)  # QEMU (another user) opens the volumes
    config: dict[str, Any] = {
        "stateDir": str(env.state_dir),
        "drivers": {"Tenant": "memory", "Network": "netlink", "Router": "netlink", "SecurityGroup": "netlink",
                    "Image": "libvirt", "Instance": "libvirt", "Volume": "storage",
                    "Bucket": "objectstore" if store_port else "memory"},
        "lockTimeoutSeconds": 60,
        "libvirt": {"uri": URI, "domainType": "qemu", "shutdownTimeoutSeconds": 10, "probeImage": str(IMAGE)},
        "volumeBackends": {"local": {"driver": "file", "path": str(pool), "default": True}},
    }
    if store_port:
        config["objectStores"] = {"local": {"driver": "swift", "default": True, "timeoutSeconds": 3,
                                            "authUrl": f"http://127.0.0.1:{store_port}/auth/v1.0"}}
    env.host_config.write_text(json.dumps(config, indent=2) + "\n")


def volume_file(env: NetEnv, name: str) -> Path:
    return env.volume_pool / f"{host_name(Key('Volume', env.tenant, name))}.qcow2"


def volume_size(path: Path) -> int:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)["virtual-size"]


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def plan_and_apply(env: NetEnv, folder: Path, code: int,
                   plan_code: int | None = None) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """`reconciler plan --json --out` (refusing a plan that touches another tenant), then
    `reconciler apply --yes FOLDER` as a user runs it; they must exit `plan_code` and
    `code` (the same by default) without a traceback. The saved plan and the apply's result."""
    env._plans += 1
    path = env.root / f"plan-{env._plans}.json"
    planned = ok(env.cli("plan", "--json", "--out", str(path), str(folder)), code if plan_code is None else plan_code)
    data = json.loads(path.read_text())
    foreign = [f"{c['action']} {c['kind']} {c['tenant']}/{c['name']}" for c in data["changes"]
               if c["action"] != "noop" and c["tenant"] != env.tenant]
    if foreign:
        pytest.fail(f"refusing to apply {folder}: it would change {foreign}", pytrace=False)
    env.remember(data)  # the teardown's sweep knows this test's networks
    env.last_manifest = folder  # the teardown destroys what the folder declares
    no_traceback(planned.stderr)
    return data, ok(env.cli("apply", "--yes", str(folder)), code)


def actions(plan: dict[str, Any]) -> dict[str, str]:
    """'Kind/name' -> action of a saved plan's changes (noops left out)."""
    return {f"{c['kind']}/{c['name']}": c["action"] for c in plan["changes"] if c["action"] != "noop"}


def unknown(plan: dict[str, Any]) -> dict[str, str]:
    return {f"{u['kind']}/{u['name']}": u["reason"] for u in plan["unknown"]}


def controller(env: NetEnv) -> Controller:
    return Controller(load_host_config(env.host_config))


def bridge_up(name: str) -> bool:
    found = link(name)
    return found is not None and "UP" in found.get("flags", [])


def resource_row(env: NetEnv, kind: str, name: str) -> dict[str, Any] | None:
    rows = journal(env, "SELECT * FROM resources WHERE kind = ? AND tenant = ? AND name = ?", kind, env.tenant, name)
    return dict(rows[0]) if rows else None


def until(daemon: DaemonProc, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """wait_for `predicate` while the daemon runs (it must stay alive); on a timeout,
    the end of the daemon's log as it is then."""
    def check() -> Any:
        if daemon.proc.poll() is not None:  # not retried: a dead daemon fails at once
            raise RuntimeError(f"the daemon exited {daemon.proc.returncode}:\n{daemon.output()}")
        return predicate()

    try:
        return wait_for(check, timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- the daemon's log (end):\n{daemon.output()}") from None


def all_ready(env: NetEnv) -> dict[str, dict[str, Any]] | None:
    rows = status_json(env)
    return rows if rows and {r["state"] for r in rows.values()} == {"ready"} else None


# --- libvirtd ----------------------------------------------------------------------------


def libvirtd_pid() -> int | None:
    """The running libvirtd (its pid file, checked in /proc; a zombie is not running)."""
    try:
        pid = int(LIBVIRTD_PID.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "libvirtd" and alive(pid) else None


def stop_libvirtd() -> None:
    """SIGTERM to libvirtd (as scripts/setup-libvirt.sh started it), until it is gone."""
    pid = libvirtd_pid()
    assert pid is not None, f"libvirtd is not running ({LIBVIRTD_PID}): run scripts/setup-libvirt.sh"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 60, interval=0.1, what=f"libvirtd (pid {pid}) to exit")
    assert run("virsh", "-c", URI, "version", check=False).returncode != 0


def start_libvirtd() -> None:
    run("bash", str(REPO / "scripts" / "setup-libvirt.sh"), timeout=180)


@contextmanager
def libvirtd_restored() -> Iterator[None]:
    """libvirtd runs again afterwards, whatever happened."""
    try:
        yield
    finally:
        if libvirtd_pid() is None:
            start_libvirtd()


def libvirt_named(text: str) -> None:
    """A clear message: it names libvirt and says it cannot connect to it."""
    assert "libvirt" in text and "cannot connect to libvirt" in text and "libvirtd running" in text, text


# --- the object store --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def own_proxy(root: Path) -> Iterator[Proxy]:
    objstore.require_swift()
    proxy = Proxy(root, port=free_port())
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def store_named(text: str, port: int) -> None:
    assert "object store" in text and f"127.0.0.1:{port}" in text and "unreachable" in text, text


def container_marked(conn: Any, name: str) -> dict[str, str] | None:
    try:
        headers = conn.head_container(name)
    except swiftclient.ClientException as exc:
        if exc.http_status == 404:
            return None
        raise
    return headers if "x-container-meta-rc-home" in headers else None


# --- dnsmasq -----------------------------------------------------------------------------


def dnsmasq_of(env: NetEnv, network: str) -> dict[int, list[str]]:
    """pid -> argv of the live dnsmasq processes serving `network`'s bridge (found in
    /proc by their command line: the DHCP files live under .../dhcp/BRIDGE/)."""
    where = f"{env.state_dir}/netlink/dhcp/{bridge_of(env.tenant, network)}/"
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = [a.decode() for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "dnsmasq" and any(where in a for a in argv) and alive(int(entry)):
            found[int(entry)] = argv
    return found


def only_dnsmasq(env: NetEnv, network: str) -> tuple[int, list[str]]:
    """The network's one dnsmasq, settled: its pid file names it and it has its DHCP
    socket (waited for a little: a starting dnsmasq forks once it has bound)."""
    def settled() -> tuple[int, list[str]] | None:
        found = dnsmasq_of(env, network)
        if len(found) != 1:
            return None
        pid, argv = next(iter(found.items()))
        pid_file = Path(next(a for a in argv if a.startswith("--pid-file=")).split("=", 1)[1])
        return (pid, argv) if pid_file.read_text().strip() == str(pid) and serves_dhcp(pid) else None

    return wait_for(settled, 10, interval=0.1, what=f"one settled dnsmasq for {network}: {dnsmasq_of(env, network)}")


def hosts_file(argv: list[str]) -> Path:
    return Path(next(a for a in argv if a.startswith("--dhcp-hostsfile=")).split("=", 1)[1])


def kill_dnsmasq(pid: int) -> None:
    """SIGKILL (the dnsmasq our test's apply started), until it is dead (or a zombie)."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 30, interval=0.05, what=f"dnsmasq {pid} to die")


def mac_of(domain: str) -> str:
    macs = [m.get("address") for m in dumpxml(domain).iter("mac")]
    assert len(macs) == 1 and macs[0], macs
    return macs[0].lower()


def serves_dhcp(pid: int) -> bool:
    """A UDP socket on port 67 in the network namespace of process `pid` (read in /proc)."""
    lines = Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]
    return any(line.split()[1].endswith(":0043") for line in lines)


def reservation(hosts: Path, mac: str) -> str:
    lines = [line for line in hosts.read_text().splitlines() if line.lower().startswith(mac)]
    assert lines, f"no reservation for {mac} in {hosts}: {hosts.read_text()!r}"
    return lines[0]


# --- the object store stopped (not serial: a proxy of the test's own) ---------------------


def test_object_store_down_before_an_apply_and_in_the_daemons_loop(tmp_path: Path, tally: Tally) -> None:
    accounts: list[str] = []
    with own_proxy(tmp_path) as proxy:
        try:
            with net_env(compute="libvirt") as env:
                accounts.append("AUTH_" + env.tenant)
                try:
                    _object_store_cases(env, proxy, tally)
                finally:
                    if proxy.proc is None:
                        proxy.start()  # the teardown's destroy needs the store
        finally:
            for account in accounts:
                objstore.remove_account(account)


def _object_store_cases(env: NetEnv, proxy: Proxy, tally: Tally) -> None:
    t, port = env.tenant, proxy.port
    admin = objstore.conn(objstore.ADMIN, "AUTH_" + t)  # through the all-in-one's own proxy
    host_config(env, store_port=port)
    (cidr,) = free_subnets(1)
    folder = env.root / "cloud"
    folder.mkdir()
    manifest = folder / "cloud.yaml"
    write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}, buckets=["assets"]))
    domain, bridge = env.domain_name("vm"), bridge_of(t, "net")

    # 1. the store is down at the first apply: the tenant has no account on it yet, so
    # observing has nothing to read there; the bucket's create is planned and fails as
    # transient, naming the store; everything else is made
    tally.inject("object store down at a tenant's first apply")
    proxy.stop()
    plan, applied = plan_and_apply(env, folder, 1, plan_code=0)
    assert actions(plan) == {f"Tenant/{t}": "create", "Network/net": "create", "Volume/data": "create",
                             "Bucket/assets": "create", "Image/tiny": "create", "Instance/vm": "create"}, plan
    failed = [line for line in applied.stdout.splitlines()
              if f"Bucket {t}/assets" in line and "TransientError" in line]
    assert failed, applied.stdout
    store_named(failed[0], port)
    assert "Apply finished with errors: 5 applied, 1 failed, 0 skipped" in applied.stdout, applied.stdout
    assert domstate(domain) == "running" and bridge_up(bridge)
    assert volume_size(volume_file(env, "data")) == 1 << 30
    assert container_marked(admin, "assets") is None

    proxy.start()
    plan, _ = plan_and_apply(env, folder, 0)
    assert actions(plan) == {"Bucket/assets": "create"} and not plan["unknown"], plan
    assert container_marked(admin, "assets")
    plan_is_zero(env, folder)
    tally.survive("object store down at a tenant's first apply")

    # 2. the store is down before an apply: the tenant's buckets cannot be observed, so
    # they are not planned (exit 1, the store named); the new volume is made
    admin.put_object("assets", "keep.txt", b"kept across the outages\n")
    data_sum = sha256_file(volume_file(env, "data"))  # the guest never writes to it
    tally.inject("object store down before an apply")
    proxy.stop()
    write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}, volumes=("data", "extra"), buckets=["assets", "logs"]))
    plan, applied = plan_and_apply(env, folder, 1)
    assert set(unknown(plan)) == {"Bucket/assets", "Bucket/logs"}, plan["unknown"]
    for why in unknown(plan).values():
        store_named(why, port)
    assert actions(plan) == {"Volume/extra": "create"}, actions(plan)
    assert "Not planned: 2 resource(s)" in applied.stdout, applied.stdout
    assert f"? Bucket {t}/logs:" in applied.stdout, applied.stdout
    assert "Not done: 2 resource(s)" in applied.stderr, applied.stderr
    assert volume_size(volume_file(env, "extra")) == 1 << 30
    rows = status_json(env)
    assert rows[f"Bucket/{t}/logs"]["state"] == "unknown", rows[f"Bucket/{t}/logs"]
    store_named(rows[f"Bucket/{t}/logs"]["detail"], port)

    proxy.start()
    plan, _ = plan_and_apply(env, folder, 0)
    assert actions(plan) == {"Bucket/logs": "create"} and not plan["unknown"], plan
    assert container_marked(admin, "logs")
    plan_is_zero(env, folder)
    assert admin.get_object("assets", "keep.txt")[1] == b"kept across the outages\n"
    tally.survive("object store down before an apply")

    # 3. the store goes down while the daemon runs: a new volume is made; a new bucket
    # is held as failed and looked at again with backoff until the store is back, then
    # the daemon makes it by itself
    with running_daemon(env, "--source", str(folder), "--backoff-cap", "2s", "--resync", "5s") as daemon:
        until(daemon, lambda: daemon_facts(env).get("appliedRevision") and all_ready(env), CONVERGE_TIMEOUT,
              "the daemon to take over the converged cloud")
        tally.inject("object store down during the daemon loop")
        proxy.stop()
        write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}, volumes=("data", "extra", "more"),
                              buckets=["assets", "logs", "media"]))
        until(daemon, volume_file(env, "more").exists, CONVERGE_TIMEOUT,
              "the volume 'more' made while the store is down")
        assert volume_size(volume_file(env, "more")) == 1 << 30
        # failures count up while the store is down (retried after 1 s, 2 s, 2 s...)
        row = until(daemon, lambda: (r := resource_row(env, "Bucket", "media")) and r["failures"] >= 2 and r,
                    CONVERGE_TIMEOUT, "Bucket media retried")
        assert row["state"] == "failed", row
        store_named(row["error"], port)
        daemon.check_alive()
        rows = status_json(env)
        for name in ("assets", "logs", "media"):
            r = rows[f"Bucket/{t}/{name}"]
            assert r["state"] in ("failed", "unknown"), r
            store_named(r["lastError"] or r["detail"], port)
        until(daemon, lambda: status_json(env)[f"Volume/{t}/more"]["state"] == "ready", CONVERGE_TIMEOUT,
              "Volume more ready")
        assert container_marked(admin, "media") is None
        told = journal(env, "SELECT reason, message FROM events WHERE resource = ?", f"Bucket/{t}/media")
        # said once while the cause lasts, not at every retry
        assert [e["reason"] for e in told] == ["CannotObserve"], [dict(e) for e in told]
        store_named(told[0]["message"], port)

        proxy.start()  # nothing else is touched: the daemon converges by itself
        until(daemon, lambda: container_marked(admin, "media") and all_ready(env), CONVERGE_TIMEOUT,
              "Bucket media made when the store is back")
        daemon.check_alive()
        no_traceback(daemon.log.read_text(errors="replace"))
    plan_is_zero(env, folder)
    assert admin.get_object("assets", "keep.txt")[1] == b"kept across the outages\n"
    assert sha256_file(volume_file(env, "data")) == data_sum
    assert domstate(domain) == "running"
    tally.survive("object store down during the daemon loop")


# --- dnsmasq killed (not serial: the test's own network's dnsmasq) ------------------------


def test_dnsmasq_killed_around_an_apply_and_in_the_daemons_loop(tally: Tally) -> None:
    with net_env(compute="libvirt") as env:
        t = env.tenant
        host_config(env)
        (cidr,) = free_subnets(1)
        folder = env.root / "cloud"
        folder.mkdir()
        manifest = folder / "cloud.yaml"
        write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}))
        plan_and_apply(env, folder, 0)
        domain = env.domain_name("vm")
        assert domstate(domain) == "running"
        pid, argv = only_dnsmasq(env, "net")
        hosts, mac = hosts_file(argv), mac_of(domain)
        reserved = reservation(hosts, mac)
        data_sum = sha256_file(volume_file(env, "data"))

        def restarted(old: int) -> int:
            """The one new dnsmasq of the network: the same command line, its DHCP
            socket, and the instance's reservation in its hosts file."""
            new, new_argv = only_dnsmasq(env, "net")
            assert new != old and new_argv == argv, (old, new, new_argv)
            assert reservation(hosts, mac) == reserved
            return new

        # 1. killed just before an apply that also makes a volume: the plan sees it
        tally.inject("dnsmasq killed before an apply")
        kill_dnsmasq(pid)
        assert not dnsmasq_of(env, "net")
        write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}, volumes=("data", "extra")))
        plan, _ = plan_and_apply(env, folder, 0)
        assert actions(plan) == {"Network/net": "update", "Volume/extra": "create"}, actions(plan)
        why = next(c["reason"] for c in plan["changes"] if c["kind"] == "Network")
        assert "dnsmasq" in why and "not running" in why, why
        pid = restarted(pid)
        assert volume_size(volume_file(env, "extra")) == 1 << 30
        plan_is_zero(env, folder)
        tally.survive("dnsmasq killed before an apply")

        # 2. killed in the middle of an apply (after its plan saw it running): the
        # volume is made; the next apply restarts dnsmasq
        tally.inject("dnsmasq killed in the middle of an apply")
        write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}, volumes=("data", "extra", "more")))
        ctl = controller(env)
        the_plan = ctl.plan(ctl.load([folder]))
        assert [(c.key.kind, c.key.name, c.action.value) for c in the_plan.actionable] == [
            ("Volume", "more", "create")], the_plan.summary()
        killed: list[int] = []

        def kill_first(change: object) -> None:
            if not killed:
                kill_dnsmasq(pid)
                killed.append(pid)

        with ctl.lock("apply", 60):
            result = ctl.apply(the_plan, on_start=kill_first)
        assert killed and result.ok, [(o.change.id, o.status, o.error) for o in result.outcomes]
        assert not dnsmasq_of(env, "net")
        assert volume_size(volume_file(env, "more")) == 1 << 30
        plan, _ = plan_and_apply(env, folder, 0)
        assert actions(plan) == {"Network/net": "update"}, actions(plan)
        pid = restarted(pid)
        plan_is_zero(env, folder)
        tally.survive("dnsmasq killed in the middle of an apply")

        # 3. killed while the daemon runs: it starts a new one by itself (its resync)
        with running_daemon(env, "--source", str(folder), "--backoff-cap", "2s", "--resync", "5s") as daemon:
            until(daemon, lambda: daemon_facts(env).get("appliedRevision") and all_ready(env), CONVERGE_TIMEOUT,
                  "the daemon to take over the converged cloud")
            tally.inject("dnsmasq killed during the daemon loop")
            kill_dnsmasq(pid)
            until(daemon, lambda: dnsmasq_of(env, "net"), CONVERGE_TIMEOUT, "a new dnsmasq for the network")
            pid = restarted(pid)
            healed = until(daemon, lambda: [e for e in events(env, "DriftHealed")
                                            if e["resource"] == f"Network/{t}/net"],
                           CONVERGE_TIMEOUT, "the network's drift healed")
            assert "dnsmasq" in healed[-1]["message"], healed[-1]["message"]
            until(daemon, lambda: all_ready(env), CONVERGE_TIMEOUT, "every resource ready")
            daemon.check_alive()
            no_traceback(daemon.log.read_text(errors="replace"))
        plan_is_zero(env, folder)
        assert only_dnsmasq(env, "net")[0] == pid
        assert sha256_file(volume_file(env, "data")) == data_sum
        assert domstate(domain) == "running"
        tally.survive("dnsmasq killed during the daemon loop")


# --- libvirtd stopped (serial: every test using libvirt shares it) ------------------------


@pytest.mark.serial
def test_libvirtd_stopped_before_and_during_an_apply(tally: Tally) -> None:
    objstore.require_swift()
    accounts: list[str] = []
    try:
        with net_env(compute="libvirt") as env, libvirtd_restored():
            accounts.append("AUTH_" + env.tenant)
            _libvirtd_apply_cases(env, tally)
    finally:
        for account in accounts:
            objstore.remove_account(account)


def _libvirtd_apply_cases(env: NetEnv, tally: Tally) -> None:
    t = env.tenant
    host_config(env, store_port=8080)  # the all-in-one's own store
    admin = objstore.conn(objstore.ADMIN, "AUTH_" + t)
    cidr, cidr2 = free_subnets(2)
    folder = env.root / "cloud"
    folder.mkdir()
    manifest = folder / "cloud.yaml"
    write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}, buckets=["assets"]))
    domain, bridge = env.domain_name("vm"), bridge_of(t, "net")

    # 1. libvirtd is down before the apply: the network, the volume and the bucket are
    # made; the image and the instance are not planned, and the message says why
    tally.inject("libvirtd stopped before an apply")
    stop_libvirtd()
    plan, applied = plan_and_apply(env, folder, 1)
    assert set(unknown(plan)) == {"Image/tiny", "Instance/vm"}, plan["unknown"]
    for why in unknown(plan).values():
        libvirt_named(why)
    assert actions(plan) == {f"Tenant/{t}": "create", "Network/net": "create", "Volume/data": "create",
                             "Bucket/assets": "create"}, actions(plan)
    assert "Not planned: 2 resource(s)" in applied.stdout, applied.stdout
    libvirt_named(next(line for line in applied.stdout.splitlines() if f"? Instance {t}/vm:" in line))
    assert "Not done: 2 resource(s)" in applied.stderr, applied.stderr
    assert bridge_up(bridge)
    data = volume_file(env, "data")
    assert volume_size(data) == 1 << 30
    assert container_marked(admin, "assets")
    rows = status_json(env)
    assert rows[f"Instance/{t}/vm"]["state"] == "unknown", rows[f"Instance/{t}/vm"]
    libvirt_named(rows[f"Instance/{t}/vm"]["detail"])
    # data written to the volume now must still be there once a guest has it
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(data))

    start_libvirtd()
    plan, _ = plan_and_apply(env, folder, 0)
    assert actions(plan) == {"Image/tiny": "create", "Instance/vm": "create"} and not plan["unknown"], plan
    wait_for(lambda: domstate(domain) == "running", BOOT_TIMEOUT, what=f"{domain} running")
    plan_is_zero(env, folder)
    marker = run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 0 64k", str(data)).stdout
    assert "read 65536/65536 bytes" in marker and "verification failed" not in marker, marker
    tally.survive("libvirtd stopped before an apply")

    # 2. libvirtd stops in the middle of an apply (once the first change starts): the
    # new network and volume are made; the new instance fails as transient, naming
    # libvirt; the running guest is not touched; the next apply converges
    tally.inject("libvirtd stopped in the middle of an apply")
    data_sum = sha256_file(data)  # the guest never writes to it
    write(manifest, cloud(t, {"net": cidr, "net2": cidr2}, {"vm": "net", "vm2": "net2"},
                          volumes=("data", "extra"), buckets=["assets"]))
    ctl = controller(env)
    the_plan = ctl.plan(ctl.load([folder]))
    assert not the_plan.unknown
    assert {(c.key.kind, c.key.name, c.action.value) for c in the_plan.actionable} == {
        ("Network", "net2", "create"), ("Volume", "extra", "create"), ("Instance", "vm2", "create")}
    stopped: list[str] = []

    def stop_first(change: object) -> None:
        if not stopped:
            stop_libvirtd()
            stopped.append("libvirtd")

    with ctl.lock("apply", 60):
        result = ctl.apply(the_plan, on_start=stop_first)
    outcomes = {(o.change.key.kind, o.change.key.name): o for o in result.outcomes}
    assert stopped and {k: o.status for k, o in outcomes.items()} == {
        ("Network", "net2"): "applied", ("Volume", "extra"): "applied", ("Instance", "vm2"): "failed"}, outcomes
    error = outcomes[("Instance", "vm2")].error or ""
    assert error.startswith("TransientError: "), error
    libvirt_named(error)
    assert bridge_up(bridge_of(t, "net2"))
    assert volume_size(volume_file(env, "extra")) == 1 << 30

    start_libvirtd()
    assert domstate(domain) == "running"  # QEMU ran on while libvirtd was away
    plan, _ = plan_and_apply(env, folder, 0)
    assert actions(plan) == {"Instance/vm2": "create"}, actions(plan)
    wait_for(lambda: domstate(env.domain_name("vm2")) == "running", BOOT_TIMEOUT, what="vm2 running")
    plan_is_zero(env, folder)
    assert sha256_file(data) == data_sum
    tally.survive("libvirtd stopped in the middle of an apply")


@pytest.mark.serial
def test_libvirtd_stopped_in_the_daemons_loop(tally: Tally) -> None:
    with net_env(compute="libvirt") as env, libvirtd_restored():
        t = env.tenant
        host_config(env)
        cidr, cidr2 = free_subnets(2)
        folder = env.root / "cloud"
        folder.mkdir()
        manifest = folder / "cloud.yaml"
        env.last_manifest = folder  # the teardown destroys what the folder declares
        domain, domain2 = env.domain_name("vm"), env.domain_name("vm2")
        with running_daemon(env, "--source", str(folder), "--backoff-cap", "2s", "--resync", "5s") as daemon:
            write(manifest, cloud(t, {"net": cidr}, {"vm": "net"}))
            env.declared |= {("Network", t, "net"), ("Network", t, "net2")}  # the teardown's sweep
            until(daemon, lambda: domstate(domain) == "running" and all_ready(env), BOOT_TIMEOUT,
                  "the cloud made by the daemon")
            data_sum = sha256_file(volume_file(env, "data"))

            # libvirtd stops; a new network and a new instance come: the network is
            # made, the instance is held as failed (backing off) with a clear message
            tally.inject("libvirtd stopped during the daemon loop")
            stop_libvirtd()
            write(manifest, cloud(t, {"net": cidr, "net2": cidr2}, {"vm": "net", "vm2": "net2"}))
            until(daemon, lambda: bridge_up(bridge_of(t, "net2")), CONVERGE_TIMEOUT,
                  "net2 made while libvirtd is down")
            row = until(daemon, lambda: (r := resource_row(env, "Instance", "vm2")) and r["failures"] >= 2 and r,
                        CONVERGE_TIMEOUT, "Instance vm2 retried")
            assert row["state"] == "failed", row
            libvirt_named(row["error"])
            rows = status_json(env)
            for name in ("vm", "vm2"):
                r = rows[f"Instance/{t}/{name}"]
                assert r["state"] in ("failed", "unknown"), r
                libvirt_named(r["lastError"] or r["detail"])
            assert rows[f"Network/{t}/net2"]["state"] == "ready", rows[f"Network/{t}/net2"]
            reasons = {e["reason"] for e in journal(env, "SELECT reason FROM events WHERE resource = ?",
                                                    f"Instance/{t}/vm2")}
            assert "CannotObserve" in reasons, reasons
            daemon.check_alive()

            start_libvirtd()  # nothing else is touched: the daemon converges by itself
            until(daemon, lambda: domstate(domain2) == "running" and all_ready(env), BOOT_TIMEOUT,
                  "vm2 made when libvirtd is back")
            daemon.check_alive()
            no_traceback(daemon.log.read_text(errors="replace"))
        plan_is_zero(env, folder)
        assert domstate(domain) == "running"
        assert sha256_file(volume_file(env, "data")) == data_sum
        tally.survive("libvirtd stopped during the daemon loop")
