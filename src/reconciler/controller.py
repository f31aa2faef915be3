"""The controller: load -> graph -> observe -> plan -> apply, with the lock and journal.

The CLI (and later the daemon) call this; it owns the order of steps and nothing else
does. Each step is a module of its own: loader, checks, dependencies, drivers, planner,
executor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import networkx as nx
import structlog

from reconciler.dependencies import build_graph
from reconciler.drivers.base import Admitting, Adopting, Attachable, Defaulting, Describing, Driver, Validating
from reconciler.drivers.registry import build_drivers
from reconciler.errors import JournalError, Problem, ReconcilerError, ValidationFailed, format_path
from reconciler.executor import (NOT_STARTED, ApplyResult, Executor, Outcome, drivers_for_kinds, observe_all,
                                 observe_each)
from reconciler.hostconfig import HostConfig
from reconciler.journal import Journal
from reconciler.loader import load
from reconciler.lock import HostLock
from reconciler.models import Desired, Key, Resource
from reconciler.planner import Action, Change, Plan, plan
from reconciler.state import Observation, Observed, Proposal, Unowned

log = structlog.get_logger("reconciler.controller")


class ImportRefused(ReconcilerError):
    """`reconciler import` cannot adopt that object (nothing was changed)."""


@dataclass(frozen=True, slots=True)
class StatusRow:
    kind: str
    tenant: str
    name: str
    state: str
    host: Mapping[str, str]
    detail: str = ""
    last_error: str | None = None
    #: the daemon's: the revision last applied to it, and when a failure is retried
    revision: str | None = None
    next_retry: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "tenant": self.tenant,
            "name": self.name,
            "state": self.state,
            "host": dict(self.host),
            "detail": self.detail,
            "lastError": self.last_error,
            "revision": self.revision,
            "nextRetry": self.next_retry,
        }


class Controller:
    """One host: its config, drivers, lock and journal."""

    def __init__(self, config: HostConfig, drivers: Mapping[str, Driver] | None = None):
        self.config = config
        self._drivers = dict(drivers) if drivers is not None else None

    @property
    def drivers(self) -> dict[str, Driver]:
        if self._drivers is None:
            self._drivers = build_drivers(self.config)
        return self._drivers

    @property
    def journal(self) -> Journal:
        return Journal(self.config.stateDir)

    # --- steps --------------------------------------------------------------------------

    @staticmethod
    def load(paths: Sequence[str | os.PathLike[str]]) -> Desired:
        desired, problems = load(paths)
        if problems:
            raise ValidationFailed(problems)
        return desired

    @staticmethod
    def graph(desired: Desired) -> nx.DiGraph:
        return build_graph(desired)

    def observe(self) -> Observation:
        """Every driver's view of the host; a driver that cannot observe raises."""
        return observe_all(drivers_for_kinds(self.drivers))

    def observe_available(self) -> tuple[Observation, dict[str, str]]:
        """What the drivers that can observe see, and kind -> why for the kinds whose
        driver cannot (its service is down: a transient error)."""
        observation, down = observe_each(drivers_for_kinds(self.drivers))
        kinds = {kind: f"the {drv.name} driver cannot observe the host: {down[drv.name]}"
                 for kind, drv in self.drivers.items() if drv.name in down}
        return observation, kinds

    def conflicts(self, desired: Desired, observation: Observation) -> dict[Key, Unowned]:
        """Desired objects whose host name is taken by an object without our mark (and
        that we do not own already: two stores of one backend, e.g. Swift and its S3 API,
        each see the other's bucket as unmarked)."""
        unowned = {(u.kind, u.host_name): u for u in observation.unowned}
        if not unowned:
            return {}
        owned = {o.key for o in observation.owned}
        found = {}
        for res in desired:
            if res.key in owned:
                continue
            drv = self.drivers[res.key.kind]
            hit = unowned.get((res.key.kind, drv.host_name(res.key)))
            if hit is not None:
                found[res.key] = hit
        return found

    def host_problems(self, desired: Desired) -> list[Problem]:
        """What this host cannot realise (e.g. vlan without 8021q, an LVM volume to attach
        without device-mapper), per resource and field."""
        found = []
        for res in desired:
            drv = self.drivers.get(res.key.kind)
            if isinstance(drv, Validating):
                for path, message in drv.problems(res.key.kind, res.key.tenant, res.key.name, res.spec_full):
                    found.append(_problem(res, ("spec",) + tuple(path), message))
            for ref in res.spec.references(res.key.tenant):
                target = desired.get(ref.key)
                owner = self.drivers.get(ref.kind)
                if target is None or not isinstance(owner, Attachable):
                    continue
                why = owner.attach_problem(ref.kind, ref.tenant, ref.name, target.spec_full)
                if why:
                    found.append(_problem(res, ("spec",) + tuple(ref.path),
                                          f"cannot attach {ref.key.display}: {why}"))
        return found

    def host_defaults(self) -> dict[str, dict[str, object]]:
        """Per kind, the values the host fills in for fields a manifest leaves to it."""
        out: dict[str, dict[str, object]] = {}
        for kind, drv in self.drivers.items():
            if isinstance(drv, Defaulting):
                values = drv.defaults(kind)
                if values:
                    out[kind] = dict(values)
        return out

    def admission_problems(self, desired: Desired, the_plan: Plan) -> list[Problem]:
        """Capacity admission: what the drivers say the host has no room for, before any change."""
        by_driver: dict[int, list[Proposal]] = {}
        admitting: dict[int, Admitting] = {}
        for change in the_plan.actionable:
            drv = self.drivers.get(change.key.kind)
            if not isinstance(drv, Admitting):
                continue
            admitting[id(drv)] = drv
            by_driver.setdefault(id(drv), []).append(Proposal(
                change.key, change.action.value,
                None if change.target is None else change.target.spec, change.primary))
        found = []
        for ident, proposals in by_driver.items():
            for key, path, message in admitting[ident].admit(proposals):
                res = desired.get(key)
                full = ("spec",) + tuple(path)
                if res is None:
                    found.append(Problem("", 0, message, key.display, format_path(full)))
                else:
                    found.append(_problem(res, full, message))
        return found

    def plan(self, desired: Desired, *, destroy: bool = False) -> Plan:
        return self.plan_observed(desired, destroy=destroy)[0]

    def plan_observed(self, desired: Desired, *, destroy: bool = False) -> tuple[Plan, Observation]:
        """The plan and the observation it was made from."""
        started = time.perf_counter()
        observation, unavailable = self.observe_available()
        observed_s = time.perf_counter() - started
        the_plan = plan(
            desired,
            observation,
            self.graph(desired),
            conflicts=self.conflicts(desired, observation),
            destroy=destroy,
            defaults=self.host_defaults(),
            unavailable=unavailable,
        )
        if not destroy:
            the_plan.errors.extend(self.host_problems(desired))
            if not the_plan.errors:
                the_plan.errors.extend(self.admission_problems(desired, the_plan))
        log.info(
            "planned",
            resources=len(desired),
            owned=len(observation.owned),
            unowned=len(observation.unowned),
            observe_s=round(observed_s, 4),
            plan_s=round(time.perf_counter() - started - observed_s, 4),
            errors=len(the_plan.errors),
            unknown=len(the_plan.unknown),
            **{a.value: n for a, n in the_plan.counts().items()},
        )
        return the_plan, observation

    def apply(
        self,
        the_plan: Plan,
        *,
        parallelism: int = 8,
        command: str = "apply",
        source: str | None = None,
        revision: str | None = None,
        on_start: Callable[[Change], None] | None = None,
        on_done: Callable[[Outcome], None] | None = None,
        stopping: Callable[[], bool] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> ApplyResult:
        """Apply a plan (the caller holds the lock) and journal the outcome."""
        journal = self.journal
        apply_id = journal.begin(command, source, revision)  # a journal that cannot record: nothing runs
        unrecorded: list[tuple[Any, ...]] = []  # kept while the journal cannot take them
        journal_error: list[str] = []

        def record() -> None:
            while unrecorded and not journal_error:
                try:
                    journal.record_change(*unrecorded[0])
                except JournalError as exc:  # locked or disk full mid-apply: the changes go on
                    journal_error.append(str(exc))
                    log.warning("the journal cannot record changes; kept until the apply ends", error=str(exc))
                    return
                unrecorded.pop(0)

        def done(outcome: Outcome) -> None:
            c = outcome.change
            log.info("change", change=c.id, action=c.action.value, outcome=outcome.status,
                     error=outcome.error, duration_s=round(outcome.duration_s, 4))
            unrecorded.append((apply_id, c.key.kind, c.key.tenant, c.key.name, c.action.value,
                               outcome.status, outcome.error, outcome.duration_s))
            record()
            if on_done:
                on_done(outcome)

        executor = Executor(self.drivers, parallelism=parallelism, on_start=on_start, on_done=done,
                            stopping=stopping, **({"sleep": sleep} if sleep else {}))
        try:
            result = executor.apply(the_plan)
        except BaseException:
            try:
                journal.finish(apply_id, "error", 0.0, {})
            except JournalError as exc:
                log.error("the journal could not record this apply", apply_id=apply_id, error=str(exc))
            raise
        counts = {
            "created": _n(result, Action.CREATE),
            "updated": _n(result, Action.UPDATE),
            "replaced": _n(result, Action.REPLACE),
            "deleted": _n(result, Action.DELETE),
            "orphaned": _n(result, Action.ORPHAN),
            "failed": sum(1 for o in result.outcomes if o.status in ("failed", "mismatch")),
            "skipped": sum(1 for o in result.outcomes if o.status == "skipped"),
        }
        stopped = any(o.error == NOT_STARTED for o in result.outcomes)
        journal_error.clear()  # one more try for what was kept, and the apply's end
        try:
            record()
            if journal_error:
                raise JournalError(journal_error[0])
            journal.finish(apply_id, "ok" if result.ok else "stopped" if stopped else "failed",
                           result.duration_s, counts)
        except JournalError as exc:
            result.journal_error = str(exc)
            log.error("the journal could not record this apply", apply_id=apply_id, error=str(exc),
                      unrecorded=len(unrecorded))
        log.info("applied", command=command, apply_id=apply_id, ok=result.ok,
                 duration_s=round(result.duration_s, 4), **counts)
        return result

    def import_object(self, desired: Desired, key: Key, host_id: str | None = None) -> Observed:
        """Adopt a host object without our mark as the manifests' `key` (``reconciler
        import``): put our mark on it, change nothing else. The next plan shows how it
        differs from the manifest."""
        if desired.get(key) is None:
            raise ImportRefused(f"{key.display} is not in the manifests: write it there first")
        drv = self.drivers.get(key.kind)
        if drv is None or not isinstance(drv, Adopting):
            raise ImportRefused(f"the {getattr(drv, 'name', '?')} driver cannot import {key.kind} objects")
        observation = self.observe()
        if any(o.key == key for o in observation.owned):
            raise ImportRefused(f"{key.display} is already managed: nothing to import")
        name = host_id or drv.host_name(key)
        if not any(u.kind == key.kind and u.host_name == name for u in observation.unowned):
            raise ImportRefused(f"no {key.kind.lower()} named {name!r} without our mark on this host")
        conflicts = {k: u for k, u in self.conflicts(desired, observation).items() if k != key}
        the_plan = plan(desired, observation, self.graph(desired), conflicts=conflicts,
                        defaults=self.host_defaults())
        change = next((c for c in the_plan if c.key == key), None)
        if change is None or change.target is None:
            raise ImportRefused(f"{key.display} cannot be planned: " + "; ".join(p.message for p in the_plan.errors))
        adopted = drv.adopt(name, change.target)
        journal = self.journal
        apply_id = journal.begin("import", f"{key} <- {name}")
        journal.record_change(apply_id, key.kind, key.tenant, key.name, "import", "applied", None, 0.0)
        journal.finish(apply_id, "ok", 0.0, {"imported": 1})
        log.info("imported", resource=str(key), host_object=name)
        return adopted

    def lock(self, what: str = "apply", timeout_s: float | None = None) -> HostLock:
        return HostLock(self.config.stateDir, self.config.lockTimeoutSeconds if timeout_s is None else timeout_s,
                        what=what)

    # --- status ---------------------------------------------------------------------

    def describe_drivers(self) -> dict[str, dict[str, str]]:
        """Driver name -> what it says about itself (e.g. libvirt's domain type), for status."""
        out: dict[str, dict[str, str]] = {}
        for drv in drivers_for_kinds(self.drivers):
            if not isinstance(drv, Describing):
                continue
            try:
                out[drv.name] = dict(drv.describe())
            except ReconcilerError as exc:
                out[drv.name] = {"error": str(exc)}
        return out

    def status(self, desired: Desired | None) -> list[StatusRow]:
        """Every resource (of the manifests, and every object we own) with its state."""
        observation, unavailable = self.observe_available()
        last = self.journal.last_changes()
        rows: list[StatusRow] = []
        planned: dict[Key, Change] = {}
        unknown: dict[Key, str] = {}
        conflict_keys = self.conflicts(desired, observation) if desired is not None else {}
        if desired is not None:
            the_plan = plan(desired, observation, self.graph(desired), conflicts=conflict_keys,
                            defaults=self.host_defaults(), unavailable=unavailable)
            planned = {c.key: c for c in the_plan}
            unknown = the_plan.unknown
        hosts: dict[Key, Mapping[str, str]] = {}
        orphaned: set[Key] = set()
        for obs in observation.owned:
            hosts.setdefault(obs.key, obs.host)
            if obs.mark.orphaned:
                orphaned.add(obs.key)
        keys = set(hosts) | set(planned) | set(conflict_keys)
        for key in sorted(keys | set(unknown)):
            prev = last.get((key.kind, key.tenant, key.name))
            if key in unknown:
                rows.append(StatusRow(key.kind, key.tenant, key.name, "unknown", hosts.get(key, {}),
                                      unknown[key], None))
                continue
            error = prev.error if prev and prev.outcome != "applied" else None
            change = planned.get(key)
            state, detail = _state(key, change, key in hosts, key in orphaned, key in conflict_keys, error)
            rows.append(StatusRow(key.kind, key.tenant, key.name, state, hosts.get(key, {}), detail, error))
        return rows


def _problem(res: Resource, path: tuple[str | int, ...], message: str) -> Problem:
    return Problem(res.source.file, res.line_of(path), message, res.key.display, format_path(path))


def _state(key: Key, change: Change | None, present: bool, orphaned: bool, conflict: bool,
           error: str | None) -> tuple[str, str]:
    if conflict:
        return "conflict", "an object without our mark has its name"
    if orphaned:
        return "orphaned", "retained after removal from the manifests"
    if change is None:
        return ("failed", error) if error else ("ready", "")
    if change.action is Action.NOOP:
        return "ready", ""
    if error:
        return "failed", error
    if not present:
        return "missing", "not created yet"
    if change.action in (Action.DELETE, Action.ORPHAN):
        return "pending", f"{change.action.value}: {change.reason}"
    if change.diffs and all(d.cause == "drift" for d in change.diffs):
        return "drifted", change.reason
    return "pending", f"{change.action.value}: {change.reason}"


def _n(result: ApplyResult, action: Action) -> int:
    return sum(1 for o in result.outcomes if o.change.action is action and o.status == "applied")
