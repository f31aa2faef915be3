"""SecurityGroup: stateful firewall rules applied to the instance ports that name it."""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Literal

from pydantic import Field, field_validator, model_validator

from reconciler.models._base import Reference, Spec, Strict, _check_name
from reconciler.models._fields import spec_field

_PORTS_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


class Rule(Strict):
    direction: Literal["ingress", "egress"] = spec_field(
        "ingress", description="ingress (to the instance) or egress (from it)."
    )
    protocol: Literal["tcp", "udp", "icmp", "any"] = spec_field(
        "any", description="IP protocol the rule matches."
    )
    ports: str | None = spec_field(
        None,
        description='Port or range, "22" or "8000-8080" (tcp and udp only; default all).',
        pattern=r"^\d{1,5}(-\d{1,5})?$",
    )
    remote: str = spec_field(
        "0.0.0.0/0",
        description="Peer: an IPv4 CIDR, or the name of a security group of the tenant "
        "(its members' addresses).",
    )
    description: str = Field("", description="Free text.", max_length=255)

    @field_validator("ports")
    @classmethod
    def _port_range(cls, value: str | None) -> str | None:
        if value is None:
            return value
        m = _PORTS_RE.fullmatch(value)
        if not m:
            raise ValueError(f'ports {value!r} must be a port "22" or a range "8000-8080"')
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            raise ValueError(f"ports {value!r}: ports are between 1 and 65535")
        if lo > hi:
            raise ValueError(f"ports {value!r}: the range starts after it ends")
        return value

    @field_validator("remote")
    @classmethod
    def _remote_is_cidr_or_name(cls, value: str) -> str:
        if remote_is_cidr(value):
            try:
                ipaddress.IPv4Network(value)
            except ValueError as exc:
                raise ValueError(f"remote {value!r} is not a valid IPv4 CIDR: {exc}") from None
        else:
            _check_name(value)
        return value

    @model_validator(mode="after")
    def _ports_need_tcp_or_udp(self) -> "Rule":
        if self.ports is not None and self.protocol not in ("tcp", "udp"):
            raise ValueError(f"ports need protocol tcp or udp, not {self.protocol}")
        return self


def remote_is_cidr(remote: str) -> bool:
    """A remote with a digit first and a dot or slash is an address, else a group name."""
    return bool(remote) and remote[0].isdigit() and ("." in remote or "/" in remote)


class SecurityGroupSpec(Spec):
    """A security group (Neutron's): default-deny ingress plus these rules."""

    kind = "SecurityGroup"
    create_before_destroy = True

    description: str = spec_field("", description="Free text.", max_length=255)
    rules: list[Rule] = spec_field(default_factory=list, description="Allowed traffic.")

    def references(self, tenant: str) -> Iterable[Reference]:
        # A group named as a remote resolves to its members' addresses at apply time:
        # it must exist, but implies no order (two groups may name each other).
        for i, rule in enumerate(self.rules):
            if not remote_is_cidr(rule.remote):
                yield Reference("SecurityGroup", tenant, rule.remote, ("rules", i, "remote"), False)
