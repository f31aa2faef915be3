"""The netlink driver's names, marks and rule comments: pure, no kernel."""

from __future__ import annotations

import re

import pytest

from reconciler.drivers.netlink import _names
from reconciler.errors import PermanentError
from reconciler.models import Key
from reconciler.naming import host_name, short_hash

NET = Key("Network", "acme", "web")
EXT = Key("Network", "provider", "public")
ROUTER = Key("Router", "acme", "r1")
GROUP = Key("SecurityGroup", "acme", "ssh")


def test_every_device_name_fits_in_15_characters() -> None:
    bridge = _names.bridge(NET)
    names = [
        bridge,
        _names.vxlan_device(bridge),
        _names.vlan_device(bridge),
        *_names.dhcp_legs(bridge, "10.0.0.0/24"),
        *_names.router_leg(ROUTER, NET),
        *_names.gateway_leg(ROUTER, EXT),
    ]
    for name in names:
        assert len(name) <= 15 and re.fullmatch(r"[a-z0-9-]+", name), name


def test_names_share_the_network_hash_and_say_what_they_are() -> None:
    bridge = _names.bridge(NET)
    h = bridge[3:]
    assert bridge == host_name(NET) == "rc-" + short_hash("Network", "acme", "web")
    assert _names.vxlan_device(bridge) == "rv-" + h
    assert _names.vlan_device(bridge) == "rl-" + h
    assert _names.dhcp_namespace(bridge) == "rc-dhcp-" + h
    assert _names.network_chains(bridge) == ("in-" + h, "out-" + h, "spoof-" + h)
    host, inside = _names.dhcp_legs(bridge, "10.0.0.0/24")
    assert host[3:] == inside[2:] and host.startswith("rd-") and inside.startswith("d-")
    assert _names.dhcp_legs(bridge, "10.0.1.0/24") != (host, inside)  # one leg per subnet


def test_router_and_group_names() -> None:
    assert _names.router_namespace(ROUTER) == host_name(ROUTER)
    host, inside = _names.router_leg(ROUTER, NET)
    assert host == "rr-" + short_hash(str(ROUTER), str(NET)) and inside == "qr-" + host[3:]
    host, inside = _names.gateway_leg(ROUTER, EXT)
    assert host.startswith("rg-") and inside == "qg-" + host[3:]
    prefix = _names.group_prefix(GROUP)
    assert prefix == host_name(GROUP, prefix="sg-")
    assert _names.group_chains(GROUP) == (prefix + "-in", prefix + "-out")
    assert _names.port_chains("rt-0123456789") == ("pi-0123456789", "po-0123456789")
    assert _names.table("0a1b2c3d") == "reconciler_0a1b2c3d"


def test_dhcp_folder_of_a_cidr() -> None:
    assert _names.dhcp_dir_name("10.0.0.0/24") == "10.0.0.0_24"


@pytest.mark.parametrize("bad", ["", "eth0; rm", "a" * 16, "UPPER", "-x", "br 0", "x\n"])
def test_names_that_are_not_ours_never_reach_the_kernel(bad: str) -> None:
    with pytest.raises(PermanentError):
        _names.check_ifname(bad)


def test_uplinks_may_be_any_interface_name() -> None:
    for name in ("eth1", "enp1s0", "bond0.5", "br_ext"):
        assert _names.check_uplink(name) == name
    with pytest.raises(PermanentError):
        _names.check_uplink("eth1 up")


@pytest.mark.parametrize("bad", ["ab", "0123456g", "0A1B2C3D"])
def test_home_is_8_hex_digits(bad: str) -> None:
    with pytest.raises(PermanentError):
        _names.check_home(bad)


def test_alias_mark_round_trips() -> None:
    text = _names.format_alias("0a1b2c3d", NET, "f" * 32)
    assert text == f"reconciler:v1 home=0a1b2c3d key=Network/acme/web hash={'f' * 32}"
    assert len(text.encode()) <= 256
    mark = _names.parse_alias(text)
    assert mark == _names.AliasMark("0a1b2c3d", NET, "f" * 32)
    assert mark is not None and mark.format() == text


@pytest.mark.parametrize("alias", [None, "", "my bridge", "reconciler:v2 home=0a1b2c3d key=Network/a/b hash=x",
                                   "reconciler:v1 home=zz key=Network/a/b hash=x",
                                   "reconciler:v1 home=0a1b2c3d key=Network/a hash=x"])
def test_an_alias_that_is_not_our_mark_is_none(alias: str | None) -> None:
    assert _names.parse_alias(alias) is None


def test_rule_comments_name_the_owner_and_digest_the_content() -> None:
    expr = [{"accept": None}]
    comment = _names.rule_comment("0123456789", "in-x", expr)
    assert re.fullmatch(r"rc:0123456789:[0-9a-f]{8}", comment)
    assert _names.comment_owner(comment) == "0123456789"
    assert _names.rule_comment("0123456789", "in-x", [{"drop": None}]) != comment
    assert _names.rule_comment("0123456789", "out-x", expr) != comment  # the chain counts too
    assert _names.comment_owner("someone's rule") is None
    assert _names.comment_owner(None) is None


def test_host_names_for_dns() -> None:
    assert _names.dns_label("web-1") == "web-1"
    assert _names.dns_label("web-") == ""  # a valid instance name, not a DNS label
    assert _names.check_hostname("web-") == "web-"
    with pytest.raises(PermanentError):
        _names.check_hostname("web,1")
