"""The executor: bounded parallelism, graph order, failure isolation, retries, checks.

Failures and concurrency are produced by `FaultyDriver`, a wrapper around a real
MemoryDriver. Concurrency is made deterministic with barriers and events (their
timeouts are only hang guards); no assertion depends on wall-clock time.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pytest

from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import PermanentError, StalePlan, TransientError
from reconciler.executor import APPLIED, FAILED, MISMATCH, SKIPPED, ApplyResult, Executor
from reconciler.loader import load
from reconciler.models import KINDS, Desired, Key
from reconciler.planner import Action, Plan, plan
from reconciler.state import Observation, Observed, Target

HANG_GUARD_S = 30.0


# --- a driver that misbehaves on request ---------------------------------------------------


@dataclass
class Recorder:
    """Shared by several FaultyDrivers: a global event log and in-flight counters."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: (seq, "start" | "end", driver name, op, key id)
    events: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    in_flight_by: Counter[str] = field(default_factory=Counter)
    max_in_flight_by: Counter[str] = field(default_factory=Counter)

    def enter(self, driver: str, op: str, key: Key) -> None:
        with self.lock:
            self.in_flight += 1
            self.in_flight_by[driver] += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.max_in_flight_by[driver] = max(self.max_in_flight_by[driver], self.in_flight_by[driver])
            self.events.append((len(self.events), "start", driver, op, str(key)))

    def leave(self, driver: str, op: str, key: Key) -> None:
        with self.lock:
            self.in_flight -= 1
            self.in_flight_by[driver] -= 1
            self.events.append((len(self.events), "end", driver, op, str(key)))

    def reset(self) -> None:
        with self.lock:
            assert self.in_flight == 0
            self.events.clear()
            self.max_in_flight = 0
            self.max_in_flight_by.clear()

    def calls(self, op: str | None = None) -> list[tuple[str, str]]:
        """(op, key id) of every call started, in order."""
        return [(o, k) for _, what, _, o, k in self.events if what == "start" and (op is None or o == op)]

    def first(self, what: str, key: str, op: str | None = None) -> int:
        for seq, w, _, o, k in self.events:
            if w == what and k == key and (op is None or o == op):
                return seq
        raise AssertionError(f"no {what} event for {key} {op or ''}")

    def last(self, what: str, key: str, op: str | None = None) -> int:
        found = [seq for seq, w, _, o, k in self.events if w == what and k == key and (op is None or o == op)]
        assert found, f"no {what} event for {key} {op or ''}"
        return found[-1]


