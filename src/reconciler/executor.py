"""apply(Plan) -> ApplyResult: the only place with side effects on the host.

The executor checks before (a plan whose host objects changed since it was made is
refused), runs the changes over the plan's edges with a bounded thread pool and
per-driver limits and lanes (one change at a time per lane, e.g. per volume group; a failed change skips only what comes after it; every independent
change still runs; transient errors are retried with backoff), and checks after: it
observes again and reports any change whose result differs from the plan as a driver
bug.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, TypeVar

import structlog

from reconciler import faults
from reconciler.drivers.base import Driver, Laned
from reconciler.errors import DriverError, StalePlan, TransientError
from reconciler.models import Key
from reconciler.planner import Action, Change, Plan
from reconciler.state import Observation, Observed, Target

log = structlog.get_logger("reconciler.executor")

T = TypeVar("T")

APPLIED = "applied"
FAILED = "failed"
SKIPPED = "skipped"
MISMATCH = "mismatch"
NOT_STARTED = "not started: stopping"


@dataclass(slots=True)
class Outcome:
    change: Change
    status: str
    error: str | None = None
    duration_s: float = 0.0
    attempts: int = 0


@dataclass(slots=True)
class ApplyResult:
    outcomes: list[Outcome] = field(default_factory=list)
    duration_s: float = 0.0
    #: the journal could not record this apply (locked, disk full): why; the host changed
    journal_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(o.status == APPLIED for o in self.outcomes)

    def counts(self) -> Counter[str]:
        return Counter(o.status for o in self.outcomes)

    def by_id(self) -> dict[str, Outcome]:
        return {o.change.id: o for o in self.outcomes}


def drivers_for(plan_changes: Iterable[Change], drivers: Mapping[str, Driver]) -> list[Driver]:
    """The distinct drivers a set of changes needs (in kind order)."""
    seen: dict[int, Driver] = {}
    for change in plan_changes:
        drv = drivers[change.key.kind]
        seen.setdefault(id(drv), drv)
    return list(seen.values())


def drivers_for_kinds(drivers: Mapping[str, Driver]) -> list[Driver]:
    """Every distinct driver of a kind -> driver map."""
    seen: dict[int, Driver] = {}
    for drv in drivers.values():
        seen.setdefault(id(drv), drv)
    return list(seen.values())


def observe_all(drivers: Iterable[Driver]) -> Observation:
    result = Observation()
    for drv in drivers:
        result.extend(drv.observe())
    return result


def observe_each(drivers: Iterable[Driver]) -> tuple[Observation, dict[str, str]]:
    """Observe every driver; one whose service is down (a transient error) is left out
    and reported (driver name -> why), so changes of the others can still be checked."""
    result = Observation()
    down: dict[str, str] = {}
    for drv in drivers:
        try:
            result.extend(drv.observe())
        except TransientError as exc:
            down[drv.name] = str(exc)
            log.warning("driver cannot observe", driver=drv.name, error=str(exc))
    return result, down


def check_fresh(plan: Plan, observation: Observation, drivers: Mapping[str, Driver] | None = None,
                unavailable: Iterable[str] = ()) -> None:
    """Raise StalePlan when a host object a change touches differs from plan time, or
    (given the drivers) an object without our mark now has the name a create needs.
    Changes of the `unavailable` kinds (their driver could not observe) are not checked:
    they are not attempted."""
    now: dict[Key, dict[str, str]] = defaultdict(dict)
    for obs in observation.owned:
        now[obs.key][obs.identity] = obs.fingerprint()
    unowned = {(u.kind, u.host_name) for u in observation.unowned}
    stale = []
    skip = set(unavailable)
    for change in plan.actionable:
        if change.key.kind in skip:
            continue
        then = {o.identity: o.fingerprint() for o in change.observed}
        if now.get(change.key, {}) != then:
            stale.append(change.key.display)
        elif (
            change.action is Action.CREATE
            and drivers is not None
            and (change.key.kind, drivers[change.key.kind].host_name(change.key)) in unowned
        ):
            stale.append(f"{change.key.display} (an object without our mark has its name)")
    if stale:
        listed = ", ".join(stale[:10]) + (f" and {len(stale) - 10} more" if len(stale) > 10 else "")
        raise StalePlan(
            f"the host changed since the plan was made ({listed}); nothing was applied. "
            "Run plan again."
        )


class Executor:
    """Runs a plan's changes through the drivers, in graph order, in parallel."""

    def __init__(
        self,
        drivers: Mapping[str, Driver],
        *,
        parallelism: int = 8,
        retries: int = 2,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_start: Callable[[Change], None] | None = None,
        on_done: Callable[[Outcome], None] | None = None,
        stopping: Callable[[], bool] | None = None,
    ):
        if parallelism < 1:
            raise ValueError("parallelism must be at least 1")
        self.drivers = drivers
        self.parallelism = parallelism
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.clock = clock
        self.on_start = on_start or (lambda c: None)
        self.on_done = on_done or (lambda o: None)
        #: when it says True, no further change starts (those running finish, the rest
        #: are recorded as not started): the daemon's SIGTERM
        self.stopping = stopping or (lambda: False)
        self._current: dict[Key, Observed] = {}
        self._current_lock = threading.Lock()
        #: drivers that could not observe at the start (name -> why): their changes are
        #: not attempted and fail as transient
        self._down: dict[str, str] = {}

    # --- the whole run ----------------------------------------------------------------

    def apply(self, plan: Plan, *, check: bool = True) -> ApplyResult:
        started = self.clock()
        changes = plan.actionable
        involved = drivers_for(changes, self.drivers)
        self._current = {}
        self._down = {}
        if changes:
            # one read of every driver: the freshness check, and what each change's
            # references have on the host (a NIC's bridge, a volume's device path)
            everything, self._down = observe_each(drivers_for_kinds(self.drivers))
            if check:
                down_kinds = [k for k, d in self.drivers.items() if d.name in self._down]
                check_fresh(plan, everything, self.drivers, unavailable=down_kinds)
            for obs in everything.owned:
                if not obs.mark.orphaned or obs.key not in self._current:
                    self._current[obs.key] = obs
        outcomes = self._run(changes, plan.edges)
        if changes:
            after, down = observe_each(involved)
            self._verify(outcomes, after, down)
        order = {c.id: i for i, c in enumerate(changes)}
        result = ApplyResult(sorted(outcomes.values(), key=lambda o: order[o.change.id]))
        result.duration_s = self.clock() - started
        return result

    def _run(self, changes: list[Change], edges: list[tuple[str, str]]) -> dict[str, Outcome]:
        by_id = {c.id: c for c in changes}
        succ: dict[str, list[str]] = defaultdict(list)
        indegree: Counter[str] = Counter()
        for a, b in edges:
            if a in by_id and b in by_id:
                succ[a].append(b)
                indegree[b] += 1
        ready = deque(c.id for c in changes if indegree[c.id] == 0)
        outcomes: dict[str, Outcome] = {}
        skipped_by: dict[str, str] = {}
        busy: Counter[int] = Counter()
        lanes = {c.id: self._lane(c) for c in changes}
        busy_lanes: set[str] = set()
        running: dict[Future[Outcome], str] = {}

        with ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="apply") as pool:
            while ready or running:
                if ready and self.stopping():
                    for cid in ready:
                        skipped_by.setdefault(cid, "")
                        for later in _descendants(cid, succ):
                            skipped_by.setdefault(later, "")
                    ready.clear()
                for cid in list(ready):
                    if len(running) >= self.parallelism:
                        break
                    drv = self.drivers[by_id[cid].key.kind]
                    if busy[id(drv)] >= max(1, drv.max_parallel):
                        continue
                    lane = lanes[cid]
                    if lane is not None and lane in busy_lanes:
                        continue
                    ready.remove(cid)
                    busy[id(drv)] += 1
                    if lane is not None:
                        busy_lanes.add(lane)
                    self.on_start(by_id[cid])
                    running[pool.submit(self._one, by_id[cid], drv)] = cid
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    cid = running.pop(fut)
                    change = by_id[cid]
                    busy[id(self.drivers[change.key.kind])] -= 1
                    busy_lanes.discard(lanes[cid])  # type: ignore[arg-type]
                    outcome = fut.result()
                    outcomes[cid] = outcome
                    self.on_done(outcome)
                    if outcome.status != APPLIED:
                        for later in _descendants(cid, succ):
                            skipped_by.setdefault(later, cid)
                    for nxt in succ[cid]:
                        indegree[nxt] -= 1
                        if indegree[nxt] == 0 and nxt not in skipped_by:
                            ready.append(nxt)
        for cid, cause in skipped_by.items():
            if cid not in outcomes:
                why = f"skipped: {by_id[cause].key.display} failed" if cause else NOT_STARTED
                outcome = Outcome(by_id[cid], SKIPPED, why)
                outcomes[cid] = outcome
                self.on_done(outcome)
        return outcomes

    def _lane(self, change: Change) -> str | None:
        drv = self.drivers[change.key.kind]
        if not isinstance(drv, Laned):
            return None
        lane = drv.lane(change.key, None if change.target is None else change.target.spec, change.primary)
        return None if lane is None else f"{drv.name}:{lane}"

    # --- one change -----------------------------------------------------------------

    def _one(self, change: Change, drv: Driver) -> Outcome:
        started = self.clock()
        attempts = [0]
        if drv.name in self._down:
            return Outcome(change, FAILED, f"TransientError: not attempted: {self._down[drv.name]}", 0.0, 0)
        try:
            self._act(change, drv, attempts)
        except DriverError as exc:
            return Outcome(change, FAILED, f"{type(exc).__name__}: {exc}", self.clock() - started, attempts[0])
        except OSError as exc:  # the host's own state (a full disk, a missing file): no bug, say what
            return Outcome(change, FAILED, f"{type(exc).__name__}: {exc}", self.clock() - started, attempts[0])
        except Exception as exc:  # noqa: BLE001 - a driver bug must not stop the others
            log.exception("driver raised an untranslated error", change=change.id)
            return Outcome(change, FAILED, f"internal error in driver {drv.name}: {type(exc).__name__}: {exc}",
                           self.clock() - started, attempts[0])
        return Outcome(change, APPLIED, None, self.clock() - started, attempts[0])

    def _act(self, change: Change, drv: Driver, attempts: list[int]) -> None:
        def retry(verb: str, fn: Callable[[], T]) -> T:
            return self._with_retries(lambda: _numbered(f"{verb} {change.key}", fn), attempts)

        action = change.action
        target = self._with_related(change.target)
        if action is Action.CREATE:
            assert target is not None
            self._record(retry("create", lambda: drv.create(target)))
        elif action is Action.UPDATE:
            assert target is not None and change.primary is not None
            primary = change.primary
            self._record(retry("update", lambda: drv.update(target, primary, change.diffs)))
            for dup in change.duplicates:
                retry("delete", lambda dup=dup: drv.delete(dup))  # type: ignore[misc]
        elif action is Action.REPLACE:
            assert target is not None
            if change.create_before_destroy:
                self._record(retry("create", lambda: drv.create(target)))
            for old in change.observed:
                retry("delete", lambda old=old: drv.delete(old))  # type: ignore[misc]
            if not change.create_before_destroy:
                self._record(retry("create", lambda: drv.create(target)))
        elif action is Action.DELETE:
            for old in change.observed:
                retry("delete", lambda old=old: drv.delete(old))  # type: ignore[misc]
        elif action is Action.ORPHAN:
            for old in change.observed:
                if not old.mark.orphaned:
                    retry("orphan", lambda old=old: drv.orphan(old))  # type: ignore[misc]

    def _with_related(self, target: Target | None) -> Target | None:
        """The target with the current host objects of the resources it references."""
        if target is None or not target.references:
            return target
        with self._current_lock:
            related = {k: self._current[k] for k in target.references if k in self._current}
        return dataclasses.replace(target, related=related)

    def _record(self, observed: Observed | None) -> None:
        if isinstance(observed, Observed):
            with self._current_lock:
                self._current[observed.key] = observed

    def _with_retries(self, fn: Callable[[], T], attempts: list[int]) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            attempts[0] += 1
            try:
                return fn()
            except TransientError as exc:
                if attempt == self.retries:
                    raise
                log.warning("transient error, retrying", error=str(exc), delay_s=delay)
                self.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    # --- afterwards -----------------------------------------------------------------

    def _verify(self, outcomes: dict[str, Outcome], observation: Observation,
                down: Mapping[str, str] | None = None) -> None:
        """Observe again: a change whose result differs from the plan is a driver bug.
        Changes of a driver that cannot observe now (`down`) stay as they were reported."""
        now: dict[Key, list[Observed]] = defaultdict(list)
        for obs in observation.owned:
            now[obs.key].append(obs)
        for outcome in outcomes.values():
            if outcome.status != APPLIED or self.drivers[outcome.change.key.kind].name in (down or {}):
                continue
            problem = _differs(outcome.change, now.get(outcome.change.key, []))
            if problem:
                outcome.status = MISMATCH
                outcome.error = f"driver result differs from the plan: {problem}"
                log.error("driver result differs from plan", change=outcome.change.id, problem=problem)


