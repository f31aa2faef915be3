"""Instance: a virtual machine on a tenant's networks, booted from an image."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import ClassVar, Iterable, Literal

from pydantic import Field

from reconciler.models._base import Name, Reference, Spec, Strict
from reconciler.models._fields import UpdatePolicy, spec_field


class Nic(Strict):
    #: a NIC is the same NIC (keeps its host-chosen address) only on the same network
    list_identity: ClassVar[str] = "network"

    network: Name = Field(description="Network of the tenant the NIC is on.")
    ip: IPv4Address | None = spec_field(
        None,
        description="Fixed address (default: allocated stably by the network driver).",
        host_default=True,
    )
    securityGroups: list[Name] = Field(
        default_factory=list, description="Security groups applied to this port."
    )


class VolumeAttachment(Strict):
    list_identity: ClassVar[str] = "volume"

    volume: Name = Field(description="Volume of the tenant to attach.")
    device: str | None = Field(
        None,
        description="Target device, e.g. vdb (default: next free). The guest may name it "
        "differently; the volume's serial identifies it.",
        pattern=r"^vd[b-z]$",
    )


class InstanceSpec(Spec):
    """A virtual machine (Nova's server)."""

    kind = "Instance"

    vcpus: int = spec_field(
        1, description="Virtual CPUs.", update=UpdatePolicy.RESTART, ge=1, le=64
    )
    memoryMiB: int = spec_field(
        512, description="Memory in MiB.", update=UpdatePolicy.RESTART, ge=64, le=1048576
    )
    image: Name = spec_field(
        description="Image of the tenant to boot from.", update=UpdatePolicy.REPLACE
    )
    rootDiskGiB: int = spec_field(
        10,
        description="Size of the root disk in GiB; growing is in place (at restart), "
        "shrinking forces replacement.",
        update=UpdatePolicy.RESTART,
        shrink="replace",
        ge=1,
        le=65536,
    )
    powerState: Literal["running", "stopped"] = spec_field(
        "running", description="Whether the instance runs."
    )
    restartPolicy: Literal["Never", "Allowed"] = spec_field(
        "Never",
        description="Allowed: changes that need a restart restart the instance during apply. "
        "Never: they apply at the next restart and the plan says so.",
    )
    networks: list[Nic] = spec_field(
        default_factory=list, description="NICs, in order (hot-plugged when changed)."
    )
    volumes: list[VolumeAttachment] = spec_field(
        default_factory=list, description="Volumes attached (hot-plugged when changed)."
    )
    userData: str | None = spec_field(
        None,
        description="cloud-init user-data. Sensitive: never logged or shown. Read by the "
        "guest at first boot.",
        update=UpdatePolicy.RESTART,
        sensitive=True,
        max_length=65536,
    )
    sshAuthorizedKeys: list[str] = spec_field(
        default_factory=list,
        description="SSH public keys for the default user (via cloud-init).",
        update=UpdatePolicy.RESTART,
    )

    def references(self, tenant: str) -> Iterable[Reference]:
        yield Reference("Image", tenant, self.image, ("image",))
        for i, nic in enumerate(self.networks):
            yield Reference("Network", tenant, nic.network, ("networks", i, "network"))
            for j, group in enumerate(nic.securityGroups):
                yield Reference(
                    "SecurityGroup", tenant, group, ("networks", i, "securityGroups", j)
                )
        for i, att in enumerate(self.volumes):
            yield Reference("Volume", tenant, att.volume, ("volumes", i, "volume"))
