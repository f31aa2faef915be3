"""The cloud-init NoCloud seed: meta-data, user-data and network-config on a `cidata` ISO.

Built in Python with pycdlib (no genisoimage, no shell). The texts are rendered here
and are pure; :func:`write_seed_iso` is the only function that touches a file. The
layout of network-config is cloud-init's network config version 2, one key per line
(the test guest parses it with sed).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pycdlib
import yaml

from reconciler.errors import PermanentError
from reconciler.fileio import write_atomic


@dataclass(frozen=True, slots=True)
class NicSeed:
    mac: str
    address: IPv4Interface | None = None  # None: DHCP
    gateway: IPv4Address | None = None
    mtu: int | None = None
    dns: tuple[IPv4Address, ...] = ()


@dataclass(frozen=True, slots=True)
class SeedData:
    """Everything that goes into the seed; equal data means an equal seed."""

    instance_id: str
    hostname: str
    nics: tuple[NicSeed, ...] = ()
    user_data: str | None = None
    ssh_authorized_keys: tuple[str, ...] = field(default=())

    def meta_data(self) -> str:
        return f"instance-id: {self.instance_id}\nlocal-hostname: {self.hostname}\n"

    def network_config(self) -> str:
        lines = ["version: 2", "ethernets:"]
        for i, nic in enumerate(self.nics):
            lines += [
                f"  nic{i}:",
                "    match:",
                f'      macaddress: "{nic.mac}"',
                f"    set-name: eth{i}",
            ]
            if nic.mtu:
                lines.append(f"    mtu: {nic.mtu}")
            if nic.address is None:
                lines.append("    dhcp4: true")
                continue
            lines += ["    dhcp4: false", "    addresses:", f"      - {nic.address.with_prefixlen}"]
            if nic.gateway is not None:
                lines.append(f"    gateway4: {nic.gateway}")
            if nic.dns:
                lines += ["    nameservers:", "      addresses:"]
                lines += [f"        - {d}" for d in nic.dns]
        return "\n".join(lines) + "\n"

    def user_data_text(self) -> str:
        """The user's user-data as given; else a #cloud-config with the SSH keys (if any).

        When both are given and user-data is #cloud-config, the keys are merged in."""
        keys = list(self.ssh_authorized_keys)
        if self.user_data is None:
            if not keys:
                return "#cloud-config\n{}\n"
            return "#cloud-config\n" + yaml.safe_dump({"ssh_authorized_keys": keys}, sort_keys=True)
        if keys and self.user_data.startswith("#cloud-config"):
            try:
                body = yaml.safe_load(self.user_data) or {}
            except yaml.YAMLError:
                # never the parser's message: it quotes the (secret) line
                raise PermanentError(
                    "userData starts with #cloud-config but is not valid YAML, so the SSH keys "
                    "cannot be merged into it"
                ) from None
            if isinstance(body, dict):
                existing = body.get("ssh_authorized_keys") or []
                if isinstance(existing, str):
                    existing = [existing]
                merged = list(existing) + [k for k in keys if k not in existing]
                body["ssh_authorized_keys"] = merged
                return "#cloud-config\n" + yaml.safe_dump(body, sort_keys=True)
        return self.user_data

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, sort_keys=True, default=str)


def build_iso(seed: SeedData) -> bytes:
    """The seed as ISO9660 bytes (volume label `cidata`, Rock Ridge and Joliet names)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="cidata", joliet=3, rock_ridge="1.09")
    files = {
        "meta-data": seed.meta_data(),
        "user-data": seed.user_data_text(),
        "network-config": seed.network_config(),
    }
    for i, (name, text) in enumerate(files.items()):
        data = text.encode()
        iso.add_fp(
            io.BytesIO(data), len(data), f"/F{i}.;1", rr_name=name, joliet_path=f"/{name}"
        )
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_seed_iso(path: Path, seed: SeedData) -> None:
    """Write the ISO atomically, readable by its owner only (it holds user-data)."""
    write_atomic(path, build_iso(seed), 0o600)
