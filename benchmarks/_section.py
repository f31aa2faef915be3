"""Rewrite one marked section of docs/benchmarks.md: each benchmark owns its markers."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the part of `path` from `begin` to `end` with `section` (which carries the
    markers), or append it; nothing else in the file changes."""
    text = path.read_text() if path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop != -1 and stop > start:
        text = text[:start] + section.rstrip("\n") + text[stop + len(end):]
        if not text.endswith("\n"):
            text += "\n"
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def reproduce(command: str, now: str, machine: Mapping[str, str]) -> list[str]:
    """The command block and the machine table every section starts with."""
    return ["```sh", command, "```", "", f"Run on {now}, on:", "", "| | |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in machine.items())]
