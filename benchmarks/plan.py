"""Planner benchmark: load and plan generated clouds of N resources; writes docs/benchmarks.md.

    python -m benchmarks.plan --sizes 1000 10000 --repeat 5 --write docs/benchmarks.md

A command, never a test. For each size it writes a valid cloud as YAML files in a
temporary folder (one file per tenant, several documents per file; tenants with
networks and subnets, a router, security groups, images, instances with NICs and
volumes, volumes and buckets) and measures, over `--repeat` runs (median, min, max):

- load + validate: `reconciler.loader.load` of the folder (parse, models, cross checks,
  which build the resource graph once; the plans reuse it, as the CLI does);
- build_graph alone, built afresh, for reference;
- plan from scratch: `plan(desired, Observation())`, everything to create;
- no-op plan: against an Observation equal to what the from-scratch plan would apply
  (built in memory from its targets), so every change is a noop;
- one field changed: the same observation, one instance's `memoryMiB` edited;
- peak memory: traced Python allocations (tracemalloc, in a separate untimed pass) and
  the worker process's maximum resident set size.

Each size runs in a fresh worker process so memory figures do not leak between sizes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import yaml

from benchmarks import _section

API = "reconciler/v1"

#: one tenant "unit": resources per tenant, in proportions of a small real cloud
PER_TENANT = {
    "Tenant": 1,
    "Network": 3,
    "Router": 1,
    "SecurityGroup": 3,
    "Image": 2,
    "Instance": 20,
    "Volume": 15,
    "Bucket": 5,
}
UNIT = sum(PER_TENANT.values())  # 50
#: the provider tenant and its external network
SHARED = 2


# --- the generated cloud --------------------------------------------------------------


def _doc(kind: str, name: str, tenant: str | None, spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if tenant is not None:
        meta["tenant"] = tenant
    if labels:
        meta["labels"] = labels
    return {"apiVersion": API, "kind": kind, "metadata": meta, "spec": spec}


def tenant_docs(t: int) -> list[dict[str, Any]]:
    """The 50 documents of tenant number `t`: valid, and referencing each other."""
    name = f"t{t:05d}"
    docs = [_doc("Tenant", name, None, {"description": f"generated tenant {t}"}, {"bench": "yes"})]
    nets = []
    for n in range(PER_TENANT["Network"]):
        net = f"net-{n}"
        nets.append(net)
        subnets: list[dict[str, Any]] = [{"cidr": f"10.{n}.0.0/24", "dnsServers": [f"10.{n}.0.1"]}]
        if n == 0:
            subnets.append({"cidr": f"10.{n}.1.0/24", "gateway": f"10.{n}.1.1",
                            "dhcp": {"start": f"10.{n}.1.100", "end": f"10.{n}.1.200"}})
        spec: dict[str, Any] = {"type": "vxlan", "subnets": subnets}
        if n == 2:
            spec["mtu"] = 1400
        docs.append(_doc("Network", net, name, spec))
    docs.append(_doc("Router", "edge", name, {"networks": nets, "external": "infra/public", "snat": True}))
    groups = ["web", "app", "db"]
    docs.append(_doc("SecurityGroup", "web", name, {"description": "HTTP and SSH", "rules": [
        {"direction": "ingress", "protocol": "tcp", "ports": "80", "remote": "0.0.0.0/0"},
        {"direction": "ingress", "protocol": "tcp", "ports": "443", "remote": "0.0.0.0/0"},
        {"direction": "ingress", "protocol": "tcp", "ports": "22", "remote": "10.250.0.0/24"},
        {"direction": "egress", "protocol": "any", "remote": "0.0.0.0/0"},
    ]}))
    docs.append(_doc("SecurityGroup", "app", name, {"rules": [
        {"direction": "ingress", "protocol": "tcp", "ports": "8000-8080", "remote": "web"},
        {"direction": "ingress", "protocol": "icmp", "remote": "10.0.0.0/8"},
    ]}))
    docs.append(_doc("SecurityGroup", "db", name, {"rules": [
        {"direction": "ingress", "protocol": "tcp", "ports": "5432", "remote": "app"},
    ]}))
    for i in range(PER_TENANT["Image"]):
        docs.append(_doc("Image", f"img-{i}", name, {
            "source": f"/var/lib/reconciler/images/base-{i}.qcow2",
            "format": "qcow2",
            "sha256": f"{(t * 7 + i):064x}",
        }))
    n_vol = PER_TENANT["Volume"]
    attached = 10  # the first 10 volumes are attached to the first 10 instances
    for i in range(PER_TENANT["Instance"]):
        net = nets[i % len(nets)]
        nics: list[dict[str, Any]] = [{"network": net, "securityGroups": [groups[i % 3]]}]
        if i % 4 == 0:
            nics[0]["ip"] = f"10.{i % len(nets)}.0.{20 + i}"
        if i % 5 == 0:
            nics.append({"network": nets[(i + 1) % len(nets)]})
        spec = {
            "vcpus": 1 + i % 4,
            "memoryMiB": 512 * (1 + i % 4),
            "image": f"img-{i % PER_TENANT['Image']}",
            "rootDiskGiB": 10,
            "networks": nics,
            "sshAuthorizedKeys": [f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA{t:08d}{i:04d} admin@example"],
        }
        if i < attached:
            spec["volumes"] = [{"volume": f"vol-{i}"}]
        if i % 3 == 0:
            spec["userData"] = f"#cloud-config\nhostname: vm-{i}\n"
        docs.append(_doc("Instance", f"vm-{i}", name, spec, {"tier": groups[i % 3]}))
    for i in range(n_vol):
        spec = {"sizeGiB": 1 + i % 50}
        if i % 3 == 0:
            spec["deletionPolicy"] = "Delete"
        docs.append(_doc("Volume", f"vol-{i}", name, spec))
    for i in range(PER_TENANT["Bucket"]):
        spec = {"acl": "private" if i % 2 else "public-read", "quota": {"bytes": 1 << 30},
                "metadata": {"owner": name}}
        docs.append(_doc("Bucket", f"bucket-{i}", name, spec))
    return docs


def shared_docs() -> list[dict[str, Any]]:
    return [
        _doc("Tenant", "infra", None, {"description": "provider networks"}),
        _doc("Network", "public", "infra", {"type": "flat", "external": True, "subnets": [
            {"cidr": "10.250.0.0/24", "gateway": "10.250.0.1", "dhcp": {"enabled": False}}]}),
    ]


def write_cloud(folder: Path, size: int) -> tuple[int, int]:
    """Write a cloud of exactly `size` resources; (resources, files) written."""
    if size < SHARED + UNIT:
        raise SystemExit(f"--sizes: the smallest cloud has {SHARED + UNIT} resources")
    units, extra = divmod(size - SHARED, UNIT)
    count = 0
    files = 0

    def dump(path: Path, docs: list[dict[str, Any]]) -> None:
        nonlocal count, files
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=None))
        count += len(docs)
        files += 1

    dump(folder / "infra.yaml", shared_docs())
    for t in range(units):
        docs = tenant_docs(t)
        if t == units - 1:  # the remainder as more buckets of the last tenant
            name = docs[0]["metadata"]["name"]
            docs += [_doc("Bucket", f"extra-{i}", name, {"acl": "private"}) for i in range(extra)]
        dump(folder / f"tenants/{t // 100:03d}/t{t:05d}.yaml", docs)
    return count, files


# --- measuring ---------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, started on a collected heap (the collector stays on)."""
    gc.collect()
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _observation_from(the_plan: Any) -> Any:
    """What the host would hold after applying a from-scratch plan: one object per target."""
    from reconciler.naming import host_name
    from reconciler.state import Observation, Observed

    owned = [
        Observed(c.key, host_name(c.key), c.target.spec, c.target.mark, {})
        for c in the_plan.changes
        if c.target is not None
    ]
    return Observation(owned=owned)


