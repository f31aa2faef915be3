"""Sizes as people read them, shared by the drivers that report data (volumes, buckets)."""

from __future__ import annotations


def human(size: float) -> str:
    """1536 -> '1.5 KiB'; bytes below 1 KiB stay whole ('5 B')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover
