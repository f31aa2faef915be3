"""Placeholder: the netlink driver is being written (see issue 4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True, slots=True)
class NetlinkSettings:
    state_dir: Path
    home: str
    uplinks: Mapping[str, str] = field(default_factory=dict)
    vxlan_local: str | None = None
    vxlan_peers: tuple[str, ...] = ()
    vxlan_port: int = 4789
    dnsmasq: str = "dnsmasq"
    lease_seconds: int = 3600
    max_parallel: int = 8


class NetlinkDriver:
    name = "netlink"
    kinds = ("Network", "Router", "SecurityGroup")

    def __init__(self, settings: NetlinkSettings):
        self.settings = settings
        self.max_parallel = settings.max_parallel
