"""`reconciler daemon`: keep the host matching the manifests of a source, continuously.

Level-based, as controller-runtime: an event (a new revision of the manifests, a host
event from a driver's watcher, a resync, a resume) only marks resources dirty in the
work queue. A pass then observes the whole host, plans against the revision in force
and applies, in one executor run (independent changes in parallel), every change that
is not held back:

- a suspended resource is observed and reported, never changed;
- a resource backing off after a failure waits for its retry time (exponential, capped),
  so one broken resource never blocks the rest;
- drift (the host moved, the manifest did not) of a resource whose policy is `report`
  is reported only;
- whatever depends on a held-back change waits with it.

A new revision is applied whole or not at all: it is loaded and planned first, and any
error (schema, references, a conflict, no room on the host) rejects it, records its
errors against it and leaves the last good revision in force.

Everything the daemon knows is written to the journal (SQLite under the state
directory) for `reconciler status`: its source and revisions, each resource's state,
the applies and events. Metrics go to a prometheus-client registry.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import structlog

from reconciler.controller import Controller
from reconciler.daemon._clock import Clock, SystemClock
from reconciler.daemon._metrics import Metrics
from reconciler.daemon._queue import Backoff, WorkQueue
from reconciler.daemon._record import Record
from reconciler.daemon._sources import Snapshot, Source, SourceError
from reconciler.drivers.base import Watch, Watching
from reconciler.errors import JournalError, LockTimeout, Problem, ReconcilerError
from reconciler.executor import APPLIED, NOT_STARTED, SKIPPED, ApplyResult
from reconciler.hostconfig import HostConfig
from reconciler.journal import Journal, ResourceState, now_iso
from reconciler.loader import load
from reconciler.models import Desired, Key
from reconciler.models._resource import canonical_json
from reconciler.planner import Action, Change, Plan
from reconciler.state import HostEvent, Observation

log = structlog.get_logger("reconciler.daemon")

#: states a resource can be in, as `reconciler status` shows them
READY, PROGRESSING, FAILED, DRIFTED, SUSPENDED, WAITING, PENDING, ORPHANED = (
    "ready", "progressing", "failed", "drifted", "suspended", "waiting", "pending", "orphaned")


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    #: full resync interval: every resource reconciled even without an event
    resync_s: float = 600.0
    backoff: Backoff = Backoff(1.0, 300.0)
    #: host events are gathered this long, so a burst (a bridge and its ports going)
    #: makes one pass
    event_delay_s: float = 0.05
    parallelism: int = 8
    #: how long a pass waits for the host lock (a manual `apply` holds it) before it
    #: is tried again
    lock_timeout_s: float = 5.0
    #: the loop wakes at least this often (its heartbeat for /healthz)
    heartbeat_s: float = 30.0
    #: a source that cannot be read is tried again after this long (doubling, capped)
    source_retry_s: float = 2.0
    #: a pass running longer than this makes /healthz say unhealthy (a stuck driver call)
    stuck_pass_s: float = 3600.0


@dataclass(slots=True)
class _Revision:
    snapshot: Snapshot
    desired: Desired


@dataclass(slots=True)
class _Held:
    state: str
    detail: str
    error: str | None = None
    reason: str = "CannotPlan"  # the event's reason when it holds a resource back


@dataclass(slots=True)
class PassReport:
    """What one pass did (for tests and logs)."""

    revision: str | None = None
    rejected: list[Problem] = field(default_factory=list)
    result: ApplyResult | None = None
    held: dict[Key, str] = field(default_factory=dict)
    drifted: list[Key] = field(default_factory=list)
    error: str | None = None


class Daemon:
    #: queue entry for a pass that failed with nothing due (a new revision's first pass)
    _PASS = Key("", "", "")

    def __init__(
        self,
        load_config: Callable[[], HostConfig],
        source: Source,
        *,
        options: DaemonOptions = DaemonOptions(),
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        make_controller: Callable[[HostConfig], Controller] = Controller,
        watch: bool = True,
    ):
        self.load_config = load_config
        self.source = source
        self.options = options
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.make_controller = make_controller
        self.watch_host = watch
        self.controller = make_controller(load_config())
        self.journal = Record(Journal(self.controller.config.stateDir), self.clock)
        self.queue: WorkQueue[Key] = WorkQueue(self.clock, backoff=options.backoff, resync_s=options.resync_s)
        self.current: _Revision | None = None
        self.candidate: _Revision | None = None
        self.passes = 0

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flags_lock = threading.Lock()
        self._source_changed = True  # read the source first thing
        self._reload_requested = False
        self._refresh_requested = False
        self._events: deque[HostEvent] = deque()
        self._source_retry_at: float | None = None
        self._source_failures = 0
        self._attempted: str | None = None
        #: the last revision tried was refused by the plan (not by validation): a host
        #: condition, tried again at the next resync
        self._rejected_by_plan = False
        self._watches: list[Watch] = []
        self._suspended: dict[str, str] = self.journal.suspensions()
        self._names: dict[str, set[Key]] = {}
        self._known: set[Key] = set()
        self._seen_hash: dict[Key, str] = {}
        self._drifted: set[Key] = set()
        self._errors: dict[Key, str] = {}
        self._revision_of: dict[Key, str | None] = {
            (Key(s.kind, s.tenant, s.name)): s.revision for s in self.journal.resources().values()}
        self._in_pass_since: float | None = None
        self._heartbeat = self.clock.now()
        self._started_at = now_iso()

    # --- what other threads call (cheap, no I/O) ------------------------------------------

    def source_changed(self) -> None:
        with self._flags_lock:
            self._source_changed = True
        self._wake.set()

    def host_event(self, event: HostEvent) -> None:
        with self._flags_lock:
            self._events.append(event)
        self._wake.set()

    def request_stop(self) -> None:
        """SIGTERM: changes in flight finish and are recorded; nothing new starts."""
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """SIGHUP: read the host config again (drivers and watchers are made anew)."""
        with self._flags_lock:
            self._reload_requested = True
        self._wake.set()

    def request_refresh(self) -> None:
        """SIGUSR1 from `reconciler suspend/resume`: read the suspensions again."""
        with self._flags_lock:
            self._refresh_requested = True
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- life -----------------------------------------------------------------------------

    def start(self) -> None:
        self._restore()
        closed = self.journal.close_abandoned()
        self.journal.set_daemon(pid=os.getpid(), startedAt=self._started_at, stoppedAt=None,
                                source=self.source.description, resyncSeconds=self.options.resync_s)
        self._event("info", "Started", f"watching {self.source.description}"
                    + (f"; {closed} apply interrupted by a crash closed in the journal" if closed else ""))
        self.source.start(self.source_changed)
        self._start_watches()

    def _restore(self) -> None:
        """The revision in force when the daemon last ran, if its manifests are still
        there and valid (a git checkout is kept): it stays in force (drift is healed
        against it) even when the source's head does not validate now."""
        info = self.journal.daemon()
        revision, manifests = info.get("appliedRevision"), info.get("manifests")
        if not revision or not manifests or not Path(manifests).is_dir():
            return
        desired, problems = load([manifests])
        if problems:
            return
        display = info.get("manifestsDisplay", manifests)
        self.current = _Revision(Snapshot(revision, Path(manifests), display, info.get("appliedSummary") or ""),
                                 desired)
        self._attempted = None
        log.info("restored the revision in force", revision=revision, resources=len(desired))

    def run(self) -> None:
        """Start, loop until stopped, shut down."""
        self.start()
        try:
            while not self._stop.is_set():
                self.step()
                if self._stop.is_set():
                    break
                self.clock.wait(self._wake, self._wait_s())
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self._close_watches()
        try:
            self.source.close()
        finally:
            self.journal.set_daemon(stoppedAt=now_iso())
            self._event("info", "Stopped", "the daemon stopped")
            self.journal.flush(force=True)
            if self.journal.pending:
                log.error("the journal could not be written before the daemon stopped; its last records "
                          "are lost (the host itself is as the log says)", error=self.journal.error,
                          lost=self.journal.pending)

    def _wait_s(self) -> float:
        wait = min(self.queue.due_in(), self.options.heartbeat_s)
        if self._source_retry_at is not None:
            wait = min(wait, max(0.0, self._source_retry_at - self.clock.now()))
        return wait

    def health(self) -> tuple[bool, dict[str, object]]:
        """For /healthz: the loop is alive (it beat recently, or is in a pass)."""
        now = self.clock.now()
        since = self._in_pass_since
        pass_s = None if since is None else now - since
        if pass_s is not None:
            alive = pass_s <= self.options.stuck_pass_s
        else:
            alive = now - self._heartbeat <= 4 * self.options.heartbeat_s
        return alive and not self._stop.is_set(), {
            "revision": self.current.snapshot.revision if self.current else None,
            "queueDepth": self._depth(),
            "inPass": pass_s is not None,
            "passSeconds": None if pass_s is None else round(pass_s, 3),
            "secondsSinceHeartbeat": round(now - self._heartbeat, 3),
        }

    # --- one turn of the loop ----------------------------------------------------------

    def step(self) -> PassReport | None:
        """Take what happened since the last turn, and run a pass if anything is due."""
        self._wake.clear()
        self._heartbeat = self.clock.now()
        with self._flags_lock:
            reload, self._reload_requested = self._reload_requested, False
            refresh, self._refresh_requested = self._refresh_requested, False
            source, self._source_changed = self._source_changed, False
            events, self._events = list(self._events), deque()
        if reload:
            self._reload()
        if refresh:
            self._refresh_suspensions()
        for event in events:
            self._on_host_event(event)
        if self._source_retry_at is not None and self.clock.now() >= self._source_retry_at:
            source = True
        if source:
            self._read_source()
        if self.queue.resync_due():
            if self._rejected_by_plan:  # a conflict or no room on the host: may be gone now
                self._rejected_by_plan = False
                self._attempted = None
                self._read_source()
            self.queue.add_all(self._all_keys())
            self.queue.resynced()
            log.info("resync", resources=len(self._known))
        due = self.queue.pop_due()
        report = None
        if due or (self.candidate is not None and self.queue.retry_at(self._PASS) is None):
            report = self.reconcile(due)
        self.metrics.queue_depth.set(self._depth())
        return report

    # --- sources ------------------------------------------------------------------------

    def _read_source(self) -> None:
        try:
            snap = self.source.latest()
        except SourceError as exc:
            self._source_failures += 1
            delay = min(60.0, self.options.source_retry_s * 2 ** (self._source_failures - 1))
            self._source_retry_at = self.clock.now() + delay
            self.journal.set_daemon(sourceError=str(exc))
            self._event("warning", "SourceError", f"{exc} (trying again in {delay:g} s)")
            return
        if self._source_failures:
            self.journal.set_daemon(sourceError=None)
        self._source_failures = 0
        self._source_retry_at = None
        if snap.revision == self._attempted:
            return
        self._attempted = snap.revision
        self.journal.set_daemon(attemptedRevision=snap.revision, attemptedAt=now_iso(),
                                attemptedSummary=snap.summary or None, attemptedErrors=[])
        desired, problems = load([snap.root])
        if problems:
            self._reject(snap, problems)
            return
        self.candidate = _Revision(snap, desired)
        old = self.current.desired if self.current else Desired()
        for key in _changed_keys(old, desired):
            self.queue.reset(key)
        log.info("new revision", revision=snap.revision, resources=len(desired))

    def _reject(self, snap: Snapshot, problems: list[Problem]) -> list[Problem]:
        """Record a revision's errors (files named as users know them); returns them."""
        shown = _as_shown(snap, problems)
        self.journal.set_daemon(attemptedErrors=[str(p) for p in shown])
        self.metrics.rejected.inc()
        in_force = self.current.snapshot.revision if self.current else "none"
        first = "; ".join(str(p) for p in shown[:3])
        more = f" (and {len(shown) - 3} more)" if len(shown) > 3 else ""
        self._event("error", "RevisionRejected",
                    f"revision {_short(snap.revision)} not applied, {len(shown)} error(s): {first}{more}; "
                    f"revision {_short(in_force)} stays in force", revision=snap.revision)
        return shown

    # --- host events ------------------------------------------------------------------

    def _on_host_event(self, event: HostEvent) -> None:
        self.metrics.host_events.labels(event.driver).inc()
        if event.subject == "*":
            keys = self._all_keys()
        else:
            # a name the last observation and the manifests do not know is not ours:
            # another installation's object (its tests, its daemon) or, for our own
            # devices without an index entry (a tap, a DHCP or router leg), the event
            # of its bridge ("port removed") names the resource
            keys = self._names.get(event.subject, set())
        if not keys:
            log.debug("host event not ours", driver=event.driver, subject=event.subject, what=event.what)
            return
        log.info("host event", driver=event.driver, subject=event.subject, what=event.what,
                 resources=len(keys))
        self.queue.add_all(keys, after=self.options.event_delay_s)

    def _start_watches(self) -> None:
        if not self.watch_host:
            return
        for drv in {id(d): d for d in self.controller.drivers.values()}.values():
            if isinstance(drv, Watching):
                try:
                    self._watches.append(drv.watch(self.host_event))
                except ReconcilerError as exc:
                    self._event("warning", "WatchFailed",
                                f"cannot watch the {drv.name} driver's host objects: {exc}; "
                                f"drift is found by the resync every {self.options.resync_s:g} s")

    def _close_watches(self) -> None:
        watches, self._watches = self._watches, []
        for w in watches:
            try:
                w.close()
            except Exception as exc:  # noqa: BLE001 - closing must go on for the others
                log.warning("closing a watch failed", error=str(exc))

    # --- host config, suspensions ---------------------------------------------------

    def _reload(self) -> None:
        try:
            config = self.load_config()
            controller = self.make_controller(config)
            if Path(config.stateDir) != Path(self.controller.config.stateDir):
                raise ReconcilerError(f"stateDir changed ({self.controller.config.stateDir} -> "
                                      f"{config.stateDir}): restart the daemon for that")
            controller.drivers  # noqa: B018 - build them now: a bad config fails here
        except ReconcilerError as exc:
            self._event("error", "HostConfigInvalid", f"host config not reloaded, the old one stays: {exc}")
            return
        self._close_watches()
        self.controller = controller
        self._start_watches()
        self.queue.add_all(self._all_keys())
        self._event("info", "HostConfigReloaded", "host config read again; every resource is reconciled")

    def _refresh_suspensions(self) -> None:
        before = self._suspended
        try:
            self._suspended = self.journal.suspensions()
        except JournalError as exc:  # the old ones stay in force; asked again at the next pass
            log.warning("suspensions not read again: the journal cannot be read", error=str(exc))
            with self._flags_lock:
                self._refresh_requested = True
            return
        changed = set(before) ^ set(self._suspended)
        for key in self._all_keys():
            if any(_matches(t, key) for t in changed):
                self.queue.reset(key)

    def suspended(self, key: Key) -> str | None:
        """The suspension that covers `key` ("*", its tenant, or itself), if any."""
        return next((t for t in self._suspended if _matches(t, key)), None)

    # --- a pass -----------------------------------------------------------------------

    def reconcile(self, due: Iterable[Key]) -> PassReport:
        """Observe, plan and apply what is not held back. `due` are the resources popped
        from the queue: they leave it reconciled (or back off)."""
        due = set(due)
        report = PassReport()
        started = self.clock.now()
        self._in_pass_since = started
        try:
            with self.controller.lock("daemon", self.options.lock_timeout_s):
                self._reconcile_locked(due, report)
        except LockTimeout as exc:
            report.error = str(exc)
            self.queue.add_all(due, after=self.options.lock_timeout_s)
            self._event("warning", "HostLocked", f"{exc}; trying again")
        except Exception as exc:  # noqa: BLE001 - the loop goes on: a bug in one pass must not stop healing
            internal = not isinstance(exc, ReconcilerError)
            if internal:
                log.exception("internal error in a reconcile pass")
            report.error = f"{type(exc).__name__}: {exc}"
            for key in due | {self._PASS}:  # _PASS: a new revision waits as long
                self.queue.failed(key)
            self._event("error", "ReconcileFailed",
                        f"reconcile failed: {'internal error: ' if internal else ''}{type(exc).__name__}: {exc}; "
                        "trying again with backoff")
        finally:
            self._in_pass_since = None
            self.passes += 1
            elapsed = self.clock.now() - started
            self.metrics.reconcile_seconds.observe(elapsed)
            self.metrics.last_pass.set(time.time())
            self.journal.set_daemon(lastPassAt=now_iso(), lastPassSeconds=round(elapsed, 4),
                                    queueDepth=self._depth())
        return report

    def _reconcile_locked(self, due: set[Key], report: PassReport) -> None:
        controller = self.controller
        candidate = self.candidate  # kept until planned: a pass that fails tries it again
        if candidate is not None:
            the_plan, observation = controller.plan_observed(candidate.desired)
            self.candidate = None
            if the_plan.errors:
                report.rejected = self._reject(candidate.snapshot, the_plan.errors)
                self._rejected_by_plan = True
                candidate = None
            else:
                self.current = candidate
                self._rejected_by_plan = False
        if self.current is None:
            return  # nothing good to apply yet
        if candidate is None:
            the_plan, observation = controller.plan_observed(self.current.desired)
        rev = self.current
        report.revision = rev.snapshot.revision
        self._index(rev.desired, observation)
        problems = self._problems_by_key(rev, the_plan.errors)
        held, drift = self._hold(rev.desired, the_plan, problems)
        report.held = {k: h.state for k, h in held.items()}
        report.drifted = sorted(drift)
        selected = [c for c in the_plan.actionable if c.key not in held]
        result = None
        if selected:
            ids = {c.id for c in selected}
            sub = Plan(changes=selected, edges=[(a, b) for a, b in the_plan.edges if a in ids and b in ids])
            self._progressing(selected)
            result = controller.apply(
                sub, parallelism=self.options.parallelism, command="daemon", source=str(rev.snapshot.root),
                revision=rev.snapshot.revision, stopping=self._stop.is_set,
                sleep=lambda seconds: self.clock.wait(self._stop, seconds))
            report.result = result
        self._record(rev, the_plan, observation, held, result, due, drift)
        if candidate is not None:
            self.journal.set_daemon(appliedRevision=rev.snapshot.revision, appliedAt=now_iso(),
                                    appliedSummary=rev.snapshot.summary or None,
                                    manifests=str(rev.snapshot.root), manifestsDisplay=rev.snapshot.display_root)
            self.metrics.set_revision(rev.snapshot.revision)
            outcome = ("ok" if result is None or result.ok else "with failures") + (
                f"; {len(the_plan.unknown)} resource(s) wait for a driver that cannot observe"
                if the_plan.unknown else "")
            self._event("info", "RevisionApplied",
                        f"revision {_short(rev.snapshot.revision)} applied ({outcome})"
                        + (f": {rev.snapshot.summary}" if rev.snapshot.summary else ""),
                        revision=rev.snapshot.revision)
            self.source.keep([rev.snapshot.revision])

    def _problems_by_key(self, rev: _Revision, problems: list[Problem]) -> dict[Key, str]:
        """Plan errors of the revision in force (a conflict appeared, the host has no room
        left) hold back only the resources they name; one naming none holds back all."""
        if not problems:
            return {}
        by_display = {r.key.display: r.key for r in rev.desired}
        out: dict[Key, str] = {}
        for p in problems:
            shown = str(_as_shown(rev.snapshot, [p])[0])
            key = by_display.get(p.resource or "")
            for k in [key] if key is not None else list(rev.desired.resources):
                out[k] = shown if k not in out else out[k]
        return out

    def _hold(self, desired: Desired, the_plan: Plan, problems: Mapping[Key, str]
              ) -> tuple[dict[Key, _Held], set[Key]]:
        """Which changes wait (and why), and which resources drifted."""
        held: dict[Key, _Held] = {}
        drift: set[Key] = set()
        fresh: list[tuple[Change, str]] = []  # drift seen for the first time
        for change in the_plan.actionable:
            key = change.key
            is_drift = self._is_drift(change)
            policy = _drift_policy(desired, key)
            if is_drift:
                drift.add(key)
                if key not in self._drifted:
                    fresh.append((change, policy))
            suspension = self.suspended(key)
            retry = self.queue.retry_at(key)
            if suspension is not None:
                held[key] = _Held(SUSPENDED, f"suspended ({suspension}); would {change.action.value}: "
                                  f"{change.reason}")
            elif key in problems:
                held[key] = _Held(FAILED, "cannot be planned", problems[key])
            elif retry is not None:
                held[key] = _Held(FAILED, f"retry in {max(0.0, retry - self.clock.now()):.0f} s",
                                  self._errors.get(key))
            elif is_drift and policy == "report":
                held[key] = _Held(DRIFTED, f"drift reported, not healed (drift: report): {change.reason}")
        self._drifted = drift
        for key, why in the_plan.unknown.items():  # its driver cannot observe (a service down)
            held[key] = _Held(FAILED, "not reconciled: its state cannot be observed now", why, "CannotObserve")
        # what comes after a held change waits with it
        by_id = {c.id: c for c in the_plan.actionable}
        succ: dict[str, list[str]] = defaultdict(list)
        for a, b in the_plan.edges:
            succ[a].append(b)
        stack = [(c.id, c.key) for c in the_plan.actionable if c.key in held]
        while stack:
            cid, cause = stack.pop()
            for nxt in succ.get(cid, ()):
                change = by_id.get(nxt)
                if change is None or change.key in held:
                    continue
                held[change.key] = _Held(WAITING, f"waits for {cause.display}")
                stack.append((nxt, cause))
        for change, policy in fresh:
            key = change.key
            self.metrics.drift.labels(key.kind, policy).inc()
            why = held.get(key)
            then = ("; healing" if why is None else " (report only: not healed)" if why.state == DRIFTED
                    else f" (not healed now: {why.detail})")
            self._event("warning", "Drift", f"{key.display} drifted: {change.reason}{then}", resource=str(key))
        return held, drift

    def _is_drift(self, change: Change) -> bool:
        """The host moved and the manifest did not: a field changed on the host, the
        driver found something broken, or an object we had made is gone."""
        if change.action in (Action.UPDATE, Action.REPLACE):
            primary = change.primary
            broken = bool(primary is not None and primary.drift)
            causes = {d.cause for d in change.diffs}
            if not causes:
                return broken
            # derived facts (a network's ports) differ as a consequence of what the
            # driver found broken (its rules gone), not of another resource's edit
            return causes == {"drift"} or (broken and causes <= {"drift", "derived"})
        if change.action is Action.CREATE and change.target is not None:
            return self._seen_hash.get(change.key) == change.target.mark.spec_hash
        return False

    def _progressing(self, changes: Iterable[Change]) -> None:
        """The pass's changes, `progressing` for `status` until it ends: one journal write
        for them all (not one per change started: that doubled a 1,000-change apply)."""
        self.journal.set_resources([self._row(c.key, PROGRESSING, f"{c.action.value}: {c.reason}")
                                    for c in changes])

    def _record(self, rev: _Revision, the_plan: Plan, observation: Observation, held: Mapping[Key, _Held],
                result: ApplyResult | None, due: set[Key], drift: set[Key]) -> None:
        """Queue what failed, and write every resource's state for `status`."""
        outcomes = {o.change.key: o for o in (result.outcomes if result else [])}
        actionable = {c.key: c for c in the_plan.actionable}
        revision = rev.snapshot.revision
        self.queue.forget(self._PASS)
        for key in due:
            if key not in actionable and key not in the_plan.unknown:  # unknown: held, backing off
                self.queue.succeeded(key)
                self._errors.pop(key, None)
        rows: dict[Key, ResourceState] = {}
        gone: set[Key] = set()
        for key, outcome in outcomes.items():
            change = outcome.change
            self.metrics.changes.labels(key.kind, change.action.value, outcome.status).inc()
            if outcome.status == APPLIED:
                self.queue.succeeded(key)
                self._errors.pop(key, None)
                if key in drift:
                    self._event("info", "DriftHealed", f"{key.display} healed: {change.reason}",
                                resource=str(key))
                if change.target is not None:
                    self._seen_hash[key] = change.target.mark.spec_hash
                if change.action is Action.DELETE:
                    self._revision_of.pop(key, None)
                    self._seen_hash.pop(key, None)
                    gone.add(key)
                    continue
                if change.action is Action.ORPHAN:
                    rows[key] = self._row(key, ORPHANED, "retained after removal from the manifests")
                    continue
                self._revision_of[key] = revision
                rows[key] = self._row(key, READY, "")
            elif outcome.status == SKIPPED and outcome.error == NOT_STARTED:
                self.queue.add(key)
                rows[key] = self._row(key, PENDING, f"{change.action.value} not started: the daemon stopped")
            else:
                delay = self.queue.failed(key)
                error = self._where(rev, key) + (outcome.error or outcome.status)
                self._errors[key] = error
                state = WAITING if outcome.status == SKIPPED else FAILED
                if state == FAILED:
                    self.metrics.failures.labels(key.kind).inc()
                if state == FAILED:
                    self._event("error", "ApplyFailed", f"{change.action.value} {key.display}: {error}",
                                resource=str(key), revision=revision)
                rows[key] = self._row(key, state, f"{change.action.value} failed, retry in {delay:g} s",
                                      error, self.clock.now() + delay)
        for key, h in held.items():
            if key in outcomes:
                continue
            if h.state == FAILED and h.error and key not in self.queue:
                if self._errors.get(key) != h.error:
                    self._event("error", h.reason, h.error, resource=str(key), revision=revision)
                self._errors[key] = h.error
                self.queue.failed(key)  # looked at again (with backoff) while the problem lasts
            rows[key] = self._row(key, h.state, h.detail, h.error or self._errors.get(key),
                                  self.queue.retry_at(key))
        owned = {o.key: o for o in observation.owned}
        for key in set(rev.desired.resources) | set(owned):
            if key in rows or key in gone:
                continue
            if key in actionable:  # not applied, not held: cut short by a stop
                rows[key] = self._row(key, PENDING, f"{actionable[key].action.value}: {actionable[key].reason}")
            elif key not in rev.desired.resources and owned[key].mark.orphaned:
                rows[key] = self._row(key, ORPHANED, "retained after removal from the manifests")
            else:
                self._revision_of[key] = self._revision_of.get(key) or revision
                suspension = self.suspended(key)
                rows[key] = (self._row(key, SUSPENDED, f"suspended ({suspension}); in sync")
                             if suspension else self._row(key, READY, ""))
        self.journal.set_resources(rows.values(), replace=True)
        self.metrics.set_states(dict(Counter(r.state for r in rows.values())))
        self._known = (set(rev.desired.resources) | set(owned)) - gone
        for key in list(self._revision_of):
            if key not in self._known:
                self._revision_of.pop(key, None)

    def _row(self, key: Key, state: str, detail: str, error: str | None = None,
             retry_at: float | None = None) -> ResourceState:
        retry = None
        if retry_at is not None:
            retry = _iso_in(retry_at - self.clock.now())
        return ResourceState(key.kind, key.tenant, key.name, state, self._revision_of.get(key), detail,
                             error, retry, self.queue.failures(key))

    def _where(self, rev: _Revision, key: Key) -> str:
        res = rev.desired.get(key)
        if res is None:
            return ""
        return f"{rev.snapshot.display(res.source.file)}:{res.source.line}: "

    def _index(self, desired: Desired, observation: Observation) -> None:
        """Host names -> resources, to map host events (a domain, an interface) to what
        they touch; and the spec hash each object was last applied with, to tell an
        object deleted on the host (drift) from one never made."""
        names: dict[str, set[Key]] = defaultdict(set)
        for obs in observation.owned:
            names[obs.identity].add(obs.key)
            for value in obs.host.values():
                if isinstance(value, str) and value:
                    names[value].add(obs.key)
            self._seen_hash[obs.key] = obs.mark.spec_hash
        drivers = self.controller.drivers
        for res in desired:
            drv = drivers.get(res.key.kind)
            if drv is not None:
                names[drv.host_name(res.key)].add(res.key)
        self._names = dict(names)

    def _depth(self) -> int:
        """Resources queued (not counting the marker of a failed pass)."""
        return len(self.queue) - (1 if self._PASS in self.queue else 0)

    def _all_keys(self) -> set[Key]:
        keys = set(self._known)
        for rev in (self.current, self.candidate):
            if rev is not None:
                keys.update(rev.desired.resources)
        return keys

    def _event(self, level: str, reason: str, message: str, *, resource: str | None = None,
               revision: str | None = None) -> None:
        getattr(log, level if level in ("info", "warning", "error") else "info")(
            reason, message=message, resource=resource)
        self.journal.event(level, reason, message, resource,
                           revision or (self.current.snapshot.revision if self.current else None))


