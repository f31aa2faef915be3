"""Crash safety: `apply` and `destroy` of the example cloud killed with SIGKILL at points
spread over the whole run, then run again, must converge to exactly the manifests.

The cloud is manifests/ on the real drivers (see _crashcloud: libvirt guests, netlink
networks and routers, nftables, qcow2 volumes, Swift buckets). A dry run of apply and of
destroy, traced (RECONCILER_FAULTS_LOG), lists every place the process can be stopped:

- the boundaries of the numbered driver calls that change the host (`call:N` just
  before the N-th starts, `call:N:after` just after it returns);
- the named points inside the drivers, mid-operation (`libvirt.after-define@2`: the
  second time a domain was defined, before it is started);
- moments in time: SIGKILL from the test T ms after the N-th call started (as its trace
  says), T taken so that the moments spread over the dry run's time line: inside a
  driver call, wherever it happens to be (a qemu-img, an nft transaction, a Swift
  request, a domain being shut down), and in whatever the other threads do meanwhile.

`figures.count(ci=20, release=100)` points are taken for apply and as many for destroy,
each kind spread evenly over the run. One iteration is: apply killed at its point ->
apply again (exit 0) -> the host matches the manifests exactly, checked with virsh, ip,
nft, qemu-img, /proc and swiftclient (no duplicate, no leaked object of this
installation, nothing half configured), and `plan` is empty; then destroy killed at its
point -> destroy again (exit 0) -> nothing of this installation is left but the retained
volume and bucket, which are intact (the same file; the object put in the bucket).

Two copies of the cloud (two installations on this host, each with its own tenants,
state dir, pool and Swift accounts) take every other iteration, side by side. Every
iteration runs to the end even when one fails (the next starts from what the failed one
left, after one more run of the command); the test fails at the end listing every
failure with the point, the killed run's last traced steps and the findings.

The tests after it are the focused regressions of what it found in the netlink driver
(a device made but not yet marked, a namespace cut short), on a small cloud of their
own; the others are unit tests (tests/unit/test_crash_recovery.py).
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

import figures
from conftest import ok, plan_is_zero, run
from netns import NetEnv, all_links, dhcp_ns_of, free_subnets, net_env, router_ns_of
from reconciler.models import Key
from reconciler.naming import host_name, short_hash
from _crashcloud import Checked, CrashEnv, Run, check_applied, check_destroyed, crash_env, read_trace, retained_facts

pytestmark = pytest.mark.reliability

POINTS = figures.count(ci=20, release=100)
#: share of the points by how they stop the process (the rest: numbered call boundaries)
NAMED_SHARE = 0.25
TIMED_SHARE = 0.25
HANG_GUARD_S = 300


@dataclass(frozen=True)
class KillPoint:
    """Where a run is stopped: a RECONCILER_FAULTS value, or `delay_s` after the start of
    call number `into_call` (SIGKILL from the test)."""

    label: str
    faults: str | None = None
    into_call: int | None = None
    delay_s: float = 0.0
    at_s: float = 0.0  # where it falls in the dry run (seconds from the process start)


@dataclass
class Tally:
    tried: int = 0
    converged: int = 0
    not_reached: int = 0
    findings: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        self.tried += other.tried
        self.converged += other.converged
        self.not_reached += other.not_reached
        self.findings += other.findings
        self.failures += other.failures


@dataclass(frozen=True)
class Call:
    number: int
    what: str
    start: float  # seconds from the process start, in the dry run
    end: float


def candidates(trace: list[dict[str, Any]], started: float) -> tuple[list[KillPoint], list[KillPoint], list[Call]]:
    """(call boundaries, named-point occurrences, the calls) of a dry run."""
    boundaries, named = [], []
    seen: Counter[str] = Counter()
    begun: dict[int, tuple[str, float]] = {}
    calls = []
    for e in trace:
        at = e["t"] - started
        if e["event"] == "before":
            boundaries.append(KillPoint(f"before call {e['call']} ({e['what']})", f"call:{e['call']}", at_s=at))
            begun[e["call"]] = (e["what"], at)
        elif e["event"] == "after":
            boundaries.append(KillPoint(f"after call {e['call']} ({e['what']})", f"call:{e['call']}:after", at_s=at))
            what, start = begun[e["call"]]
            calls.append(Call(e["call"], what, start, at))
        else:
            seen[e["what"]] += 1
            named.append(KillPoint(f"{e['what']}@{seen[e['what']]}", f"{e['what']}@{seen[e['what']]}", at_s=at))
    assert calls, f"the dry run made no driver call: {trace}"
    return boundaries, named, calls


def moment(calls: list[Call], at: float) -> KillPoint:
    """The kill point at time `at` of the dry run: so long after the start of the call
    that started last among those running then (else the last one started before)."""
    running = [c for c in calls if c.start <= at <= c.end] or [c for c in calls if c.start <= at] or calls[:1]
    call = max(running, key=lambda c: c.start)
    delay = max(0.0, at - call.start)
    return KillPoint(f"SIGKILL {delay * 1000:.0f} ms into call {call.number} ({call.what})",
                     into_call=call.number, delay_s=delay, at_s=at)


def spread(items: list[KillPoint], n: int) -> list[KillPoint]:
    """`n` of `items` (time-ordered) evenly spread, all of them when there are fewer."""
    items = sorted(items, key=lambda p: p.at_s)
    if n >= len(items):
        return items
    return [items[int((i + 0.5) * len(items) / n)] for i in range(n)]


def dispersed(n: int) -> list[int]:
    """0..n-1 in an order where each next index is the farthest from those before it."""
    order = [0] if n else []
    while len(order) < n:
        order.append(max((i for i in range(n) if i not in order), key=lambda i: min(abs(i - j) for j in order)))
    return order


def choose(trace: list[dict[str, Any]], started: float, n: int, rng: random.Random) -> list[KillPoint]:
    boundaries, named, calls = candidates(trace, started)
    n_named = min(len(named), round(n * NAMED_SHARE))
    n_timed = round(n * TIMED_SHARE)
    n_calls = min(len(boundaries), n - n_named - n_timed)
    n_timed = n - n_named - n_calls
    # named points: every distinct name once, then more occurrences of each, far apart
    by_name: dict[str, list[KillPoint]] = {}
    for p in named:
        by_name.setdefault(p.label.split("@")[0], []).append(p)
    orders = {name: dispersed(len(occurrences)) for name, occurrences in by_name.items()}
    picked_named: list[KillPoint] = []
    for rnd in range(max(map(len, by_name.values()), default=0)):
        for name, occurrences in by_name.items():
            if rnd < len(occurrences) and len(picked_named) < n_named:
                picked_named.append(occurrences[orders[name][rnd]])
    # moments in time, one in each of n_timed equal slices of the calls' span
    first, last = min(c.start for c in calls), max(c.end for c in calls)
    width = (last - first) / max(1, n_timed)
    timed = [moment(calls, first + width * (i + rng.random())) for i in range(n_timed)]
    chosen = spread(boundaries, n_calls) + picked_named + timed
    return sorted(chosen, key=lambda p: p.at_s)


def killed_run(env: CrashEnv, command: str, point: KillPoint, trace: Path) -> Run:
    running = env.start(command, str(env.cloud.folder), "--yes", faults=point.faults, trace=trace)
    if point.into_call is None:
        return running.finish(timeout=HANG_GUARD_S)
    deadline = time.monotonic() + HANG_GUARD_S
    while running.proc.poll() is None and time.monotonic() < deadline:
        if any(e["event"] == "before" and e["call"] == point.into_call for e in read_trace(trace)):
            time.sleep(point.delay_s)
            running.kill()
            break
        time.sleep(0.01)
    return running.finish(timeout=HANG_GUARD_S)


def last_steps(trace: Path, n: int = 6) -> str:
    events = read_trace(trace)
    return "; ".join(f"{e['event']} {e['call'] or ''} {e['what']}".replace("  ", " ") for e in events[-n:])


def iterate(env: CrashEnv, command: str, point: KillPoint, i: int, tally: Tally,
            check: Callable[[], Checked], seed: int) -> str:
    """`command` killed at `point`, then run again: exit 0, `check` finds nothing, and
    (after apply) plan is empty. Failures are recorded in `tally`, not raised. What took
    how long (for the log)."""
    folder = str(env.cloud.folder)
    trace = env.root / f"{command}-{i}.trace"
    first = killed_run(env, command, point, trace)
    where = f"{command} killed at {point.label} (iteration {i}, seed {seed})"
    problems = []
    if first.killed:
        tally.tried += 1
    else:  # the point was not reached: no kill point, but the run must still have worked
        tally.not_reached += 1
        if first.returncode != 0:
            problems.append(f"the {command} to be killed was not, and failed:\n{first.text()}")
    again = env.run(command, folder, "--yes", timeout=HANG_GUARD_S)
    if again.returncode != 0:
        problems.append(f"the next {command} exited {again.returncode}:\n{again.text()}")
    # plan (read-only) runs while the host is checked
    planning = env.start("plan", "--detailed-exitcode", folder) if command == "apply" else None
    began = time.monotonic()
    checked = check()
    check_s = time.monotonic() - began
    if checked.findings:
        problems.append(f"the host differs from what the manifests say after {command}:\n{checked}")
        tally.findings.update(f.what for f in checked.findings)
    plan = planning.finish() if planning else None
    if plan is not None and again.returncode == 0:
        if not (plan.returncode == 0 and "No changes" in plan.stdout):
            problems.append(f"plan is not empty:\n{plan.stdout[-3000:]}{plan.stderr[-2000:]}")
    if problems:
        tally.failures.append(f"{where}; its last steps: {last_steps(trace)}\n" + "\n".join(problems))
        print(tally.failures[-1], flush=True)
        env.run(command, folder, "--yes", timeout=HANG_GUARD_S)  # the next iteration starts from there
    elif first.killed:
        tally.converged += 1
    return (f"{command}: killed {first.duration_s:.1f} s, again {again.duration_s:.1f} s, check {check_s:.1f} s"
            + (f", plan {plan.duration_s:.1f} s" if plan else ""))


def run_points(env: CrashEnv, points: list[tuple[int, KillPoint, KillPoint]], seed: int) -> tuple[Tally, Tally]:
    """Each (i, apply point, destroy point): one iteration (see the module docstring)."""
    applies, destroys = Tally(), Tally()
    for i, ap, dp in points:
        env.wait_for_services()
        began = time.monotonic()
        took = iterate(env, "apply", ap, i, applies, lambda: check_applied(env), seed)
        kept = retained_facts(env)
        took += "; " + iterate(env, "destroy", dp, i, destroys, lambda: check_destroyed(env, kept), seed)
        print(f"[{i}] apply killed at {ap.label}; destroy killed at {dp.label}: "
              f"{time.monotonic() - began:.1f} s ({took})", flush=True)
    return applies, destroys


def test_apply_and_destroy_killed_anywhere_converge() -> None:
    """Two copies of the cloud (two installations, as two state dirs on one host) take
    half of the points each, at the same time: most of an iteration is waiting (for
    libvirtd, Swift, guests to be reaped), and two reconcilers side by side must not
    disturb each other either."""
    with crash_env() as env, crash_env() as other:
        print(f"clouds: {env.root.name} and {other.root.name}", flush=True)
        folder = str(env.cloud.folder)
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)

        # dry runs: the cloud applied and destroyed once, traced, and checked
        apply_trace, destroy_trace = env.root / "dry-apply.trace", env.root / "dry-destroy.trace"
        started = time.monotonic()
        dry = env.run("apply", folder, "--yes", trace=apply_trace, timeout=HANG_GUARD_S)
        assert dry.returncode == 0, dry.text()
        baseline = check_applied(env)
        assert not baseline.findings, f"the uninterrupted apply does not match the manifests:\n{baseline}"
        plan = env.run("plan", "--detailed-exitcode", folder)
        assert plan.returncode == 0 and "No changes" in plan.stdout, plan.text()
        apply_points = choose(read_trace(apply_trace), started, POINTS, rng)
        print(f"dry apply: {dry.duration_s:.1f} s", flush=True)

        kept = retained_facts(env)
        started = time.monotonic()
        dry = env.run("destroy", folder, "--yes", trace=destroy_trace, timeout=HANG_GUARD_S)
        assert dry.returncode == 0, dry.text()
        baseline = check_destroyed(env, kept)
        assert not baseline.findings, f"the uninterrupted destroy left the host wrong:\n{baseline}"
        destroy_points = choose(read_trace(destroy_trace), started, POINTS, rng)
        print(f"dry destroy: {dry.duration_s:.1f} s", flush=True)

        points = [(i, ap, dp) for i, (ap, dp) in enumerate(zip(apply_points, destroy_points))]
        with ThreadPoolExecutor(max_workers=2) as pool:
            halves = list(pool.map(lambda job: run_points(job[0], job[1], seed),
                                   [(env, points[0::2]), (other, points[1::2])]))
        applies, destroys = Tally(), Tally()
        for a, d in halves:
            applies.add(a)
            destroys.add(d)

        findings = applies.findings + destroys.findings
        figures.record("crash", apply_kill_points=applies.tried, apply_converged=applies.converged,
                       destroy_kill_points=destroys.tried, destroy_converged=destroys.converged,
                       duplicates=findings["duplicate"], leaks=findings["leak"],
                       half_configured=findings["half"])
        failures = applies.failures + destroys.failures
        assert not failures, f"{len(failures)} kill point(s) did not converge:\n\n" + "\n\n".join(failures)
        # a point the run never reached is not a kill point: they must stay rare
        assert applies.tried >= POINTS * 3 // 4 and destroys.tried >= POINTS * 3 // 4, (
            f"too few runs were killed: apply {applies.tried}/{POINTS}, destroy {destroys.tried}/{POINTS}")


# --- focused regressions: one named point each, on a small cloud of networks -------------


def small_network_cloud(env: NetEnv) -> tuple[Path, str]:
    """A tenant with a provider network (flat, no DHCP), a vxlan network with DHCP and a
    router joining them: every kind of device the netlink driver makes. (manifest, the
    vxlan network's subnet)"""
    ext, net = free_subnets(2)
    gw = ext.replace(".0/24", ".1")
    t = env.tenant
    return env.write_manifest(f"""
        apiVersion: reconciler/v1
        kind: Tenant
        metadata: {{name: {t}}}
        ---
        apiVersion: reconciler/v1
        kind: Network
        metadata: {{name: ext, tenant: {t}}}
        spec: {{type: flat, external: true, subnets: [{{cidr: "{ext}", gateway: "{gw}", dhcp: {{enabled: false}}}}]}}
        ---
        apiVersion: reconciler/v1
        kind: Network
        metadata: {{name: net, tenant: {t}}}
        spec: {{type: vxlan, subnets: [{{cidr: "{net}"}}]}}
        ---
        apiVersion: reconciler/v1
        kind: Router
        metadata: {{name: r, tenant: {t}}}
        spec: {{networks: [net], external: {t}/ext, snat: true}}
        """), net


@pytest.mark.parametrize("point", ["netlink.bridge-unmarked", "netlink.vxlan-unmarked",
                                   "netlink.dhcp-leg-unmarked", "netlink.router-leg-unmarked"])
def test_a_device_made_but_not_yet_marked_is_finished_then_destroyed(point: str) -> None:
    """Killed between creating a device and marking it (the kernel takes no alias with
    the creation): the next apply takes the device as its own (its sidecar, written
    first, names it) instead of refusing it as someone else's, and destroy removes it."""
    with net_env() as env:
        manifest, net_cidr = small_network_cloud(env)
        t = env.tenant
        bridges = {n: host_name(Key("Network", t, n)) for n in ("ext", "net")}
        router = f"Router/{t}/r"
        devices = {  # every host-side device of the cloud -> the resource whose mark it carries
            bridges["ext"]: f"Network/{t}/ext", bridges["net"]: f"Network/{t}/net",
            "rv-" + bridges["net"][3:]: f"Network/{t}/net",
            "rd-" + short_hash(bridges["net"], net_cidr): f"Network/{t}/net",
            "rr-" + short_hash(router, f"Network/{t}/net"): router,
            "rg-" + short_hash(router, f"Network/{t}/ext"): router,
        }
        killed = env.apply(manifest, env={"RECONCILER_FAULTS": point})
        assert killed.returncode == -signal.SIGKILL, f"{point} not reached: {killed.stdout}{killed.stderr}"
        links = {e["ifname"]: e for e in all_links()}
        assert any(n in links and not links[n].get("ifalias") for n in devices), (
            f"killed at {point}, yet no device of this test is left unmarked")
        ok(env.apply(manifest))
        plan_is_zero(env, manifest)
        links = {e["ifname"]: e for e in all_links()}
        for name, owner in devices.items():
            assert name in links, f"{name} ({owner}) is missing"
            assert (links[name].get("ifalias") or "").startswith(
                f"reconciler:v1 home={env.home} key={owner} "), links[name]
        ok(env.cli("destroy", "--yes", str(manifest)))
        assert not env.leftovers(), env.leftovers()


def stub_namespace(name: str) -> None:
    """Replace namespace `name` by what a creation or removal killed half way leaves: its
    mount point in /run/netns, an empty file with no namespace bound to it."""
    run("ip", "netns", "del", name, check=False)
    Path("/run/netns", name).touch()


def snat_rules(ns: str) -> list[dict[str, Any]]:
    listed = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset").stdout)["nftables"]
    return [o for o in listed if "rule" in o and "masquerade" in json.dumps(o)]


def test_namespaces_cut_short_are_finished_then_removed() -> None:
    """Was: (1) a namespace whose creation (or removal) was killed between making its
    mount point and binding the namespace to it could not be entered ("failed to open
    netns"): every later apply and destroy of its network or router failed, and it
    stayed; (2) a router killed before its rules (or addresses, route) were in its
    namespace looked done to observe, which does not enter it: no later plan repaired it,
    and its tenants had no SNAT."""
    with net_env() as env:
        manifest, _cidr = small_network_cloud(env)
        dhcp_ns, router_ns = dhcp_ns_of(env.tenant, "net"), router_ns_of(env.tenant, "r")
        for point, stub in (("netlink.dhcp-leg-unmarked", dhcp_ns), ("netlink.router-leg-unmarked", router_ns),
                            ("netlink.router-before-rules", None)):
            killed = env.apply(manifest, env={"RECONCILER_FAULTS": point})
            assert killed.returncode == -signal.SIGKILL, f"{point}: {killed.stdout}{killed.stderr}"
            if stub:
                stub_namespace(stub)
        assert not snat_rules(router_ns)  # killed before them
        ok(env.apply(manifest))
        plan_is_zero(env, manifest)
        for ns in (dhcp_ns, router_ns):  # real namespaces again, with their legs
            legs = [e["ifname"] for e in json.loads(run("ip", "-n", ns, "-j", "link", "show").stdout)]
            assert any(leg.startswith(("d-", "qr-")) for leg in legs), (ns, legs)
        assert snat_rules(router_ns), f"no SNAT in {router_ns} after the apply that finished it"
        stub_namespace(router_ns)
        ok(env.cli("destroy", "--yes", str(manifest)))
        assert not env.leftovers(), env.leftovers()
        assert not Path("/run/netns", router_ns).exists()
