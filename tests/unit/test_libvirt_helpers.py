"""The libvirt driver's pure helpers: secret redaction, power states, device names."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest

from reconciler.drivers.libvirt._driver import (
    _static_address,
    MAX_ROOT_GIB,
    REDACTED,
    SENSITIVE_FIELDS,
    _is_redacted,
    _next_device,
    _power_state,
    _redact_mark,
    _redact_spec,
    _restore_mark,
    _unredact,
    _volume_serial,
)
from reconciler.drivers.libvirt._host import libvirt
from reconciler.errors import PermanentError, TransientError
from reconciler.models import Key
from reconciler.naming import host_name
from reconciler.state import Mark, Observed

SECRET = "#cloud-config\npassword: hunter2-secret\n"
HASH = "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
KEY = Key("Instance", "acme", "vm")


def mark(applied: dict) -> Mark:
    return Mark(KEY, "spec-hash-1", applied, depends_on=("Volume/acme/data",))


# --- redaction -------------------------------------------------------------------------


def test_user_data_is_the_only_sensitive_field() -> None:
    assert SENSITIVE_FIELDS == ("userData",)
    assert REDACTED == "sha256:"


def test_redact_spec_replaces_user_data_with_its_hash() -> None:
    spec = {"vcpus": 2, "userData": SECRET, "sshAuthorizedKeys": ["ssh-ed25519 AAAA"]}
    out = _redact_spec(dict(spec))
    assert out == {"vcpus": 2, "userData": HASH, "sshAuthorizedKeys": ["ssh-ed25519 AAAA"]}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", out["userData"])
    assert "hunter2" not in repr(out)


def test_redact_spec_leaves_specs_without_user_data_alone() -> None:
    assert _redact_spec({"vcpus": 1}) == {"vcpus": 1}
    assert _redact_spec({"userData": None}) == {"userData": None}


def test_an_already_redacted_value_is_not_hashed_twice() -> None:
    once = _redact_spec({"userData": SECRET})
    twice = _redact_spec(dict(once))
    assert twice == once == {"userData": HASH}


def test_a_value_that_only_looks_like_a_hash_prefix_is_hashed() -> None:
    short = "sha256:abc"  # not 64 hex digits: a real (odd) user-data
    out = _redact_spec({"userData": short})
    assert out["userData"] == "sha256:" + hashlib.sha256(short.encode()).hexdigest()


def test_redact_mark_hashes_applied_and_keeps_the_rest() -> None:
    m = mark({"vcpus": 2, "userData": SECRET})
    original = copy.deepcopy(m.to_dict())
    data = _redact_mark(m)
    assert data["applied"] == {"vcpus": 2, "userData": HASH}
    assert {k: v for k, v in data.items() if k != "applied"} == {
        k: v for k, v in original.items() if k != "applied"
    }
    assert m.applied["userData"] == SECRET  # the Mark itself is not changed
    assert "hunter2" not in repr(data)
    assert _redact_mark(Mark.from_dict(data)) == data  # already redacted: stays as it is


def test_restore_mark_gives_the_secret_back_when_the_sidecar_matches() -> None:
    stored = Mark.from_dict(_redact_mark(mark({"vcpus": 2, "userData": SECRET})))
    restored = _restore_mark(stored, {"userData": SECRET})
    assert restored.applied == {"vcpus": 2, "userData": SECRET}
    assert (restored.key, restored.spec_hash, restored.depends_on) == (KEY, "spec-hash-1",
                                                                      ("Volume/acme/data",))


@pytest.mark.parametrize(
    "seed", [None, {}, {"userData": None}, {"userData": "#cloud-config\nother\n"}]
)
def test_restore_mark_keeps_the_hash_otherwise(seed) -> None:
    stored = Mark.from_dict(_redact_mark(mark({"userData": SECRET})))
    assert _restore_mark(stored, seed).applied["userData"] == HASH


def test_restore_mark_without_a_redacted_field_is_the_same_mark() -> None:
    plain = mark({"vcpus": 1})
    assert _restore_mark(plain, {"userData": SECRET}) is plain


def test_unredact() -> None:
    assert _unredact(HASH, SECRET) == SECRET
    assert _unredact(HASH, SECRET + " ") == HASH
    assert _unredact(HASH, None) == HASH


def test_is_redacted() -> None:
    assert _is_redacted(HASH)
    assert not _is_redacted(SECRET)
    assert not _is_redacted("sha256:" + "0" * 63)
    assert not _is_redacted(None) and not _is_redacted(42)


# --- power states ----------------------------------------------------------------------

STATES = [
    ("VIR_DOMAIN_NOSTATE", "stopped"),
    ("VIR_DOMAIN_RUNNING", "running"),
    ("VIR_DOMAIN_BLOCKED", "running"),
    ("VIR_DOMAIN_PAUSED", "paused"),
    ("VIR_DOMAIN_SHUTDOWN", "stopped"),  # being shut down
    ("VIR_DOMAIN_SHUTOFF", "stopped"),
    ("VIR_DOMAIN_CRASHED", "stopped"),
    ("VIR_DOMAIN_PMSUSPENDED", "suspended"),
]


@pytest.mark.parametrize(("constant", "expected"), STATES, ids=[s[0] for s in STATES])
def test_power_state(constant: str, expected: str) -> None:
    assert _power_state(getattr(libvirt, constant)) == expected


def test_power_state_values_are_libvirts() -> None:
    # the stable ABI values (virDomainState): the mapping holds for the raw numbers too
    assert [getattr(libvirt, c) for c, _ in STATES] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [_power_state(i) for i in range(8)] == [e for _, e in STATES]


def test_an_unknown_state_is_stopped() -> None:
    assert _power_state(99) == "stopped"
    assert _power_state(-1) == "stopped"


# --- device names ----------------------------------------------------------------------


def test_next_device_is_the_first_free_after_vda() -> None:
    assert _next_device(set()) == "vdb"
    assert _next_device({"vda"}) == "vdb"
    assert _next_device({"vda", "vdb", "vdc"}) == "vdd"


def test_next_device_fills_gaps() -> None:
    assert _next_device({"vda", "vdb", "vdd"}) == "vdc"
    assert _next_device({"vda", "vdc"}) == "vdb"


def test_next_device_ignores_other_names() -> None:
    assert _next_device({"hdc", "sda", "vdaa"}) == "vdb"


def test_next_device_gives_vdz_last() -> None:
    used = {f"vd{c}" for c in "abcdefghijklmnopqrstuvwxy"}
    assert _next_device(used) == "vdz"


def test_next_device_raises_when_vdb_to_vdz_are_used() -> None:
    used = {f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz"}
    with pytest.raises(PermanentError, match="vdb..vdz"):
        _next_device(used)
    with pytest.raises(PermanentError):
        _next_device(used | {"vda"})


# --- small constants and names ---------------------------------------------------------


def test_volume_serial_is_the_volume_host_name_and_fits_virtio() -> None:
    serial = _volume_serial("acme", "data")
    assert serial == host_name(Key("Volume", "acme", "data"))
    assert len(serial) <= 20  # virtio-blk serials are at most 20 bytes
    assert serial != _volume_serial("acme", "logs") != _volume_serial("other", "data")


def test_max_root_disk_matches_the_model_limit() -> None:
    from reconciler.models.instance import InstanceSpec

    meta = InstanceSpec.model_fields["rootDiskGiB"].metadata
    le = [m.le for m in meta if hasattr(m, "le")]
    assert le == [MAX_ROOT_GIB]


# --- a fixed IP as the guest configures it ---------------------------------------------



def _network(tenant: str, name: str, subnets: list[dict[str, object]]) -> Observed:
    key = Key("Network", tenant, name)
    return Observed(key, "rc-x", {"type": "flat", "subnets": subnets}, Mark(key, "h", {}), {})


def test_static_address_takes_prefix_gateway_and_dns_of_its_subnet() -> None:
    net = _network("acme", "web", [{"cidr": "10.0.0.0/24"},
                                   {"cidr": "10.1.0.0/16", "gateway": "10.1.0.254", "dnsServers": ["10.1.0.53"]}])
    key = Key("Instance", "acme", "vm")
    address, gateway, dns, dhcp = _static_address(key, 0, {"network": "web", "ip": "10.1.2.3"}, {net.key: net})
    assert (str(address), str(gateway), [str(d) for d in dns]) == ("10.1.2.3/16", "10.1.0.254", ["10.1.0.53"])
    assert dhcp is True  # the subnets serve DHCP by default
    address, gateway, dns, dhcp = _static_address(key, 0, {"network": "web", "ip": "10.0.0.9"}, {net.key: net})
    assert (str(address), str(gateway), dns) == ("10.0.0.9/24", "10.0.0.1", ())


def test_static_address_outside_every_subnet_names_the_field() -> None:
    net = _network("acme", "web", [{"cidr": "10.0.0.0/24"}])
    key = Key("Instance", "acme", "vm")
    with pytest.raises(PermanentError, match=r"Instance acme/vm: spec.networks\[1\].ip 192.0.2.1 is in no subnet"):
        _static_address(key, 1, {"network": "web", "ip": "192.0.2.1"}, {net.key: net})
    with pytest.raises(TransientError, match="network acme/other is not on this host"):
        _static_address(key, 0, {"network": "other", "ip": "10.0.0.5"}, {net.key: net})
