"""Tenant: a project owning networks, instances, volumes and buckets, with quotas."""

from __future__ import annotations

from pydantic import Field

from reconciler.models._base import Spec, Strict
from reconciler.models._fields import spec_field


class TenantQuota(Strict):
    """Upper limits over all of the tenant's resources; an omitted limit is unlimited."""

    instances: int | None = spec_field(None, description="Number of instances.", ge=0)
    vcpus: int | None = spec_field(None, description="Sum of instance vcpus.", ge=0)
    memoryMiB: int | None = spec_field(None, description="Sum of instance memory, MiB.", ge=0)
    volumeGiB: int | None = spec_field(None, description="Sum of volume sizes, GiB.", ge=0)
    buckets: int | None = spec_field(None, description="Number of buckets.", ge=0)


class TenantSpec(Spec):
    """A tenant (Keystone's project): the unit of ownership, isolation and quota."""

    kind = "Tenant"

    description: str = spec_field("", description="Free text shown in status.", max_length=1024)
    quota: TenantQuota = Field(default_factory=TenantQuota, description="Quota limits.")