class FaultyDriver:
    """The Driver protocol around a real MemoryDriver, with injectable faults.

    - permanent[(op, key id)] = message: raise PermanentError
    - transient[(op, key id)] = n: raise TransientError n times, then succeed
    - crash[(op, key id)] = exception: raise it (an untranslated library error)
    - lie[(op, key id)] = fn(target) -> target: create/update write fn(target) instead
    - skip_delete = {key id}: delete returns without deleting (a lying delete)
    - gate(op, key): called while the call is in flight (barriers, events, checks)
    """

    def __init__(
        self,
        inner: MemoryDriver,
        recorder: Recorder | None = None,
        *,
        name: str = "faulty",
        max_parallel: int | None = None,
    ):
        self.inner = inner
        self.recorder = recorder or Recorder()
        self.name = name
        self.kinds = inner.kinds
        self.max_parallel = inner.max_parallel if max_parallel is None else max_parallel
        self.permanent: dict[tuple[str, str], str] = {}
        self.transient: dict[tuple[str, str], int] = {}
        self.crash: dict[tuple[str, str], BaseException] = {}
        self.lie: dict[tuple[str, str], Callable[[Target], Target]] = {}
        self.skip_delete: set[str] = set()
        self.gate: Callable[[str, Key], None] | None = None
        self.attempts: Counter[tuple[str, str]] = Counter()
        #: (op, key id, identity) of every create result and delete argument
        self.identities: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def clear_faults(self) -> None:
        self.permanent.clear()
        self.transient.clear()
        self.crash.clear()
        self.lie.clear()
        self.skip_delete.clear()
        self.gate = None

    # protocol

    def observe(self) -> Observation:
        return self.inner.observe()

    def host_name(self, key: Key) -> str:
        return self.inner.host_name(key)

    def create(self, target: Target) -> Observed:
        def act() -> Observed:
            lie = self.lie.get(("create", str(target.key)))
            obs = self.inner.create(lie(target) if lie else target)
            self.identities.append(("create", str(target.key), obs.identity))
            return obs

        return self._call("create", target.key, act)

    def update(self, target: Target, observed: Observed, diffs: Any) -> Observed:
        def act() -> Observed:
            lie = self.lie.get(("update", str(target.key)))
            return self.inner.update(lie(target) if lie else target, observed, diffs)

        return self._call("update", target.key, act)

    def delete(self, observed: Observed) -> None:
        def act() -> None:
            self.identities.append(("delete", str(observed.key), observed.identity))
            if str(observed.key) not in self.skip_delete:
                self.inner.delete(observed)

        return self._call("delete", observed.key, act)

    def orphan(self, observed: Observed) -> Observed:
        return self._call("orphan", observed.key, lambda: self.inner.orphan(observed))

    def _call(self, op: str, key: Key, act: Callable[[], Any]) -> Any:
        k = (op, str(key))
        self.recorder.enter(self.name, op, key)
        try:
            with self._lock:
                self.attempts[k] += 1
            if self.gate is not None:
                self.gate(op, key)
            if k in self.crash:
                raise self.crash[k]
            if k in self.permanent:
                raise PermanentError(self.permanent[k])
            with self._lock:
                left = self.transient.get(k, 0)
                if left:
                    self.transient[k] = left - 1
            if left:
                raise TransientError(f"{key} is busy, try again")
            return act()
        finally:
            self.recorder.leave(self.name, op, key)


# --- helpers ---------------------------------------------------------------------------


def load_ok(*paths: Path) -> Desired:
    desired, problems = load(list(paths))
    assert problems == []
    return desired


def drivers_of(*drivers: FaultyDriver) -> dict[str, FaultyDriver]:
    by_kind: dict[str, FaultyDriver] = {}
    for drv in drivers:
        for kind in drv.kinds:
            by_kind[kind] = drv
    assert set(by_kind) == set(KINDS)
    return by_kind


def observe(drivers: Mapping[str, FaultyDriver]) -> Observation:
    obs = Observation()
    for drv in {id(d): d for d in drivers.values()}.values():
        obs.extend(drv.observe())
    return obs


def plan_for(desired: Desired, drivers: Mapping[str, FaultyDriver]) -> Plan:
    the_plan = plan(desired, observe(drivers))
    assert the_plan.errors == []
    return the_plan


def statuses(result: ApplyResult) -> dict[str, str]:
    return {o.change.id: o.status for o in result.outcomes}


def with_status(result: ApplyResult, status: str) -> set[str]:
    return {o.change.id for o in result.outcomes if o.status == status}


def host_keys(drivers: Mapping[str, FaultyDriver]) -> set[str]:
    return {str(o.key) for o in observe(drivers).owned}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_sleep(_: float) -> None:
    raise AssertionError("the executor slept without a transient error")


def descendants(start: str, edges: Iterable[tuple[str, str]]) -> set[str]:
    succ: dict[str, list[str]] = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
    seen: set[str] = set()
    stack = list(succ.get(start, ()))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(succ.get(node, ()))
    return seen


def tenants_yaml(names: Iterable[str]) -> str:
    return "\n---\n".join(
        f"apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: {n}\nspec:\n  description: tenant {n}\n"
        for n in names
    )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def faulty(memory_driver: MemoryDriver, recorder: Recorder) -> FaultyDriver:
    return FaultyDriver(memory_driver, recorder)


@pytest.fixture
def drivers(faulty: FaultyDriver) -> dict[str, FaultyDriver]:
    return drivers_of(faulty)


@pytest.fixture
def example(example_manifests: Path) -> Desired:
    return load_ok(example_manifests)


