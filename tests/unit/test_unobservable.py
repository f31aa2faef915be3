"""A driver that cannot observe the host (its service is down) holds back only what
needs it: its own resources and the changes that could touch what it holds are `not
planned`; everything else is planned and applied; when the service is back, the next
run converges. The apply, destroy and daemon paths, on the in-memory drivers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.controller import Controller
from reconciler.daemon import Backoff, Daemon, DaemonOptions, FakeClock
from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import TransientError
from reconciler.hostconfig import HostConfig
from reconciler.models import KINDS, Key
from reconciler.planner import Action, Plan

from test_daemon_loop import DirSource

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests"
DOWN = "cannot connect to the compute service: connection refused"


class Compute(MemoryDriver):
    """The Instance kind's driver, on a service that can be stopped."""

    name = "compute"
    down = False

    def observe(self):
        if self.down:
            raise TransientError(DOWN)
        return super().observe()

    def create(self, target):
        if self.down:
            raise TransientError(DOWN)
        return super().create(target)


@pytest.fixture
def host(tmp_path: Path):
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    compute = Compute(config.stateDir / "compute", kinds=("Instance",))
    rest = MemoryDriver(config.stateDir / "memory", kinds=tuple(k for k in KINDS if k != "Instance"))
    drivers = {k: compute if k == "Instance" else rest for k in KINDS}
    return config, compute, rest, drivers


