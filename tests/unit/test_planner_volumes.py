"""What the planner does for volumes, through its public API: the host's default backend
filled in, growth shown as live when a running guest holds the volume, the instance's
disk size derived from its volumes, replacement of a volume refused while it is
retained, and a delete that destroys data flagged (in red by the CLI)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from reconciler.loader import load
from reconciler.planner import Action, Plan, plan
from reconciler.state import Observation, Observed

VOL = "Volume/acme/data"
VM = "Instance/acme/vm"


def _doc(kind: str, name: str, spec: dict | None = None) -> dict:
    metadata: dict[str, Any] = {"name": name}
    if kind != "Tenant":
        metadata["tenant"] = "acme"
    doc: dict[str, Any] = {"apiVersion": "reconciler/v1", "kind": kind, "metadata": metadata}
    if spec is not None:
        doc["spec"] = spec
    return doc


def _docs(volume: dict | None = None, attached: bool = True, power: str = "running") -> list[dict]:
    vm = {"image": "tiny", "vcpus": 1, "memoryMiB": 256, "rootDiskGiB": 1, "powerState": power}
    if attached:
        vm["volumes"] = [{"volume": "data"}]
    docs = [
        _doc("Tenant", "acme", {"description": "ACME"}),
        _doc("Image", "tiny", {"source": "/images/tiny.qcow2"}),
        _doc("Instance", "vm", vm),
    ]
    if volume is not None:
        docs.append(_doc("Volume", "data", volume))
    return docs


@pytest.fixture
def load_docs(write_manifests: Callable[..., Path]):
    def go(docs: list[dict]):
        files = {f"{i}.yaml": yaml.safe_dump(d, sort_keys=False) for i, d in enumerate(docs)}
        desired, problems = load([write_manifests(files)])
        assert problems == [], [str(p) for p in problems]
        return desired
    return go


def _applied(result: Plan, host: dict[str, dict[str, str]] | None = None) -> list[Observed]:
    """Every change of `result` as the host would have it after apply."""
    out = []
    for c in result.changes:
        assert c.target is not None
        spec = json.loads(json.dumps(dict(c.target.spec)))
        out.append(Observed(c.key, f"host:{c.id}", spec, c.target.mark, (host or {}).get(c.id, {}),
                            derived=c.target.derived))
    return out


def _by_id(result: Plan) -> dict[str, Any]:
    return {c.id: c for c in result.changes}


DEFAULTS = {"Volume": {"backend": "local"}}


def test_the_hosts_default_backend_is_filled_in_and_kept(load_docs) -> None:
    first = plan(load_docs(_docs({"sizeGiB": 1})), Observation(), defaults=DEFAULTS)
    assert _by_id(first)[VOL].target.spec["backend"] == "local"
    # the manifest never named a backend: a later default elsewhere moves nothing
    again = plan(load_docs(_docs({"sizeGiB": 1})), Observation(owned=_applied(first)),
                 defaults={"Volume": {"backend": "fast"}})
    assert not again.has_changes, [(c.id, c.reason) for c in again.actionable]
    # writing the backend it already has is no change either
    named = plan(load_docs(_docs({"sizeGiB": 1, "backend": "local"})), Observation(owned=_applied(first)),
                 defaults=DEFAULTS)
    assert not named.has_changes


def test_an_instance_carries_the_sizes_of_its_volumes(load_docs) -> None:
    first = plan(load_docs(_docs({"sizeGiB": 3})), Observation(), defaults=DEFAULTS)
    assert _by_id(first)[VM].target.derived == {"volumeGiB": {"data": 3}}
    assert _by_id(first)[VOL].target.derived == {}


def test_growth_of_a_volume_a_running_guest_holds_is_live(load_docs) -> None:
    first = plan(load_docs(_docs({"sizeGiB": 1})), Observation(), defaults=DEFAULTS)
    grown = plan(load_docs(_docs({"sizeGiB": 4})), Observation(owned=_applied(first)), defaults=DEFAULTS)
    changes = _by_id(grown)
    vol, vm = changes[VOL], changes[VM]
    assert vol.action is Action.UPDATE and vm.action is Action.UPDATE
    assert [(d.path, d.old, d.new) for d in vol.diffs] == [(("sizeGiB",), 1, 4)]
    assert any("grown live while attached to running Instance acme/vm" in n and "4 GiB" in n
               for n in vol.notes), vol.notes
    assert [(d.path, d.old, d.new, d.cause) for d in vm.diffs] == [(("volumeGiB", "data"), 1, 4, "derived")]
    # the volume grows first, then the guest is told
    assert (VOL, VM) in grown.edges


def test_growth_of_a_volume_of_a_stopped_instance_is_not_called_live(load_docs) -> None:
    first = plan(load_docs(_docs({"sizeGiB": 1}, power="stopped")), Observation(), defaults=DEFAULTS)
    grown = plan(load_docs(_docs({"sizeGiB": 2}, power="stopped")), Observation(owned=_applied(first)),
                 defaults=DEFAULTS)
    assert not any("live" in n for n in _by_id(grown)[VOL].notes)


def test_changing_the_backend_of_a_retained_volume_is_refused(load_docs) -> None:
    first = plan(load_docs(_docs({"sizeGiB": 1})), Observation(), defaults=DEFAULTS)
    moved = plan(load_docs(_docs({"sizeGiB": 1, "backend": "fast"})), Observation(owned=_applied(first)),
                 defaults=DEFAULTS)
    assert _by_id(moved)[VOL].action is Action.REPLACE
    (problem,) = moved.errors
    assert problem.path == "spec.backend"
    assert "destroy its data" in problem.message and "deletionPolicy" in problem.message
    assert problem.line > 0 and problem.file.endswith(".yaml")


def test_replacing_a_volume_with_delete_policy_warns_that_data_goes(load_docs) -> None:
    spec = {"sizeGiB": 1, "deletionPolicy": "Delete"}
    first = plan(load_docs(_docs(spec)), Observation(), defaults=DEFAULTS)
    moved = plan(load_docs(_docs({**spec, "backend": "fast"})), Observation(owned=_applied(first)),
                 defaults=DEFAULTS)
    assert moved.errors == []
    change = _by_id(moved)[VOL]
    assert change.action is Action.REPLACE
    assert change.warnings and "destroys the data of Volume acme/data" in change.warnings[0]


@pytest.mark.parametrize("data, warned", [("12.0 MiB written", True), ("empty", False), (None, False)])
def test_deleting_a_volume_that_holds_data_is_flagged(load_docs, data: str | None, warned: bool) -> None:
    spec = {"sizeGiB": 1, "deletionPolicy": "Delete"}
    first = plan(load_docs(_docs(spec)), Observation(), defaults=DEFAULTS)
    host = {VOL: {"data": data}} if data else {}
    gone = plan(load_docs(_docs(None, attached=False)), Observation(owned=_applied(first, host)),
                defaults=DEFAULTS)
    change = _by_id(gone)[VOL]
    assert change.action is Action.DELETE
    assert bool(change.warnings) is warned
    if warned:
        assert "holds data (12.0 MiB written)" in change.warnings[0]
    # the instance lets go of it first
    assert (VM, VOL) in gone.edges


def test_a_retained_volume_removed_is_orphaned_without_a_warning(load_docs) -> None:
    first = plan(load_docs(_docs({"sizeGiB": 1})), Observation(), defaults=DEFAULTS)
    owned = [dataclasses.replace(o, host={"data": "1.0 GiB written"}) if str(o.key) == VOL else o
             for o in _applied(first)]
    gone = plan(load_docs(_docs(None, attached=False)), Observation(owned=owned), defaults=DEFAULTS)
    change = _by_id(gone)[VOL]
    assert change.action is Action.ORPHAN and change.warnings == ()


def test_warnings_survive_a_saved_plan(load_docs) -> None:
    spec = {"sizeGiB": 1, "deletionPolicy": "Delete"}
    first = plan(load_docs(_docs(spec)), Observation(), defaults=DEFAULTS)
    gone = plan(load_docs(_docs(None, attached=False)),
                Observation(owned=_applied(first, {VOL: {"data": "5 MiB written"}})), defaults=DEFAULTS)
    again = Plan.from_dict(json.loads(gone.to_json(redact=False)))
    assert _by_id(again)[VOL].warnings == _by_id(gone)[VOL].warnings != ()


def test_snapshot_names_are_a_set(load_docs, write_manifests) -> None:
    desired = load_docs(_docs({"sizeGiB": 1, "snapshots": ["b", "a"]}))
    first = plan(desired, Observation(), defaults=DEFAULTS)
    assert _by_id(first)[VOL].target.spec["snapshots"] == ["a", "b"]
    files = {"v.yaml": yaml.safe_dump(_doc("Volume", "data", {"sizeGiB": 1, "snapshots": ["a", "a"]}))}
    _, problems = load([write_manifests(files)])
    assert any("listed twice" in p.message for p in problems), [str(p) for p in problems]
