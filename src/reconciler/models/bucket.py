"""Bucket: an object-store container (Swift) or bucket (S3) in the tenant's account."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from reconciler.models._base import DeletionPolicy, Spec, Strict, deletion_policy_field
from reconciler.models._fields import spec_field


class BucketQuota(Strict):
    bytes: int | None = spec_field(None, description="Maximum bytes stored.", ge=0)
    objects: int | None = spec_field(None, description="Maximum number of objects.", ge=0)


class BucketSpec(Spec):
    """An object bucket (Swift's container)."""

    kind = "Bucket"
    stateful = True

    acl: Literal["private", "public-read"] = spec_field(
        "private", description="private, or public-read (anonymous reads and listing)."
    )
    versioning: bool = spec_field(False, description="Keep old versions of overwritten objects.")
    quota: BucketQuota = Field(default_factory=BucketQuota, description="Limits on the bucket.")
    metadata: dict[str, str] = spec_field(
        default_factory=dict,
        description="Custom metadata set on the bucket; keys set by others are left alone.",
        merge_keys=True,
    )
    deletionPolicy: DeletionPolicy = deletion_policy_field()
    purgeOnDelete: bool = spec_field(
        False, description="With deletionPolicy Delete: delete the objects first."
    )
