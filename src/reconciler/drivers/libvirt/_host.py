"""The libvirt connection, and libvirt's errors translated into ours at this boundary.

Only this package imports `libvirt`. A lost connection or a daemon that is not up is
transient (retried with backoff); a missing domain is NotFound; anything libvirt
refuses for good (bad XML, unsupported setting) is permanent.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from reconciler.errors import Conflict, NotFound, PermanentError, TransientError

try:  # the binding is a compiled extension; the driver says so clearly when it is missing
    import libvirt
except ImportError:  # pragma: no cover - exercised only on machines without libvirt-python
    libvirt = None  # type: ignore[assignment]

# libvirt prints every error to stderr unless an error handler is registered
if libvirt is not None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_TRANSIENT_CODES = {
    "VIR_ERR_NO_CONNECT", "VIR_ERR_RPC", "VIR_ERR_OPERATION_TIMEOUT", "VIR_ERR_AGENT_UNRESPONSIVE",
    "VIR_ERR_SYSTEM_ERROR", "VIR_ERR_AUTH_UNAVAILABLE", "VIR_ERR_OPERATION_ABORTED",
}
_NOT_FOUND_CODES = {"VIR_ERR_NO_DOMAIN", "VIR_ERR_NO_DOMAIN_METADATA"}
_CONFLICT_CODES = {"VIR_ERR_OPERATION_INVALID", "VIR_ERR_DOM_EXIST"}


def _codes(names: set[str]) -> set[int]:
    return {getattr(libvirt, n) for n in names if libvirt is not None and hasattr(libvirt, n)}


def translate(exc: Exception, doing: str) -> Exception:
    """Our error for a libvirt error raised while `doing` something."""
    if libvirt is None or not isinstance(exc, libvirt.libvirtError):
        return exc
    code = exc.get_error_code()
    message = (exc.get_error_message() or str(exc)).strip()
    text = f"{doing}: {message}"
    if code in _codes(_NOT_FOUND_CODES):
        return NotFound(text)
    if code in _codes(_TRANSIENT_CODES) or "Failed to connect socket" in message:
        return TransientError(text)
    if code in _codes(_CONFLICT_CODES):
        return Conflict(text)
    return PermanentError(text)


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Run a block of libvirt calls; re-raise libvirt errors as ours."""
    try:
        yield
    except Exception as exc:
        if libvirt is not None and isinstance(exc, libvirt.libvirtError):
            raise translate(exc, doing) from None
        raise


class Host:
    """One shared connection to libvirtd (libvirt connections are thread-safe)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._conn = None
        self._lock = threading.Lock()

    def conn(self):  # -> libvirt.virConnect
        if libvirt is None:
            raise PermanentError(
                "libvirt-python is not installed: run `make setup` (needs libvirt-dev and pkg-config)"
            )
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise TransientError(
                    f"cannot connect to libvirt at {self.uri}: "
                    f"{(exc.get_error_message() or str(exc)).strip()} (is libvirtd running? "
                    "`make setup` starts it)"
                ) from None
            return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
                self._conn = None
