"""Networks on the real netlink driver: observe and plan with many networks, apply and
destroy of networks with DHCP; writes a section of docs/benchmarks.md.

    python -m benchmarks.networks --write docs/benchmarks.md

A command, never a test. Needs root and the network tools (scripts/setup-network.sh:
nftables, dnsmasq, iproute2, br_netfilter). Network, Router and SecurityGroup go through
the netlink driver; Tenant (and the other kinds, unused here) through the in-memory
drivers. Each scenario starts from a clean host state: a new tenant `rcbnet<hex>` with its
own state dir under /var/lib/reconciler/bench (so its own installation id, `home`), and
ends with a check that nothing of that home is left (links, namespaces, nftables tables,
dnsmasq processes), then the removal of its state dir.

- `observe-plan`: `--networks` (200) vxlan networks with one /24 subnet each and DHCP
  off (so the figures are about kernel objects: bridges, VXLAN devices, nftables chains;
  no namespaces or dnsmasq), applied once (`reconciler apply --parallelism 8`, timed);
  then `--repeat` (5) times, in this process through the controller API as `reconciler
  plan` does it: a fresh Controller (drivers built), the manifests loaded (not timed), then
  `Controller.observe()` and the planning (`planner.plan` with the conflicts check and
  the drivers' host problems) timed separately; every plan must be all no-op. Also, per
  repeat, a whole `reconciler plan` process for reference. Then the destroy (timed).
- `dhcp-P` (P = 1 and 8): `--dhcp-networks` (50) vxlan networks with DHCP on (one DHCP
  namespace, veth leg and dnsmasq each) applied from scratch by `reconciler apply
  --parallelism P`, checked (every bridge present, one live dnsmasq per network), then
  `reconciler destroy --parallelism P`; both timed; `--apply-repeat` (3) times. For
  comparison, the same number of networks without DHCP at parallelism 8.

Figures are medians with min and max. With `--write FILE` only the part of FILE between
`<!-- networks:begin -->` and `<!-- networks:end -->` is replaced (the section is
appended when the markers are absent); nothing else in the file changes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import _section
from benchmarks._section import (
    EnvPaths, Interference, fmt_s, home_of, log, make_dir, processes_mentioning,
    remove_host_objects, run,
)

from reconciler.models import Key
from reconciler.naming import host_name

REPO = Path(__file__).resolve().parent.parent
RECONCILER = REPO / ".venv" / "bin" / "reconciler"
BENCH_ROOT = Path("/var/lib/reconciler/bench")
PREFIX = "rcbnet"  # not "rcbench": the instances benchmark sweeps those
SUBNET_BASE = "10.250"  # 10.250.X.0/24 per network (tests: 10.251, 10.253; instances: 10.252)
BEGIN = "<!-- networks:begin -->"
END = "<!-- networks:end -->"
TOOLS = ("ip", "nft", "dnsmasq")


# --- one benchmark environment ---------------------------------------------------------------


@dataclass
class Env(EnvPaths):
    tenant: str
    root: Path

    @classmethod
    def create(cls) -> "Env":
        tenant = f"{PREFIX}{secrets.token_hex(4)}"
        make_dir(BENCH_ROOT.parent)
        make_dir(BENCH_ROOT)
        env = cls(tenant, BENCH_ROOT / tenant)
        make_dir(env.root)
        make_dir(env.state_dir)
        drivers = {k: "memory" for k in ("Tenant", "Image", "Instance", "Volume", "Bucket")}
        drivers.update(Network="netlink", Router="netlink", SecurityGroup="netlink")
        env.host_config.write_text(json.dumps({"stateDir": str(env.state_dir), "drivers": drivers}, indent=2) + "\n")
        return env

    def network_names(self, count: int) -> list[str]:
        return [f"net-{i:03d}" for i in range(count)]

    def write_manifest(self, count: int, dhcp: bool) -> Path:
        (self.root / "networks.txt").write_text("\n".join(self.network_names(count)) + "\n")  # for a sweep
        docs = [f"apiVersion: reconciler/v1\nkind: Tenant\nmetadata: {{name: {self.tenant}}}\nspec: {{}}\n"]
        for i, name in enumerate(self.network_names(count)):
            subnet = f"{SUBNET_BASE}.{i}.0/24"
            dhcp_part = "" if dhcp else ", dhcp: {enabled: false}"
            docs.append(f"apiVersion: reconciler/v1\nkind: Network\nmetadata: {{name: {name}, tenant: {self.tenant}}}\n"
                        f"spec: {{type: vxlan, subnets: [{{cidr: {subnet}{dhcp_part}}}]}}\n")
        make_dir(self.root / "manifests")
        path = self.root / "manifests" / "cloud.yaml"
        path.write_text("---\n".join(docs))
        return path

    def bridges(self, count: int) -> list[str]:
        return [host_name(Key("Network", self.tenant, n)) for n in self.network_names(count)]

    def dnsmasqs(self) -> dict[int, str]:
        return {p: c for p, c in processes_mentioning(str(self.state_dir)).items() if "dnsmasq" in c}

    def leftovers(self) -> list[tuple[str, str]]:
        """(what, name) of everything of this environment's home still on the host."""
        return leftovers_of(self.root, self.tenant)

    def cleanup(self) -> list[str]:
        return sweep_root(self.root, self.tenant)


