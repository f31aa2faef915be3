"""Human output: plans that read like Terraform's, apply progress, status tables."""

from __future__ import annotations

import json
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from reconciler.controller import StatusRow
from reconciler.errors import Problem, format_path
from reconciler.executor import ApplyResult, Outcome
from reconciler.planner import Action, Change, Plan
from reconciler.state import SENSITIVE

SYMBOL = {
    Action.CREATE: ("+", "green"),
    Action.UPDATE: ("~", "yellow"),
    Action.REPLACE: ("-/+", "magenta"),
    Action.DELETE: ("-", "red"),
    Action.ORPHAN: ("!", "cyan"),
}
VERB = {
    Action.CREATE: "will be created",
    Action.UPDATE: "will be updated in place",
    Action.REPLACE: "must be replaced",
    Action.DELETE: "will be destroyed",
    Action.ORPHAN: "will be orphaned (retained on the host with its data)",
}
PAST = {
    Action.CREATE: "created",
    Action.UPDATE: "updated",
    Action.REPLACE: "replaced",
    Action.DELETE: "destroyed",
    Action.ORPHAN: "orphaned",
}


def _value(value: Any, sensitive: bool = False) -> str:
    if sensitive and value is not None:
        return SENSITIVE
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _symbol(change: Change) -> tuple[str, str]:
    sym, style = SYMBOL[change.action]
    if change.action is Action.REPLACE and change.create_before_destroy:
        sym = "+/-"
    return sym, style


def render_plan(console: Console, plan: Plan, *, sensitive_fields: set[str] | None = None) -> None:
    acting = plan.actionable
    if plan.errors:
        render_problems(console, plan.errors, "Planning found errors; nothing can be applied:")
        return
    if plan.unknown:
        render_unknown(console, plan)
    if not acting:
        if plan.unknown:
            console.print("No changes to what could be observed.")
        else:
            console.print("No changes. The host matches the manifests.")
        return
    console.print("Reconciler will perform the following actions:\n")
    for change in acting:
        sym, style = _symbol(change)
        head = Text()
        head.append(f"  # {change.key.display} {VERB[change.action]}", style="bold")
        if change.source:
            head.append(f"  ({change.source})", style="dim")
        console.print(head)
        if change.action is not Action.CREATE:
            console.print(Text(f"  # {change.reason}", style="dim"))
        line = Text()
        line.append(f"{sym:>4} ", style=style)
        line.append(change.key.display, style=style)
        console.print(line)
        if change.action is Action.CREATE and change.target is not None:
            _render_attributes(console, change, style)
        for diff in change.diffs:
            row = Text("       ")
            row.append("~ ", style="yellow")
            row.append(f"{format_path(diff.path)}: {_value(diff.old, diff.sensitive)} -> "
                       f"{_value(diff.new, diff.sensitive)}")
            tags = []
            if diff.policy.value == "replace":
                tags.append("forces replacement")
            elif diff.policy.value == "restart":
                tags.append("needs restart")
            if diff.cause == "drift":
                tags.append("drift: changed on the host")
            if tags:
                row.append("   # " + ", ".join(tags), style="dim")
            console.print(row)
        for note in change.notes:
            console.print(Text(f"       ! {note}", style="dim"))
        for warning in change.warnings:
            console.print(Text(f"       !! {warning}", style="bold red"))
        console.print()
    console.print(Text(plan.summary(), style="bold"))


def render_unknown(console: Console, plan: Plan) -> None:
    """The resources left out of the plan because a driver could not observe the host."""
    console.print(Text(f"Not planned: {len(plan.unknown)} resource(s) whose state cannot be observed now "
                       "(planned again when the service is back):", style="bold yellow"))
    for key, why in sorted(plan.unknown.items()):
        console.print(Text(f"    ? {key.display}: {why}", style="yellow"), soft_wrap=True)
    console.print()


def _render_attributes(console: Console, change: Change, style: str) -> None:
    from reconciler.models import KINDS
    from reconciler.planner._diff import field_table

    assert change.target is not None
    table = field_table(KINDS[change.key.kind])
    for name, value in change.target.spec.items():
        if value in (None, [], {}, "") or value is False:
            continue
        meta = table.get(name)
        row = Text("       ")
        row.append("+ ", style=style)
        row.append(f"{name} = {_value(value, bool(meta and meta.sensitive))}")
        console.print(row)


def render_problems(console: Console, problems: Iterable[Problem], heading: str | None = None) -> None:
    problems = list(problems)
    if heading:
        console.print(Text(heading, style="bold red"))
    for p in problems:
        console.print(Text(str(p)), soft_wrap=True)
    console.print(Text(f"{len(problems)} error(s); nothing was changed.", style="bold red"))


def render_outcome(console: Console, outcome: Outcome) -> None:
    change = outcome.change
    sym, style = _symbol(change)
    line = Text()
    line.append(f"{sym:>4} ", style=style)
    line.append(change.key.display)
    if outcome.status == "applied":
        line.append(f": {PAST[change.action]} ({outcome.duration_s:.2f}s)", style="dim")
    elif outcome.status == "skipped":
        line.append(f": {outcome.error}", style="yellow")
    else:
        line.append(f": {outcome.status}: {outcome.error}", style="red")
    console.print(line, soft_wrap=True)