def _differs(change: Change, found: list[Observed]) -> str | None:
    if change.action is Action.DELETE:
        return f"{len(found)} object(s) still on the host" if found else None
    if change.action is Action.ORPHAN:
        return None if all(o.mark.orphaned for o in found) else "not flagged orphaned"
    target = change.target
    assert target is not None
    if len(found) != 1:
        return f"expected one object on the host, found {len(found)}"
    obs = found[0]
    if obs.mark.spec_hash != target.mark.spec_hash or obs.mark.orphaned:
        return "the ownership mark was not written as planned"
    if dict(obs.spec) != dict(target.spec):
        fields = sorted(k for k in set(obs.spec) | set(target.spec) if obs.spec.get(k) != target.spec.get(k))
        return "fields differ after apply: " + ", ".join(fields)
    if dict(obs.derived) != dict(target.derived):
        names = sorted(k for k in set(obs.derived) | set(target.derived)
                       if obs.derived.get(k) != target.derived.get(k))
        return "derived host facts differ after apply: " + ", ".join(names)
    if obs.drift:
        return "still broken on the host: " + "; ".join(obs.drift)
    return None


def _numbered(what: str, fn: Callable[[], T]) -> T:
    """One driver call that changes the host, numbered for the fault points `call:N`
    (see `faults`): a crash-safety test can stop the process just before or after it."""
    number = faults.call_started(what)
    try:
        return fn()
    finally:
        faults.call_returned(number, what)


def _descendants(start: str, succ: Mapping[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(succ.get(start, ()))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(succ.get(node, ()))
    return seen
