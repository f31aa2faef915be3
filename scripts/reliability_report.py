"""Write the figures of a reliability run into docs/reliability.md.

    python scripts/reliability_report.py FIGURES_DIR docs/reliability.md [--duration S]

FIGURES_DIR holds one JSON file per suite, written by the tests through
tests/figures.py (`RECONCILER_FIGURES=DIR`). The run's level ("ci" or "release") picks
the section rewritten (`<!-- figures-LEVEL:begin -->` ... `end -->`); nothing else in
the document changes. `make reliability` runs the suites at release counts and calls
this; a CI-level section comes from `make reliability-ci`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._section import write_section  # noqa: E402
from benchmarks.plan import machine  # noqa: E402

#: suite -> (title, [(key, label)]) in the order the document shows them; keys a suite
#: records beyond these are shown after them as they are
SUITES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "crash": ("Crash safety (SIGKILL during apply and destroy, real drivers)", [
        ("apply_kill_points", "apply kill points tried"), ("apply_converged", "converged after a re-run"),
        ("destroy_kill_points", "destroy kill points tried"), ("destroy_converged", "converged after a re-run"),
        ("duplicates", "duplicates found"), ("leaks", "leaked objects found"),
        ("half_configured", "half-configured objects found")]),
    "faults": ("Faults (services stopped, state directory full, journal locked)", [
        ("injected", "faults injected"), ("survived", "survived (converged, nothing lost)")]),
    "bad_input": ("Bad input (generated manifests through validate and plan)", [
        ("manifests", "manifests generated"), ("valid", "valid"), ("invalid", "invalid"),
        ("tracebacks", "tracebacks"), ("hangs", "hangs"),
        ("errors_without_file_line", "errors without FILE:LINE")]),
    "ownership": ("Ownership (a hand-made object with our name, per kind)", [
        ("kinds", "kinds"), ("conflicts", "conflicts reported"),
        ("untouched_by_apply", "left untouched by apply"), ("untouched_by_destroy", "left untouched by destroy"),
        ("modified", "foreign objects modified")]),
    "isolation": ("Isolation (probes between tenants and through security groups)", [
        ("probes", "probes"), ("allowed", "expected to pass"), ("denied", "expected to be blocked"),
        ("leaks", "leaks"), ("wrongly_blocked", "wrongly blocked")]),
    "secrets": ("Secrets (userData and credentials)", [
        ("canaries", "secret canaries"), ("places_checked", "places searched"), ("leaks", "leaks"),
        ("files_0600", "files holding one, all 0600")]),
}


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) if value else "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def section(figures: dict[str, dict[str, Any]], level: str, duration_s: float | None,
            command: str | None = None) -> str:
    begin, end = f"<!-- figures-{level}:begin -->", f"<!-- figures-{level}:end -->"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = command or ("make reliability" if level == "release" else "make reliability-ci")
    lines = [begin, f"### {'Release' if level == 'release' else 'CI'} counts", "",
             f"`{command}`, run on {when}" + (f", {duration_s / 60:.0f} min in all" if duration_s else "")
             + ", on: " + ", ".join(f"{k} {v}" for k, v in machine().items()) + ".", ""]
    lines += ["| suite | figure | value |", "|---|---|---:|"]
    for suite, (title, keys) in SUITES.items():
        data = figures.get(suite)
        if data is None:
            lines.append(f"| {title} | not run | - |")
            continue
        shown = [k for k, _ in keys if k in data]
        labels = dict(keys)
        extra = sorted(k for k in data if k not in labels and k != "level")
        for i, key in enumerate(shown + extra):
            lines.append(f"| {title if i == 0 else ''} | {labels.get(key, key)} | {_value(data[key])} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", type=Path)
    parser.add_argument("doc", type=Path)
    parser.add_argument("--duration", type=float, default=None, help="seconds the run took")
    parser.add_argument("--command", default=None, help="what ran the suites (default: the make target)")
    args = parser.parse_args(argv)
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(args.figures.glob("*.json"))}
    if not figures:
        print(f"no figures in {args.figures}: run the suites with RECONCILER_FIGURES={args.figures}",
              file=sys.stderr)
        return 1
    levels = {f.get("level", "ci") for f in figures.values()}
    if len(levels) != 1:
        print(f"figures of several levels mixed in {args.figures}: {sorted(levels)}", file=sys.stderr)
        return 1
    level = levels.pop()
    write_section(args.doc, section(figures, level, args.duration, args.command), f"<!-- figures-{level}:begin -->",
                  f"<!-- figures-{level}:end -->")
    print(f"wrote the {level} figures of {len(figures)} suite(s) to {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
