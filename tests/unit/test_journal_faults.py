"""The journal locked by another process: a clear error before anything changes; locked
in the middle of an apply: the changes go on, what they did is written when the lock
goes (or the apply says its record is incomplete); the daemon's loop never stops for
it, backs off, and writes what it kept when the journal is back."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from reconciler import journal as journal_module
from reconciler.cli.app import app
from reconciler.controller import Controller
from reconciler.daemon import Backoff, Daemon, DaemonOptions, FakeClock
from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import JournalError
from reconciler.hostconfig import HostConfig
from reconciler.journal import Journal
from reconciler.models import KINDS

from test_daemon_loop import DirSource, cloud, on_host  # noqa: F401 - the fixture

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests"


@pytest.fixture(autouse=True)
def short_lock_wait(monkeypatch):
    monkeypatch.setattr(journal_module, "LOCK_WAIT_S", 0.1)


class Locker:
    """Another process's hold on the journal: an exclusive SQLite transaction."""

    def __init__(self, path: Path):
        self.path = path
        self.db: sqlite3.Connection | None = None

    def take(self) -> None:
        self.db = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.db is not None:
            self.db.execute("ROLLBACK")
            self.db.close()
            self.db = None


@contextmanager
def locked(state: Path) -> Iterator[Locker]:
    locker = Locker(Journal(state).path)
    locker.take()
    try:
        yield locker
    finally:
        locker.release()


def test_a_locked_journal_is_a_clear_error_not_a_traceback(tmp_path):
    with locked(tmp_path) as _:
        with pytest.raises(JournalError, match=r"journal .*journal.sqlite3 is locked by another process"):
            Journal(tmp_path).begin("apply")


def test_apply_with_the_journal_locked_changes_nothing_and_says_why(tmp_path, monkeypatch):
    state = tmp_path / "state"
    config = tmp_path / "host.yaml"
    config.write_text(f"stateDir: {state}\ndrivers: memory\nlockTimeoutSeconds: 2\n")
    monkeypatch.setenv("NO_COLOR", "1")
    with locked(state):
        result = CliRunner().invoke(app, ["--host-config", str(config), "apply", str(EXAMPLE), "--yes"])
    assert result.exit_code == 1, result.output
    assert "is locked by another process" in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not on_host(MemoryDriver(state / "memory"))  # nothing was changed


def test_locked_mid_apply_the_changes_go_on_and_are_recorded_when_it_goes(tmp_path):
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    controller = Controller(config)
    desired = controller.load([EXAMPLE])
    the_plan = controller.plan(desired)
    locker = Locker(Journal(config.stateDir).path)
    started: list[str] = []
    done: list[str] = []

    def on_start(change):
        if not started:
            locker.take()  # another process takes the journal as the first change starts
        started.append(change.id)

    def on_done(outcome):
        done.append(outcome.change.id)
        if len(done) == len(the_plan.actionable) - 1:
            locker.release()  # ... and lets it go before the last one ends

    result = controller.apply(the_plan, on_start=on_start, on_done=on_done, parallelism=1)
    assert result.ok and result.journal_error is None
    last = controller.journal.applies(1)[0]
    assert last["outcome"] == "ok"
    recorded = controller.journal.changes_of(last["id"])
    assert len(recorded) == len(the_plan.actionable)  # every change, none lost
    assert not controller.plan(desired).has_changes


def test_locked_to_the_end_the_apply_says_its_record_is_incomplete(tmp_path):
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    controller = Controller(config)
    desired = controller.load([EXAMPLE])
    locker = Locker(Journal(config.stateDir).path)
    try:
        result = controller.apply(controller.plan(desired), on_start=lambda c: locker.db or locker.take())
        assert result.ok  # the host got every change
        assert result.journal_error and "is locked by another process" in result.journal_error
    finally:
        locker.release()
    assert not controller.plan(desired).has_changes


def test_the_daemon_goes_on_while_the_journal_is_locked_and_writes_what_it_kept(tmp_path, cloud):  # noqa: F811
    config = HostConfig(stateDir=tmp_path / "state", drivers="memory")
    driver = MemoryDriver(config.stateDir / "memory")
    clock = FakeClock()
    daemon = Daemon(lambda: config, DirSource(cloud), options=DaemonOptions(backoff=Backoff(1.0, 8.0)),
                    clock=clock, make_controller=lambda c: Controller(c, {k: driver for k in KINDS}),
                    watch=False)
    locker = Locker(daemon.journal.path)
    locker.take()
    try:
        report = daemon.step()  # the apply cannot begin: nothing changes, the pass backs off
        assert report.error and "is locked by another process" in report.error
        assert not on_host(driver)
        assert daemon.journal.error and daemon.journal.pending
        assert daemon.step() is None  # backing off, no hot loop
    finally:
        locker.release()
    clock.advance(8)
    report = daemon.step()
    assert report.result is not None and report.result.ok
    assert len(on_host(driver)) == 4
    reasons = [e["reason"] for e in Journal(config.stateDir).events(50)]
    assert "ReconcileFailed" in reasons  # written late, not lost
    assert daemon.journal.error is None and not daemon.journal.pending