# --- parallelism -------------------------------------------------------------------------


@pytest.mark.parametrize("parallelism", [2, 3, 5])
def test_parallelism_bounds_changes_in_flight(
    write_manifests: Callable[..., Path], faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
    recorder: Recorder, parallelism: int,
) -> None:
    names = [f"t{i:02d}" for i in range(parallelism * 3)]
    desired = load_ok(write_manifests(tenants_yaml(names)))
    the_plan = plan_for(desired, drivers)
    assert the_plan.edges == [] and len(the_plan.actionable) == len(names)
    # every round of `parallelism` creates must be in flight together to pass the barrier
    barrier = threading.Barrier(parallelism)
    faulty.gate = lambda op, key: barrier.wait(timeout=HANG_GUARD_S)

    result = Executor(drivers, parallelism=parallelism, sleep=no_sleep).apply(the_plan)

    assert statuses(result) == {f"Tenant/{n}/{n}": APPLIED for n in names}
    assert recorder.max_in_flight == parallelism
    assert host_keys(drivers) == {f"Tenant/{n}/{n}" for n in names}


def test_independent_changes_run_concurrently(
    write_manifests: Callable[..., Path], faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
    recorder: Recorder,
) -> None:
    desired = load_ok(write_manifests(tenants_yaml(["a", "b"])))
    the_plan = plan_for(desired, drivers)
    # serial execution could never get both creates past a two-party barrier
    barrier = threading.Barrier(2)
    faulty.gate = lambda op, key: barrier.wait(timeout=HANG_GUARD_S)

    result = Executor(drivers, parallelism=8, sleep=no_sleep).apply(the_plan)

    assert result.ok, statuses(result)
    assert recorder.max_in_flight >= 2


def test_parallelism_must_be_positive(drivers: dict[str, FaultyDriver]) -> None:
    with pytest.raises(ValueError):
        Executor(drivers, parallelism=0)


def test_driver_max_parallel_one_limits_that_driver_only(
    write_manifests: Callable[..., Path], state_dir: Path, recorder: Recorder,
) -> None:
    root = state_dir / "memory"
    slow = FaultyDriver(MemoryDriver(root, kinds=("Image",)), recorder, name="slow", max_parallel=1)
    fast = FaultyDriver(MemoryDriver(root, kinds=tuple(k for k in KINDS if k != "Image")), recorder, name="fast")
    drivers = drivers_of(slow, fast)
    # the tenant exists already, so images and buckets have no ordering edges at all
    base = write_manifests(tenants_yaml(["acme"]))
    assert Executor(drivers).apply(plan_for(load_ok(base), drivers)).ok
    recorder.reset()
    images = "\n---\n".join(
        f"apiVersion: reconciler/v1\nkind: Image\nmetadata: {{name: img{i}, tenant: acme}}\n"
        f"spec: {{source: /images/img{i}.qcow2}}\n"
        for i in range(6)
    )
    buckets = "\n---\n".join(
        f"apiVersion: reconciler/v1\nkind: Bucket\nmetadata: {{name: b{i}, tenant: acme}}\nspec: {{}}\n"
        for i in range(2)
    )
    folder = write_manifests({"tenants.yaml": tenants_yaml(["acme"]), "images.yaml": images, "buckets.yaml": buckets})
    the_plan = plan_for(load_ok(folder), drivers)
    assert the_plan.edges == [] and len(the_plan.actionable) == 8

    # the first image create waits until both bucket creates are in flight with it
    barrier = threading.Barrier(3)
    first_image = threading.Lock()

    def slow_gate(op: str, key: Key) -> None:
        if first_image.acquire(blocking=False):
            barrier.wait(timeout=HANG_GUARD_S)

    slow.gate = slow_gate
    fast.gate = lambda op, key: barrier.wait(timeout=HANG_GUARD_S)

    result = Executor(drivers, parallelism=8, sleep=no_sleep).apply(the_plan)

    assert result.ok, statuses(result)
    assert recorder.max_in_flight_by["slow"] == 1
    assert recorder.max_in_flight_by["fast"] == 2
    assert recorder.max_in_flight >= 3
    assert len(recorder.calls("create")) == 8


