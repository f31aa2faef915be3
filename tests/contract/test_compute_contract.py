"""One suite, two drivers: Image and Instance on the memory driver and on libvirt.

Each case acts through the driver and asserts on what `observe` reads back afterwards,
so the fake and the real driver are held to the same behaviour. The integration tests
check the real host with virsh and from inside the guest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reconciler.errors import Conflict, PermanentError
from reconciler.models import Key, UpdatePolicy
from reconciler.state import FieldDiff, Observed, Target

from .conftest import target


def observed(driver: Any, key: Key) -> list[Observed]:
    return [o for o in driver.observe().owned if o.key == key]


def only(driver: Any, key: Key) -> Observed:
    found = observed(driver, key)
    assert len(found) == 1, found
    return found[0]


def with_related(h: Any, t: Target, *related: Observed | None) -> Target:
    return dataclasses.replace(t, related=h.related(*related))


def diffs(old: Observed, new: Target) -> list[FieldDiff]:
    out = []
    for name in sorted(set(old.spec) | set(new.spec)):
        if old.spec.get(name) != new.spec.get(name):
            out.append(FieldDiff((name,), old.spec.get(name), new.spec.get(name), UpdatePolicy.RESTART))
    return out


def make_image(h: Any) -> Observed:
    t = target("Image", h.tenant, "tiny", source=h.image_source)
    return h.driver.create(t)


def instance(h: Any, name: str = "vm", **fields: Any) -> Target:
    fields.setdefault("image", "tiny")
    fields.setdefault("memoryMiB", 128)
    fields.setdefault("rootDiskGiB", 1)
    fields.setdefault("powerState", "stopped")
    return target("Instance", h.tenant, name, **fields)


# --- images ---------------------------------------------------------------------------


def test_image_create_observe_delete(harness: Any) -> None:
    t = target("Image", harness.tenant, "tiny", source=harness.image_source)
    created = harness.driver.create(t)
    seen = only(harness.driver, t.key)
    assert seen.spec == t.spec == created.spec
    assert seen.mark.spec_hash == t.mark.spec_hash and not seen.mark.orphaned
    harness.driver.delete(seen)
    assert observed(harness.driver, t.key) == []


@pytest.mark.parametrize("harness", ["libvirt"], indirect=True)  # the fake reads no files
def test_image_checksum_mismatch_is_refused(harness: Any) -> None:
    t = target("Image", harness.tenant, "tiny", source=harness.image_source, sha256="0" * 64)
    with pytest.raises(PermanentError, match="checksum"):
        harness.driver.create(t)
    assert observed(harness.driver, t.key) == []


# --- instances ------------------------------------------------------------------------


def test_instance_create_and_observe(harness: Any) -> None:
    image = make_image(harness)
    net = harness.network(harness.tenant, "net")
    t = with_related(harness, instance(harness, networks=[{"network": "net"}], userData="#!/bin/sh\ntrue\n"),
                     image, net)
    created = harness.driver.create(t)
    seen = only(harness.driver, t.key)
    assert dict(seen.spec) == dict(t.spec) == dict(created.spec)
    assert seen.mark.applied == t.mark.applied  # userData restored from its private copy
    assert seen.mark.spec_hash == t.mark.spec_hash


@pytest.mark.parametrize(
    "field,value",
    [
        ("vcpus", 2),
        ("memoryMiB", 192),
        ("rootDiskGiB", 2),
        ("restartPolicy", "Allowed"),
        ("userData", "#!/bin/sh\necho changed\n"),
        ("sshAuthorizedKeys", ["ssh-ed25519 AAAAC3Nza test@example"]),
        ("networks", [{"network": "net"}, {"network": "other", "ip": "10.252.0.20"}]),
    ],
)
def test_instance_update_each_field(harness: Any, field: str, value: Any) -> None:
    image = make_image(harness)
    net = harness.network(harness.tenant, "net")
    other = harness.network(harness.tenant, "other")
    old_t = with_related(harness, instance(harness, networks=[{"network": "net"}]), image, net, other)
    harness.driver.create(old_t)
    before = only(harness.driver, old_t.key)
    fields = {**old_t.mark.applied, field: value}
    new_t = with_related(harness, instance(harness, **fields), image, net, other)
    after = harness.driver.update(new_t, before, diffs(before, new_t))
    seen = only(harness.driver, new_t.key)
    assert dict(seen.spec) == dict(new_t.spec) == dict(after.spec)
    assert seen.spec[field] != before.spec[field]
    assert seen.mark.spec_hash == new_t.mark.spec_hash


def test_instance_power_on_and_off(harness: Any) -> None:
    image = make_image(harness)
    net = harness.network(harness.tenant, "net")
    stopped = with_related(harness, instance(harness, networks=[{"network": "net"}]), image, net)
    harness.driver.create(stopped)
    assert only(harness.driver, stopped.key).spec["powerState"] == "stopped"
    running = with_related(harness, instance(harness, networks=[{"network": "net"}], powerState="running"),
                           image, net)
    before = only(harness.driver, stopped.key)
    harness.driver.update(running, before, diffs(before, running))
    assert only(harness.driver, running.key).spec["powerState"] == "running"
    before = only(harness.driver, running.key)
    harness.driver.update(stopped, before, diffs(before, stopped))
    assert only(harness.driver, stopped.key).spec["powerState"] == "stopped"


@pytest.mark.parametrize("power", ["stopped", "running"])
def test_instance_attach_and_detach_volume(harness: Any, power: str) -> None:
    image = make_image(harness)
    vol = harness.volume(harness.tenant, "data")
    plain = with_related(harness, instance(harness, powerState=power), image, vol)
    harness.driver.create(plain)
    attached = with_related(harness, instance(harness, powerState=power, volumes=[{"volume": "data"}]),
                            image, vol)
    before = only(harness.driver, plain.key)
    harness.driver.update(attached, before, diffs(before, attached))
    seen = only(harness.driver, attached.key)
    assert seen.spec["volumes"] == [{"volume": "data", "device": None}]
    harness.driver.update(plain, seen, diffs(seen, plain))
    assert only(harness.driver, plain.key).spec["volumes"] == []


def test_instance_delete_leaves_the_image(harness: Any) -> None:
    image = make_image(harness)
    t = with_related(harness, instance(harness, powerState="running"), image)
    harness.driver.create(t)
    harness.driver.delete(only(harness.driver, t.key))
    assert observed(harness.driver, t.key) == []
    assert len(observed(harness.driver, image.key)) == 1


def test_instance_delete_is_idempotent(harness: Any) -> None:
    image = make_image(harness)
    t = with_related(harness, instance(harness), image)
    harness.driver.create(t)
    obs = only(harness.driver, t.key)
    harness.driver.delete(obs)
    harness.driver.delete(obs)  # already gone: no error
    assert observed(harness.driver, t.key) == []


def test_unowned_object_in_the_way_is_a_conflict(harness: Any) -> None:
    image = make_image(harness)
    t = with_related(harness, instance(harness), image)
    name = harness.unowned(t.key)
    seen = harness.driver.observe()
    assert any(u.kind == "Instance" and u.host_name == name for u in seen.unowned)
    with pytest.raises(Conflict):
        harness.driver.create(t)
    seen = harness.driver.observe()
    assert any(u.host_name == name for u in seen.unowned)  # still there, still not ours
    assert observed(harness.driver, t.key) == []


def test_adoption_marks_without_changing(harness: Any) -> None:
    image = make_image(harness)
    t = with_related(harness, instance(harness), image)
    name = harness.unowned(t.key)
    adopted = harness.driver.adopt(name, t)
    seen = only(harness.driver, t.key)
    assert seen.mark.spec_hash == t.mark.spec_hash and adopted.key == t.key
    assert not any(u.host_name == name for u in harness.driver.observe().unowned)
    with pytest.raises(Conflict):
        harness.driver.adopt(name, t)  # already ours


def test_orphan_flags_the_mark(harness: Any) -> None:
    image = make_image(harness)
    t = with_related(harness, instance(harness), image)
    harness.driver.create(t)
    harness.driver.orphan(only(harness.driver, t.key))
    assert only(harness.driver, t.key).mark.orphaned


@pytest.mark.parametrize("harness", ["libvirt"], indirect=True)  # one state dir per fake
def test_a_marked_domain_of_another_installation_is_not_ours(harness: Any) -> None:
    from reconciler.drivers.libvirt import LibvirtDriver

    image = make_image(harness)
    t = with_related(harness, instance(harness), image)
    harness.driver.create(t)
    other = LibvirtDriver(dataclasses.replace(harness.driver.settings,
                                              instance_dir=harness.root / "elsewhere"))
    seen = other.observe()
    assert not [o for o in seen.owned if o.key == t.key]
    name = harness.driver.host_name(t.key)
    assert any(u.host_name == name and "another reconciler installation" in u.detail for u in seen.unowned)
    with pytest.raises(Conflict, match="another reconciler installation"):
        other.create(t)
    with pytest.raises(Conflict):
        other.delete(only(harness.driver, t.key))
    assert len(observed(harness.driver, t.key)) == 1  # still there, still the first one's