def leftovers_of(root: Path, tenant: str) -> list[tuple[str, str]]:
    state = root / "state"
    home = home_of(state)
    names_file = root / "networks.txt"
    networks = names_file.read_text().split() if names_file.exists() else []
    hashes = {host_name(Key("Network", tenant, n))[3:] for n in networks}
    found: list[tuple[str, str]] = []
    links = json.loads(run("ip", "-j", "link", "show").stdout or "[]")
    for entry in links:
        name, alias = entry["ifname"], entry.get("ifalias") or ""
        if f"home={home}" in alias or (name[:3] in ("rc-", "rv-", "rl-") and name[3:] in hashes):
            found.append(("link", name))
    spaces = json.loads(run("ip", "-j", "netns", "list").stdout or "[]")
    for entry in spaces:
        if entry["name"].startswith("rc-dhcp-") and entry["name"][8:] in hashes:
            found.append(("namespace", entry["name"]))
    tables = json.loads(run("nft", "-j", "list", "tables").stdout)["nftables"]
    for obj in tables:
        table = obj.get("table")
        if table and table["name"] == f"reconciler_{home}":
            found.append(("nft table", f"{table['family']} {table['name']}"))
    for pid in processes_mentioning(str(state)):
        found.append(("process", str(pid)))
    return found


def sweep_root(root: Path, tenant: str) -> list[str]:
    """Remove what is left of one environment (by its home and network names), then its
    state dir; what could not be removed."""
    left = leftovers_of(root, tenant) if root.exists() else []
    remove_host_objects(left)
    problems = []
    if left:
        time.sleep(0.5)
        problems = [f"{w} {n}" for w, n in leftovers_of(root, tenant)]
    shutil.rmtree(root, ignore_errors=True)
    return problems


def sweep_all() -> list[str]:
    """Everything an interrupted run of this command left: rcbnet* environments only."""
    problems: list[str] = []
    if BENCH_ROOT.exists():
        for root in sorted(BENCH_ROOT.glob(f"{PREFIX}*")):
            log(f"removing leftovers of {root.name}")
            problems += sweep_root(root, root.name)
    return problems


# --- interference ------------------------------------------------------------------------------


WATCH = Interference("benchmarks.networks", PREFIX)


def _check_clean(env: Env, what: str) -> None:
    deadline = time.monotonic() + 5  # a killed dnsmasq is reaped by PID 1 within ~1.5 s
    while True:
        left = env.leftovers()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        raise RuntimeError(f"{what} left: " + "; ".join(f"{w} {n}" for w, n in left[:20]))


def scenario_observe_plan(count: int, repeat: int) -> dict[str, Any]:
    from reconciler.cli.app import tune_gc
    from reconciler.controller import Controller
    from reconciler.hostconfig import load_host_config
    from reconciler.log import configure
    from reconciler.planner import Action, plan

    configure("warning", json=True)
    tune_gc()
    env = Env.create()
    try:
        manifest = env.write_manifest(count, dhcp=False)
        apply_s, _ = env.cli("apply", str(manifest), "--yes", "--parallelism", "8")
        missing = [b for b in env.bridges(count) if not Path("/sys/class/net", b).exists()]
        if missing:
            raise RuntimeError(f"after apply, {len(missing)} bridges missing: {missing[:5]}")
        runs: list[dict[str, float]] = []
        owned = 0
        for _ in range(repeat):
            WATCH.sample()
            controller = Controller(load_host_config(env.host_config))
            desired = controller.load([manifest])
            netlink = controller.drivers["Network"]
            gc.collect()
            t0 = time.perf_counter()
            observation = controller.observe()
            t1 = time.perf_counter()
            the_plan = plan(desired, observation, controller.graph(desired),
                            conflicts=controller.conflicts(desired, observation))
            the_plan.errors.extend(controller.host_problems(desired))
            t2 = time.perf_counter()
            gc.collect()
            t3 = time.perf_counter()
            netlink.observe()
            t4 = time.perf_counter()
            acting = [c for c in the_plan.changes if c.action is not Action.NOOP]
            if acting or the_plan.errors:
                raise RuntimeError(f"the plan after apply is not a no-op: {[c.id for c in acting][:5]} "
                                   f"{[str(e) for e in the_plan.errors][:5]}")
            owned = len(observation.owned)
            whole_s, result = env.cli("plan", "--detailed-exitcode", str(manifest))
            runs.append({"observe": t1 - t0, "plan": t2 - t1, "observe_netlink": t4 - t3, "whole": whole_s})
        destroy_s, _ = env.cli("destroy", str(manifest), "--yes", "--parallelism", "8")
        _check_clean(env, "destroy")
        return {"apply": apply_s, "destroy": destroy_s, "runs": runs, "owned": owned}
    finally:
        problems = env.cleanup()
        if problems:
            raise RuntimeError("cleanup failed: " + "; ".join(problems))


