"""Bucket: an object-store container (Swift) or bucket (S3) in the tenant's account."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from reconciler.models._base import DeletionPolicy, Spec, Strict, deletion_policy_field
from reconciler.models._fields import UpdatePolicy, spec_field

#: metadata keys travel as HTTP header names (Swift folds their case and turns `_` into
#: `-`), so only lowercase letters, digits and `-`
METADATA_KEY = r"^[a-z0-9][a-z0-9-]{0,127}$"
#: keys the object store or reconciler itself uses on a container
RESERVED_KEYS = ("quota-bytes", "quota-count", "temp-url-key", "temp-url-key-2")
RESERVED_PREFIXES = ("rc-",)

MetadataKey = Annotated[str, Field(pattern=METADATA_KEY)]


class BucketQuota(Strict):
    bytes: int | None = spec_field(None, description="Maximum bytes stored.", ge=0)
    objects: int | None = spec_field(None, description="Maximum number of objects.", ge=0)


class BucketSpec(Spec):
    """An object bucket (Swift's container)."""

    kind = "Bucket"
    stateful = True

    store: str | None = spec_field(
        None,
        description="Object store named in the host config (default: the host's default). "
        "Changing it replaces the bucket.",
        update=UpdatePolicy.REPLACE,
        host_default=True,
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
    )
    acl: Literal["private", "public-read"] = spec_field(
        "private", description="private, or public-read (anonymous reads and listing)."
    )
    versioning: bool = spec_field(False, description="Keep old versions of overwritten objects.")
    quota: BucketQuota = Field(default_factory=BucketQuota, description="Limits on the bucket.")
    metadata: dict[MetadataKey, Annotated[str, Field(max_length=256)]] = spec_field(
        default_factory=dict,
        description="Custom metadata set on the bucket (Swift container metadata, S3 bucket "
        "tags); keys set by others are left alone. Keys: lowercase letters, digits and '-'; "
        "values up to 256 characters.",
        merge_keys=True,
    )
    deletionPolicy: DeletionPolicy = deletion_policy_field()
    purgeOnDelete: bool = spec_field(
        False, description="With deletionPolicy Delete: delete the objects first."
    )

    @field_validator("metadata")
    @classmethod
    def _not_reserved(cls, metadata: dict[str, str]) -> dict[str, str]:
        for key in metadata:
            if key in RESERVED_KEYS or key.startswith(RESERVED_PREFIXES):
                raise ValueError(f"metadata key {key!r} is reserved (quota-bytes, quota-count, "
                                 "temp-url-key*, rc-*): use spec.quota, or another key")
        return metadata
