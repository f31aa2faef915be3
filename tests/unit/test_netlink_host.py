"""The netlink driver's kernel boundary and host checks that need no root: error
translation, VLAN support detection, and what `plan` is told up front."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings, _host
from reconciler.errors import Conflict, NotFound, PermanentError, TransientError

NetlinkError = _host.NetlinkError  # pyroute2's, as the boundary sees it


@pytest.mark.parametrize("code,kind", [
    (errno.EEXIST, Conflict),
    (errno.ENODEV, NotFound),
    (errno.ENOENT, NotFound),
    (errno.EBUSY, TransientError),
    (errno.EAGAIN, TransientError),
    (errno.ENOBUFS, TransientError),
    (errno.EPERM, PermanentError),
    (errno.EOPNOTSUPP, PermanentError),
])
def test_netlink_errors_become_ours(code: int, kind: type) -> None:
    err = _host.translate(NetlinkError(code), "creating bridge rc-x")
    assert type(err) is kind
    assert str(err).startswith("creating bridge rc-x: ")


def test_permission_errors_say_to_run_as_root() -> None:
    assert "run as root" in str(_host.translate(NetlinkError(errno.EPERM), "x"))
    assert "run as root" in str(_host.translate(PermissionError(errno.EACCES, "denied"), "x"))


def test_translated_reraises_as_ours() -> None:
    with pytest.raises(NotFound, match="deleting rc-x"):
        with _host.translated("deleting rc-x"):
            raise NetlinkError(errno.ENODEV)
    with pytest.raises(ValueError):  # not a kernel error: untouched
        with _host.translated("x"):
            raise ValueError("bug")


def test_vlan_support_is_found_without_loading_anything(tmp_path: Path) -> None:
    proc = tmp_path / "proc"  # a /proc without net/vlan: 8021q is not loaded
    (proc / "net").mkdir(parents=True)
    release = tmp_path / "6.1.0-test"
    release.mkdir()
    assert not _host.has_8021q("6.1.0-test", tmp_path, proc)
    (release / "modules.builtin").write_text("kernel/net/bridge/bridge.ko\nkernel/net/8021q/8021q.ko\n")
    assert _host.has_8021q("6.1.0-test", tmp_path, proc)
    (release / "modules.builtin").write_text("kernel/net/bridge/bridge.ko\n")
    module = release / "kernel/net/8021q/8021q.ko.xz"
    module.parent.mkdir(parents=True)
    module.write_bytes(b"")
    assert _host.has_8021q("6.1.0-test", tmp_path, proc)
    module.unlink()
    (proc / "net" / "vlan").mkdir()  # loaded (or built in): /proc/net/vlan exists
    assert _host.has_8021q("6.1.0-test", tmp_path, proc)


def test_first_lines() -> None:
    assert _host.first_lines("a\n\nb\nc\nd\ne\n") == "a | b | c | d"
    assert _host.first_lines("") == "(no message)"


def test_in_namespace_is_an_argument_list() -> None:
    assert _host.in_namespace(None, ["nft", "-j"]) == ["nft", "-j"]
    assert _host.in_namespace("rc-0123456789", ["nft"]) == ["ip", "netns", "exec", "rc-0123456789", "nft"]
    with pytest.raises(PermanentError):
        _host.in_namespace("x; reboot", ["nft"])


# --- what plan is told ------------------------------------------------------------------


def driver(tmp_path: Path, vlan: bool, **settings: object) -> NetlinkDriver:
    d = NetlinkDriver(NetlinkSettings(state_dir=tmp_path, home="0a1b2c3d", **settings))  # type: ignore[arg-type]
    d._vlan = vlan
    return d


def test_vlan_without_8021q_is_a_problem_of_its_type_field(tmp_path: Path) -> None:
    d = driver(tmp_path, vlan=False, uplinks={"acme/v": "lo"})
    assert d.problems("Network", "acme", "v", {"type": "vlan", "vlanId": 5}) == [
        (("type",), "type vlan needs VLAN (8021q) support, which this host's kernel lacks; use vxlan or flat")]
    assert d.problems("Network", "acme", "x", {"type": "vxlan"}) == []
    assert d.problems("Router", "acme", "r", {}) == []


def test_vlan_without_an_uplink_is_a_problem(tmp_path: Path) -> None:
    d = driver(tmp_path, vlan=True)
    ((path, message),) = d.problems("Network", "acme", "v", {"type": "vlan"})
    assert path == ("type",) and 'netlink.uplinks["acme/v"]' in message


def test_a_missing_uplink_is_a_problem(tmp_path: Path) -> None:
    d = driver(tmp_path, vlan=True, uplinks={"acme/f": "nosuchdev0"})
    ((path, message),) = d.problems("Network", "acme", "f", {"type": "flat"})
    assert "nosuchdev0" in message


def test_describe(tmp_path: Path) -> None:
    facts = driver(tmp_path, vlan=False).describe()
    assert facts["table"] == "inet reconciler_0a1b2c3d"
    assert facts["vlan"] == "unavailable (no 8021q in this kernel)"
    assert "dnsmasq" in facts["dnsmasq"]


def test_host_names_of_each_kind(tmp_path: Path) -> None:
    from reconciler.models import Key
    from reconciler.naming import host_name

    d = driver(tmp_path, vlan=False)
    assert d.host_name(Key("Network", "a", "n")) == host_name(Key("Network", "a", "n"))
    assert d.host_name(Key("Router", "a", "r")) == host_name(Key("Router", "a", "r"))
    assert d.host_name(Key("SecurityGroup", "a", "g")) == host_name(Key("SecurityGroup", "a", "g"), prefix="sg-")


def test_orphan_is_refused(tmp_path: Path) -> None:
    from reconciler.models import Key
    from reconciler.state import Mark, Observed

    key = Key("Network", "a", "n")
    with pytest.raises(PermanentError, match="never orphaned"):
        driver(tmp_path, vlan=False).orphan(Observed(key, "rc-x", {}, Mark(key, "h", {})))
