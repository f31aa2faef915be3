"""The cloud-init NoCloud seed: the three texts exactly, the ISO, and its file on disk."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pycdlib
import pytest
import yaml

from reconciler.drivers.libvirt._driver import LibvirtDriver, LibvirtSettings
from reconciler.drivers.libvirt._seed import NicSeed, SeedData, build_iso, write_seed_iso
from reconciler.models import Key
from reconciler.naming import mac_address
from reconciler.state import Mark, Observed

MAC0 = "52:54:00:aa:bb:cc"
MAC1 = "52:54:00:dd:ee:ff"
KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne one@example"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITwo two@example"

STATIC = NicSeed(
    MAC0,
    IPv4Interface("10.10.1.5/24"),
    IPv4Address("10.10.1.1"),
    mtu=1450,
    dns=(IPv4Address("10.10.1.2"), IPv4Address("1.1.1.1")),
)


def seed(**kw) -> SeedData:
    fields = dict(instance_id="iid-0001", hostname="web-1")
    fields.update(kw)
    return SeedData(**fields)


def open_iso(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def read_rr(iso: pycdlib.PyCdlib, name: str) -> str:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
    return out.getvalue().decode()


# --- meta-data -------------------------------------------------------------------------


def test_meta_data_exactly() -> None:
    assert seed().meta_data() == "instance-id: iid-0001\nlocal-hostname: web-1\n"


# --- network-config --------------------------------------------------------------------


def test_network_config_static_with_gateway_mtu_and_dns() -> None:
    assert seed(nics=(STATIC,)).network_config() == (
        "version: 2\n"
        "ethernets:\n"
        "  nic0:\n"
        "    match:\n"
        '      macaddress: "52:54:00:aa:bb:cc"\n'
        "    set-name: eth0\n"
        "    mtu: 1450\n"
        "    dhcp4: false\n"
        "    addresses:\n"
        "      - 10.10.1.5/24\n"
        "    gateway4: 10.10.1.1\n"
        "    nameservers:\n"
        "      addresses:\n"
        "        - 10.10.1.2\n"
        "        - 1.1.1.1\n"
    )


def test_network_config_dhcp() -> None:
    assert seed(nics=(NicSeed(MAC1),)).network_config() == (
        "version: 2\n"
        "ethernets:\n"
        "  nic0:\n"
        "    match:\n"
        '      macaddress: "52:54:00:dd:ee:ff"\n'
        "    set-name: eth0\n"
        "    dhcp4: true\n"
    )


def test_network_config_dhcp_with_mtu() -> None:
    text = seed(nics=(NicSeed(MAC1, mtu=9000),)).network_config()
    assert "    mtu: 9000\n    dhcp4: true\n" in text


def test_network_config_two_nics_only_the_first_with_a_gateway() -> None:
    """As the driver builds them: the second NIC's NicSeed has gateway None."""
    second = NicSeed(MAC1, IPv4Interface("10.20.0.7/16"), None, dns=(IPv4Address("10.20.0.2"),))
    assert seed(nics=(STATIC, second)).network_config() == (
        "version: 2\n"
        "ethernets:\n"
        "  nic0:\n"
        "    match:\n"
        '      macaddress: "52:54:00:aa:bb:cc"\n'
        "    set-name: eth0\n"
        "    mtu: 1450\n"
        "    dhcp4: false\n"
        "    addresses:\n"
        "      - 10.10.1.5/24\n"
        "    gateway4: 10.10.1.1\n"
        "    nameservers:\n"
        "      addresses:\n"
        "        - 10.10.1.2\n"
        "        - 1.1.1.1\n"
        "  nic1:\n"
        "    match:\n"
        '      macaddress: "52:54:00:dd:ee:ff"\n'
        "    set-name: eth1\n"
        "    dhcp4: false\n"
        "    addresses:\n"
        "      - 10.20.0.7/16\n"
        "    nameservers:\n"
        "      addresses:\n"
        "        - 10.20.0.2\n"
    )


def test_network_config_without_nics() -> None:
    assert seed().network_config() == "version: 2\nethernets:\n"


