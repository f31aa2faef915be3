"""Manifest models: one module per kind, each field with its change policy."""

from __future__ import annotations

from reconciler.models._base import (
    NAME_PATTERN,
    Key,
    Metadata,
    Reference,
    Source,
    Spec,
)
from reconciler.models._fields import X_SENSITIVE, X_SHRINK, X_UPDATE, UpdatePolicy, spec_field
from reconciler.models._resource import Desired, Resource, document_model
from reconciler.models.bucket import BucketSpec
from reconciler.models.image import ImageSpec
from reconciler.models.instance import InstanceSpec
from reconciler.models.network import NetworkSpec
from reconciler.models.router import RouterSpec
from reconciler.models.security_group import SecurityGroupSpec
from reconciler.models.tenant import TenantSpec
from reconciler.models.volume import VolumeSpec

#: every kind, in the order documentation lists them
KINDS: dict[str, type[Spec]] = {
    cls.kind: cls
    for cls in (
        TenantSpec,
        NetworkSpec,
        RouterSpec,
        SecurityGroupSpec,
        ImageSpec,
        InstanceSpec,
        VolumeSpec,
        BucketSpec,
    )
}

__all__ = [
    "KINDS",
    "NAME_PATTERN",
    "X_SENSITIVE",
    "X_SHRINK",
    "X_UPDATE",
    "Desired",
    "Key",
    "Metadata",
    "Reference",
    "Resource",
    "Source",
    "Spec",
    "UpdatePolicy",
    "document_model",
    "spec_field",
]
