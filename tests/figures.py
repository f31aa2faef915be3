"""Counts for the reliability suites: how many cases a run tries, and what it found.

The suites (crash, faults, bad input, ownership, isolation, secrets) run in CI at a
reduced count and, with `RECONCILER_RELIABILITY=release` (`make reliability`), at the
release count. Each records what it tried and found with `record(suite, ...)`; when
`RECONCILER_FIGURES=DIR` is set the figures are merged into `DIR/<suite>.json`, which
`scripts/reliability_report.py` turns into the tables of docs/reliability.md.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

LEVEL = os.environ.get("RECONCILER_RELIABILITY", "ci")
if LEVEL not in ("ci", "release"):
    raise SystemExit(f"RECONCILER_RELIABILITY={LEVEL!r}: expected 'ci' or 'release'")


def count(ci: int, release: int) -> int:
    """The number of cases for this run: `ci` in the test suite, `release` for releases."""
    return release if LEVEL == "release" else ci


def record(suite: str, **figures: Any) -> None:
    """Merge `figures` (JSON values) into DIR/<suite>.json when RECONCILER_FIGURES=DIR.

    Numbers are added to what an earlier test of the same run recorded under the same
    key (so several tests can count into one figure), lists are joined; anything else
    replaces it.
    """
    where = os.environ.get("RECONCILER_FIGURES")
    if not where:
        return
    path = Path(where) / f"{suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers record concurrently
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        for key, value in figures.items():
            old = data.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and isinstance(old, (int, float)) and not isinstance(old, bool):
                data[key] = old + value
            elif isinstance(value, list) and isinstance(old, list):
                data[key] = old + value
            else:
                data[key] = value
        data["level"] = LEVEL
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