def kinds_of(the_plan: Plan, action: Action | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in the_plan.actionable:
        if action is None or c.action is action:
            out[c.key.kind] = out.get(c.key.kind, 0) + 1
    return out


def test_apply_with_compute_down_creates_everything_else_then_converges(host):
    config, compute, rest, drivers = host
    controller = Controller(config, drivers)
    desired = controller.load([EXAMPLE])
    instances = {r.key for r in desired if r.key.kind == "Instance"}
    compute.down = True
    the_plan = controller.plan(desired)
    assert not the_plan.errors
    assert set(the_plan.unknown) == instances  # nothing depends on an instance
    assert all(DOWN in why and "compute" in why for why in the_plan.unknown.values())
    assert "Instance" not in kinds_of(the_plan)
    assert kinds_of(the_plan) == {k: n for k, n in kinds_of(controller.plan(desired)).items()}
    result = controller.apply(the_plan)
    assert result.ok
    observed = {o.key for o in rest.observe().owned}
    assert observed == {r.key for r in desired} - instances
    states = {Key(r.kind, r.tenant, r.name): r for r in controller.status(desired)}
    assert {k for k, r in states.items() if r.state == "unknown"} == instances
    assert all(DOWN in states[k].detail for k in instances)
    compute.down = False
    again = controller.plan(desired)
    assert not again.unknown and {c.key for c in again.actionable} == instances
    assert controller.apply(again).ok
    assert not controller.plan(desired).has_changes


def test_a_network_driver_down_holds_what_depends_on_networks(tmp_path):
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    net = Compute(config.stateDir / "net", kinds=("Network",))
    rest = MemoryDriver(config.stateDir / "memory", kinds=tuple(k for k in KINDS if k != "Network"))
    controller = Controller(config, {k: net if k == "Network" else rest for k in KINDS})
    desired = controller.load([EXAMPLE])
    net.down = True
    the_plan = controller.plan(desired)
    unknown_kinds = {k.kind for k in the_plan.unknown}
    assert unknown_kinds == {"Network", "Router", "Instance"}
    web1 = Key("Instance", "acme", "web-1")
    assert the_plan.unknown[web1].startswith("waits for Network acme/")
    assert {"Volume", "Bucket", "Image", "SecurityGroup", "Tenant"} <= set(kinds_of(the_plan))


def test_destroy_with_compute_down_keeps_what_a_guest_may_use(host):
    config, compute, rest, drivers = host
    controller = Controller(config, drivers)
    desired = controller.load([EXAMPLE])
    assert controller.apply(controller.plan(desired)).ok
    compute.down = True
    the_plan = controller.plan(desired, destroy=True)
    deleted = kinds_of(the_plan, Action.DELETE)
    # networks, images, groups and tenants could still be in use by a guest we cannot
    # see: not deleted now; buckets are not used by guests; retained volumes are only
    # orphaned (their data stays either way)
    assert not {"Instance", "Network", "Image", "SecurityGroup", "Tenant"} & set(deleted), deleted
    assert kinds_of(the_plan, Action.ORPHAN).get("Bucket")
    held = {k.kind for k in the_plan.unknown}
    assert {"Instance", "Network", "Image", "SecurityGroup"} <= held
    assert any("may still use it" in why for why in the_plan.unknown.values())
    assert controller.apply(the_plan).ok
    networks = [o for o in rest.observe().owned if o.key.kind == "Network"]
    assert networks and not any(o.mark.orphaned for o in networks)  # still there, untouched
    compute.down = False
    final = controller.plan(desired, destroy=True)
    assert not final.unknown
    assert controller.apply(final).ok
    left = [o for o in rest.observe().owned + compute.observe().owned if not o.mark.orphaned]
    assert left == []


def test_a_saved_plan_keeps_what_was_not_planned(host):
    config, compute, _rest, drivers = host
    controller = Controller(config, drivers)
    compute.down = True
    the_plan = controller.plan(controller.load([EXAMPLE]))
    again = Plan.from_dict(the_plan.to_dict(redact=False))
    assert again.unknown == the_plan.unknown and "not planned" in again.summary()


def test_the_daemon_converges_the_rest_and_backs_off_until_the_service_is_back(host, tmp_path):
    config, compute, rest, drivers = host
    src = tmp_path / "manifests"
    shutil.copytree(EXAMPLE, src)
    clock = FakeClock()
    daemon = Daemon(lambda: config, DirSource(src), options=DaemonOptions(backoff=Backoff(1.0, 8.0)),
                    clock=clock, make_controller=lambda c: Controller(c, drivers), watch=False)
    compute.down = True
    report = daemon.step()
    assert report.error is None and report.result is not None and report.result.ok
    instances = {k for k in daemon.current.desired.resources if k.kind == "Instance"}
    assert {o.key for o in rest.observe().owned} == set(daemon.current.desired.resources) - instances
    rows = daemon.journal.resources()
    for key in instances:
        row = rows[(key.kind, key.tenant, key.name)]
        assert row.state == "failed" and DOWN in (row.error or "")
    assert any(e["reason"] == "CannotObserve" for e in daemon.journal.events())
    # backing off: retried at 1, 2, 4 s while the service stays down, never in between
    for wait in (1, 2, 4):
        assert daemon.step() is None
        clock.advance(wait)
        assert daemon.step() is not None
    compute.down = False
    clock.advance(8)
    report = daemon.step()
    assert report.result is not None and report.result.ok
    assert {o.key for o in compute.observe().owned} == instances
    rows = daemon.journal.resources()
    assert all(r.state == "ready" for r in rows.values()), {k: r.state for k, r in rows.items()}


def test_the_daemon_doubles_its_backoff_while_a_driver_cannot_observe(host, tmp_path):
    """Each retry of a resource whose driver cannot observe counts as one more failure:
    the wait doubles (1, 2, 4 s) and the CannotObserve event is written once, not on
    every retry."""
    config, compute, _rest, drivers = host
    src = tmp_path / "manifests"
    shutil.copytree(EXAMPLE, src)
    clock = FakeClock()
    daemon = Daemon(lambda: config, DirSource(src), options=DaemonOptions(backoff=Backoff(1.0, 64.0)),
                    clock=clock, make_controller=lambda c: Controller(c, drivers), watch=False)
    compute.down = True
    assert daemon.step() is not None
    web1 = ("Instance", "acme", "web-1")
    events = [e for e in daemon.journal.events() if e["reason"] == "CannotObserve"]
    for failures, wait in ((1, 1), (2, 2), (3, 4)):
        assert daemon.journal.resources()[web1].failures == failures
        clock.advance(wait - 0.5)
        assert daemon.step() is None  # not retried before its time
        clock.advance(0.5)
        assert daemon.step() is not None
    assert daemon.journal.resources()[web1].failures == 4
    assert [e for e in daemon.journal.events() if e["reason"] == "CannotObserve"] == events
