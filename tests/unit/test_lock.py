"""The host lock: one flock under the state directory, waited for with a timeout.

Waiting uses an injected clock and sleep (instant); another process holding the lock is
a real `python -c` subprocess that reports on stdout once it holds the flock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from reconciler.errors import LockTimeout
from reconciler.lock import HostLock

HANG_GUARD_S = 60.0


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: list = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds
        for hook in self.on_sleep:
            hook(len(self.sleeps))


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def waiting_lock(state_dir: Path, fake: FakeTime, timeout_s: float, what: str = "apply") -> HostLock:
    return HostLock(state_dir, timeout_s, what=what, clock=fake.clock, sleep=fake.sleep)


# --- in one process -----------------------------------------------------------------------


def test_second_lock_times_out_naming_the_holder(state_dir: Path, fake: FakeTime) -> None:
    first = HostLock(state_dir, 0, what="destroy")
    first.acquire()
    try:
        second = waiting_lock(state_dir, fake, timeout_s=5)
        with pytest.raises(LockTimeout) as exc:
            second.acquire()
    finally:
        first.release()

    message = str(exc.value)
    assert f"pid {os.getpid()}: destroy" in message
    assert str(state_dir / "lock") in message
    assert "5 s" in message and "--lock-timeout" in message
    # it kept trying until the deadline, then gave up (without waiting for real)
    assert fake.now - 1000.0 >= 5
    assert fake.now - 1000.0 < 5 + 1
    assert len(fake.sleeps) > 1


def test_zero_timeout_gives_up_without_sleeping(state_dir: Path, fake: FakeTime) -> None:
    with HostLock(state_dir, 0):
        with pytest.raises(LockTimeout):
            waiting_lock(state_dir, fake, timeout_s=0).acquire()
    assert fake.sleeps == []


def test_lock_is_acquired_once_the_first_is_released(state_dir: Path, fake: FakeTime) -> None:
    first = HostLock(state_dir, 0)
    first.acquire()
    second = waiting_lock(state_dir, fake, timeout_s=0)
    with pytest.raises(LockTimeout):
        second.acquire()

    first.release()
    second.acquire()
    try:
        holder = (state_dir / "lock").read_text()
        assert holder == f"pid {os.getpid()}: apply\n"
        with pytest.raises(LockTimeout):
            HostLock(state_dir, 0).acquire()
    finally:
        second.release()
    assert (state_dir / "lock").read_text() == ""


def test_waiting_lock_gets_it_when_released_during_the_wait(state_dir: Path, fake: FakeTime) -> None:
    first = HostLock(state_dir, 0)
    first.acquire()
    fake.on_sleep.append(lambda n: first.release() if n == 3 else None)

    with waiting_lock(state_dir, fake, timeout_s=60, what="plan"):
        assert len(fake.sleeps) == 3
        assert (state_dir / "lock").read_text() == f"pid {os.getpid()}: plan\n"


def test_context_manager_releases_on_error(state_dir: Path) -> None:
    with pytest.raises(RuntimeError):
        with HostLock(state_dir, 0):
            raise RuntimeError("apply crashed")
    with HostLock(state_dir, 0) as again:  # a zero timeout: raises LockTimeout if still held
        assert again.path.read_text() == f"pid {os.getpid()}: apply\n"


def test_release_is_idempotent_and_lock_file_is_private(state_dir: Path) -> None:
    lock = HostLock(state_dir / "nested" / "state", 0)
    lock.acquire()
    assert (lock.path.stat().st_mode & 0o777) == 0o600
    lock.release()
    lock.release()
    with HostLock(state_dir / "nested" / "state", 0) as again:  # raises LockTimeout if still held
        assert again.path.read_text() == f"pid {os.getpid()}: apply\n"


# --- another process ----------------------------------------------------------------------

RAW_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: raw holder\\n".encode())
    print("locked", flush=True)
    sys.stdin.read()
    """
)

HOSTLOCK_HOLDER = textwrap.dedent(
    """
    import sys
    from reconciler.lock import HostLock
    lock = HostLock(sys.argv[1], 0, what="held by test")
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def hold(script: str, arg: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(arg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the holder has the flock (or died)
    if line.strip() != "locked":
        proc.kill()
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        raise AssertionError(f"holder did not get the lock: {line!r} {err}")
    return proc


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=HANG_GUARD_S)


def test_lock_held_by_another_process_blocks_us_until_it_is_killed(
    state_dir: Path, fake: FakeTime, holders: list[subprocess.Popen[str]],
) -> None:
    proc = hold(RAW_HOLDER, state_dir / "lock")
    holders.append(proc)

    with pytest.raises(LockTimeout) as exc:
        waiting_lock(state_dir, fake, timeout_s=2).acquire()
    assert f"pid {proc.pid}: raw holder" in str(exc.value)

    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=HANG_GUARD_S) == -signal.SIGKILL

    # the kernel released the flock with the process: no waiting at all now
    with HostLock(state_dir, 0):
        assert (state_dir / "lock").read_text() == f"pid {os.getpid()}: apply\n"


def test_lock_timeout_names_the_pid_of_a_reconciler_in_another_process(
    state_dir: Path, fake: FakeTime, holders: list[subprocess.Popen[str]],
) -> None:
    proc = hold(HOSTLOCK_HOLDER, state_dir)
    holders.append(proc)

    with pytest.raises(LockTimeout) as exc:
        waiting_lock(state_dir, fake, timeout_s=1).acquire()
    assert f"pid {proc.pid}: held by test" in str(exc.value)

    # a holder that ends normally (stdin closed) releases it as well
    proc.communicate(input="", timeout=HANG_GUARD_S)
    assert proc.returncode == 0
    with HostLock(state_dir, 0) as again:  # a zero timeout: raises LockTimeout if still held
        assert again.path.read_text() == f"pid {os.getpid()}: apply\n"


def test_we_block_another_process(state_dir: Path) -> None:
    probe = textwrap.dedent(
        """
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("busy")
        else:
            print("free")
        """
    )

    def probe_lock() -> str:
        out = subprocess.run([sys.executable, "-c", probe, str(state_dir / "lock")],
                             capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)
        return out.stdout.strip()

    with HostLock(state_dir, 0):
        assert probe_lock() == "busy"
    assert probe_lock() == "free"


# --- end to end -----------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli.app", *args],
        capture_output=True, text=True, timeout=HANG_GUARD_S, env=dict(os.environ), stdin=subprocess.DEVNULL,
    )


def memory_objects(state_dir: Path) -> list[Path]:
    root = state_dir / "memory"
    return sorted(root.rglob("*.json")) if root.exists() else []


def test_apply_while_another_process_holds_the_lock_fails_and_changes_nothing(
    host_config_file: Path, state_dir: Path, example_manifests: Path, holders: list[subprocess.Popen[str]],
) -> None:
    proc = hold(RAW_HOLDER, state_dir / "lock")
    holders.append(proc)

    blocked = run_cli("apply", str(example_manifests), "--yes", "--lock-timeout", "0.2")

    assert blocked.returncode != 0
    assert "Traceback" not in blocked.stderr
    message = " ".join(blocked.stderr.split())
    assert "another reconciler holds the host lock" in message
    assert f"pid {proc.pid}" in message
    assert "0.2 s" in message
    assert memory_objects(state_dir) == []

    # the same command works once the holder is gone: it was the lock that stopped it
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    done = run_cli("apply", str(example_manifests), "--yes", "--lock-timeout", "0.2")
    assert done.returncode == 0, done.stderr
    assert len(memory_objects(state_dir)) == 23