def _with_one_change(desired: Any) -> tuple[Any, str]:
    """A copy of `desired` with one instance's memoryMiB doubled."""
    from reconciler.models import KINDS, Desired, Resource

    key = sorted(r.key for r in desired.of_kind("Instance"))[len(desired.resources) % 7]
    res = desired.resources[key]
    spec_set = dict(res.spec_set)
    spec_set["memoryMiB"] = res.spec_full["memoryMiB"] * 2
    spec = KINDS[key.kind].model_validate(spec_set)
    resources = dict(desired.resources)
    resources[key] = Resource.build(res.metadata, spec, res.source, res.lines)
    return Desired(resources=resources, unloaded=set(desired.unloaded)), key.display


def _one_run(folder: Path, written: int) -> tuple[dict[str, float], dict[str, dict[str, int]], dict[str, int], str]:
    """One repeat: (seconds per step, action counts per plan, resources per kind, changed resource)."""
    from reconciler.dependencies import build_graph
    from reconciler.loader import load
    from reconciler.planner import Action, plan
    from reconciler.state import Observation

    times: dict[str, float] = {}
    times["load"], (desired, problems) = _timed(lambda: load([folder]))
    if problems:
        raise SystemExit("the generated cloud is invalid:\n" + "\n".join(map(str, problems[:20])))
    assert len(desired) == written, (len(desired), written)
    desired.derived.clear()  # load built the graph (for its cycle check): time a fresh build
    times["graph"], _ = _timed(lambda: build_graph(desired))
    times["scratch"], scratch = _timed(lambda: plan(desired, Observation()))
    observed = _observation_from(scratch)
    times["noop"], noop = _timed(lambda: plan(desired, observed))
    changed, which = _with_one_change(desired)
    build_graph(changed)  # as loading the edited manifests would (untimed)
    times["one"], one = _timed(lambda: plan(changed, observed))
    plans = {"scratch": scratch, "noop": noop, "one": one}
    for name, p in plans.items():
        if p.errors:
            raise SystemExit(f"{name} plan has errors: {p.errors[:5]}")
    counts = {name: _count(p) for name, p in plans.items()}
    if counts["noop"] != {Action.NOOP.value: written}:
        print(f"WARNING: the no-op plan is not all noop: {counts['noop']}", file=sys.stderr)
    kinds = dict(Counter(r.key.kind for r in desired))
    return times, counts, kinds, which


