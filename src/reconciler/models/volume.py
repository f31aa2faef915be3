"""Volume: a block device (LVM logical volume or qcow2 file) attachable to instances."""

from __future__ import annotations

from pydantic import Field

from reconciler.models._base import DeletionPolicy, Spec, deletion_policy_field
from reconciler.models._fields import UpdatePolicy, spec_field


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
    snapshots: list[str] = Field(
        default_factory=list, description="Named snapshots to keep; removing one deletes it."
    )