# --- order -------------------------------------------------------------------------------


def test_each_change_starts_after_all_its_predecessors_finished(
    example: Desired, drivers: dict[str, FaultyDriver], recorder: Recorder,
) -> None:
    the_plan = plan_for(example, drivers)
    assert len(the_plan.edges) > 20

    result = Executor(drivers, parallelism=8, sleep=no_sleep).apply(the_plan)

    assert result.ok, statuses(result)
    assert len(result.outcomes) == len(the_plan.actionable)
    for before, after in the_plan.edges:
        assert recorder.last("end", before) < recorder.first("start", after), (before, after)
    # and a few edges we know the example has
    assert ("Network/acme/web", "Instance/acme/web-1") in the_plan.edges
    assert ("Network/infra/public", "Router/globex/gw") in the_plan.edges


def test_deletes_run_in_reverse_dependency_order(
    example: Desired, drivers: dict[str, FaultyDriver], recorder: Recorder,
) -> None:
    assert Executor(drivers).apply(plan_for(example, drivers)).ok
    recorder.reset()

    removal = plan_for(Desired(), drivers)
    deleted = {c.id for c in removal.actionable if c.action is Action.DELETE}
    assert {"Network/acme/web", "Instance/acme/web-1", "Router/acme/edge", "Network/infra/public",
            "Tenant/infra/infra"} <= deleted

    result = Executor(drivers, parallelism=8, sleep=no_sleep).apply(removal)

    assert result.ok, statuses(result)
    for before, after in removal.edges:
        assert recorder.last("end", before) < recorder.first("start", after), (before, after)
    # dependents go first: the instance before its network, image and security group...
    for dep in ("Network/acme/web", "Image/acme/tiny", "SecurityGroup/acme/web"):
        assert recorder.last("end", "Instance/acme/web-1") < recorder.first("start", dep, "delete")
    # ...the routers before the provider network, and that before its tenant
    for router in ("Router/acme/edge", "Router/globex/gw"):
        assert recorder.last("end", router) < recorder.first("start", "Network/infra/public", "delete")
    assert recorder.last("end", "Network/infra/public") < recorder.first("start", "Tenant/infra/infra", "delete")
    assert host_keys(drivers) == {c.id for c in removal.actionable if c.action is Action.ORPHAN}


# --- failures ------------------------------------------------------------------------------


def test_permanent_failure_skips_exactly_its_descendants(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver], recorder: Recorder,
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.permanent[("create", "Network/acme/web")] = "bridge rc-web: device busy"
    expected_skips = {"Instance/acme/web-1", "Instance/acme/web-2", "Router/acme/edge"}
    assert descendants("Network/acme/web", the_plan.edges) == expected_skips

    result = Executor(drivers, parallelism=4, sleep=no_sleep).apply(the_plan)

    assert not result.ok
    outcomes = result.by_id()
    assert with_status(result, FAILED) == {"Network/acme/web"}
    assert outcomes["Network/acme/web"].error == "PermanentError: bridge rc-web: device busy"
    assert outcomes["Network/acme/web"].attempts == 1
    assert with_status(result, SKIPPED) == expected_skips
    for cid in expected_skips:
        assert outcomes[cid].error == "skipped: Network acme/web failed"
    # the sibling network, the other tenants and everything else still applied
    applied = with_status(result, APPLIED)
    assert applied == {c.id for c in the_plan.actionable} - expected_skips - {"Network/acme/web"}
    assert {"Network/acme/db", "Instance/acme/db-1", "SecurityGroup/acme/web", "Image/acme/tiny",
            "Tenant/globex/globex", "Router/globex/gw", "Instance/globex/app-1"} <= applied
    # skipped changes never reached the driver, and nothing of them is on the host
    started = {k for _, k in recorder.calls()}
    assert started.isdisjoint(expected_skips)
    assert host_keys(drivers) == applied
    assert result.counts() == Counter({APPLIED: len(applied), FAILED: 1, SKIPPED: 3})


