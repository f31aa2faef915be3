"""The daemon's loop on the in-memory drivers with the fake clock: revisions applied
whole or not at all, backoff of one broken resource while the rest converge, drift
healed or only reported, suspend/resume, resync, stop mid-apply.

Each test drives the loop one turn at a time (`step`), so nothing waits on real time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path
from typing import Callable, Iterable

import pytest

from reconciler.controller import Controller
from reconciler.daemon import Backoff, Daemon, DaemonOptions, FakeClock, Snapshot
from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import TransientError
from reconciler.hostconfig import HostConfig
from reconciler.journal import Journal
from reconciler.models import KINDS, Key
from reconciler.state import HostEvent, Observed, Target

TENANTS = """\
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
spec: {}
---
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: globex}
spec: {}
"""


def network(tenant: str, name: str, cidr: str, mtu: int = 1450, drift: str | None = None) -> str:
    meta = f"{{name: {name}, tenant: {tenant}{', drift: ' + drift if drift else ''}}}"
    return textwrap.dedent(f"""\
        apiVersion: reconciler/v1
        kind: Network
        metadata: {meta}
        spec:
          type: vxlan
          mtu: {mtu}
          subnets:
            - cidr: {cidr}
        """)


class DirSource:
    """A folder, read when told (the tests call `source_changed` themselves)."""

    description = "test folder"

    def __init__(self, root: Path):
        self.root = root
        self.kept: list[str] = []

    def start(self, changed: Callable[[], None]) -> None:
        pass

    def latest(self) -> Snapshot:
        h = hashlib.sha256()
        for f in sorted(self.root.rglob("*.yaml")):
            h.update(f.name.encode() + f.read_bytes())
        return Snapshot("sha256:" + h.hexdigest()[:16], self.root, str(self.root))

    def keep(self, revisions: Iterable[str]) -> None:
        self.kept = list(revisions)

    def close(self) -> None:
        pass


class Flaky(MemoryDriver):
    """Memory driver whose creates and updates of the named resources fail (transient)."""

    def __init__(self, root: Path, broken: set[Key]):
        super().__init__(root)
        self.broken = broken
        self.calls: list[Key] = []

    def create(self, target: Target) -> Observed:
        self.calls.append(target.key)
        if target.key in self.broken:
            raise TransientError(f"{target.key.display} is broken on purpose")
        return super().create(target)

    def update(self, target, observed, diffs):
        self.calls.append(target.key)
        if target.key in self.broken:
            raise TransientError(f"{target.key.display} is broken on purpose")
        return super().update(target, observed, diffs)


@pytest.fixture
def cloud(tmp_path: Path):
    src = tmp_path / "manifests"
    src.mkdir()
    (src / "tenants.yaml").write_text(TENANTS)
    (src / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/24"))
    (src / "globex.yaml").write_text(network("globex", "data", "10.2.0.0/24"))
    return src


def make_daemon(tmp_path: Path, src: Path, broken: set[Key] = frozenset(), **opts) -> tuple[Daemon, FakeClock, Flaky]:
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    driver = Flaky(config.stateDir / "memory", set(broken))
    clock = FakeClock()
    options = DaemonOptions(backoff=Backoff(1.0, 8.0), **opts)
    daemon = Daemon(lambda: config, DirSource(src), options=options, clock=clock,
                    make_controller=lambda c: Controller(c, {k: driver for k in KINDS}), watch=False)
    daemon.journal.close_abandoned()
    return daemon, clock, driver


def on_host(driver: MemoryDriver) -> dict[Key, dict]:
    """What the memory 'host' holds, read from its files (not through the driver)."""
    found = {}
    for f in driver.root.rglob("*.json"):
        data = json.loads(f.read_text())
        if not data.get("mark"):
            continue  # not ours
        m = data["mark"]
        found[Key(m["kind"], m["tenant"], m["name"])] = data
    return found


def after_event(daemon: Daemon, subject: str = "*"):
    """A host event, then the turns of the loop that take it: it is gathered for
    event_delay_s, then one pass runs."""
    daemon.host_event(HostEvent("memory", subject, "changed"))
    assert daemon.step() is None  # gathered first: a burst makes one pass
    daemon.clock.advance(daemon.options.event_delay_s)
    return daemon.step()


WEB = Key("Network", "acme", "web")
DATA = Key("Network", "globex", "data")


def test_first_revision_is_applied_and_recorded(tmp_path, cloud):
    daemon, _, driver = make_daemon(tmp_path, cloud)
    report = daemon.step()
    assert report is not None and report.result is not None and report.result.ok
    assert set(on_host(driver)) == {WEB, DATA, Key("Tenant", "acme", "acme"), Key("Tenant", "globex", "globex")}
    info = daemon.journal.daemon()
    assert info["appliedRevision"] == info["attemptedRevision"] == report.revision
    assert info["attemptedErrors"] == []
    states = daemon.journal.resources()
    assert {s.state for s in states.values()} == {"ready"}
    assert all(s.revision == report.revision for s in states.values())
    applies = daemon.journal.applies()
    assert applies[0]["command"] == "daemon" and applies[0]["revision"] == report.revision
    assert applies[0]["created"] == 4 and applies[0]["outcome"] == "ok"
    assert daemon.source.kept == [report.revision]  # older snapshots may go
    # nothing more to do: a second turn makes no pass
    assert daemon.step() is None


def test_an_edit_is_applied_and_the_revision_moves(tmp_path, cloud):
    daemon, _, driver = make_daemon(tmp_path, cloud)
    first = daemon.step().revision
    (cloud / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/24", mtu=1400))
    daemon.source_changed()
    report = daemon.step()
    assert report.revision != first
    assert [o.change.key for o in report.result.outcomes] == [WEB]
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1400
    assert daemon.journal.resources()[("Network", "acme", "web")].revision == report.revision
    assert daemon.journal.daemon()["appliedRevision"] == report.revision


def test_an_invalid_revision_changes_nothing_and_its_errors_name_file_and_line(tmp_path, cloud):
    daemon, _, driver = make_daemon(tmp_path, cloud)
    good = daemon.step().revision
    before = on_host(driver)
    (cloud / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/24", mtu=1400)
                                     + "---\n" + network("acme", "bad", "10.9.0.0/33"))
    daemon.source_changed()
    daemon.step()
    assert on_host(driver) == before  # not even the valid mtu edit in the same revision
    info = daemon.journal.daemon()
    assert info["appliedRevision"] == good
    assert info["attemptedRevision"] != good
    errors = info["attemptedErrors"]
    assert errors and all(e.startswith(f"{cloud / 'acme.yaml'}:") for e in errors)
    assert any("10.9.0.0/33" in e for e in errors)
    line = int(errors[0].split(":")[1])
    assert (cloud / "acme.yaml").read_text().splitlines()[line - 1].strip().startswith(("- cidr", "cidr", "subnets"))
    events = daemon.journal.events()
    assert events[0]["reason"] == "RevisionRejected" and good[:15] in events[0]["message"]
    # drift is still healed against the revision in force
    (driver.root / "Network").joinpath(next(p.name for p in (driver.root / "Network").iterdir()
                                            if "web" in json.loads(p.read_text())["mark"]["name"])).unlink()
    after_event(daemon)
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1450
    # fixed: applied whole
    (cloud / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/24", mtu=1400))
    daemon.source_changed()
    report = daemon.step()
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1400
    assert daemon.journal.daemon()["appliedRevision"] == report.revision


def test_a_plan_error_rejects_the_whole_revision(tmp_path, cloud):
    """An object without our mark in the way (a conflict) is found at plan time: the
    revision that needs it is not applied at all."""
    daemon, _, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    new = Key("Network", "globex", "blocked")
    (driver.root / "Network" / f"{driver.host_name(new)}.json").write_text("{}")
    (cloud / "globex.yaml").write_text(network("globex", "data", "10.2.0.0/24", mtu=1300)
                                       + "---\n" + network("globex", "blocked", "10.3.0.0/24"))
    daemon.source_changed()
    report = daemon.step()
    assert report.rejected and "blocked" in str(report.rejected[0])
    assert on_host(driver)[DATA]["spec"]["mtu"] == 1450
    assert daemon.journal.daemon()["attemptedErrors"]


def test_one_broken_resource_backs_off_while_the_rest_converge(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud, broken={WEB})
    report = daemon.step()
    assert DATA in on_host(driver) and WEB not in on_host(driver)
    state = daemon.journal.resources()[("Network", "acme", "web")]
    assert state.state == "failed" and state.next_retry
    assert state.error.startswith(f"{cloud / 'acme.yaml'}:1: ") and "broken on purpose" in state.error
    # retried 1, 2, 4, 8, 8 s (the cap) after each failure; never before
    for expected in (1, 2, 4, 8, 8):
        assert daemon.queue.retry_at(WEB) - clock.now() == pytest.approx(expected)
        clock.advance(expected - 0.01)
        assert daemon.step() is None
        clock.advance(0.01)
        report = daemon.step()
        assert report is not None and [o.status for o in report.result.outcomes] == ["failed"]
    # the executor retries transient errors itself (3 attempts per try)
    assert driver.calls.count(WEB) == 6 * 3
    # a host event about the broken one does not retry it before its time
    daemon.host_event(HostEvent("memory", driver.host_name(WEB), "test"))
    clock.advance(0.5)
    report = daemon.step()
    assert report is None or WEB not in [o.change.key for o in report.result.outcomes]
    # fixed on the host side: the next retry converges and the failures are forgotten
    driver.broken.clear()
    clock.advance(8)
    daemon.step()
    assert WEB in on_host(driver)
    assert daemon.queue.failures(WEB) == 0
    assert daemon.journal.resources()[("Network", "acme", "web")].state == "ready"


def test_an_edit_retries_a_failing_resource_at_once(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud, broken={WEB})
    daemon.step()
    daemon.step()
    driver.broken.clear()
    (cloud / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/24", mtu=1400))
    daemon.source_changed()
    daemon.step()  # no clock advance: the edit resets the backoff
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1400


def _set_mtu_on_host(driver: MemoryDriver, key: Key, mtu: int) -> None:
    for f in (driver.root / key.kind).glob("*.json"):
        data = json.loads(f.read_text())
        if data["mark"]["name"] == key.name and data["mark"]["tenant"] == key.tenant:
            data["spec"]["mtu"] = mtu
            f.write_text(json.dumps(data))


def test_drift_from_a_host_event_is_healed(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    _set_mtu_on_host(driver, WEB, 9000)
    report = after_event(daemon, driver.host_name(WEB))
    assert report.drifted == [WEB]
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1450
    reasons = [e["reason"] for e in daemon.journal.events()]
    assert "Drift" in reasons and "DriftHealed" in reasons
    assert daemon.metrics.drift.labels("Network", "heal")._value.get() == 1


def test_drift_report_only_is_reported_never_healed(tmp_path, cloud):
    (cloud / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/24", drift="report"))
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    _set_mtu_on_host(driver, WEB, 9000)
    report = after_event(daemon, driver.host_name(WEB))
    assert report.drifted == [WEB] and report.held[WEB] == "drifted"
    assert on_host(driver)[WEB]["spec"]["mtu"] == 9000
    state = daemon.journal.resources()[("Network", "acme", "web")]
    assert state.state == "drifted" and "report" in state.detail
    # reported once, not at every pass
    clock.advance(daemon.options.resync_s)
    daemon.step()
    assert [e["reason"] for e in daemon.journal.events(limit=50)].count("Drift") == 1
    assert on_host(driver)[WEB]["spec"]["mtu"] == 9000


def test_tenant_drift_policy_applies_to_its_resources(tmp_path, cloud):
    (cloud / "tenants.yaml").write_text(TENANTS.replace("metadata: {name: acme}",
                                                        "metadata: {name: acme, drift: report}"))
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    for key in (WEB, DATA):
        _set_mtu_on_host(driver, key, 9000)
    after_event(daemon)
    assert on_host(driver)[WEB]["spec"]["mtu"] == 9000  # acme: report
    assert on_host(driver)[DATA]["spec"]["mtu"] == 1450  # globex: heal


def test_an_object_deleted_on_the_host_is_drift_and_recreated(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    for f in (driver.root / "Network").glob("*.json"):
        if json.loads(f.read_text())["mark"]["name"] == "web":
            f.unlink()
    report = after_event(daemon, driver.host_name(WEB))
    assert report.drifted == [WEB]
    assert WEB in on_host(driver)


def test_suspend_holds_changes_and_resume_applies_them(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    Journal(tmp_path / "state").suspend("acme")
    daemon.request_refresh()
    daemon.step()
    _set_mtu_on_host(driver, WEB, 9000)
    (cloud / "globex.yaml").write_text(network("globex", "data", "10.2.0.0/24", mtu=1300))
    daemon.source_changed()
    daemon.host_event(HostEvent("memory", "*", "changed"))
    daemon.step()
    clock.advance(1)
    report = daemon.step()
    assert report.held[WEB] == "suspended"
    assert on_host(driver)[WEB]["spec"]["mtu"] == 9000  # observed, not changed
    assert on_host(driver)[DATA]["spec"]["mtu"] == 1300  # the other tenant goes on
    states = daemon.journal.resources()
    assert states[("Network", "acme", "web")].state == "suspended"
    assert states[("Tenant", "acme", "acme")].state == "suspended"
    Journal(tmp_path / "state").resume("acme")
    daemon.request_refresh()
    daemon.step()
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1450
    assert daemon.journal.resources()[("Network", "acme", "web")].state == "ready"


def test_a_resource_suspended_by_address_only(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    Journal(tmp_path / "state").suspend(str(WEB))
    daemon.request_refresh()
    daemon.step()
    for key in (WEB, DATA):
        _set_mtu_on_host(driver, key, 9000)
    after_event(daemon)
    assert on_host(driver)[WEB]["spec"]["mtu"] == 9000
    assert on_host(driver)[DATA]["spec"]["mtu"] == 1450


def test_resync_heals_drift_no_event_reported(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud, resync_s=600)
    daemon.step()
    _set_mtu_on_host(driver, WEB, 9000)
    clock.advance(599)
    assert daemon.step() is None
    clock.advance(1)
    report = daemon.step()
    assert report is not None and report.drifted == [WEB]
    assert on_host(driver)[WEB]["spec"]["mtu"] == 1450


def test_removed_from_the_manifests_is_deleted(tmp_path, cloud):
    daemon, _, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    (cloud / "globex.yaml").unlink()
    daemon.source_changed()
    daemon.step()
    assert DATA not in on_host(driver)
    assert ("Network", "globex", "data") not in daemon.journal.resources()


def test_stop_mid_apply_finishes_what_runs_and_records_the_rest(tmp_path, cloud):
    daemon, _, driver = make_daemon(tmp_path, cloud, parallelism=1)
    original = driver.create

    def create_then_stop(target):
        observed = original(target)
        daemon.request_stop()  # SIGTERM while this change runs
        return observed

    driver.create = create_then_stop  # type: ignore[method-assign]
    report = daemon.step()
    statuses = sorted(o.status for o in report.result.outcomes)
    assert statuses.count("applied") == 1 and statuses.count("skipped") == 3
    journal = daemon.journal
    apply = journal.applies()[0]
    assert apply["finished_at"] and apply["outcome"] == "stopped"
    assert len(journal.changes_of(apply["id"])) == 4  # every change has its outcome
    assert {s.state for s in journal.resources().values()} == {"ready", "pending"}
    # the next start converges
    daemon2, _, driver2 = make_daemon(tmp_path, cloud)
    report = daemon2.step()
    assert report.result.ok and len(on_host(driver2)) == 4


def test_an_interrupted_apply_is_closed_at_the_next_start(tmp_path, cloud):
    state = tmp_path / "state"
    journal = Journal(state)
    apply_id = journal.begin("daemon", str(cloud), "sha256:0")
    with journal._connect() as db:  # a process that died: a pid that does not run
        db.execute("UPDATE applies SET pid = ? WHERE id = ?", (2 ** 22 + 7, apply_id))
    assert journal.close_abandoned() == 1
    assert journal.applies()[0]["outcome"] == "interrupted"
    assert journal.close_abandoned() == 0


def test_reload_reads_the_host_config_again(tmp_path, cloud):
    daemon, _, _ = make_daemon(tmp_path, cloud)
    daemon.step()
    daemon.request_reload()
    daemon.step()
    assert daemon.journal.events()[0]["reason"] == "HostConfigReloaded"


def test_health_reports_the_loop(tmp_path, cloud):
    daemon, clock, _ = make_daemon(tmp_path, cloud)
    daemon.step()
    ok, facts = daemon.health()
    assert ok and facts["revision"] == daemon.current.snapshot.revision
    clock.advance(10 * daemon.options.heartbeat_s)
    assert daemon.health()[0] is False  # the loop stopped beating
    daemon.step()
    assert daemon.health()[0] is True


class Blind(Flaky):
    """Cannot observe while `down` is set: a transient outage, or a bug (`bug`)."""

    down = False
    bug = False

    def observe(self):
        if self.bug:
            raise KeyError("a driver bug")
        if self.down:
            raise TransientError("the service is down")
        return super().observe()


def test_a_host_that_cannot_be_observed_backs_off_and_the_revision_waits(tmp_path, cloud):
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    driver = Blind(config.stateDir / "memory", set())
    clock = FakeClock()
    daemon = Daemon(lambda: config, DirSource(cloud), options=DaemonOptions(backoff=Backoff(1.0, 8.0)),
                    clock=clock, make_controller=lambda c: Controller(c, {k: driver for k in KINDS}), watch=False)
    driver.down = True
    report = daemon.step()  # nothing can be observed: every resource waits, and backs off
    assert report.error is None and report.result is None
    assert set(report.held) == set(daemon.current.desired.resources)
    assert {e["reason"] for e in daemon.journal.events()} >= {"CannotObserve"}
    rows = daemon.journal.resources()
    assert rows and all(r.state == "failed" and "the service is down" in (r.error or "") for r in rows.values()), rows
    assert daemon.step() is None  # backing off: no hot loop
    driver.down, driver.bug = False, True
    clock.advance(1)
    report = daemon.step()  # an internal error is caught and backs off too
    assert "KeyError" in report.error and "internal error" in daemon.journal.events()[0]["message"]
    driver.bug = False
    clock.advance(2)
    report = daemon.step()
    assert report.result.ok and len(on_host(driver)) == 4
    assert daemon.journal.daemon()["appliedRevision"] == report.revision


def test_a_revision_refused_by_a_host_condition_is_tried_again_at_the_resync(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud, resync_s=600)
    daemon.step()
    new = Key("Network", "globex", "blocked")
    squatter = driver.root / "Network" / f"{driver.host_name(new)}.json"
    squatter.write_text("{}")
    (cloud / "globex.yaml").write_text(network("globex", "data", "10.2.0.0/24")
                                       + "---\n" + network("globex", "blocked", "10.3.0.0/24"))
    daemon.source_changed()
    assert daemon.step().rejected
    squatter.unlink()  # the conflict is gone: nothing tells the daemon
    clock.advance(600)
    daemon.step()
    assert new in on_host(driver)


class CopySource(DirSource):
    """Each revision a copy of its own, as the git source's checkouts."""

    def latest(self) -> Snapshot:
        snap = super().latest()
        copy = self.root.parent / "checkouts" / snap.revision.replace(":", "-")
        if not copy.exists():
            shutil.copytree(self.root, copy)
        return Snapshot(snap.revision, copy, "")


