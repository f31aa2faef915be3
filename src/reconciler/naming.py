"""Host object names: derived, short, stable (Linux interface names have 15 characters)."""

from __future__ import annotations

import hashlib

from reconciler.models import Key

PREFIX = "rc-"


def short_hash(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def host_name(key: Key, prefix: str = PREFIX) -> str:
    """`rc-` + 10 hex digits of sha256(kind/tenant/name): 13 characters."""
    return prefix + short_hash(key.kind, key.tenant, key.name)
