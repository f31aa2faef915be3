"""Bucket: an object-store container (Swift) or bucket (S3) in the tenant's account."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from reconciler.models._base import DeletionPolicy, Spec, Strict, deletion_policy_field
from reconciler.models._fields import UpdatePolicy, spec_field

#: metadata keys travel as HTTP header names (Swift folds their case and turns `_` into
#: `-`), so only lowercase letters, digits and `-`
METADATA_KEY = r"^[a-z0-9][a-z0-9-]{0,127}$"
#: keys the object store or reconciler itself uses on a container
RESERVED_KEYS = ("quota-bytes", "quota-count", "temp-url-key", "temp-url-key-2")
RESERVED_PREFIXES = ("rc-",)

MetadataKey = Annotated[str, Field(pattern=METADATA_KEY)]


def _header_value(value: str) -> str:
    """A metadata value travels as an HTTP header value (Swift) or a tag (S3): a control
    character (a line break, NUL) cannot be sent, and HTTP drops spaces at either end (so
    the value read back would never match: a change at every plan)."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("a metadata value cannot hold control characters (line breaks, tabs, NUL): "
                         "it is sent as an HTTP header value")
    if value != value.strip(" "):
        raise ValueError("a metadata value cannot start or end with a space: HTTP drops it")
    return value


MetadataValue = Annotated[str, Field(max_length=256), AfterValidator(_header_value)]


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
    metadata: dict[MetadataKey, MetadataValue] = spec_field(
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
