"""Restart-class changes the host can apply live, through the public planner API.

A driver reports in `Observed.live` what it can change without a restart, up to which
value (the libvirt driver: memory up to the running domain's maximum, when it has a
balloon; the root disk up to the model's limit). Such a change plans in place; beyond
the limit it keeps its restart class. A stopped instance has nothing to restart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from reconciler.loader import load
from reconciler.models import UpdatePolicy
from reconciler.planner import Action, Change, Disruption, Plan, plan
from reconciler.state import Observation, Observed

VM = "Instance/acme/vm"


def _doc(kind: str, name: str, spec: dict | None = None) -> dict:
    metadata: dict[str, Any] = {"name": name}
    if kind != "Tenant":
        metadata["tenant"] = "acme"
    doc: dict[str, Any] = {"apiVersion": "reconciler/v1", "kind": kind, "metadata": metadata}
    if spec is not None:
        doc["spec"] = spec
    return doc


def _docs(**instance: Any) -> list[dict]:
    spec = {"image": "tiny", "vcpus": 1, "memoryMiB": 256, "rootDiskGiB": 10}
    spec.update(instance)
    return [
        _doc("Tenant", "acme", {"description": "ACME"}),
        _doc("Image", "tiny", {"source": "/images/tiny.qcow2"}),
        _doc("Instance", "vm", spec),
    ]


@pytest.fixture
def run(write_manifests: Callable[..., Path]):
    """run(before, after, live=..., host=...) -> the Change of the instance.

    `before` is planned from an empty host and applied (each target becomes an owned
    object); the instance's observed spec is then edited by `host` and given `live`
    limits; `after` is planned against that."""

    def load_docs(docs: list[dict]):
        files = {f"{i}.yaml": yaml.safe_dump(d, sort_keys=False) for i, d in enumerate(docs)}
        desired, problems = load([write_manifests(files)])
        assert problems == [], [str(p) for p in problems]
        return desired

    def go(before: dict, after: dict, *, live: dict[str, int] | None = None,
           host: dict[str, Any] | None = None) -> tuple[Change, Plan]:
        first = plan(load_docs(_docs(**before)), Observation())
        assert first.errors == [] and all(c.action is Action.CREATE for c in first.changes)
        owned = []
        for c in first.changes:
            spec = json.loads(json.dumps(dict(c.target.spec)))
            obs = Observed(c.key, f"host:{c.id}", spec, c.target.mark, {}, derived=c.target.derived)
            if c.id == VM:
                obs = dataclasses.replace(obs, spec={**spec, **(host or {})}, live=dict(live or {}))
            owned.append(obs)
        result = plan(load_docs(_docs(**after)), Observation(owned=owned))
        (change,) = [c for c in result.changes if c.id == VM]
        assert [c.id for c in result.changes if c.action is not Action.NOOP] in ([], [VM])
        return change, result

    return go


def _diffs(change: Change) -> list[tuple[str, int | str, int | str, UpdatePolicy]]:
    return [(".".join(map(str, d.path)), d.old, d.new, d.policy) for d in change.diffs]


# --- memory ----------------------------------------------------------------------------


def test_memory_within_the_live_limit_is_applied_in_place(run) -> None:
    change, p = run({"memoryMiB": 256}, {"memoryMiB": 200}, live={"memoryMiB": 256})
    assert change.action is Action.UPDATE
    assert change.disruption is Disruption.NONE
    assert _diffs(change) == [("memoryMiB", 256, 200, UpdatePolicy.IN_PLACE)]
    assert change.notes == ("memoryMiB: applied live, without a restart",)
    assert not any("restart" in n and "without" not in n for n in change.notes)
    assert p.errors == []


def test_memory_up_to_the_limit_itself_is_in_place(run) -> None:
    change, _ = run({"memoryMiB": 128}, {"memoryMiB": 256}, live={"memoryMiB": 256})
    assert _diffs(change) == [("memoryMiB", 128, 256, UpdatePolicy.IN_PLACE)]
    assert change.disruption is Disruption.NONE
    assert "memoryMiB: applied live, without a restart" in change.notes


def test_memory_over_the_live_limit_keeps_the_restart_class(run) -> None:
    change, _ = run({"memoryMiB": 256}, {"memoryMiB": 300}, live={"memoryMiB": 256})
    assert change.action is Action.UPDATE
    assert change.disruption is Disruption.RESTART
    assert _diffs(change) == [("memoryMiB", 256, 300, UpdatePolicy.RESTART)]
    assert change.notes == ("memoryMiB: takes effect at the next restart",)


def test_memory_over_the_limit_with_restart_policy_allowed_restarts_during_apply(run) -> None:
    change, _ = run({"memoryMiB": 256, "restartPolicy": "Allowed"},
                    {"memoryMiB": 300, "restartPolicy": "Allowed"}, live={"memoryMiB": 256})
    assert change.disruption is Disruption.RESTART
    assert _diffs(change) == [("memoryMiB", 256, 300, UpdatePolicy.RESTART)]
    assert change.notes == (
        "memoryMiB: the instance restarts during apply (restartPolicy: Allowed)",
    )


def test_memory_within_the_limit_with_restart_policy_allowed_does_not_restart(run) -> None:
    change, _ = run({"memoryMiB": 256, "restartPolicy": "Allowed"},
                    {"memoryMiB": 200, "restartPolicy": "Allowed"}, live={"memoryMiB": 256})
    assert change.disruption is Disruption.NONE
    assert change.notes == ("memoryMiB: applied live, without a restart",)


def test_without_live_limits_memory_is_a_restart(run) -> None:
    change, _ = run({"memoryMiB": 256}, {"memoryMiB": 200}, live={})
    assert change.disruption is Disruption.RESTART
    assert _diffs(change) == [("memoryMiB", 256, 200, UpdatePolicy.RESTART)]
    assert change.notes == ("memoryMiB: takes effect at the next restart",)


def test_a_limit_for_memory_does_not_make_vcpus_live(run) -> None:
    change, _ = run({"vcpus": 1}, {"vcpus": 2}, live={"memoryMiB": 4096})
    assert change.disruption is Disruption.RESTART
    assert _diffs(change) == [("vcpus", 1, 2, UpdatePolicy.RESTART)]
    assert change.notes == ("vcpus: takes effect at the next restart",)


def test_live_and_restart_changes_together_still_restart(run) -> None:
    change, _ = run({"memoryMiB": 256, "vcpus": 1}, {"memoryMiB": 200, "vcpus": 2},
                    live={"memoryMiB": 256})
    assert change.disruption is Disruption.RESTART
    assert dict((path, pol) for path, _o, _n, pol in _diffs(change)) == {
        "memoryMiB": UpdatePolicy.IN_PLACE, "vcpus": UpdatePolicy.RESTART,
    }
    assert change.notes == ("memoryMiB: applied live, without a restart",
                            "vcpus: takes effect at the next restart")


def test_memory_drift_within_the_limit_is_put_back_live(run) -> None:
    """The host moved (someone ran virsh setmem); the manifest did not change."""
    change, _ = run({"memoryMiB": 256}, {"memoryMiB": 256}, live={"memoryMiB": 256},
                    host={"memoryMiB": 192})
    assert _diffs(change) == [("memoryMiB", 192, 256, UpdatePolicy.IN_PLACE)]
    assert change.diffs[0].cause == "drift"
    assert change.disruption is Disruption.NONE


# --- root disk -------------------------------------------------------------------------


def test_root_disk_growth_is_in_place_with_the_drivers_limit(run) -> None:
    change, p = run({"rootDiskGiB": 10}, {"rootDiskGiB": 20}, live={"rootDiskGiB": 65536})
    assert change.action is Action.UPDATE
    assert change.disruption is Disruption.NONE
    assert _diffs(change) == [("rootDiskGiB", 10, 20, UpdatePolicy.IN_PLACE)]
    assert change.notes == ("rootDiskGiB: applied live, without a restart",)
    assert p.errors == []


def test_root_disk_growth_without_the_limit_is_a_restart(run) -> None:
    change, _ = run({"rootDiskGiB": 10}, {"rootDiskGiB": 20}, live={})
    assert change.disruption is Disruption.RESTART
    assert _diffs(change) == [("rootDiskGiB", 10, 20, UpdatePolicy.RESTART)]


def test_root_disk_shrink_forces_replacement_whatever_the_limit(run) -> None:
    change, p = run({"rootDiskGiB": 20}, {"rootDiskGiB": 10}, live={"rootDiskGiB": 65536})
    assert change.action is Action.REPLACE
    assert change.disruption is Disruption.REPLACE
    assert _diffs(change) == [("rootDiskGiB", 20, 10, UpdatePolicy.REPLACE)]
    assert change.reason.startswith("rootDiskGiB forces replacement")
    assert not any("applied live" in n for n in change.notes)
    assert p.errors == []


# --- a stopped instance ----------------------------------------------------------------


def test_a_stopped_instance_has_no_restart_class_for_vcpus(run) -> None:
    change, _ = run({"vcpus": 1, "powerState": "stopped"}, {"vcpus": 4, "powerState": "stopped"})
    assert change.action is Action.UPDATE
    assert change.disruption is Disruption.NONE
    assert _diffs(change) == [("vcpus", 1, 4, UpdatePolicy.IN_PLACE)]
    assert not any("restart" in n for n in change.notes)


def test_a_stopped_instance_has_no_restart_class_even_past_a_limit(run) -> None:
    change, _ = run({"memoryMiB": 256, "powerState": "stopped"},
                    {"memoryMiB": 1024, "powerState": "stopped"}, live={"memoryMiB": 256})
    assert change.disruption is Disruption.NONE
    assert _diffs(change) == [("memoryMiB", 256, 1024, UpdatePolicy.IN_PLACE)]
    assert not any("restart" in n for n in change.notes)


def test_an_instance_found_stopped_that_should_run_has_no_restart_class(run) -> None:
    """It starts during apply, with the new vcpus: nothing to restart."""
    change, _ = run({"vcpus": 1}, {"vcpus": 2}, host={"powerState": "stopped"})
    assert change.disruption is Disruption.NONE
    assert dict((path, pol) for path, _o, _n, pol in _diffs(change)) == {
        "powerState": UpdatePolicy.IN_PLACE, "vcpus": UpdatePolicy.IN_PLACE,
    }


def test_the_same_change_on_a_running_instance_is_a_restart(run) -> None:
    change, _ = run({"vcpus": 1}, {"vcpus": 4})
    assert change.disruption is Disruption.RESTART
    assert _diffs(change) == [("vcpus", 1, 4, UpdatePolicy.RESTART)]


def test_a_stopped_instance_still_replaces_on_a_shrink(run) -> None:
    change, _ = run({"rootDiskGiB": 20, "powerState": "stopped"},
                    {"rootDiskGiB": 10, "powerState": "stopped"})
    assert change.action is Action.REPLACE
    assert _diffs(change) == [("rootDiskGiB", 20, 10, UpdatePolicy.REPLACE)]


# --- the plan keeps it ------------------------------------------------------------------


def test_the_live_class_survives_a_saved_plan(run) -> None:
    """`plan --out` then `apply PLAN`: the driver still sees an in-place memory diff."""
    _change, p = run({"memoryMiB": 256}, {"memoryMiB": 200}, live={"memoryMiB": 256})
    back = Plan.from_dict(json.loads(p.to_json(redact=False)))
    (vm,) = [c for c in back.changes if c.id == VM]
    assert vm.disruption is Disruption.NONE
    assert _diffs(vm) == [("memoryMiB", 256, 200, UpdatePolicy.IN_PLACE)]
    assert vm.notes == ("memoryMiB: applied live, without a restart",)
    assert dict(vm.primary.live) == {"memoryMiB": 256}
