"""Volume: a block device (LVM logical volume or qcow2 file) attachable to instances."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from reconciler.models._base import DeletionPolicy, Spec, deletion_policy_field
from reconciler.models._fields import UpdatePolicy, spec_field

SNAPSHOT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"

SnapshotName = Annotated[str, Field(pattern=SNAPSHOT_PATTERN)]


class VolumeSpec(Spec):
    """A block volume (Cinder's volume)."""

    kind = "Volume"
    stateful = True

    sizeGiB: int = spec_field(
        description="Size in GiB. Volumes only grow: a smaller size is refused.",
        shrink="error",
        ge=1,
        le=65536,
    )
    backend: str | None = spec_field(
        None,
        description="Volume backend named in the host config (default: the host's default).",
        update=UpdatePolicy.REPLACE,
        host_default=True,
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
    )
    multiattach: bool = spec_field(
        False, description="May be attached to several instances at once."
    )
    wipe: bool = spec_field(False, description="Overwrite the data before deleting.")
    deletionPolicy: DeletionPolicy = deletion_policy_field()
    snapshots: list[SnapshotName] = Field(
        default_factory=list,
        description="Named point-in-time snapshots to keep (LVM snapshots, or qcow2 internal "
        "snapshots on the file backend): adding a name takes one, removing a name deletes it. "
        "A set: the order does not matter. Names: 1 to 32 lowercase letters, digits or '-'.",
    )

    @field_validator("snapshots")
    @classmethod
    def _snapshot_set(cls, names: list[str]) -> list[str]:
        seen = set()
        for name in names:
            if name in seen:
                raise ValueError(f"snapshot {name!r} is listed twice")
            seen.add(name)
        return sorted(names)