def scenario_apply(count: int, parallelism: int, dhcp: bool = True) -> dict[str, Any]:
    env = Env.create()
    try:
        manifest = env.write_manifest(count, dhcp=dhcp)
        WATCH.sample()
        load = os.getloadavg()[0]
        apply_s, _ = env.cli("apply", str(manifest), "--yes", "--parallelism", str(parallelism))
        WATCH.sample()
        missing = [b for b in env.bridges(count) if not Path("/sys/class/net", b).exists()]
        if missing:
            raise RuntimeError(f"after apply, {len(missing)} bridges missing: {missing[:5]}")
        dnsmasqs = env.dnsmasqs()
        if len(dnsmasqs) != (count if dhcp else 0):
            raise RuntimeError(f"after apply, {len(dnsmasqs)} dnsmasq processes run, not {count if dhcp else 0}")
        destroy_s, _ = env.cli("destroy", str(manifest), "--yes", "--parallelism", str(parallelism))
        _check_clean(env, "destroy")
        return {"apply": apply_s, "destroy": destroy_s, "dnsmasq": len(dnsmasqs), "load": load}
    finally:
        problems = env.cleanup()
        if problems:
            raise RuntimeError("cleanup failed: " + "; ".join(problems))


# --- the report --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    from benchmarks.plan import machine as planner_machine

    info = planner_machine()
    info.pop("libraries", None)
    nft = run("nft", "--version", check=False).stdout.strip()
    dnsmasq = [" ".join(line.split()[:3]) for line in run("dnsmasq", "--version", check=False).stdout.splitlines()[:1]]
    ip = run("ip", "-V", check=False).stdout.strip()
    try:
        import importlib.metadata as md

        pyroute2 = md.version("pyroute2")
    except Exception:  # pragma: no cover - reported as unknown
        pyroute2 = "unknown"
    info["network tools"] = (f"{nft}; {dnsmasq[0] if dnsmasq else 'dnsmasq ?'}; {ip}; pyroute2 {pyroute2}; "
                             "br_netfilter loaded")
    return info


def write_section(path: Path, section: str) -> None:
    _section.write_section(path, section, BEGIN, END)


