"""Error types shared by every layer: validation problems, and driver errors.

Drivers raise only these (translated from their library's errors at the boundary):
:class:`TransientError` means "retry later with backoff", :class:`PermanentError` means
"report and stop retrying until something changes".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


def format_path(path: Sequence[str | int]) -> str:
    """('spec', 'subnets', 0, 'cidr') -> 'spec.subnets[0].cidr'. A key that is not short
    printable text (a line break, an RTL override, 5,000 characters) is shown as a
    shortened Python literal, so an error stays on one line and reads as written."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + printable(str(part))
    return out


def printable(text: str, limit: int = 60) -> str:
    """`text` itself when it is printable and at most `limit` characters, else its
    (shortened) repr: what goes into a one-line message from a user's input."""
    if text.isprintable() and len(text) <= limit:
        return text
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation error, printed compiler-style: FILE:LINE: RESOURCE: FIELD: message."""

    file: str
    line: int
    message: str
    resource: str | None = None  # e.g. "Network acme/web"
    path: str | None = None  # e.g. "spec.subnets[0].cidr"

    def __str__(self) -> str:
        parts = [f"{self.file}:{self.line}"]
        if self.resource:
            parts.append(self.resource)
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)

    def sort_key(self) -> tuple[str, int, str, str]:
        return (self.file, self.line, self.path or "", self.message)


class ReconcilerError(Exception):
    """Base of every error the reconciler reports to a user (never a traceback)."""


class ValidationFailed(ReconcilerError):
    """The manifests have errors; nothing was changed."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = sorted(problems, key=Problem.sort_key)
        super().__init__(f"{len(self.problems)} validation error(s)")


class ConfigError(ReconcilerError):
    """The host config is missing a setting or has a wrong one."""


class LockTimeout(ReconcilerError):
    """Another reconciler holds the host lock."""


class JournalError(ReconcilerError):
    """The journal (SQLite under the state directory) cannot be read or written: locked
    by another process, or its disk is full."""


class StalePlan(ReconcilerError):
    """A saved plan no longer matches the host."""


class DriverError(ReconcilerError):
    """An error from a driver, translated from its library."""


class TransientError(DriverError):
    """Retry later: the host or a service is temporarily unable (down, busy, timeout)."""


class PermanentError(DriverError):
    """Retrying will not help until the manifest or the host changes."""


class NotFound(PermanentError):
    """The host object does not exist (any more)."""


class Conflict(PermanentError):
    """A host object we do not own is in the way."""
