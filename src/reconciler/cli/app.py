"""`reconciler` command line (typer). Errors are messages with an exit code, never tracebacks."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from reconciler import __version__
from reconciler.cli.render import (
    render_outcome,
    render_plan,
    render_daemon,
    render_problems,
    render_result,
    render_status,
    short_revision,
)
from reconciler.controller import Controller, StatusRow
from reconciler.errors import ConfigError, LockTimeout, ReconcilerError, ValidationFailed
from reconciler.fileio import write_atomic
from reconciler.graph import to_dot, to_mermaid
from reconciler.hostconfig import load_host_config
from reconciler.journal import Journal, pid_alive
from reconciler.lock import HostLock
from reconciler.loader import load
from reconciler.models import KINDS, Key
from reconciler.models._base import NAME_PATTERN
from reconciler.log import configure as configure_logging
from reconciler.planner import Plan
from reconciler.schema import write_schemas

app = typer.Typer(
    name="reconciler",
    help="Make one or a few Linux hosts match a private cloud declared in YAML manifests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _State:
    host_config: Optional[str] = None

    def controller(self) -> Controller:
        return Controller(load_host_config(self.host_config))


state = _State()

HostConfigOpt = typer.Option(
    None, "--host-config", envvar="RECONCILER_HOST_CONFIG",
    help="Host config file (default: $RECONCILER_HOST_CONFIG, else /etc/reconciler/host.yaml).",
)


def _host_config(value: Optional[str]) -> None:
    if value:
        state.host_config = value


@app.callback()
def main_options(
    host_config: Optional[str] = HostConfigOpt,
    log_level: str = typer.Option("warning", "--log-level", envvar="RECONCILER_LOG_LEVEL",
                                  help="debug, info, warning or error (logs go to stderr)."),
) -> None:
    configure_logging(log_level)
    _host_config(host_config)


def _run(fn: Callable[[], int | None]) -> None:
    """Run a command body, turning our errors into messages and exit codes."""
    try:
        code = fn() or 0
    except ValidationFailed as exc:
        render_problems(err, exc.problems)
        code = 1
    except ReconcilerError as exc:
        err.print(f"Error: {exc}", soft_wrap=True)
        code = 1
    except OSError as exc:  # the host's own state (a full disk, a missing file): said, not a traceback
        err.print(f"Error: {exc}", soft_wrap=True)
        code = 1
    except KeyboardInterrupt:
        err.print("Interrupted.")
        code = 130
    raise typer.Exit(code)


def _confirm(prompt: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        err.print("Refusing to change the host without confirmation: not on a terminal. "
                  "Pass --yes to apply.")
        return False
    answer = typer.prompt(f"{prompt} Only 'yes' will be accepted", default="", show_default=False)
    if answer.strip() != "yes":
        err.print("Cancelled; nothing was changed.")
        return False
    return True


@app.command()
def validate(
    paths: list[Path] = typer.Argument(..., help="Manifest files or folders."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Check manifests (schema, references, addresses, quotas, cycles) without touching the host."""
    _host_config(host_config)  # accepted everywhere; validation needs no host

    def body() -> int:
        desired, problems = load(paths)
        if problems:
            raise ValidationFailed(problems)
        out.print(f"Valid: {len(desired)} resources.")
        return 0

    _run(body)