def test_a_restart_keeps_the_last_good_revision_when_the_head_does_not_validate(tmp_path, cloud):
    daemon, _, driver = make_daemon(tmp_path, cloud)
    daemon.source = CopySource(cloud)
    daemon.source_changed()
    good = daemon.step().revision
    (cloud / "acme.yaml").write_text(network("acme", "web", "10.1.0.0/33"))
    again, clock, driver = make_daemon(tmp_path, cloud)
    again.source = CopySource(cloud)
    again.start()
    again.step()
    info = again.journal.daemon()
    assert info["appliedRevision"] == good and info["attemptedErrors"]
    assert info["attemptedErrors"][0].startswith("acme.yaml:")  # named as in the repository
    _set_mtu_on_host(driver, DATA, 9000)
    report = after_event(again)
    assert report.revision == good and report.drifted == [DATA]
    assert on_host(driver)[DATA]["spec"]["mtu"] == 1450
    again.shutdown()


def test_a_reload_that_moves_the_state_directory_is_refused(tmp_path, cloud):
    configs = [HostConfig(stateDir=tmp_path / "state", drivers="memory")]
    daemon = Daemon(lambda: configs[-1], DirSource(cloud), clock=FakeClock(), watch=False)
    daemon.step()
    configs.append(HostConfig(stateDir=tmp_path / "elsewhere", drivers="memory"))
    daemon.request_reload()
    daemon.step()
    event = daemon.journal.events()[0]
    assert event["reason"] == "HostConfigInvalid" and "stateDir changed" in event["message"]
    assert daemon.controller.config.stateDir == tmp_path / "state"


def test_health_says_unhealthy_when_a_pass_is_stuck(tmp_path, cloud):
    daemon, clock, driver = make_daemon(tmp_path, cloud, stuck_pass_s=100)
    seen = []
    original = driver.create

    def slow(target):  # a driver call that hangs for 101 s of the fake clock
        seen.append(daemon.health())
        clock.advance(101)
        seen.append(daemon.health())
        driver.create = original  # type: ignore[method-assign]
        return original(target)

    driver.create = slow  # type: ignore[method-assign]
    daemon.step()
    (ok_before, facts_before), (ok_after, facts_after) = seen
    assert ok_before and facts_before["inPass"]
    assert not ok_after and facts_after["passSeconds"] >= 101
    assert daemon.health()[0]  # the pass ended


def test_a_host_event_about_a_name_not_ours_makes_no_pass(tmp_path, cloud):
    """Other installations' objects carry our prefix too (their tests, their daemons)."""
    daemon, clock, driver = make_daemon(tmp_path, cloud)
    daemon.step()
    daemon.host_event(HostEvent("memory", "rc-0123456789", "link changed"))
    daemon.step()
    clock.advance(1)
    assert daemon.step() is None
    assert daemon.metrics.host_events.labels("memory")._value.get() == 1
