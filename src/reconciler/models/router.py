"""Router: joins a tenant's networks and, with `external`, gives them SNAT to the outside."""

from __future__ import annotations

from typing import Iterable

from pydantic import field_validator

from reconciler.models._base import NAME_PATTERN, Name, Reference, Spec, _check_name
from reconciler.models._fields import spec_field


class RouterSpec(Spec):
    """A router (Neutron's L3 router): a namespace with a leg on each network."""

    kind = "Router"

    networks: list[Name] = spec_field(
        default_factory=list,
        description="Networks of this tenant the router joins; it holds each subnet's gateway.",
    )
    external: str | None = spec_field(
        None,
        description="External network for the gateway leg: a network of this tenant, or "
        "`TENANT/NAME` of a network with `external: true`; none for an internal router.",
        json_schema_extra={"pattern": f"^([a-z0-9][a-z0-9-]{{0,62}}/)?{NAME_PATTERN[1:]}"},
    )
    snat: bool = spec_field(
        True, description="Masquerade the tenant subnets behind the external leg."
    )

    @field_validator("external")
    @classmethod
    def _external_is_a_name(cls, value: str | None) -> str | None:
        if value is not None:
            for part in value.split("/", 1):
                _check_name(part)
        return value

    def references(self, tenant: str) -> Iterable[Reference]:
        for i, net in enumerate(self.networks):
            yield Reference("Network", tenant, net, ("networks", i))
        if self.external is not None:
            other, _, name = self.external.rpartition("/")
            yield Reference("Network", other or tenant, name, ("external",))