@app.command()
def plan(
    paths: list[Path] = typer.Argument(..., help="Manifest files or folders."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (sensitive values hidden)."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Save the plan for `apply FILE` (mode 0600)."),
    detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode",
                                           help="Exit 0 with no changes, 2 with changes, 1 on error."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Show what apply would change, Terraform-style."""
    _host_config(host_config)

    def body() -> int:
        controller = state.controller()
        desired = controller.load(paths)
        the_plan = controller.plan(desired)
        if as_json:
            out.print_json(the_plan.to_json())
        else:
            render_plan(out, the_plan)
        if the_plan.errors:
            return 1
        if the_plan.unknown:
            _warn_unknown(the_plan)
        if out_file is not None:
            _save_plan(the_plan, out_file)
            if not as_json:
                out.print(f"Saved the plan to {out_file}; apply it exactly with: reconciler apply {out_file}")
        if the_plan.unknown:
            return 1
        if detailed_exitcode and the_plan.has_changes:
            return 2
        return 0

    _run(body)


def _warn_unknown(the_plan: Plan) -> None:
    err.print(f"Warning: {len(the_plan.unknown)} resource(s) could not be planned: a driver cannot observe "
              "the host (see 'Not planned' above). The rest can be applied; run again when the service "
              "is back.", soft_wrap=True)


def _save_plan(the_plan: Plan, path: Path) -> None:
    """It holds the targets, secrets included: a new 0600 file renamed over `path`, never
    the existing file rewritten (someone may hold it open, and it may be world-readable)."""
    try:
        write_atomic(path, the_plan.to_json(redact=False), 0o600)
    except OSError as exc:
        raise ReconcilerError(f"cannot save the plan to {path}: {exc.strerror or exc}") from None


def _load_plan(path: Path) -> Plan:
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReconcilerError(f"{path} is not a usable saved plan: {exc}") from None


def _is_plan_file(paths: list[Path]) -> bool:
    if len(paths) != 1 or not paths[0].is_file() or paths[0].suffix in (".yaml", ".yml"):
        return False
    with open(paths[0], "rb") as f:
        return f.read(1) == b"{"


def _apply_plan(controller: Controller, the_plan: Plan, parallelism: int, command: str, source: str | None) -> int:
    # progress: one line per change as it finishes (failures and skips say why)
    result = controller.apply(
        the_plan, parallelism=parallelism, command=command, source=source,
        on_done=lambda o: render_outcome(out, o),
    )
    render_result(out, result)
    if result.journal_error:
        err.print(f"Warning: {result.journal_error}. The host was changed as shown above; the journal's "
                  "record of this apply is incomplete (status and the next plan read the host itself).",
                  soft_wrap=True)
        return 1
    return 0 if result.ok else 1


def _plan_and_apply(controller: Controller, paths: list[Path], *, destroy: bool, yes: bool,
                    parallelism: int, lock_timeout: float | None) -> int:
    """Under the host lock: plan, show it, ask, apply. Exit code."""
    command = "destroy" if destroy else "apply"
    desired = controller.load(paths)
    _warn_if_daemon(controller.journal, command)
    with controller.lock(command, lock_timeout):
        the_plan = controller.plan(desired, destroy=destroy)
        render_plan(out, the_plan)
        if the_plan.errors:
            return 1
        if the_plan.unknown:
            _warn_unknown(the_plan)
        if not the_plan.has_changes:
            return 1 if the_plan.unknown else 0
        if not _confirm("\nDestroy these resources?" if destroy else "\nApply these changes?", yes):
            return 1
        source = None if destroy else ",".join(str(p.resolve()) for p in paths)
        code = _apply_plan(controller, the_plan, parallelism, command, source)
        if the_plan.unknown:
            err.print(f"Not done: {len(the_plan.unknown)} resource(s) whose driver cannot observe the host; "
                      f"run {command} again when it is back.", soft_wrap=True)
            return 1
        return code


@app.command()
def apply(
    paths: list[Path] = typer.Argument(..., help="Manifest files or folders, or a plan saved with plan --out."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    parallelism: int = typer.Option(8, "--parallelism", min=1, max=256, help="Changes run at once."),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", min=0,
                                                 help="Seconds to wait for another apply to finish."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Make the host match the manifests (or apply a saved plan exactly)."""
    _host_config(host_config)

    def body() -> int:
        controller = state.controller()
        if _is_plan_file(paths):
            the_plan = _load_plan(paths[0])
            with controller.lock("apply", lock_timeout):
                if not the_plan.has_changes:
                    out.print("No changes in this plan.")
                    return 0
                return _apply_plan(controller, the_plan, parallelism, "apply", None)
        return _plan_and_apply(controller, paths, destroy=False, yes=yes, parallelism=parallelism,
                               lock_timeout=lock_timeout)

    _run(body)


@app.command()
def destroy(
    paths: list[Path] = typer.Argument(..., help="Manifest files or folders naming what to destroy."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    parallelism: int = typer.Option(8, "--parallelism", min=1, max=256),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", min=0),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Remove what the manifests declare (Retain volumes and buckets are orphaned, not deleted)."""
    _host_config(host_config)

    def body() -> int:
        return _plan_and_apply(state.controller(), paths, destroy=True, yes=yes,
                               parallelism=parallelism, lock_timeout=lock_timeout)

    _run(body)


@app.command("import")
def import_(
    address: str = typer.Argument(..., help="KIND/TENANT/NAME of the resource in the manifests, "
                                  "e.g. Instance/acme/web-1."),
    host_object: Optional[str] = typer.Argument(
        None, help="Name of the host object to adopt (default: the name reconciler would give it)."),
    paths: list[Path] = typer.Option(..., "--manifests", "-m", help="Manifest files or folders."),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", min=0),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Adopt a host object that has no reconciler mark as a resource of the manifests.

    Only the mark is written; run `plan` afterwards to see how the object differs from
    its manifest."""
    _host_config(host_config)

    def body() -> int:
        key = _parse_address(address)
        controller = state.controller()
        desired = controller.load(paths)
        with controller.lock("import", lock_timeout):
            adopted = controller.import_object(desired, key, host_object)
        where = ", ".join(f"{k}={v}" for k, v in adopted.host.items())
        out.print(f"Imported {key.display} ({where}). Run `reconciler plan` to see how it differs "
                  "from the manifest.", soft_wrap=True)
        return 0

    _run(body)


def _parse_address(address: str) -> Key:
    parts = address.split("/")
    if len(parts) == 2 and parts[0] == "Tenant":
        return Key("Tenant", parts[1], parts[1])
    if len(parts) != 3 or not all(parts) or parts[0] not in KINDS:
        raise ConfigError(f"{address!r} is not KIND/TENANT/NAME (kinds: {', '.join(KINDS)})")
    return Key(*parts)


class GraphFormat(str, Enum):
    dot = "dot"
    mermaid = "mermaid"


@app.command()
def graph(
    paths: list[Path] = typer.Argument(..., help="Manifest files or folders."),
    fmt: GraphFormat = typer.Option(GraphFormat.dot, "--format", help="dot (Graphviz) or mermaid."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Print the dependency graph of the manifests (edges: dependency -> dependent)."""
    _host_config(host_config)

    def body() -> int:
        desired = Controller.load(paths)
        g = Controller.graph(desired)
        label: Callable[[Any], str] = lambda k: k.display  # noqa: E731
        text = to_dot(g, label) if fmt is GraphFormat.dot else to_mermaid(g, label)
        sys.stdout.write(text)
        return 0

    _run(body)


@app.command()
def status(
    paths: Optional[list[Path]] = typer.Argument(None, help="Manifests to compare with (default: those of the last apply)."),
    as_json: bool = typer.Option(False, "--json", help="JSON: a list of {kind, tenant, name, state, host}."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Every managed resource with its state (ready, drifted, pending, failed, orphaned...) and host identity."""
    _host_config(host_config)

    def body() -> int:
        controller = state.controller()
        sources = [Path(p) for p in paths] if paths else None
        journal = controller.journal
        daemon_info = journal.daemon()
        running = _daemon_running(daemon_info)
        if sources is not None:
            desired = controller.load(sources)
        else:
            sources = _status_sources(journal, daemon_info, running)
            desired = None
            if sources:
                desired, problems = load(sources)
                if problems:  # e.g. the daemon's folder mid-edit: it keeps its revision
                    err.print(f"Note: {', '.join(map(str, sources))} do not validate now ({problems[0]}"
                              f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                              "comparing with the host only.", soft_wrap=True)
                    desired = None
        rows = _with_daemon_states(controller.status(desired), journal, running)
        drivers = controller.describe_drivers()
        if as_json:
            sys.stdout.write(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
        else:
            if daemon_info.get("pid"):
                render_daemon(out, daemon_info, running, journal.events(limit=10))
            render_status(out, rows, journal.applies(limit=5), drivers)
        return 0

    _run(body)


def _duration(text: str, option: str) -> float:
    """30s, 10m, 1h, 500ms or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    for suffix in ("ms", "s", "m", "h"):
        if t.endswith(suffix):
            number, factor = t[: -len(suffix)], units[suffix]
            break
    else:
        number, factor = t, 1.0
    try:
        value = float(number) * factor
    except ValueError:
        raise ConfigError(f"{option} {text!r}: not a duration (e.g. 30s, 10m, 1h)") from None
    if not 0 < value < 10 ** 7:
        raise ConfigError(f"{option} {text!r}: must be more than 0")
    return value


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics-address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9477")
    return host.strip("[]"), int(port)


@app.command()
def daemon(
    source: Optional[Path] = typer.Option(None, "--source", help="A folder of manifests, watched (inotify)."),
    git: Optional[str] = typer.Option(None, "--git", help="A git repository (URL or local path) to follow."),
    branch: str = typer.Option("main", "--branch", help="The branch to follow (with --git)."),
    subdir: str = typer.Option("", "--path", help="The manifests' folder inside the repository (with --git)."),
    interval: str = typer.Option("30s", "--interval", help="How often to fetch the repository (with --git)."),
    resync: str = typer.Option("10m", "--resync", help="Full resync interval: every resource reconciled."),
    backoff_cap: str = typer.Option("5m", "--backoff-cap", help="Longest wait between retries of a failing resource."),
    metrics_address: str = typer.Option("127.0.0.1:9477", "--metrics-address",
                                        help="Where /metrics and /healthz listen (loopback only; port 0 picks "
                                        "one; 'off' disables)."),
    parallelism: int = typer.Option(8, "--parallelism", min=1, max=256, help="Changes run at once."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Keep the host matching a folder or a git branch: apply new revisions whole, heal
    drift from host events, retry failures with backoff (SIGTERM stops, SIGHUP reloads
    the host config)."""
    _host_config(host_config)

    def body() -> int:
        from reconciler.daemon import Backoff, Daemon, DaemonOptions, FolderSource, GitSource, MetricsServer
        from reconciler.daemon._process import catch_signals, serve

        if (source is None) == (git is None):
            raise ConfigError("give exactly one of --source DIR or --git URL")
        options = DaemonOptions(resync_s=_duration(resync, "--resync"),
                                backoff=Backoff(1.0, _duration(backoff_cap, "--backoff-cap")),
                                parallelism=parallelism)
        metrics_at = None if metrics_address.strip().lower() == "off" else _address(metrics_address)
        catch_signals()  # before anything slow: an early SIGHUP must not kill the process
        config = load_host_config(state.host_config)
        lock = HostLock(config.stateDir, 0, what="daemon", name="daemon.lock")
        try:
            lock.acquire()
        except LockTimeout:
            raise ConfigError(f"another reconciler daemon runs on the state directory {config.stateDir} "
                              f"({lock.holder() or 'pid unknown'})") from None
        try:
            if git is not None:
                src = GitSource(git, branch=branch, path=subdir, interval_s=_duration(interval, "--interval"),
                                cache_dir=Path(config.stateDir) / "daemon" / "git")
                if src.url.startswith("/") and not Path(src.url).exists():  # a local path (URLs are retried)
                    raise ConfigError(f"--git {git}: no such repository on this host")
            else:
                assert source is not None
                if not source.is_dir():
                    raise ConfigError(f"--source {source}: no such folder (the folder that holds the manifests)")
                src = FolderSource(source.absolute())
            the_daemon = Daemon(lambda: load_host_config(state.host_config), src, options=options)
            server = None
            if metrics_at is not None:
                server = MetricsServer(the_daemon.metrics, the_daemon.health, *metrics_at)
            err.print(f"reconciler daemon (pid {os.getpid()}): {src.description}"
                      + (f"; metrics on {server.url}/metrics" if server else ""))
            return serve(the_daemon, server)
        finally:
            lock.release()

    _run(body)


def _suspension_target(target: Optional[str]) -> str:
    if target is None or target == "*":
        return "*"
    if "/" in target:
        return str(_parse_address(target))
    if not re.fullmatch(NAME_PATTERN, target):
        raise ConfigError(f"{target!r} is neither a tenant name nor KIND/TENANT/NAME")
    return target


def _tell_daemon(journal: Journal) -> str:
    """Signal the running daemon (SIGUSR1) to read the suspensions again."""
    info = journal.daemon()
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("stoppedAt") or not pid_alive(pid):
        return "no daemon runs: it takes effect when one starts"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"reconciler" not in f.read():
                return "no daemon runs: it takes effect when one starts"
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        return f"could not tell the daemon (pid {pid}): {exc.strerror}; it takes effect at its next start"
    return f"the daemon (pid {pid}) was told"


TargetArg = typer.Argument(None, help="TENANT or KIND/TENANT/NAME (default: everything).")


def _suspension(target: Optional[str], suspend: bool) -> int:
    """Write a suspension (or remove it), record the event, tell a running daemon."""
    what = _suspension_target(target)
    label = "everything" if what == "*" else what
    journal = Journal(load_host_config(state.host_config).stateDir)
    note = ""
    if suspend:
        note = "" if journal.suspend(what) else " (it already was)"
    elif not journal.resume(what):
        held = ", ".join(journal.suspensions()) or "none"
        raise ConfigError(f"{what!r} is not suspended (suspended: {held})")
    verb = "Suspended" if suspend else "Resumed"
    journal.event("info", verb, f"{label} {verb.lower()}", None if what == "*" else what)
    out.print(f"{verb} {label}{note}; {_tell_daemon(journal)}.")
    return 0


@app.command()
def suspend(target: Optional[str] = TargetArg, host_config: Optional[str] = HostConfigOpt) -> None:
    """Stop the daemon changing a tenant or resource (it is still observed and reported)."""
    _host_config(host_config)
    _run(lambda: _suspension(target, suspend=True))


@app.command()
def resume(target: Optional[str] = TargetArg, host_config: Optional[str] = HostConfigOpt) -> None:
    """Let the daemon change a suspended tenant or resource again (reconciled at once)."""
    _host_config(host_config)
    _run(lambda: _suspension(target, suspend=False))


def _warn_if_daemon(journal: Journal, command: str) -> None:
    """A daemon on this state directory takes the host back to its own revision: say so
    before a manual apply or destroy (unless everything is suspended)."""
    info = journal.daemon()
    if not _daemon_running(info) or "*" in journal.suspensions():
        return
    err.print(f"Warning: a reconciler daemon (pid {info.get('pid')}) runs on this state directory "
              f"({info.get('source', '?')}): its next pass takes the host back to its revision "
              f"{short_revision(info.get('appliedRevision'))}, undoing this {command}. "
              "Run `reconciler suspend` first to keep the result.", soft_wrap=True)


def _daemon_running(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    return isinstance(pid, int) and not info.get("stoppedAt") and pid_alive(pid)


def _status_sources(journal: Journal, daemon_info: dict[str, Any], running: bool) -> list[Path] | None:
    """The manifests `status` compares with: the daemon's revision in force when it runs
    or applied last, else those of the last `apply` (none after a `destroy`)."""
    latest = journal.applies(limit=1)
    manifests = daemon_info.get("manifests")
    if manifests and Path(manifests).exists() and (
            running or not latest or latest[0]["command"] == "daemon"
            or str(daemon_info.get("appliedAt", "")) >= latest[0]["started_at"]):
        return [Path(manifests)]
    last = journal.last_source()
    if latest and latest[0]["command"] == "destroy":
        return None  # destroyed since: those manifests are no longer the desired state
    if last:
        candidates = [Path(p) for p in last.split(",")]
        if all(p.exists() for p in candidates):
            return candidates
    return None


def _with_daemon_states(rows: list[StatusRow], journal: Journal, running: bool) -> list[StatusRow]:
    """The live rows with what the daemon knows: the revision each resource was last
    applied from, its failure and next retry (while it runs), suspensions."""
    states = journal.resources()
    suspended = journal.suspensions()
    out = []
    for row in rows:
        st = states.get((row.kind, row.tenant, row.name))
        if st is not None:
            row = dataclasses.replace(row, revision=st.revision)
            if running and st.state in ("failed", "progressing", "waiting") and row.state != "conflict":
                row = dataclasses.replace(row, state=st.state, detail=st.detail,
                                          last_error=st.error or row.last_error, next_retry=st.next_retry)
        hold = next((t for t in suspended if t in ("*", row.tenant, f"{row.kind}/{row.tenant}/{row.name}")), None)
        if hold is not None and row.state not in ("conflict", "orphaned"):
            what = "in sync" if row.state == "ready" else f"{row.state}: {row.last_error or row.detail}"
            row = dataclasses.replace(row, state="suspended", detail=f"suspended ({hold}); {what}", last_error=None)
        out.append(row)
    return out


@app.command()
def schema(
    out_dir: Path = typer.Option(Path("schemas"), "--out", help="Folder to write the JSON Schemas to."),
    host_config: Optional[str] = HostConfigOpt,
) -> None:
    """Write the JSON Schema of every kind (generated from the models)."""
    _host_config(host_config)

    def body() -> int:
        for path in write_schemas(out_dir):
            out.print(f"wrote {path}")
        return 0

    _run(body)


@app.command()
def version(host_config: Optional[str] = HostConfigOpt) -> None:
    """Print the version."""
    _host_config(host_config)
    out.print(f"reconciler {__version__}")


def tune_gc() -> None:
    """Loading and planning allocate many small long-lived objects; the default GC
    thresholds spend a third of a large plan in collections that free nothing."""
    gc.set_threshold(100_000, 50, 100)


def main() -> None:
    tune_gc()
    app()


if __name__ == "__main__":
    main()
