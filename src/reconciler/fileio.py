"""Atomic file writes: a temporary file in the same folder, then a rename.

A process killed mid-write leaves the old file or the new one, never half of one; the
temporary name starts with `.tmp-`, which readers skip.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: str | bytes, mode: int = 0o600, *, one_temporary: bool = False) -> None:
    """Write `data` to `path` atomically with permission `mode` (private by default).

    `one_temporary`: the temporary file is always `.tmp-NAME` (for a path only ever
    written by one writer at a time), so what a killed write left is overwritten by the
    next write, and the owner of `path` can remove it with it; otherwise it has a random
    name, and a killed write leaves it for good (readers skip it)."""
    if one_temporary:
        tmp_path = path.with_name(".tmp-" + path.name)
        tmp_path.unlink(missing_ok=True)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        tmp = str(tmp_path)
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file: None when it does not exist, {} when unreadable or not an object
    (a damaged file is treated as empty, never as a crash of observe)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
