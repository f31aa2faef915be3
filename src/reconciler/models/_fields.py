"""Field declarations: every spec field says how a change to it is applied.

A field is declared with :func:`spec_field`, which records in the JSON Schema extras
(`x-update`, `x-sensitive`) whether changing it is done in place without disruption,
in place but needing a restart, or forces replacement of the resource. The planner reads
these declarations; nothing else decides a field's change policy.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import Field


class UpdatePolicy(str, enum.Enum):
    """How a change to one field reaches the host (ordered by disruption)."""

    IN_PLACE = "in-place"  # applied live, nothing restarts
    RESTART = "restart"  # applied in place, takes effect when the resource restarts
    REPLACE = "replace"  # the resource is destroyed and created again

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {UpdatePolicy.IN_PLACE: 0, UpdatePolicy.RESTART: 1, UpdatePolicy.REPLACE: 2}

X_UPDATE = "x-update"
X_SENSITIVE = "x-sensitive"
X_SHRINK = "x-shrink"
X_HOST_DEFAULT = "x-host-default"
X_MERGE_KEYS = "x-merge-keys"


def spec_field(
    default: Any = ...,
    *,
    description: str,
    update: UpdatePolicy = UpdatePolicy.IN_PLACE,
    sensitive: bool = False,
    shrink: str | None = None,
    host_default: bool = False,
    merge_keys: bool = False,
    **kwargs: Any,
) -> Any:
    """A pydantic Field carrying the reconciler's change policy for that field.

    `shrink` applies to numbers whose decrease differs from an increase:
    "replace" (a smaller value forces replacement) or "error" (a smaller value is refused
    at plan time, e.g. a volume can only grow). `host_default`: when the manifest does
    not set the field, the host's value stands (allocated ids, the default backend).
    `merge_keys`: a map whose keys the user never set are left alone.
    """
    extra: dict[str, Any] = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[X_UPDATE] = update.value
    if sensitive:
        extra[X_SENSITIVE] = True
    if host_default:
        extra[X_HOST_DEFAULT] = True
    if merge_keys:
        extra[X_MERGE_KEYS] = True
    if shrink is not None:
        assert shrink in ("replace", "error")
        extra[X_SHRINK] = shrink
    return Field(default, description=description, json_schema_extra=extra, **kwargs)
