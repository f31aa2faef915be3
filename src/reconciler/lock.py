"""One host lock (flock under the state directory): two applies never interleave."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from reconciler.errors import LockTimeout, ReconcilerError


class HostLock:
    """An exclusive flock on STATE_DIR/lock, waited for up to `timeout_s` seconds.

    The kernel releases the lock when the holder exits, even by SIGKILL, so a crashed
    apply never leaves the host locked.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        timeout_s: float = 60.0,
        *,
        what: str = "apply",
        name: str = "lock",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.path = Path(state_dir) / name
        self.timeout_s = timeout_s
        self.what = what
        self.clock = clock
        self.sleep = sleep
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ReconcilerError(f"cannot open the host lock {self.path}: {exc.strerror}") from None
        deadline = self.clock() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self.clock() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise LockTimeout(
                        f"another reconciler holds the host lock {self.path}"
                        f"{f' ({holder})' if holder else ''}; gave up after {self.timeout_s:g} s. "
                        "Wait for it to finish, or raise --lock-timeout."
                    ) from None
                self.sleep(0.05)
        try:  # who holds it, for the message of the next one that waits: a courtesy
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {self.what}\n".encode(), 0)
        except OSError:  # a full disk: the lock is held all the same
            pass
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("pid 123: apply"), or ""."""
        try:
            return self.path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            try:
                try:
                    os.ftruncate(self._fd, 0)
                except OSError:
                    pass
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "HostLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