def render_result(console: Console, result: ApplyResult) -> None:
    n = result.counts()
    failed = n["failed"] + n["mismatch"]
    text = (f"Apply {'complete' if result.ok else 'finished with errors'}: "
            f"{n['applied']} applied, {failed} failed, {n['skipped']} skipped "
            f"in {result.duration_s:.1f} s.")
    console.print(Text(text, style="bold green" if result.ok else "bold red"))
    if not result.ok:
        console.print("Run apply again after fixing the cause: it continues where this one stopped.")


STATE_STYLE = {"ready": "green", "drifted": "yellow", "pending": "yellow", "missing": "yellow",
               "progressing": "blue", "waiting": "yellow", "suspended": "magenta",
               "failed": "red", "conflict": "red", "orphaned": "cyan", "unknown": "yellow"}


def short_revision(revision: str | None) -> str:
    if not revision:
        return "-"
    return revision[:15] if revision.startswith("sha256:") else revision[:12]


def render_daemon(console: Console, info: dict[str, Any], running: bool, events: list[dict[str, Any]]) -> None:
    """The daemon: alive or not, its source, the revision in force and the last one
    tried (with its errors), and its recent events."""
    if running:
        head = Text.assemble(("Daemon: ", "bold"), ("running", "green"),
                             f" (pid {info.get('pid')}, since {info.get('startedAt', '?')})")
    else:
        head = Text.assemble(("Daemon: ", "bold"), ("stopped", "yellow"),
                             f" (at {info.get('stoppedAt') or '?'}; it was pid {info.get('pid')})")
    console.print(head)
    console.print(f"  source:    {info.get('source', '?')}", soft_wrap=True)
    applied = info.get("appliedRevision")
    summary = f' "{info["appliedSummary"]}"' if info.get("appliedSummary") else ""
    console.print(f"  applied:   {short_revision(applied)}{summary} at {info.get('appliedAt', '-')}"
                  if applied else "  applied:   none yet", soft_wrap=True)
    attempted = info.get("attemptedRevision")
    errors = info.get("attemptedErrors") or []
    if attempted and (attempted != applied or errors):
        verdict = Text(f"rejected, {len(errors)} error(s)", style="red") if errors else Text("in progress")
        console.print(Text.assemble(f"  attempted: {short_revision(attempted)} at {info.get('attemptedAt', '-')}: ",
                                    verdict))
        for e in errors[:20]:
            console.print(f"    {e}", soft_wrap=True)
    if info.get("sourceError"):
        console.print(Text(f"  source error: {info['sourceError']}", style="red"), soft_wrap=True)
    facts = []
    if info.get("lastPassAt"):
        facts.append(f"last pass {info['lastPassAt']} ({info.get('lastPassSeconds', 0):.2f}s)")
    if running and info.get("queueDepth") is not None:
        facts.append(f"queue {info['queueDepth']}")
    if running and info.get("metricsUrl"):
        facts.append(f"metrics {info['metricsUrl']}/metrics")
    if facts:
        console.print("  " + ", ".join(facts), soft_wrap=True)
    if events:
        ev = Table(title="Recent events", box=None, title_justify="left")
        for col in ("AT", "LEVEL", "REASON", "RESOURCE", "MESSAGE"):
            ev.add_column(col, overflow="fold")
        for e in events:
            style = {"error": "red", "warning": "yellow"}.get(e["level"], "")
            ev.add_row(e["at"], Text(e["level"], style=style), e["reason"], e.get("resource") or "", e["message"])
        console.print(ev)
    console.print()


def render_status(console: Console, rows: list[StatusRow], applies: list[dict[str, Any]],
                  drivers: dict[str, dict[str, str]] | None = None) -> None:
    table = Table(box=None, pad_edge=False, show_edge=False)
    revisions = any(r.revision for r in rows)
    for col in ("KIND", "TENANT", "NAME", "STATE") + (("REVISION",) if revisions else ()) + ("HOST", "DETAIL"):
        table.add_column(col, overflow="fold")
    for r in rows:
        host = " ".join(f"{k}={v}" for k, v in r.host.items())
        detail = r.last_error or r.detail
        if r.next_retry:
            detail += f" (next retry {r.next_retry})"
        cells = [r.kind, r.tenant, r.name, Text(r.state, style=STATE_STYLE.get(r.state, ""))]
        if revisions:
            cells.append(short_revision(r.revision))
        table.add_row(*cells, host, detail)
    if rows:
        console.print(table)
    else:
        console.print("Nothing on this host is managed by reconciler yet.")
    for name, facts in (drivers or {}).items():
        console.print(f"Driver {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()), soft_wrap=True)
    if applies:
        console.print()
        hist = Table(title="Recent applies", box=None, title_justify="left")
        for col in ("ID", "COMMAND", "REVISION", "STARTED", "DURATION", "OUTCOME", "CHANGES"):
            hist.add_column(col)
        for a in applies:
            changes = ", ".join(
                f"{a[c]} {c}" for c in ("created", "updated", "replaced", "deleted", "orphaned", "failed", "skipped")
                if a.get(c)
            ) or "none"
            dur = f"{a['duration_s']:.2f}s" if a.get("duration_s") is not None else "-"
            hist.add_row(str(a["id"]), a["command"], short_revision(a.get("revision")), a["started_at"], dur,
                         a.get("outcome") or "running", changes)
        console.print(hist)