def _as_shown(snap: Snapshot, problems: Iterable[Problem]) -> list[Problem]:
    """Problems with their files named as users know them (a git path in the repository)."""
    return [dataclasses.replace(p, file=snap.display(p.file)) if p.file else p for p in problems]


def _changed_keys(old: Desired, new: Desired) -> set[Key]:
    """Resources whose intent differs between two revisions (added, removed, edited)."""
    def sig(d: Desired) -> dict[Key, str]:
        return {r.key: r.spec_hash + canonical_json(r.metadata.model_dump(mode="json")) for r in d}
    a, b = sig(old), sig(new)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _drift_policy(desired: Desired, key: Key) -> str:
    res = desired.get(key)
    if res is not None and res.metadata.drift:
        return res.metadata.drift
    tenant = desired.get(Key("Tenant", key.tenant, key.tenant))
    if tenant is not None and tenant.metadata.drift:
        return tenant.metadata.drift
    return "heal"


def _matches(target: str, key: Key) -> bool:
    return target == "*" or target == key.tenant or target == str(key)


def _short(revision: str) -> str:
    if revision.startswith("sha256:"):
        return revision[:15]
    return revision[:12]


def _iso_in(seconds: float) -> str:
    at = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=max(0.0, seconds))
    return at.isoformat(timespec="seconds")