def _peak_memory(folder: Path) -> tuple[int, int]:
    """Peak traced bytes during load, then during a from-scratch and a no-op plan (untimed)."""
    from reconciler.loader import load
    from reconciler.planner import plan
    from reconciler.state import Observation

    gc.collect()
    tracemalloc.start()
    try:
        desired, _ = load([folder])
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        observed = _observation_from(plan(desired, Observation()))
        plan(desired, observed)
        _, plan_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return load_peak, plan_peak


def worker(size: int, repeat: int) -> dict[str, Any]:
    """Measure one size in this process; a JSON-able result."""
    from reconciler.cli.app import tune_gc

    tune_gc()  # the garbage-collector settings of the `reconciler` command
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in ("load", "graph", "scratch", "noop", "one")}
    with tempfile.TemporaryDirectory(prefix="reconciler-bench-") as tmp:
        folder = Path(tmp)
        written, files = write_cloud(folder, size)
        yaml_bytes = sum(p.stat().st_size for p in folder.rglob("*.yaml"))
        for _ in range(repeat):
            run, counts, kinds, which = _one_run(folder, written)
            for step, seconds in run.items():
                times[step].append(seconds)
        load_peak, plan_peak = _peak_memory(folder)
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "size": size,
        "resources": written,
        "files": files,
        "yaml_bytes": yaml_bytes,
        "repeat": repeat,
        "times": times,
        "counts": counts,
        "changed": which,
        "kinds": kinds,
        "tracemalloc_load_peak": load_peak,
        "tracemalloc_plan_peak": plan_peak,
        "maxrss": maxrss_kib * 1024,
        "loadavg": [load_before, os.getloadavg()[0]],
    }