def test_failed_tenant_skips_its_whole_tenant_but_not_the_others(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.permanent[("create", "Tenant/globex/globex")] = "no such account"

    result = Executor(drivers, parallelism=8, sleep=no_sleep).apply(the_plan)

    globex = {c.id for c in the_plan.actionable if c.key.tenant == "globex"} - {"Tenant/globex/globex"}
    assert with_status(result, FAILED) == {"Tenant/globex/globex"}
    assert with_status(result, SKIPPED) == globex
    # skip reasons name the change that failed, even for grandchildren (Instance after Network)
    assert {result.by_id()[cid].error for cid in globex} == {"skipped: Tenant globex failed"}
    assert with_status(result, APPLIED) == {c.id for c in the_plan.actionable if c.key.tenant != "globex"}


def test_untranslated_driver_exception_is_a_failed_outcome(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.crash[("create", "Network/globex/batch")] = KeyError("bridge")

    result = Executor(drivers, parallelism=8, sleep=no_sleep).apply(the_plan)

    outcome = result.by_id()["Network/globex/batch"]
    assert outcome.status == FAILED
    assert outcome.error is not None
    assert "internal error in driver faulty" in outcome.error and "KeyError" in outcome.error
    assert with_status(result, SKIPPED) == {"Router/globex/gw", "Instance/globex/app-1"}
    assert len(with_status(result, APPLIED)) == len(the_plan.actionable) - 3


def test_transient_errors_are_retried_with_growing_delays(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.transient[("create", "Bucket/acme/assets")] = 4
    slept: list[float] = []

    result = Executor(drivers, retries=4, backoff_s=0.5, sleep=slept.append).apply(the_plan)

    assert result.ok, statuses(result)
    assert faulty.attempts[("create", "Bucket/acme/assets")] == 5
    assert result.by_id()["Bucket/acme/assets"].attempts == 5
    assert result.by_id()["Tenant/acme/acme"].attempts == 1
    assert slept == [0.5, 1.0, 2.0, 4.0]
    assert "Bucket/acme/assets" in host_keys(drivers)


def test_transient_errors_beyond_the_retries_fail_and_skip_descendants(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.transient[("create", "Image/acme/tiny")] = 10
    slept: list[float] = []

    result = Executor(drivers, retries=2, backoff_s=0.25, sleep=slept.append).apply(the_plan)

    outcome = result.by_id()["Image/acme/tiny"]
    assert outcome.status == FAILED
    assert outcome.error is not None and outcome.error.startswith("TransientError:")
    assert outcome.attempts == 3 == faulty.attempts[("create", "Image/acme/tiny")]
    assert slept == [0.25, 0.5]
    assert with_status(result, SKIPPED) == {"Instance/acme/web-1", "Instance/acme/web-2", "Instance/acme/db-1"}


def test_permanent_errors_are_not_retried(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.permanent[("create", "Volume/acme/pgdata")] = "disk full"

    result = Executor(drivers, retries=5, sleep=no_sleep).apply(the_plan)

    assert faulty.attempts[("create", "Volume/acme/pgdata")] == 1
    assert with_status(result, FAILED) == {"Volume/acme/pgdata"}
    assert with_status(result, SKIPPED) == {"Instance/acme/db-1"}


def test_rerun_after_the_fault_is_gone_converges(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    first = plan_for(example, drivers)
    faulty.permanent[("create", "Network/acme/web")] = "device busy"
    faulty.crash[("create", "Bucket/globex/reports")] = RuntimeError("boom")
    result = Executor(drivers, sleep=no_sleep).apply(first)
    not_applied = {c.id for c in first.actionable} - with_status(result, APPLIED)
    assert not_applied == {"Network/acme/web", "Instance/acme/web-1", "Instance/acme/web-2",
                           "Router/acme/edge", "Bucket/globex/reports"}

    faulty.clear_faults()
    second = plan_for(example, drivers)
    assert {c.id for c in second.actionable} == not_applied
    assert all(c.action is Action.CREATE for c in second.actionable)
    result = Executor(drivers, sleep=no_sleep).apply(second)
    assert result.ok, statuses(result)

    third = plan_for(example, drivers)
    assert not third.has_changes
    assert third.actionable == []
    assert host_keys(drivers) == {c.id for c in first.actionable}


# --- checks before and after -------------------------------------------------------------


def saved(the_plan: Plan) -> Plan:
    """What `plan --out` then `apply FILE` would run."""
    return Plan.from_dict(json.loads(the_plan.to_json(redact=False)))


def test_stale_plan_host_changed_between_plan_and_apply(
    example_manifests: Path, tmp_path: Path, state_dir: Path, faulty: FaultyDriver,
    drivers: dict[str, FaultyDriver], recorder: Recorder, memory_driver: MemoryDriver,
) -> None:
    assert Executor(drivers).apply(plan_for(load_ok(example_manifests), drivers)).ok
    copy = tmp_path / "edited"
    shutil.copytree(example_manifests, copy)
    storage = copy / "acme" / "storage.yaml"
    storage.write_text(storage.read_text().replace("acl: public-read", "acl: private"))
    the_plan = saved(plan_for(load_ok(copy), drivers))
    assert [(c.id, c.action) for c in the_plan.actionable] == [("Bucket/acme/assets", Action.UPDATE)]

    # someone changes the bucket on the host after the plan was made
    bucket = next(o for o in memory_driver.observe().owned if str(o.key) == "Bucket/acme/assets")
    path = state_dir / "memory" / "Bucket" / f"{bucket.identity}.json"
    data = json.loads(path.read_text())
    data["spec"]["versioning"] = False
    path.write_text(json.dumps(data))
    before = snapshot(state_dir / "memory")
    recorder.reset()

    with pytest.raises(StalePlan) as exc:
        Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert "Bucket acme/assets" in str(exc.value)
    assert "nothing was applied" in str(exc.value)
    assert recorder.events == []
    assert snapshot(state_dir / "memory") == before


def test_stale_plan_object_appeared_for_a_create(
    example: Desired, state_dir: Path, drivers: dict[str, FaultyDriver], recorder: Recorder,
    memory_driver: MemoryDriver,
) -> None:
    the_plan = saved(plan_for(example, drivers))
    tenant = next(c for c in the_plan.actionable if c.id == "Tenant/acme/acme")
    assert tenant.action is Action.CREATE and tenant.target is not None
    # another apply created the tenant in the meantime
    memory_driver.create(tenant.target)
    before = snapshot(state_dir / "memory")

    with pytest.raises(StalePlan) as exc:
        Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert "Tenant acme" in str(exc.value)
    assert recorder.events == []
    assert snapshot(state_dir / "memory") == before
    assert host_keys(drivers) == {"Tenant/acme/acme"}


def test_stale_plan_unmarked_object_appeared_for_a_create(
    example: Desired, state_dir: Path, drivers: dict[str, FaultyDriver], recorder: Recorder,
    memory_driver: MemoryDriver,
) -> None:
    the_plan = saved(plan_for(example, drivers))
    key = Key("Network", "acme", "web")
    assert next(c for c in the_plan.actionable if c.key == key).action is Action.CREATE
    # someone creates, by hand, an object with the name the create needs (no mark)
    folder = state_dir / "memory" / "Network"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{memory_driver.host_name(key)}.json").write_text(json.dumps({"spec": {"mtu": 1500}}))
    before = snapshot(state_dir / "memory")

    with pytest.raises(StalePlan) as exc:
        Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert "Network acme/web (an object without our mark has its name)" in str(exc.value)
    assert recorder.events == []
    assert snapshot(state_dir / "memory") == before


def test_fresh_saved_plan_applies(example: Desired, drivers: dict[str, FaultyDriver]) -> None:
    result = Executor(drivers, sleep=no_sleep).apply(saved(plan_for(example, drivers)))
    assert result.ok, statuses(result)
    assert not plan_for(example, drivers).has_changes


def test_mismatch_check_reports_a_driver_writing_a_different_spec(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.lie[("create", "Bucket/acme/assets")] = lambda t: Target(t.key, {**t.spec, "acl": "private"}, t.mark)

    result = Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert not result.ok
    outcome = result.by_id()["Bucket/acme/assets"]
    assert outcome.status == MISMATCH
    assert outcome.error == "driver result differs from the plan: fields differ after apply: acl"
    assert with_status(result, MISMATCH) == {"Bucket/acme/assets"}
    assert len(with_status(result, APPLIED)) == len(the_plan.actionable) - 1


def test_mismatch_check_reports_a_delete_that_did_nothing(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    assert Executor(drivers).apply(plan_for(example, drivers)).ok
    without_router = Desired({k: r for k, r in example.resources.items() if str(k) != "Router/acme/edge"})
    the_plan = plan_for(without_router, drivers)
    assert [(c.id, c.action) for c in the_plan.actionable] == [("Router/acme/edge", Action.DELETE)]
    faulty.skip_delete.add("Router/acme/edge")

    result = Executor(drivers, sleep=no_sleep).apply(the_plan)

    outcome = result.by_id()["Router/acme/edge"]
    assert outcome.status == MISMATCH
    assert outcome.error == "driver result differs from the plan: 1 object(s) still on the host"
    assert not result.ok


def test_mismatch_check_reports_a_wrong_mark(
    write_manifests: Callable[..., Path], faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    desired = load_ok(write_manifests(tenants_yaml(["acme", "globex"])))
    the_plan = plan_for(desired, drivers)
    faulty.lie[("create", "Tenant/acme/acme")] = lambda t: Target(
        t.key, t.spec, type(t.mark)(t.mark.key, "0" * 32, t.mark.applied)
    )

    result = Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert statuses(result) == {"Tenant/acme/acme": MISMATCH, "Tenant/globex/globex": APPLIED}
    assert result.by_id()["Tenant/acme/acme"].error == (
        "driver result differs from the plan: the ownership mark was not written as planned"
    )


# --- replace ---------------------------------------------------------------------------------


IMAGE = """
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Image
metadata: {name: tiny, tenant: acme}
spec: {source: SOURCE}
"""

NETWORK = """
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: web, tenant: acme}
spec:
  type: vxlan
  subnets:
    - cidr: CIDR
"""


def test_replace_create_before_destroy_creates_the_new_object_first(
    write_manifests: Callable[..., Path], faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
    recorder: Recorder, memory_driver: MemoryDriver,
) -> None:
    v1 = load_ok(write_manifests(IMAGE.replace("SOURCE", "/images/v1.qcow2")))
    assert Executor(drivers).apply(plan_for(v1, drivers)).ok
    old = next(o for o in memory_driver.observe().owned if o.key.kind == "Image")
    v2 = load_ok(write_manifests(IMAGE.replace("SOURCE", "/images/v2.qcow2")))
    the_plan = plan_for(v2, drivers)
    (change,) = the_plan.actionable
    assert change.action is Action.REPLACE and change.create_before_destroy
    recorder.reset()
    faulty.identities.clear()
    seen_during_create: list[set[str]] = []

    def gate(op: str, key: Key) -> None:
        if op == "create":
            seen_during_create.append({o.identity for o in memory_driver.observe().owned if o.key == key})

    faulty.gate = gate

    result = Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert result.ok, statuses(result)
    assert recorder.calls() == [("create", "Image/acme/tiny"), ("delete", "Image/acme/tiny")]
    # the old object was still there while the new one was created, under another identity
    assert seen_during_create == [{old.identity}]
    (created,) = [i for op, _, i in faulty.identities if op == "create"]
    (deleted,) = [i for op, _, i in faulty.identities if op == "delete"]
    assert deleted == old.identity != created
    (now,) = [o for o in memory_driver.observe().owned if o.key.kind == "Image"]
    assert now.identity == created and now.spec["source"] == "/images/v2.qcow2"
    assert not plan_for(v2, drivers).has_changes


def test_replace_destroy_before_create_deletes_the_old_object_first(
    write_manifests: Callable[..., Path], faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
    recorder: Recorder, memory_driver: MemoryDriver,
) -> None:
    v1 = load_ok(write_manifests(NETWORK.replace("CIDR", "10.10.1.0/24")))
    assert Executor(drivers).apply(plan_for(v1, drivers)).ok
    v2 = load_ok(write_manifests(NETWORK.replace("CIDR", "10.10.9.0/24")))
    the_plan = plan_for(v2, drivers)
    (change,) = the_plan.actionable
    assert change.action is Action.REPLACE and not change.create_before_destroy
    recorder.reset()
    seen_during_create: list[int] = []

    def gate(op: str, key: Key) -> None:
        if op == "create":
            seen_during_create.append(sum(1 for o in memory_driver.observe().owned if o.key == key))

    faulty.gate = gate

    result = Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert result.ok, statuses(result)
    assert recorder.calls() == [("delete", "Network/acme/web"), ("create", "Network/acme/web")]
    assert seen_during_create == [0]
    (now,) = [o for o in memory_driver.observe().owned if o.key.kind == "Network"]
    assert now.spec["subnets"][0]["cidr"] == "10.10.9.0/24"
    assert not plan_for(v2, drivers).has_changes


def test_empty_plan_touches_nothing(example: Desired, drivers: dict[str, FaultyDriver], recorder: Recorder) -> None:
    assert Executor(drivers).apply(plan_for(example, drivers)).ok
    recorder.reset()
    the_plan = plan_for(example, drivers)
    assert not the_plan.has_changes

    result = Executor(drivers, sleep=no_sleep).apply(the_plan)

    assert result.outcomes == [] and result.ok
    assert recorder.events == []


def test_on_start_and_on_done_see_every_change_once(
    example: Desired, faulty: FaultyDriver, drivers: dict[str, FaultyDriver],
) -> None:
    the_plan = plan_for(example, drivers)
    faulty.permanent[("create", "Network/acme/web")] = "busy"
    started: list[str] = []
    done: list[str] = []

    result = Executor(drivers, sleep=no_sleep, on_start=lambda c: started.append(c.id),
                      on_done=lambda o: done.append(o.change.id)).apply(the_plan)

    skipped = with_status(result, SKIPPED)
    assert sorted(done) == sorted(c.id for c in the_plan.actionable)
    assert sorted(started) == sorted(c.id for c in the_plan.actionable if c.id not in skipped)
    # outcomes come back in plan order
    assert [o.change.id for o in result.outcomes] == [c.id for c in the_plan.actionable]


# --- references: each target gets the current host objects of what it references ------


def test_targets_get_the_host_objects_they_reference(
    drivers: dict[str, FaultyDriver], faulty: FaultyDriver, example: Desired
) -> None:
    seen: dict[str, dict[str, str]] = {}
    inner_create = faulty.inner.create

    def create(target: Target) -> Observed:
        seen[str(target.key)] = {str(k): o.identity for k, o in target.related.items()}
        return inner_create(target)

    faulty.inner.create = create  # type: ignore[method-assign]
    the_plan = plan_for(example, drivers)
    assert Executor(drivers, sleep=no_sleep).apply(the_plan).ok
    host = {str(o.key): o.identity for o in observe(drivers).owned}
    web1 = example.get(Key("Instance", "acme", "web-1"))
    assert web1 is not None
    wanted = {str(Key(r.kind, r.tenant, r.name)) for r in web1.spec.references("acme")}
    # created earlier in the same apply: handed over with what the driver returned
    assert seen["Instance/acme/web-1"] == {k: host[k] for k in wanted}
    assert "Tenant/acme/acme" not in seen["Instance/acme/web-1"]  # only references
    # a plan read back from JSON keeps the references
    again = Plan.from_dict(the_plan.to_dict(redact=False))
    change = next(c for c in again if str(c.key) == "Instance/acme/web-1")
    assert change.target is not None and {str(k) for k in change.target.references} == wanted