def report(results: Mapping[str, Any], args: argparse.Namespace, command: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    op = results["observe-plan"]
    n, d = args.networks, args.dhcp_networks

    def row(label: str, values: Sequence[float]) -> str:
        return f"| {label} | {fmt_s(statistics.median(values))} | {fmt_s(min(values))} | {fmt_s(max(values))} |"

    runs = op["runs"]
    lines = [
        BEGIN,
        "## Networks on the netlink driver (real kernel objects)",
        "",
        "Generated by `benchmarks/networks.py`; a measurement, never a test. It rewrites only the part "
        "of this file between its markers.",
        "",
        "### How to reproduce",
        "",
        "From the project root, as root, with the network tools installed (`scripts/setup-network.sh`, "
        "part of `make services`):",
        "",
        *_section.reproduce(command, now, machine()),
    ]
    lines += [
        "",
        "### What is measured",
        "",
        "Network, Router and SecurityGroup are realised by the netlink driver (pyroute2, nftables, "
        "dnsmasq); the Tenant stays in the in-memory driver. Every scenario starts from a clean host: a "
        f"new tenant `{PREFIX}<hex>` with its own state dir under `{BENCH_ROOT}` (so its own installation "
        "id); after its destroy the benchmark checks that no link, namespace, nftables table or process "
        "of that installation is left, then removes the state dir.",
        "",
        f"- **observe and plan with {n} networks**: {n} vxlan networks, one /24 subnet each, **DHCP off** "
        "(so this is about kernel objects only: a bridge and a VXLAN device per network, nftables "
        "chains; no namespace or dnsmasq), applied once. Then, "
        f"{args.repeat} times, in this process through the controller API as `reconciler plan` does it: "
        "a fresh `Controller` (drivers built) and the manifests loaded (not timed), then "
        "`Controller.observe()` (every driver: the netlink driver's one dump plus the in-memory "
        "tenant) and the planning (`planner.plan` with the conflicts check and the drivers' host "
        "checks) timed separately; each plan must be all no-op. The netlink driver's `observe()` alone "
        "and a whole `reconciler plan` process (start-up and loading included) are given for reference.",
        f"- **apply {d} networks with DHCP**: {d} vxlan networks with DHCP on (per network: bridge, VXLAN "
        "device, DHCP namespace with a veth leg, a dnsmasq) applied from scratch by "
        "`reconciler apply --yes --parallelism 1` and `--parallelism 8` (whole process, until it "
        f"returns; then {d} bridges and {d} live dnsmasq processes are checked), each followed by "
        "`reconciler destroy --yes` at the same parallelism (also timed). For comparison, the same "
        f"{d} networks without DHCP, at parallelism 8.",
        "",
        f"Medians of {args.repeat} runs (observe and plan) and {args.apply_repeat} runs (apply and "
        "destroy; parallelism 1 and 8 alternate), with the fastest and slowest.",
        "",
        "### Results",
        "",
        "| step | median | min | max |",
        "|---|---:|---:|---:|",
        row(f"observe, {n} networks applied (`Controller.observe()`)", [r["observe"] for r in runs]),
        row("… the netlink driver's `observe()` alone", [r["observe_netlink"] for r in runs]),
        row(f"plan, {n} networks, all no-op (`planner.plan` + checks)", [r["plan"] for r in runs]),
        row(f"whole `reconciler plan` process, {n} networks", [r["whole"] for r in runs]),
    ]
    for p in (1, 8):
        rows = results[f"dhcp-{p}"]
        lines.append(row(f"apply {d} networks with DHCP, `--parallelism {p}`", [r["apply"] for r in rows]))
    for p in (1, 8):
        rows = results[f"dhcp-{p}"]
        lines.append(row(f"destroy {d} networks with DHCP, `--parallelism {p}`", [r["destroy"] for r in rows]))
    plain = results["plain-8"]
    lines.append(row(f"apply {d} networks without DHCP, `--parallelism 8` (for comparison)", [r["apply"] for r in plain]))
    lines.append(row(f"destroy {d} networks without DHCP, `--parallelism 8`", [r["destroy"] for r in plain]))
    a1 = statistics.median(r["apply"] for r in results["dhcp-1"])
    a8 = statistics.median(r["apply"] for r in results["dhcp-8"])
    whole = statistics.median(r["whole"] for r in runs)
    p50 = statistics.median(r["apply"] for r in results["plain-8"])
    x50 = statistics.median(r["destroy"] for r in results["plain-8"])
    observe = statistics.median(r["observe"] for r in runs)
    lines += [
        "",
        "### Notes",
        "",
        f"- Per network: observing costs {fmt_s(observe / n)} (median over {n}), applying one with DHCP "
        f"{fmt_s(a1 / d)} at parallelism 1 and {fmt_s(a8 / d)} at parallelism 8 (whole process divided by {d}; "
        f"parallelism 8 is {a1 / a8:.1f}x faster on {os.cpu_count()} cores).",
        f"- The whole `reconciler plan` process took {fmt_s(whole)}, of which observing the host "
        f"{fmt_s(observe)} and planning {fmt_s(statistics.median(r['plan'] for r in runs))}; the rest is "
        "interpreter and CLI start-up and loading the manifests.",
        f"- For scale: creating the {n} networks without DHCP took {fmt_s(op['apply'])} (`apply "
        f"--parallelism 8`, once) and destroying them {fmt_s(op['destroy'])}; the no-op plans saw "
        f"{op['owned']} owned host objects ({n} networks and the tenant).",
        f"- Without DHCP, a network cost {fmt_s(p50 / d)} to create among {d} and {fmt_s(op['apply'] / n)} "
        f"among {n} (destroy: {fmt_s(x50 / d)} and {fmt_s(op['destroy'] / n)})"
        + (": apply does not scale linearly. The driver reads the whole host again around every change "
           "(the link dump and both nftables tables, listed whole: `NetlinkDriver.facts()`), so "
           "each change costs more the more networks there are, and an apply of N networks grows "
           "roughly with N²." if n > d and op["apply"] / n > 1.5 * p50 / d else
           ": about linear.")
        + (" Parallelism 8 barely helps: the driver serialises its nftables and sidecar updates under "
           "one lock, and there are two cores." if a1 / a8 < 1.3 else ""),
        f"- After every destroy the check found nothing of the installation left ({1 + 3 * args.apply_repeat} "
        "scenarios); every state dir of the benchmark was removed at the end.",
        "- Interference: " + (f"other work ran on this host meanwhile ({', '.join(sorted(WATCH.others))}); "
                              "the min columns are the least disturbed runs. " if WATCH.others else
                              "no other test run or reconciler command was seen during the runs. ")
        + (f"1-minute load average seen: {min(WATCH.load):.1f} to {max(WATCH.load):.1f}." if WATCH.load else ""),
        "",
        END,
    ]
    return "\n".join(lines) + "\n"


def preflight() -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (bridges, namespaces, nftables)")
    reasons += [f"{t} missing: run scripts/setup-network.sh" for t in TOOLS if shutil.which(t) is None]
    if not RECONCILER.exists():
        reasons.append(f"{RECONCILER} missing: install the project into .venv (make setup)")
    if reasons:
        raise SystemExit("cannot run: " + "; ".join(reasons))


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.networks", description=__doc__.split("\n")[0])
    parser.add_argument("--networks", type=int, default=200, help="Networks for observe and plan (default: 200).")
    parser.add_argument("--dhcp-networks", type=int, default=50, help="Networks with DHCP to apply (default: 50).")
    parser.add_argument("--repeat", type=int, default=5, help="Observe and plan runs (default: 5).")
    parser.add_argument("--apply-repeat", type=int, default=3, help="Apply and destroy runs (default: 3).")
    parser.add_argument("--write", type=Path, default=None,
                        help="Write the Markdown section into this file (between its markers).")
    parser.add_argument("--json", type=Path, default=None, help="Also dump the raw results as JSON here.")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.apply_repeat < 1:
        parser.error("--repeat and --apply-repeat must be at least 1")
    if not 1 <= args.networks <= 256 or not 1 <= args.dhcp_networks <= 256:
        parser.error("--networks and --dhcp-networks: between 1 and 256 (one 10.250.X.0/24 each)")
    preflight()
    signal.signal(signal.SIGTERM, _sigterm)
    results: dict[str, Any] = {"dhcp-1": [], "dhcp-8": [], "plain-8": []}
    try:
        problems = sweep_all()
        if problems:
            raise SystemExit("leftovers of an earlier run could not be removed: " + "; ".join(problems))
        log(f"observe and plan with {args.networks} networks ({args.repeat} runs)...")
        op = results["observe-plan"] = scenario_observe_plan(args.networks, args.repeat)
        log(f"  apply {fmt_s(op['apply'])}; observe {[fmt_s(r['observe']) for r in op['runs']]}; "
            f"plan {[fmt_s(r['plan']) for r in op['runs']]}; destroy {fmt_s(op['destroy'])}")
        for i in range(args.apply_repeat):
            for p in (1, 8):
                log(f"run {i + 1}: apply {args.dhcp_networks} networks with DHCP at parallelism {p}...")
                r = scenario_apply(args.dhcp_networks, p)
                results[f"dhcp-{p}"].append(r)
                log(f"  apply {fmt_s(r['apply'])}, destroy {fmt_s(r['destroy'])}")
            log(f"run {i + 1}: apply {args.dhcp_networks} networks without DHCP at parallelism 8...")
            r = scenario_apply(args.dhcp_networks, 8, dhcp=False)
            results["plain-8"].append(r)
            log(f"  apply {fmt_s(r['apply'])}, destroy {fmt_s(r['destroy'])}")
    finally:
        problems = sweep_all()
        if problems:
            log("cleanup problems: " + "; ".join(problems))
        try:
            if BENCH_ROOT.exists() and not any(BENCH_ROOT.iterdir()):
                BENCH_ROOT.rmdir()
        except OSError:
            pass
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    command = ".venv/bin/python -m benchmarks.networks"
    for flag, value, default in (("--networks", args.networks, 200), ("--dhcp-networks", args.dhcp_networks, 50),
                                 ("--repeat", args.repeat, 5), ("--apply-repeat", args.apply_repeat, 3)):
        if value != default:
            command += f" {flag} {value}"
    if args.write:
        command += f" --write {args.write}"
    section = report(results, args, command)
    if args.write:
        write_section(args.write, section)
        log(f"wrote the networks section of {args.write}")
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