def _count(the_plan: Any) -> dict[str, int]:
    return dict(sorted(Counter(c.action.value for c in the_plan.changes).items()))


# --- the report ------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    import pydantic
    import networkx

    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} ({usable} usable by this process)",
        "memory": mem,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": f"pydantic {pydantic.VERSION}, PyYAML {yaml.__version__} "
                     f"({'C' if hasattr(yaml, 'CSafeLoader') else 'pure-Python'} parser), "
                     f"networkx {networkx.__version__}",
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:,.1f} ms"


def _mib(n: float) -> str:
    return f"{n / 1024 / 1024:,.0f} MiB"


ROWS = [
    ("load", "load + validate (parse YAML, models, cross-resource checks)"),
    ("graph", "build_graph alone (done once, inside load)"),
    ("scratch", "plan from scratch (empty Observation)"),
    ("noop", "no-op plan (observed = applied)"),
    ("one", "plan with one field changed"),
]


def report(results: list[dict[str, Any]], command: str, aim_s: float) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Planner benchmarks",
        "",
        "Generated by `benchmarks/plan.py`; a measurement, never a test. The aim: a cloud of "
        f"10,000 resources planned in under {aim_s:g} second.",
        "",
        "## How to reproduce",
        "",
        "From the project root (`make bench` runs the same):",
        "",
        *_section.reproduce(command, now, machine()),
    ]
    lines += [
        "",
        "## What is measured",
        "",
        "Each size is a generated, valid cloud written as YAML (one file per tenant, several "
        "documents per file) in a temporary folder, loaded and planned in a fresh worker "
        "process. Per tenant: " + ", ".join(f"{n} {k}" for k, n in PER_TENANT.items())
        + " (instances with one NIC or, for a fifth of them, two; a quarter with a fixed address; a third with cloud-init "
        "user data; two thirds of the volumes attached; security groups naming each other); plus a provider tenant with the "
        "external network every router uses; a remainder is made up with buckets.",
        "",
        "- **load + validate**: `reconciler.loader.load(folder)`: parse, validate every document "
        "against its model, run the cross-resource checks (references, subnets, addresses, "
        "quotas, cycles). The files are in the page cache after the first run.",
        "- **build_graph**: the resource graph alone, built afresh. `load` builds it once for its "
        "cycle check and the plans reuse it, as `reconciler plan` does; so a command's total is "
        "load + one plan.",
        "- **plan from scratch**: `plan(desired, Observation())`: every resource to create.",
        "- **no-op plan**: `plan(desired, observation)` where the observation holds, for each "
        "target of the from-scratch plan, `Observed(key, identity, target.spec, target.mark, {})` "
        "(what a perfect apply would leave): every change must be a noop.",
        "- **one field changed**: the same observation, with one instance's `memoryMiB` doubled in "
        "the desired state: one update, the rest noops.",
        "- **peak memory**: traced Python allocations (tracemalloc) during the load, and during "
        "the from-scratch plus no-op plans with the desired state and observation alive; and the "
        "worker's maximum resident set size (interpreter and libraries included).",
        "",
        "Times are the median of the repeats, with the fastest and slowest; each timed step "
        "starts after a `gc.collect()`, with the garbage collector on and tuned as the "
        "`reconciler` command tunes it (`reconciler.cli.app.tune_gc`).",
        "",
    ]
    for r in results:
        n = r["resources"]
        lines += [
            f"## {n:,} resources",
            "",
            f"{r['files']:,} files, {r['yaml_bytes'] / 1024 / 1024:.1f} MiB of YAML; "
            f"{r['repeat']} repeats. Load average (1 min) {r['loadavg'][0]:.1f} before, "
            f"{r['loadavg'][1]:.1f} after" + _busy(r["loadavg"]) + ".",
            "",
            "| step | median | min | max | per resource (median) |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, label in ROWS:
            ts = r["times"][key]
            med = statistics.median(ts)
            lines.append(f"| {label} | {_ms(med)} | {_ms(min(ts))} | {_ms(max(ts))} | "
                         f"{med / n * 1e6:,.0f} µs |")
        lines += [
            "",
            "| memory | |",
            "|---|---:|",
            f"| peak traced allocations, load + validate | {_mib(r['tracemalloc_load_peak'])} |",
            f"| peak traced allocations, from-scratch + no-op plans | {_mib(r['tracemalloc_plan_peak'])} |",
            f"| maximum resident set size of the worker | {_mib(r['maxrss'])} |",
            "",
            "Plans: from scratch " + _fmt_counts(r["counts"]["scratch"]) + "; no-op "
            + _fmt_counts(r["counts"]["noop"]) + "; one field changed ("
            + f"`memoryMiB` of {r['changed']}) " + _fmt_counts(r["counts"]["one"]) + ".",
            "",
        ]
    lines += ["## Against the aim", ""]
    for r in results:
        scratch = statistics.median(r["times"]["scratch"])
        noop = statistics.median(r["times"]["noop"])
        one = statistics.median(r["times"]["one"])
        verdict = "met" if max(scratch, noop, one) < aim_s else "not met"
        lines.append(
            f"- {r['resources']:,} resources: from scratch {_ms(scratch)}, no-op {_ms(noop)}, "
            f"one change {_ms(one)}: under {aim_s:g} s is **{verdict}**."
        )
    for r in results:
        total = statistics.median(r["times"]["load"]) + statistics.median(r["times"]["scratch"])
        lines.append(
            f"- {r['resources']:,} resources, counting load and validation too (what `reconciler plan` "
            f"does before observing): {_ms(total)}: under {aim_s:g} s is "
            f"**{'met' if total < aim_s else 'not met'}**."
        )
    lines.append("")
    return "\n".join(lines)


def _busy(loadavg: list[float]) -> str:
    cores = os.cpu_count() or 1
    if max(loadavg) > cores * 0.75:
        return f" (other work was running on these {cores} cores: expect these times to be high)"
    return ""


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000],
                        help="Cloud sizes, in resources (default: 1000 10000).")
    parser.add_argument("--repeat", type=int, default=5, help="Runs per size (default: 5).")
    parser.add_argument("--write", type=Path, default=None, help="Write the Markdown report here.")
    parser.add_argument("--aim", type=float, default=1.0, help="Seconds the aim allows (default: 1).")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    if args.worker is not None:
        json.dump(worker(args.worker, args.repeat), sys.stdout)
        return 0

    results = []
    for size in args.sizes:
        print(f"benchmarking {size:,} resources x {args.repeat}...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.plan", "--worker", str(size), "--repeat", str(args.repeat)],
            stdout=subprocess.PIPE, check=True, cwd=Path(__file__).resolve().parent.parent,
        )
        result = json.loads(proc.stdout)
        results.append(result)
        for key, label in ROWS:
            ts = result["times"][key]
            print(f"  {label:<62} median {_ms(statistics.median(ts)):>10}  "
                  f"min {_ms(min(ts)):>10}  max {_ms(max(ts)):>10}", file=sys.stderr)
        print(f"  peak traced: load {_mib(result['tracemalloc_load_peak'])}, plans "
              f"{_mib(result['tracemalloc_plan_peak'])}; max RSS {_mib(result['maxrss'])}", file=sys.stderr)
    sizes = " ".join(str(s) for s in args.sizes)
    command = f".venv/bin/python -m benchmarks.plan --sizes {sizes} --repeat {args.repeat}"
    if args.write:
        command += f" --write {args.write}"
    text = report(results, command, args.aim)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
