"""The in-memory driver: JSON files with the ownership mark, behaving like a real driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.drivers.base import Driver
from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import Conflict, NotFound, PermanentError
from reconciler.models import Key, UpdatePolicy
from reconciler.naming import host_name
from reconciler.state import FieldDiff, Mark, Observed, Target

NET = Key("Network", "acme", "web")
OTHER = Key("Network", "acme", "db")


def target(key: Key = NET, cidr: str = "10.10.1.0/24", spec_hash: str = "h1") -> Target:
    spec = {"type": "vxlan", "vni": 4242, "subnets": [{"cidr": cidr}]}
    return Target(key, spec, Mark(key, spec_hash, {"subnets": [{"cidr": cidr}]}))


def path_of(driver: MemoryDriver, obs: Observed) -> Path:
    return driver.root / obs.key.kind / f"{obs.identity}.json"


def owned(driver: MemoryDriver, key: Key = NET) -> list[Observed]:
    return [o for o in driver.observe().owned if o.key == key]


def test_it_follows_the_driver_protocol(memory_driver: MemoryDriver) -> None:
    assert isinstance(memory_driver, Driver)
    assert memory_driver.name == "memory"
    assert "Network" in memory_driver.kinds and memory_driver.max_parallel >= 1
    assert memory_driver.host_name(NET) == host_name(NET)


def test_observe_on_an_empty_host(memory_driver: MemoryDriver) -> None:
    obs = memory_driver.observe()
    assert obs.owned == [] and obs.unowned == []


def test_create_then_observe_round_trip(memory_driver: MemoryDriver) -> None:
    t = target()
    created = memory_driver.create(t)

    assert created.key == NET
    assert created.identity == host_name(NET)
    assert dict(created.spec) == dict(t.spec)
    assert created.mark == t.mark
    assert created.host == {"bridge": host_name(NET), "driver": "memory"}

    (seen,) = memory_driver.observe().owned
    assert seen.key == NET and seen.identity == created.identity
    assert dict(seen.spec) == dict(t.spec)
    assert seen.mark == t.mark and not seen.mark.orphaned
    assert dict(seen.host) == created.host
    assert seen.fingerprint() == created.fingerprint()


def test_update_round_trip(memory_driver: MemoryDriver) -> None:
    created = memory_driver.create(target())
    new = target(cidr="10.10.1.0/25", spec_hash="h2")
    diffs = [FieldDiff(("subnets", 0, "cidr"), "10.10.1.0/24", "10.10.1.0/25", UpdatePolicy.REPLACE)]

    updated = memory_driver.update(new, created, diffs)

    assert updated.identity == created.identity
    assert dict(updated.spec) == dict(new.spec) and updated.mark == new.mark
    (seen,) = memory_driver.observe().owned
    assert dict(seen.spec) == dict(new.spec)
    assert seen.mark.spec_hash == "h2"
    assert seen.fingerprint() != created.fingerprint()


def test_delete_round_trip_and_idempotence(memory_driver: MemoryDriver) -> None:
    created = memory_driver.create(target())
    keep = memory_driver.create(target(OTHER))

    memory_driver.delete(created)
    assert [o.key for o in memory_driver.observe().owned] == [OTHER]
    assert not path_of(memory_driver, created).exists()

    memory_driver.delete(created)  # already gone: not an error
    assert [o.identity for o in memory_driver.observe().owned] == [keep.identity]


def test_delete_of_something_never_created_is_fine(memory_driver: MemoryDriver) -> None:
    ghost = Observed(NET, host_name(NET), {}, target().mark)
    memory_driver.delete(ghost)
    assert memory_driver.observe().owned == []


def test_orphan_round_trip_keeps_object_and_spec(memory_driver: MemoryDriver) -> None:
    created = memory_driver.create(target())

    orphaned = memory_driver.orphan(created)

    assert orphaned.mark.orphaned
    assert orphaned.mark.key == NET and orphaned.mark.spec_hash == created.mark.spec_hash
    assert dict(orphaned.mark.applied) == dict(created.mark.applied)
    (seen,) = memory_driver.observe().owned
    assert seen.mark.orphaned and seen.identity == created.identity
    assert dict(seen.spec) == dict(created.spec)
    # orphaning twice keeps it orphaned
    memory_driver.orphan(seen)
    assert memory_driver.observe().owned[0].mark.orphaned


def test_update_and_orphan_of_a_vanished_object_raise_not_found(memory_driver: MemoryDriver) -> None:
    created = memory_driver.create(target())
    path_of(memory_driver, created).unlink()

    with pytest.raises(NotFound):
        memory_driver.update(target(spec_hash="h2"), created, [])
    with pytest.raises(NotFound):
        memory_driver.orphan(created)
    assert issubclass(NotFound, PermanentError)
    assert memory_driver.observe().owned == []


# --- objects that are not ours ---------------------------------------------------------------


def write_unmarked(driver: MemoryDriver, key: Key, suffix: str = "") -> Path:
    folder = driver.root / key.kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{host_name(key)}{suffix}.json"
    path.write_text(json.dumps({"spec": {"type": "flat"}, "host": {"bridge": "made by hand"}}))
    return path


def test_unmarked_file_in_the_way_is_unowned_and_create_conflicts(memory_driver: MemoryDriver) -> None:
    path = write_unmarked(memory_driver, NET)
    before = path.read_bytes()

    obs = memory_driver.observe()
    assert obs.owned == []
    (unowned,) = obs.unowned
    assert unowned.kind == "Network"
    assert unowned.host_name == host_name(NET) == memory_driver.host_name(NET)
    assert "no ownership mark" in unowned.detail

    with pytest.raises(Conflict):
        memory_driver.create(target())
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_unreadable_file_is_unowned(memory_driver: MemoryDriver) -> None:
    folder = memory_driver.root / "Network"
    folder.mkdir(parents=True)
    (folder / f"{host_name(NET)}.json").write_text("{not json")

    obs = memory_driver.observe()
    assert obs.owned == []
    assert [(u.kind, u.host_name) for u in obs.unowned] == [("Network", host_name(NET))]
    with pytest.raises(PermanentError):
        memory_driver.create(target())


@pytest.mark.parametrize(
    "replacement",
    [
        pytest.param({"spec": {"type": "flat"}}, id="mark removed"),
        pytest.param({"mark": Mark(OTHER, "x", {}).to_dict(), "spec": {}}, id="another resource's mark"),
        pytest.param({"mark": {"owner": "someone else"}, "spec": {}}, id="foreign mark"),
    ],
)
def test_delete_update_orphan_refuse_a_file_that_is_not_ours(
    memory_driver: MemoryDriver, replacement: dict,
) -> None:
    created = memory_driver.create(target())
    path = path_of(memory_driver, created)
    path.write_text(json.dumps(replacement))
    before = path.read_bytes()

    with pytest.raises(Conflict):
        memory_driver.delete(created)
    with pytest.raises(Conflict):
        memory_driver.update(target(spec_hash="h2"), created, [])
    with pytest.raises(Conflict):
        memory_driver.orphan(created)
    assert path.read_bytes() == before


def test_create_refuses_a_file_of_another_resource_under_its_name(memory_driver: MemoryDriver) -> None:
    folder = memory_driver.root / "Network"
    folder.mkdir(parents=True)
    path = folder / f"{host_name(NET)}.json"
    path.write_text(json.dumps({"mark": Mark(OTHER, "x", {}).to_dict(), "spec": {}}))

    with pytest.raises(Conflict):
        memory_driver.create(target())
    assert [o.key for o in memory_driver.observe().owned] == [OTHER]


def test_create_refuses_a_file_with_a_foreign_mark_under_its_name(memory_driver: MemoryDriver) -> None:
    folder = memory_driver.root / "Network"
    folder.mkdir(parents=True)
    path = folder / f"{host_name(NET)}.json"
    path.write_text(json.dumps({"mark": {"owner": "another tool"}, "spec": {}}))

    with pytest.raises(Conflict):
        memory_driver.create(target())
    assert sorted(p.name for p in folder.iterdir()) == [path.name]
    assert [(u.kind, u.host_name) for u in memory_driver.observe().unowned] == [("Network", host_name(NET))]


def test_bad_identity_is_refused(memory_driver: MemoryDriver) -> None:
    memory_driver.create(target())
    for identity in ("../../../etc/passwd", ".hidden", "a/b"):
        sneaky = Observed(NET, identity, {}, target().mark)
        with pytest.raises(PermanentError):
            memory_driver.delete(sneaky)
    assert len(memory_driver.observe().owned) == 1


# --- create before destroy ---------------------------------------------------------------------


def test_create_for_a_key_that_has_an_object_makes_a_second_one(memory_driver: MemoryDriver) -> None:
    old = memory_driver.create(target())
    new = memory_driver.create(target(cidr="10.10.9.0/24", spec_hash="h2"))

    assert new.identity != old.identity
    assert new.host == old.host  # same host name, another object
    found = {o.identity: o for o in owned(memory_driver)}
    assert set(found) == {old.identity, new.identity}
    assert found[old.identity].mark.spec_hash == "h1"
    assert found[new.identity].mark.spec_hash == "h2"

    # a third one while both exist gets yet another identity
    third = memory_driver.create(target(spec_hash="h3"))
    assert third.identity not in (old.identity, new.identity)

    # deleting the old one leaves exactly the others, untouched
    memory_driver.delete(old)
    assert {o.identity for o in owned(memory_driver)} == {new.identity, third.identity}
    assert dict(owned(memory_driver)[0].spec) in (dict(new.spec), dict(third.spec))


def test_kinds_limit_what_is_observed(state_dir: Path) -> None:
    root = state_dir / "memory"
    nets = MemoryDriver(root, kinds=("Network",))
    tenants = MemoryDriver(root, kinds=("Tenant",))
    nets.create(target())
    tenant = Key("Tenant", "acme", "acme")
    tenants.create(Target(tenant, {"description": ""}, Mark(tenant, "t", {})))

    assert [o.key for o in nets.observe().owned] == [NET]
    assert [o.key for o in tenants.observe().owned] == [tenant]


def test_leftover_temporary_file_of_a_killed_write_is_not_an_object(memory_driver: MemoryDriver) -> None:
    created = memory_driver.create(target())
    # a write killed between writing the temporary file and renaming it
    leftover = path_of(memory_driver, created).parent / ".tmp-abc123.json"
    leftover.write_text(path_of(memory_driver, created).read_text())
    partial = path_of(memory_driver, created).parent / ".tmp-def456.json"
    partial.write_text('{"mark": {"kin')

    obs = memory_driver.observe()
    assert [o.identity for o in obs.owned] == [created.identity]
    assert obs.unowned == []


def test_files_are_private(memory_driver: MemoryDriver) -> None:
    created = memory_driver.create(target())
    path = path_of(memory_driver, created)
    assert path.stat().st_mode & 0o777 == 0o600
    memory_driver.update(target(spec_hash="h2"), created, [])
    assert path.stat().st_mode & 0o777 == 0o600
    memory_driver.orphan(owned(memory_driver)[0])
    assert path.stat().st_mode & 0o777 == 0o600
    # no temporary files are left behind by writes
    assert [p.name for p in path.parent.iterdir()] == [path.name]