def test_network_config_is_yaml_cloud_init_reads() -> None:
    second = NicSeed(MAC1)
    data = yaml.safe_load(seed(nics=(STATIC, second)).network_config())
    assert data == {
        "version": 2,
        "ethernets": {
            "nic0": {
                "match": {"macaddress": MAC0},
                "set-name": "eth0",
                "mtu": 1450,
                "dhcp4": False,
                "addresses": ["10.10.1.5/24"],
                "gateway4": "10.10.1.1",
                "nameservers": {"addresses": ["10.10.1.2", "1.1.1.1"]},
            },
            "nic1": {"match": {"macaddress": MAC1}, "set-name": "eth1", "dhcp4": True},
        },
    }


def _network(name: str, cidr: str, **subnet) -> Observed:
    key = Key("Network", "acme", name)
    spec = {"subnets": [{"cidr": cidr, **subnet}]}
    return Observed(key, f"br-{name}", spec, Mark(key, "h", spec), {"bridge": f"rcx-{name}"})


def test_the_driver_gives_only_the_first_nic_a_gateway(tmp_path: Path) -> None:
    """The driver's own seed writer: two static NICs whose subnets both have gateways."""
    driver = LibvirtDriver(LibvirtSettings(instance_dir=tmp_path, image_dir=tmp_path / "img"))
    off = {"enabled": False}  # without DHCP the guest configures its address itself
    web = _network("web", "10.10.1.0/24", gateway="10.10.1.254", dnsServers=["10.10.1.2"], dhcp=off)
    db = _network("db", "10.20.0.0/16", dnsServers=["10.20.0.2"], dhcp=off)  # gateway: the first address
    related = {web.key: web, db.key: db}
    spec = {
        "networks": [{"network": "web", "ip": "10.10.1.5"}, {"network": "db", "ip": "10.20.3.4"}],
        "userData": "#!/bin/sh\necho hello\n",
        "sshAuthorizedKeys": [KEY1],
    }
    key = Key("Instance", "acme", "web-1")
    driver._write_seed(tmp_path, key, spec, related, instance_id="iid-9")

    mac_web = mac_address("acme", "web-1", "web")
    mac_db = mac_address("acme", "web-1", "db")
    iso = open_iso((tmp_path / "seed.iso").read_bytes())
    try:
        assert read_rr(iso, "meta-data") == "instance-id: iid-9\nlocal-hostname: web-1\n"
        assert read_rr(iso, "user-data") == "#!/bin/sh\necho hello\n"
        assert read_rr(iso, "network-config") == (
            "version: 2\n"
            "ethernets:\n"
            "  nic0:\n"
            "    match:\n"
            f'      macaddress: "{mac_web}"\n'
            "    set-name: eth0\n"
            "    dhcp4: false\n"
            "    addresses:\n"
            "      - 10.10.1.5/24\n"
            "    gateway4: 10.10.1.254\n"
            "    nameservers:\n"
            "      addresses:\n"
            "        - 10.10.1.2\n"
            "  nic1:\n"
            "    match:\n"
            f'      macaddress: "{mac_db}"\n'
            "    set-name: eth1\n"
            "    dhcp4: false\n"
            "    addresses:\n"
            "      - 10.20.3.4/16\n"
            "    nameservers:\n"
            "      addresses:\n"
            "        - 10.20.0.2\n"
        )
    finally:
        iso.close()
    sidecar = json.loads((tmp_path / "seed.json").read_text())
    assert [n["gateway"] for n in sidecar["nics"]] == ["10.10.1.254", None]
    assert sidecar["user_data"] == "#!/bin/sh\necho hello\n"
    assert stat.S_IMODE((tmp_path / "seed.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "seed.iso").stat().st_mode) == 0o600


def test_the_driver_gateway_defaults_to_the_first_address(tmp_path: Path) -> None:
    driver = LibvirtDriver(LibvirtSettings(instance_dir=tmp_path, image_dir=tmp_path / "img"))
    db = _network("db", "10.20.0.0/16", dhcp={"enabled": False})
    spec = {"networks": [{"network": "db", "ip": "10.20.3.4"}]}
    driver._write_seed(tmp_path, Key("Instance", "acme", "vm"), spec, {db.key: db}, "iid-1")
    sidecar = json.loads((tmp_path / "seed.json").read_text())
    assert sidecar["nics"][0]["gateway"] == "10.20.0.1"
    assert sidecar["nics"][0]["address"] == "10.20.3.4/16"


def test_the_driver_lets_the_guest_ask_dhcp_where_the_subnet_serves_it(tmp_path: Path) -> None:
    """The address is reserved for the NIC's MAC in the subnet's dnsmasq: the guest asks."""
    driver = LibvirtDriver(LibvirtSettings(instance_dir=tmp_path, image_dir=tmp_path / "img"))
    web = _network("web", "10.10.1.0/24")
    spec = {"networks": [{"network": "web", "ip": "10.10.1.44"}]}
    driver._write_seed(tmp_path, Key("Instance", "acme", "vm"), spec, {web.key: web}, "iid-2")
    sidecar = json.loads((tmp_path / "seed.json").read_text())
    assert sidecar["nics"][0]["address"] is None
    assert sidecar["nics"][0]["mac"] == mac_address("acme", "vm", "web")


# --- user-data -------------------------------------------------------------------------


def test_user_data_none_without_keys() -> None:
    assert seed().user_data_text() == "#cloud-config\n{}\n"


def test_user_data_none_with_keys() -> None:
    text = seed(ssh_authorized_keys=(KEY1, KEY2)).user_data_text()
    assert text == f"#cloud-config\nssh_authorized_keys:\n- {KEY1}\n- {KEY2}\n"
    assert yaml.safe_load(text) == {"ssh_authorized_keys": [KEY1, KEY2]}


def test_a_script_is_kept_verbatim_even_with_keys() -> None:
    script = "#!/bin/sh\nset -e\necho 'hi there' > /tmp/x\n"
    assert seed(user_data=script).user_data_text() == script
    assert seed(user_data=script, ssh_authorized_keys=(KEY1,)).user_data_text() == script


def test_cloud_config_without_keys_is_kept_verbatim() -> None:
    text = "#cloud-config\n# a comment that survives\npackages: [htop]\n"
    assert seed(user_data=text).user_data_text() == text


def test_cloud_config_is_merged_with_keys() -> None:
    text = f"#cloud-config\npackages:\n  - htop\nssh_authorized_keys:\n  - {KEY2}\n"
    merged = seed(user_data=text, ssh_authorized_keys=(KEY1, KEY2)).user_data_text()
    assert merged.startswith("#cloud-config\n")
    # the user's keys first, ours after, none twice
    assert yaml.safe_load(merged) == {"packages": ["htop"], "ssh_authorized_keys": [KEY2, KEY1]}
    assert merged == f"#cloud-config\npackages:\n- htop\nssh_authorized_keys:\n- {KEY2}\n- {KEY1}\n"


def test_cloud_config_without_its_own_keys_gets_ours() -> None:
    s = seed(user_data="#cloud-config\nhostname: x\n", ssh_authorized_keys=(KEY1,))
    merged = s.user_data_text()
    assert merged == f"#cloud-config\nhostname: x\nssh_authorized_keys:\n- {KEY1}\n"


def test_empty_cloud_config_with_keys() -> None:
    merged = seed(user_data="#cloud-config\n", ssh_authorized_keys=(KEY1,)).user_data_text()
    assert merged == f"#cloud-config\nssh_authorized_keys:\n- {KEY1}\n"


def test_cloud_config_that_is_not_a_mapping_is_kept() -> None:
    text = "#cloud-config\n- just\n- a list\n"
    assert seed(user_data=text, ssh_authorized_keys=(KEY1,)).user_data_text() == text


def test_cloud_config_with_a_single_key_string() -> None:
    text = f"#cloud-config\nssh_authorized_keys: {KEY2}\n"
    merged = seed(user_data=text, ssh_authorized_keys=(KEY1,)).user_data_text()
    assert yaml.safe_load(merged)["ssh_authorized_keys"] == [KEY2, KEY1]


def test_invalid_cloud_config_never_leaks_into_an_error() -> None:
    text = "#cloud-config\npassword: hunter2: oops\n"
    try:
        seed(user_data=text, ssh_authorized_keys=(KEY1,)).user_data_text()
    except Exception as exc:  # noqa: BLE001 - any error is fine if it hides the secret
        assert "hunter2" not in str(exc)
        assert not isinstance(exc, yaml.YAMLError)


# --- the ISO ---------------------------------------------------------------------------

FULL = seed(
    nics=(STATIC, NicSeed(MAC1)),
    user_data="#cloud-config\nruncmd:\n  - [touch, /tmp/seeded]\n",
    ssh_authorized_keys=(KEY1,),
)


def test_iso_opens_with_label_cidata_and_the_three_files() -> None:
    data = build_iso(FULL)
    assert data[0x8001:0x8006] == b"CD001"  # the primary volume descriptor
    iso = open_iso(data)
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        assert read_rr(iso, "meta-data") == FULL.meta_data()
        assert read_rr(iso, "network-config") == FULL.network_config()
        assert read_rr(iso, "user-data") == FULL.user_data_text()
        names = sorted(c.rock_ridge.name() for c in iso.list_children(rr_path="/")
                       if c.rock_ridge is not None and not c.is_dot() and not c.is_dotdot())
        assert names == [b"meta-data", b"network-config", b"user-data"]
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path="/user-data")
        assert out.getvalue().decode() == FULL.user_data_text()
    finally:
        iso.close()


def test_iso_contents_exactly() -> None:
    iso = open_iso(build_iso(seed(ssh_authorized_keys=(KEY1,))))
    try:
        assert read_rr(iso, "meta-data") == "instance-id: iid-0001\nlocal-hostname: web-1\n"
        assert read_rr(iso, "user-data") == f"#cloud-config\nssh_authorized_keys:\n- {KEY1}\n"
        assert read_rr(iso, "network-config") == "version: 2\nethernets:\n"
    finally:
        iso.close()


def test_equal_seeds_build_equal_isos_and_different_ones_differ() -> None:
    a = build_iso(FULL)
    assert _same_files(build_iso(dataclasses.replace(FULL)), a)
    assert not _same_files(build_iso(seed(hostname="web-2")), a)


def _same_files(x: bytes, y: bytes) -> bool:
    def files(data: bytes) -> dict[str, str]:
        iso = open_iso(data)
        try:
            return {n: read_rr(iso, n) for n in ("meta-data", "network-config", "user-data")}
        finally:
            iso.close()

    return files(x) == files(y)


def test_utf8_user_data_survives() -> None:
    s = seed(user_data="#!/bin/sh\necho 'grüße ✓'\n")
    iso = open_iso(build_iso(s))
    try:
        assert read_rr(iso, "user-data") == "#!/bin/sh\necho 'grüße ✓'\n"
    finally:
        iso.close()


# --- write_seed_iso --------------------------------------------------------------------


def test_write_seed_iso_mode_0600_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(path, FULL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]
    assert _same_files(path.read_bytes(), build_iso(FULL))


def test_write_seed_iso_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write_seed_iso(path, seed(hostname="new-host"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    iso = open_iso(path.read_bytes())
    try:
        assert "local-hostname: new-host\n" in read_rr(iso, "meta-data")
    finally:
        iso.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]


def test_write_seed_iso_cleans_up_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    def fail(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        write_seed_iso(tmp_path / "seed.iso", FULL)
    assert list(tmp_path.iterdir()) == []


def test_seed_json_is_stable_and_names_every_input() -> None:
    data = json.loads(FULL.to_json())
    assert FULL.to_json() == dataclasses.replace(FULL).to_json()
    assert FULL.to_json() != dataclasses.replace(FULL, user_data="other").to_json()
    assert data["instance_id"] == "iid-0001" and data["hostname"] == "web-1"
    assert data["nics"][0] == {"mac": MAC0, "address": "10.10.1.5/24", "gateway": "10.10.1.1",
                               "mtu": 1450, "dns": ["10.10.1.2", "1.1.1.1"]}
    assert data["ssh_authorized_keys"] == [KEY1]
    assert json.loads(seed(user_data="x").to_json())["user_data"] == "x"
