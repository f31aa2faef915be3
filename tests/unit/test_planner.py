"""The planner, table-driven: base manifests + one edit -> expected changes.

Every case in CASES is plain data:

- ``setup``: edits to the base manifests before the first apply (e.g. deletionPolicy);
- the base is planned from an empty host and "applied": each change's target becomes
  an owned host object (``Observed(key, identity, target.spec, target.mark)``);
- ``manifest``: edits to the manifests afterwards (intent), ``add``: new documents;
- ``live``: edits to live host specs (drift), ``mark``: edits to ownership marks,
  ``gone``: host objects removed (deleted by an earlier apply),
  ``duplicate``: extra host objects carrying the same key;
- ``xfail``: a known planner bug (the case states the correct behaviour);
- ``expect``: for every change id that is not a noop: (action, disruption, diffs) with
  diffs as (field path, policy, cause); every other change must be a noop, and a key
  mapped to None must have no change at all.

Edit paths are dotted, list indices are numbers ("spec.networks.0.ip"); DROP removes a
field, and a document id mapped to DROP removes the document.
"""

from __future__ import annotations

import builtins
import copy
import json
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from reconciler.dependencies import build_graph
from reconciler.errors import format_path
from reconciler.loader import load
from reconciler.models import Key
from reconciler.planner import Action, Disruption, Plan, plan
from reconciler.planner._alloc import RANGES
from reconciler.state import SENSITIVE, Mark, Observation, Observed, Unowned

DROP = "__drop__"
SECRET = "#cloud-config\npassword: hunter2-secret\n"
SECRET2 = "#cloud-config\npassword: swordfish-secret\n"

TENANT = "Tenant/acme/acme"
NET = "Network/acme/web"
IMAGE = "Image/acme/tiny"
VOLUME = "Volume/acme/data"
VM = "Instance/acme/vm"
ROUTER = "Router/acme/edge"
BUCKET = "Bucket/acme/assets"
GROUP = "SecurityGroup/acme/ssh"


def _doc(kind: str, name: str, spec: dict | None = None, **meta: Any) -> dict:
    metadata: dict[str, Any] = {"name": name}
    if kind != "Tenant":
        metadata["tenant"] = "acme"
    metadata.update(meta)
    doc: dict[str, Any] = {"apiVersion": "reconciler/v1", "kind": kind, "metadata": metadata}
    if spec is not None:
        doc["spec"] = spec
    return doc


BASE: list[dict] = [
    _doc("Tenant", "acme", {"description": "ACME"}),
    _doc("Network", "web", {"subnets": [{"cidr": "10.10.1.0/24"}]}),
    _doc("Image", "tiny", {"source": "/images/tiny.qcow2"}),
    _doc("Volume", "data", {"sizeGiB": 2}),
    _doc("SecurityGroup", "ssh", {"rules": [{"protocol": "tcp", "ports": "22"}]}),
    _doc(
        "Instance",
        "vm",
        {
            "image": "tiny",
            "vcpus": 1,
            "memoryMiB": 512,
            "rootDiskGiB": 10,
            "networks": [{"network": "web", "securityGroups": ["ssh"]}],
            "volumes": [{"volume": "data"}],
            "userData": SECRET,
        },
    ),
    _doc("Router", "edge", {"networks": ["web"]}),
    _doc("Bucket", "assets", {"metadata": {"owner": "web"}}),
]

ALL_IDS = [TENANT, NET, IMAGE, VOLUME, GROUP, VM, ROUTER, BUCKET]

# --- the cases ------------------------------------------------------------------------

CASES: list[dict[str, Any]] = [
    # every action
    {"id": "noop: nothing changed", "expect": {}},
    {
        "id": "create: a new network",
        "add": [_doc("Network", "db", {"subnets": [{"cidr": "10.10.2.0/24"}]})],
        "expect": {"Network/acme/db": ("create", "none", [])},
    },
    {
        "id": "update in place: bucket versioning",
        "manifest": {BUCKET: {"spec.versioning": True}},
        "expect": {BUCKET: ("update", "none", [("versioning", "in-place", "manifest")])},
    },
    {
        "id": "delete: router removed from the manifests",
        "manifest": {ROUTER: DROP},
        "expect": {ROUTER: ("delete", "destroy", [])},
    },
    {
        "id": "orphan: retained volume removed (and detached)",
        "manifest": {VOLUME: DROP, VM: {"spec.volumes": DROP}},
        "expect": {
            VOLUME: ("orphan", "none", []),
            VM: ("update", "none", [("volumes[0]", "in-place", "manifest")]),
        },
    },
    {
        "id": "orphan: retained bucket removed",
        "manifest": {BUCKET: DROP},
        "expect": {BUCKET: ("orphan", "none", [])},
    },
    {
        "id": "noop: already orphaned volume stays orphaned",
        "manifest": {VOLUME: DROP, VM: {"spec.volumes": DROP}},
        "mark": {VOLUME: {"orphaned": True}},
        "expect": {VM: ("update", "none", [("volumes[0]", "in-place", "manifest")])},
        "reasons": {VOLUME: "orphaned"},
    },
    {
        "id": "re-adoption: orphaned volume back in the manifests",
        "mark": {VOLUME: {"orphaned": True}},
        "expect": {VOLUME: ("update", "none", [])},
        "reasons": {VOLUME: "adopted again"},
    },
    {
        "id": "duplicates: primary kept, extra removed",
        "duplicate": {NET: {"identity": "aaa-duplicate", "spec_hash": "stale"}},
        "expect": {NET: ("update", "none", [])},
        "reasons": {NET: "1 duplicate host object(s) to remove"},
        "observed": {NET: [f"host:{NET}", "aaa-duplicate"]},
    },
    {
        "id": "duplicates: with a diff the note says the extra goes",
        "duplicate": {NET: {"identity": "zzz-duplicate", "spec_hash": "stale"}},
        "manifest": {NET: {"spec.mtu": 1400}},
        "expect": {NET: ("update", "none", [("mtu", "in-place", "manifest")])},
        "notes": {NET: "1 duplicate host object(s) removed"},
        "observed": {NET: [f"host:{NET}", "zzz-duplicate"]},
    },
    # disruption: restart
    {
        "id": "restart: instance vcpus",
        "manifest": {VM: {"spec.vcpus": 2}},
        "expect": {VM: ("update", "restart", [("vcpus", "restart", "manifest")])},
        "notes": {VM: "vcpus: takes effect at the next restart"},
    },
    {
        "id": "restart: instance memoryMiB",
        "manifest": {VM: {"spec.memoryMiB": 1024}},
        "expect": {VM: ("update", "restart", [("memoryMiB", "restart", "manifest")])},
    },
    {
        "id": "restart: instance userData",
        "manifest": {VM: {"spec.userData": SECRET2}},
        "expect": {VM: ("update", "restart", [("userData", "restart", "manifest")])},
    },
    {
        "id": "restart: restartPolicy Allowed restarts during apply",
        "setup": {VM: {"spec.restartPolicy": "Allowed"}},
        "manifest": {VM: {"spec.vcpus": 4}},
        "expect": {VM: ("update", "restart", [("vcpus", "restart", "manifest")])},
        "notes": {VM: "the instance restarts during apply"},
    },
    {
        "id": "restart: root disk growth",
        "manifest": {VM: {"spec.rootDiskGiB": 20}},
        "expect": {VM: ("update", "restart", [("rootDiskGiB", "restart", "manifest")])},
    },
    # disruption: replace
    {
        "id": "replace: root disk shrink",
        "manifest": {VM: {"spec.rootDiskGiB": 5}},
        "expect": {VM: ("replace", "replace", [("rootDiskGiB", "replace", "manifest")])},
    },
    {
        "id": "replace: network subnet cidr",
        "manifest": {NET: {"spec.subnets.0.cidr": "10.20.1.0/24"}},
        "expect": {
            NET: ("replace", "replace", [("subnets[0].cidr", "replace", "manifest"),
                                         ("ports.acme/vm.ip", "in-place", "derived")]),
            # the instance's address was allocated in the old subnet: a new one is allocated
            VM: ("update", "none", [("networks[0].ip", "in-place", "derived")]),
        },
        "notes": {NET: "every instance on it loses its address meanwhile: Instance acme/vm"},
    },
    {
        "id": "replace: network type",
        "manifest": {NET: {"spec.type": "flat"}},
        "expect": {NET: ("replace", "replace", [("type", "replace", "manifest")])},
    },
    {
        "id": "replace: image source",
        "manifest": {IMAGE: {"spec.source": "/images/tiny-v2.qcow2"}},
        "expect": {IMAGE: ("replace", "replace", [("source", "replace", "manifest")])},
        "notes": {IMAGE: "depends on it: Instance acme/vm"},
        "cbd": {IMAGE: True},
    },
    {
        "id": "replace: instance image",
        "add": [_doc("Image", "big", {"source": "/images/big.qcow2"})],
        "manifest": {VM: {"spec.image": "big"}},
        "expect": {
            "Image/acme/big": ("create", "none", []),
            VM: ("replace", "replace", [("image", "replace", "manifest")]),
        },
        "notes": {VM: "the old object is destroyed before the new one is created"},
        "cbd": {VM: False},
    },
    {
        "id": "replace wins over restart in one change",
        "manifest": {VM: {"spec.vcpus": 2, "spec.rootDiskGiB": 5}},
        "expect": {
            VM: (
                "replace",
                "replace",
                [("vcpus", "restart", "manifest"), ("rootDiskGiB", "replace", "manifest")],
            )
        },
    },
    # volume size
    {
        "id": "volume growth is in place",
        "manifest": {VOLUME: {"spec.sizeGiB": 5}},
        "expect": {VOLUME: ("update", "none", [("sizeGiB", "in-place", "manifest")]),
                   # the instance's disk grows with it (blockResize when it runs)
                   VM: ("update", "none", [("volumeGiB.data", "in-place", "derived")])},
    },
    {
        "id": "volume shrink is a plan error",
        "setup": {VOLUME: {"spec.sizeGiB": 8}},
        "manifest": {VOLUME: {"spec.sizeGiB": 4}},
        "expect": {VOLUME: ("update", "none", [("sizeGiB", "in-place", "manifest")]),
                   # the instance's disk grows with it (blockResize when it runs)
                   VM: ("update", "none", [("volumeGiB.data", "in-place", "derived")])},
        "errors": [(VOLUME, "spec.sizeGiB", "cannot shrink from 8 to 4")],
    },
    # three-way diff
    {
        "id": "drift: host changed vcpus, manifest unchanged",
        "live": {VM: {"vcpus": 4}},
        "expect": {VM: ("update", "restart", [("vcpus", "restart", "drift")])},
        "reasons": {VM: "drift on the host: vcpus"},
    },
    {
        "id": "intent: manifest changed vcpus, host unchanged",
        "manifest": {VM: {"spec.vcpus": 3}},
        "expect": {VM: ("update", "restart", [("vcpus", "restart", "manifest")])},
        "reasons": {VM: "manifest changed: vcpus"},
    },
    {
        "id": "intent wins when host and manifest both moved",
        "manifest": {VM: {"spec.vcpus": 3}},
        "live": {VM: {"vcpus": 4}},
        "expect": {VM: ("update", "restart", [("vcpus", "restart", "manifest")])},
    },
    {
        "id": "drift and intent on different fields",
        "manifest": {VM: {"spec.memoryMiB": 1024}},
        "live": {VM: {"vcpus": 4}},
        "expect": {
            VM: ("update", "restart", [("vcpus", "restart", "drift"), ("memoryMiB", "restart", "manifest")])
        },
        "reasons": {VM: "manifest changed: memoryMiB; drift on the host: vcpus"},
    },
    {
        "id": "drift in a nested list element",
        "live": {NET: {"subnets.0.dhcp.enabled": False}},
        "expect": {NET: ("update", "none", [("subnets[0].dhcp.enabled", "in-place", "drift")])},
    },
    {
        "id": "drift on a replace field forces replacement",
        "live": {NET: {"subnets.0.cidr": "10.99.0.0/24"}},
        "expect": {NET: ("replace", "replace", [("subnets[0].cidr", "replace", "drift")])},
    },
    {
        "id": "a default the user never set is healed (powerState)",
        "live": {VM: {"powerState": "stopped"}},
        "expect": {VM: ("update", "none", [("powerState", "in-place", "drift")])},
        "targets": {VM: {"powerState": "running"}},
    },
    {
        "id": "a default the user starts to set is intent",
        "manifest": {VM: {"spec.powerState": "stopped"}},
        "expect": {VM: ("update", "none", [("powerState", "in-place", "manifest")])},
    },
    {
        "id": "host defaults the manifest omits keep the host's values",
        "live": {
            NET: {"vni": 5000, "mtu": 1450},
            VM: {"networks.0.ip": "10.10.1.50"},
            VOLUME: {"backend": "lvm"},
        },
        # the host's address stays; the network's port (its DHCP reservation) follows it
        "expect": {NET: ("update", "none", [("ports.acme/vm.ip", "in-place", "derived")])},
    },
    {
        "id": "a host default the manifest sets is intent",
        "live": {NET: {"mtu": 1450}},
        "manifest": {NET: {"spec.mtu": 1400}},
        "expect": {NET: ("update", "none", [("mtu", "in-place", "manifest")])},
    },
    {
        "id": "a nic ip the manifest sets replaces the host's choice",
        "live": {VM: {"networks.0.ip": "10.10.1.50"}},
        "manifest": {VM: {"spec.networks.0.ip": "10.10.1.60"}},
        "expect": {VM: ("update", "none", [("networks[0].ip", "in-place", "manifest")]),
                   NET: ("update", "none", [("ports.acme/vm.ip", "in-place", "derived")])},
    },
    {
        "id": "bucket metadata keys set by others are left alone",
        "live": {BUCKET: {"metadata.billing": "ops"}},
        "expect": {},
    },
    {
        "id": "bucket metadata key the user removed is removed, others kept",
        "live": {BUCKET: {"metadata.billing": "ops"}},
        "manifest": {BUCKET: {"spec.metadata": DROP}},
        "expect": {BUCKET: ("update", "none", [("metadata", "in-place", "manifest")])},
        "targets": {BUCKET: {"metadata": {"billing": "ops"}}},
    },
    {
        "id": "bucket metadata key replaced by another, others kept",
        "live": {BUCKET: {"metadata.billing": "ops"}},
        "manifest": {BUCKET: {"spec.metadata": {"env": "prod"}}},
        "expect": {BUCKET: ("update", "none", [("metadata", "in-place", "manifest")])},
        "targets": {BUCKET: {"metadata": {"billing": "ops", "env": "prod"}}},
    },
    {
        "id": "bucket metadata value of the user's key drifted",
        "live": {BUCKET: {"metadata.owner": "mallory", "metadata.billing": "ops"}},
        "expect": {BUCKET: ("update", "none", [("metadata", "in-place", "drift")])},
        "targets": {BUCKET: {"metadata": {"owner": "web", "billing": "ops"}}},
    },
    # deletionPolicy
    {
        "id": "deletionPolicy Delete: volume removed is deleted",
        "setup": {VOLUME: {"spec.deletionPolicy": "Delete"}},
        "manifest": {VOLUME: DROP, VM: {"spec.volumes": DROP}},
        "expect": {
            VOLUME: ("delete", "destroy", []),
            VM: ("update", "none", [("volumes[0]", "in-place", "manifest")]),
        },
    },
    {
        "id": "deletionPolicy Delete: bucket with purgeOnDelete",
        "setup": {BUCKET: {"spec.deletionPolicy": "Delete", "spec.purgeOnDelete": True}},
        "manifest": {BUCKET: DROP},
        "expect": {BUCKET: ("delete", "destroy", [])},
        "notes": {BUCKET: "purgeOnDelete"},
    },
    {
        "id": "tenant removed while a retained volume remains is orphaned",
        "manifest": {i: DROP for i in ALL_IDS},
        "expect": {
            TENANT: ("orphan", "none", []),
            VOLUME: ("orphan", "none", []),
            BUCKET: ("orphan", "none", []),
            NET: ("delete", "destroy", []),
            IMAGE: ("delete", "destroy", []),
            GROUP: ("delete", "destroy", []),
            VM: ("delete", "destroy", []),
            ROUTER: ("delete", "destroy", []),
        },
        "reasons": {TENANT: "kept while retained objects remain: Bucket acme/assets, Volume acme/data"},
    },
    {
        "id": "already-orphaned tenant with retained objects stays a noop",
        "manifest": {i: DROP for i in ALL_IDS},
        "gone": [NET, IMAGE, GROUP, VM, ROUTER],
        "mark": {TENANT: {"orphaned": True}, VOLUME: {"orphaned": True}, BUCKET: {"orphaned": True}},
        "expect": {},
        "reasons": {TENANT: "orphaned", VOLUME: "orphaned", BUCKET: "orphaned"},
    },
    {
        "id": "orphaned tenant whose retained objects are gone is deleted",
        "manifest": {i: DROP for i in ALL_IDS},
        "gone": [NET, IMAGE, GROUP, VM, ROUTER, VOLUME, BUCKET],
        "mark": {TENANT: {"orphaned": True}},
        "expect": {TENANT: ("delete", "destroy", [])},
    },
    {
        "id": "tenant removed with everything deletable is deleted",
        "setup": {
            VOLUME: {"spec.deletionPolicy": "Delete"},
            BUCKET: {"spec.deletionPolicy": "Delete"},
        },
        "manifest": {i: DROP for i in ALL_IDS},
        "expect": {i: ("delete", "destroy", []) for i in ALL_IDS},
    },
    {
        "id": "destroy: every resource of the manifests, by deletionPolicy",
        "destroy": True,
        "expect": {
            TENANT: ("orphan", "none", []),
            VOLUME: ("orphan", "none", []),
            BUCKET: ("orphan", "none", []),
            NET: ("delete", "destroy", []),
            IMAGE: ("delete", "destroy", []),
            GROUP: ("delete", "destroy", []),
            VM: ("delete", "destroy", []),
            ROUTER: ("delete", "destroy", []),
        },
    },
    {
        "id": "destroy: owned objects outside the manifests are left alone",
        "setup": {
            VOLUME: {"spec.deletionPolicy": "Delete"},
            BUCKET: {"spec.deletionPolicy": "Delete"},
        },
        "manifest": {ROUTER: DROP, VM: DROP, VOLUME: DROP},
        "destroy": True,
        "expect": {
            ROUTER: None,
            VM: None,
            VOLUME: None,
            TENANT: ("orphan", "none", []),
            BUCKET: ("delete", "destroy", []),
            NET: ("delete", "destroy", []),
            IMAGE: ("delete", "destroy", []),
            GROUP: ("delete", "destroy", []),
        },
    },
    {
        "id": "destroy: a manifest resource not on the host has no change",
        "add": [_doc("Network", "db", {"subnets": [{"cidr": "10.10.2.0/24"}]})],
        "destroy": True,
        "expect": {
            "Network/acme/db": None,
            TENANT: ("orphan", "none", []),
            VOLUME: ("orphan", "none", []),
            BUCKET: ("orphan", "none", []),
            NET: ("delete", "destroy", []),
            IMAGE: ("delete", "destroy", []),
            GROUP: ("delete", "destroy", []),
            VM: ("delete", "destroy", []),
            ROUTER: ("delete", "destroy", []),
        },
    },
    {
        "id": "destroy: already-orphaned retained objects are a noop",
        "destroy": True,
        "gone": [NET, IMAGE, GROUP, VM, ROUTER],
        "mark": {TENANT: {"orphaned": True}, VOLUME: {"orphaned": True}, BUCKET: {"orphaned": True}},
        "expect": {},
    },
    # conflicts
    {
        "id": "conflict: an unowned host object has the name",
        "add": [_doc("Network", "db", {"subnets": [{"cidr": "10.10.2.0/24"}]})],
        "conflicts": {"Network/acme/db": ("Network", "rc-acme-db", "bridge exists")},
        "expect": {"Network/acme/db": None},
        "errors": [("Network/acme/db", "metadata.name", "'rc-acme-db'")],
    },
    {
        "id": "conflict on an owned key is ignored: ownership wins",
        "conflicts": {NET: ("Network", "rc-acme-web", "")},
        "expect": {},
    },
]


# --- helpers --------------------------------------------------------------------------


def _parse_path(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _set(data: Any, path: str, value: Any) -> None:
    parts = _parse_path(path)
    for part in parts[:-1]:
        if isinstance(part, str) and part not in data:
            data[part] = {}
        data = data[part]
    if value == DROP:
        del data[parts[-1]]
    else:
        data[parts[-1]] = copy.deepcopy(value)


def _doc_id(doc: dict) -> str:
    meta = doc["metadata"]
    return str(Key(doc["kind"], meta.get("tenant", meta["name"]), meta["name"]))


def _edit_docs(docs: list[dict], edits: dict[str, Any] | None) -> list[dict]:
    docs = copy.deepcopy(docs)
    for doc_id, edit in (edits or {}).items():
        if edit == DROP:
            docs = [d for d in docs if _doc_id(d) != doc_id]
            continue
        (doc,) = [d for d in docs if _doc_id(d) == doc_id]
        for path, value in edit.items():
            _set(doc, path, value)
    return docs


def _write(write_manifests: Callable[..., Path], docs: list[dict]) -> Path:
    """One file per document, named after its id, so errors point at a known file."""
    files = {
        _doc_id(d).replace("/", "-") + ".yaml": yaml.safe_dump(d, sort_keys=False) for d in docs
    }
    return write_manifests(files)


def _load(write_manifests: Callable[..., Path], docs: list[dict]):
    folder = _write(write_manifests, docs)
    desired, problems = load([folder])
    assert problems == [], [str(p) for p in problems]
    return desired, folder


def _apply(p: Plan) -> Observation:
    """What the host holds after a successful apply of `p` from an empty host."""
    return Observation(
        owned=[
            Observed(c.key, f"host:{c.id}", json.loads(json.dumps(dict(c.target.spec))), c.target.mark, {},
                     derived=json.loads(json.dumps(dict(c.target.derived))))
            for c in p.changes
            if c.target is not None
        ]
    )


def _replace_observed(obs: Observation, key: str, **kw: Any) -> None:
    for i, o in enumerate(obs.owned):
        if str(o.key) == key:
            spec = kw.pop("spec", o.spec)
            mark = kw.pop("mark", o.mark)
            obs.owned[i] = Observed(o.key, kw.pop("identity", o.identity), spec, mark, o.host,
                                    derived=kw.pop("derived", o.derived), drift=kw.pop("drift", o.drift))
            return
    raise AssertionError(f"{key} not on the host")


def _find(obs: Observation, key: str) -> Observed:
    (found,) = [o for o in obs.owned if str(o.key) == key]
    return found


def _changes(p: Plan) -> dict[str, Any]:
    return {c.id: c for c in p.changes}


def _diffs(change) -> list[tuple[str, str, str]]:
    return [(format_path(d.path), d.policy.value, d.cause) for d in change.diffs]


@pytest.fixture
def scenario(write_manifests):
    """scenario(case) -> (plan, desired, observation, folder) for one case of CASES."""

    def run(case: dict[str, Any]):
        base = _edit_docs(BASE, case.get("setup"))
        desired0, _ = _load(write_manifests, base)
        first = plan(desired0, Observation())
        assert first.errors == []
        assert all(c.action is Action.CREATE for c in first.changes)
        obs = _apply(first)

        for key, edits in case.get("live", {}).items():
            spec = copy.deepcopy(dict(_find(obs, key).spec))
            for path, value in edits.items():
                _set(spec, path, value)
            _replace_observed(obs, key, spec=spec)
        gone = set(case.get("gone", ()))
        obs.owned = [o for o in obs.owned if str(o.key) not in gone]
        for key, fields in case.get("mark", {}).items():
            mark = _find(obs, key).mark
            _replace_observed(
                obs,
                key,
                mark=Mark(
                    mark.key,
                    fields.get("spec_hash", mark.spec_hash),
                    fields.get("applied", mark.applied),
                    fields.get("orphaned", mark.orphaned),
                ),
            )
        for key, fields in case.get("duplicate", {}).items():
            o = _find(obs, key)
            mark = Mark(o.key, fields.get("spec_hash", o.mark.spec_hash), o.mark.applied)
            obs.owned.append(Observed(o.key, fields["identity"], copy.deepcopy(dict(o.spec)), mark, {},
                                      derived=o.derived))

        docs = _edit_docs(base, case.get("manifest")) + copy.deepcopy(case.get("add", []))
        desired, folder = _load(write_manifests, docs)
        conflicts = {
            Key.parse(k): Unowned(*v) for k, v in case.get("conflicts", {}).items()
        }
        result = plan(desired, obs, conflicts=conflicts, destroy=case.get("destroy", False))
        return result, desired, obs, folder

    return run


# --- the table ------------------------------------------------------------------------


def _params(cases: list[dict[str, Any]]) -> list[Any]:
    return [
        pytest.param(c, id=c["id"], marks=[pytest.mark.xfail(reason=c["xfail"], strict=True)] if "xfail" in c else [])
        for c in cases
    ]


@pytest.mark.parametrize("case", _params(CASES))
def test_case(case: dict[str, Any], scenario) -> None:
    result, desired, obs, folder = scenario(case)
    changes = _changes(result)
    expect = case["expect"]

    for key, want in expect.items():
        if want is None:
            assert key not in changes, f"{key}: expected no change, got {changes[key].action}"
            continue
        assert key in changes, f"{key}: no change planned"
        change = changes[key]
        action, disruption, diffs = want
        assert (change.action.value, change.disruption.value) == (action, disruption), (
            key,
            change.reason,
        )
        assert _diffs(change) == diffs, key
    for key, change in changes.items():
        if key not in expect:
            assert change.action is Action.NOOP, (key, change.action, change.reason, _diffs(change))
            assert change.diffs == ()

    for key, text in case.get("reasons", {}).items():
        assert text in changes[key].reason, changes[key].reason
    for key, text in case.get("notes", {}).items():
        assert any(text in n for n in changes[key].notes), changes[key].notes
    for key, identities in case.get("observed", {}).items():
        assert [o.identity for o in changes[key].observed] == identities
    for key, flag in case.get("cbd", {}).items():
        assert changes[key].create_before_destroy is flag
    for key, fields in case.get("targets", {}).items():
        target = changes[key].target
        assert target is not None
        for name, value in fields.items():
            assert target.spec[name] == value

    want_errors = case.get("errors", [])
    assert len(result.errors) == len(want_errors), [str(e) for e in result.errors]
    for problem, (key, path, text) in zip(result.errors, want_errors):
        res = desired.get(Key.parse(key))
        assert problem.resource == res.key.display
        assert problem.path == path
        assert problem.file == res.source.file
        assert text in problem.message
        expected_file = folder / (key.replace("/", "-") + ".yaml")
        assert problem.file == str(expected_file)
        field = path.rsplit(".", 1)[-1]
        lines = expected_file.read_text().splitlines()
        want_line = next(i for i, line in enumerate(lines, 1) if line.strip().startswith(field + ":"))
        assert problem.line == want_line

    # invariants of every plan
    _assert_valid_order(result)
    for change in result.changes:
        if change.action in (Action.CREATE, Action.UPDATE, Action.REPLACE):
            assert change.target is not None and change.target.mark.orphaned is False
            assert change.target.mark == Mark(
                change.key, desired.get(change.key).spec_hash, desired.get(change.key).spec_set
            )
        else:
            assert change.target is None
        if change.action is Action.DELETE:
            assert change.disruption is Disruption.DESTROY


def _assert_valid_order(p: Plan) -> None:
    position = {c.id: i for i, c in enumerate(p.changes)}
    acting = {c.id for c in p.changes if c.action is not Action.NOOP}
    for before, after in p.edges:
        assert before in acting and after in acting, (before, after)
        assert position[before] < position[after], (before, after)
    # noops come last
    kinds = [c.action is Action.NOOP for c in p.changes]
    assert kinds == sorted(kinds)


# --- targeted tests beyond the table ----------------------------------------------------


def _net(name: str, cidr: str, **spec: Any) -> dict:
    return _doc("Network", name, {"subnets": [{"cidr": cidr}], **spec})


def _plan_docs(write_manifests, docs: list[dict], obs: Observation | None = None, **kw: Any) -> Plan:
    desired, _ = _load(write_manifests, docs)
    return plan(desired, obs or Observation(), **kw)


def _position(p: Plan) -> dict[str, int]:
    return {c.id: i for i, c in enumerate(p.changes)}


def test_re_adoption_target_carries_a_fresh_mark(scenario) -> None:
    case = {"mark": {VOLUME: {"orphaned": True}}}
    result, desired, obs, _ = scenario(case)
    change = _changes(result)[VOLUME]
    assert change.action is Action.UPDATE
    assert change.target.mark.orphaned is False
    assert change.target.spec == dict(_find(obs, VOLUME).spec)
    assert change.primary.mark.orphaned is True


def test_duplicates_of_a_removed_key_are_all_deleted(scenario) -> None:
    case = {"manifest": {ROUTER: DROP}, "duplicate": {ROUTER: {"identity": "zzz-copy"}}}
    result, *_ = scenario(case)
    change = _changes(result)[ROUTER]
    assert change.action is Action.DELETE
    assert [o.identity for o in change.observed] == [f"host:{ROUTER}", "zzz-copy"]


def test_network_type_change_does_not_keep_the_old_segment_id(scenario) -> None:
    """Replacing a vxlan network by a vlan one must not carry the vni over (invalid spec)."""
    result, *_ = scenario({"manifest": {NET: {"spec.type": "vlan"}}, "live": {NET: {"mtu": 1450}}})
    change = _changes(result)[NET]
    assert change.action is Action.REPLACE
    assert _diffs(change) == [("type", "replace", "manifest")]
    spec = change.target.spec
    assert spec["type"] == "vlan"
    assert spec["vni"] is None
    assert spec["mtu"] is None  # the vxlan MTU the host chose does not carry over
    assert spec["subnets"] == change.primary.spec["subnets"]
    lo, hi = RANGES["vlanId"]
    assert isinstance(spec["vlanId"], int) and lo <= spec["vlanId"] <= hi
    # the target is a valid network spec
    from reconciler.models import KINDS

    KINDS["Network"].model_validate(dict(spec))


def test_network_type_change_keeps_ids_the_manifest_sets(scenario) -> None:
    result, *_ = scenario({"manifest": {NET: {"spec.type": "vlan", "spec.vlanId": 300, "spec.mtu": 9000}}})
    spec = _changes(result)[NET].target.spec
    assert (spec["type"], spec["vni"], spec["vlanId"], spec["mtu"]) == ("vlan", None, 300, 9000)


def test_nic_moved_to_another_network_drops_the_old_ip(scenario) -> None:
    case = {
        "add": [_net("db", "10.10.2.0/24")],
        "live": {VM: {"networks.0.ip": "10.10.1.50"}},
        "manifest": {VM: {"spec.networks.0.network": "db"}},
    }
    result, *_ = scenario(case)
    change = _changes(result)[VM]
    nic = change.target.spec["networks"][0]
    assert nic["network"] == "db"
    assert nic["ip"] != "10.10.1.50"


# --- stable allocation ----------------------------------------------------------------


def test_vxlan_networks_get_distinct_stable_vnis(write_manifests) -> None:
    docs = [BASE[0], _net("a", "10.1.0.0/24"), _net("b", "10.2.0.0/24"), _net("c", "10.3.0.0/24")]
    first = _plan_docs(write_manifests, docs)
    second = _plan_docs(write_manifests, docs)
    vnis = {c.id: c.target.spec["vni"] for c in first.changes if c.key.kind == "Network"}
    again = {c.id: c.target.spec["vni"] for c in second.changes if c.key.kind == "Network"}
    assert vnis == again
    assert len(set(vnis.values())) == 3
    lo, hi = RANGES["vni"]
    assert all(isinstance(v, int) and lo <= v <= hi for v in vnis.values())
    assert all(c.target.spec["vlanId"] is None for c in first.changes if c.key.kind == "Network")


def test_existing_network_keeps_its_vni_when_another_is_added(write_manifests) -> None:
    docs = [BASE[0], _net("a", "10.1.0.0/24")]
    first = _plan_docs(write_manifests, docs)
    obs = _apply(first)
    vni_a = _find(obs, "Network/acme/a").spec["vni"]

    second = _plan_docs(write_manifests, docs + [_net("b", "10.2.0.0/24")], obs)
    changes = _changes(second)
    assert changes["Network/acme/a"].action is Action.NOOP
    assert changes["Network/acme/b"].action is Action.CREATE
    vni_b = changes["Network/acme/b"].target.spec["vni"]
    assert isinstance(vni_b, int) and vni_b != vni_a

    # even when the host's vni of `a` is what `b` would get on an empty host
    alone = _plan_docs(write_manifests, [BASE[0], _net("b", "10.2.0.0/24")])
    vni_b_alone = _changes(alone)["Network/acme/b"].target.spec["vni"]
    _replace_observed(obs, "Network/acme/a", spec={**_find(obs, "Network/acme/a").spec, "vni": vni_b_alone})
    third = _plan_docs(write_manifests, docs + [_net("b", "10.2.0.0/24")], obs)
    changes = _changes(third)
    assert changes["Network/acme/a"].action is Action.NOOP
    assert changes["Network/acme/b"].target.spec["vni"] not in (None, vni_b_alone)


def test_allocation_avoids_vnis_written_in_the_manifests(write_manifests) -> None:
    alone = _plan_docs(write_manifests, [BASE[0], _net("a", "10.1.0.0/24")])
    taken = _changes(alone)["Network/acme/a"].target.spec["vni"]
    docs = [BASE[0], _net("a", "10.1.0.0/24"), _net("b", "10.2.0.0/24", vni=taken)]
    changes = _changes(_plan_docs(write_manifests, docs))
    assert changes["Network/acme/b"].target.spec["vni"] == taken
    assert changes["Network/acme/a"].target.spec["vni"] not in (None, taken)


def test_vlan_and_flat_networks(write_manifests) -> None:
    docs = [BASE[0], _net("v", "10.1.0.0/24", type="vlan"), _net("f", "10.2.0.0/24", type="flat")]
    changes = _changes(_plan_docs(write_manifests, docs))
    vlan = changes["Network/acme/v"].target.spec
    flat = changes["Network/acme/f"].target.spec
    lo, hi = RANGES["vlanId"]
    assert lo <= vlan["vlanId"] <= hi and vlan["vni"] is None
    assert flat["vni"] is None and flat["vlanId"] is None


# --- sensitive fields and saved plans -------------------------------------------------


def test_user_data_diff_is_sensitive_and_redacted(scenario) -> None:
    result, *_ = scenario({"manifest": {VM: {"spec.userData": SECRET2}}})
    (diff,) = _changes(result)[VM].diffs
    assert diff.path == ("userData",) and diff.sensitive is True
    assert diff.old == SECRET and diff.new == SECRET2

    redacted = result.to_json()
    for secret in ("hunter2-secret", "swordfish-secret"):
        assert secret not in redacted
    data = json.loads(redacted)
    (vm,) = [c for c in data["changes"] if c["kind"] == "Instance"]
    assert vm["diffs"][0]["old"] == SENSITIVE and vm["diffs"][0]["new"] == SENSITIVE
    assert "target" not in vm and "observed" not in vm

    full = result.to_json(redact=False)
    assert "hunter2-secret" in full and "swordfish-secret" in full


def test_non_sensitive_diffs_are_shown(scenario) -> None:
    result, *_ = scenario({"manifest": {VM: {"spec.vcpus": 2}}})
    data = json.loads(result.to_json())
    (vm,) = [c for c in data["changes"] if c["kind"] == "Instance"]
    assert vm["diffs"] == [
        {"path": ["vcpus"], "old": 1, "new": 2, "policy": "restart", "cause": "manifest", "sensitive": False}
    ]


def test_created_user_data_is_never_in_the_redacted_plan(write_manifests) -> None:
    p = _plan_docs(write_manifests, BASE)
    assert "hunter2-secret" not in p.to_json()
    assert "hunter2-secret" in p.to_json(redact=False)


@pytest.mark.parametrize(
    "case",
    [
        {"add": [_net("db", "10.10.2.0/24")], "manifest": {VM: {"spec.userData": SECRET2}}},
        {"manifest": {i: DROP for i in ALL_IDS}},
        {"duplicate": {NET: {"identity": "zzz"}}, "live": {VM: {"powerState": "stopped"}}},
    ],
    ids=["create-update", "removals", "duplicates-drift"],
)
def test_plan_round_trips_through_json(case, scenario) -> None:
    result, *_ = scenario(case)
    assert result.has_changes
    restored = Plan.from_dict(json.loads(result.to_json(redact=False)))
    assert restored.changes == result.changes
    assert restored.edges == result.edges
    assert restored.destroy == result.destroy
    assert restored.created_at == result.created_at
    assert restored.to_json(redact=False) == result.to_json(redact=False)


def test_a_redacted_plan_cannot_be_loaded_for_apply(scenario) -> None:
    result, *_ = scenario({"manifest": {VM: {"spec.vcpus": 2}}})
    with pytest.raises(ValueError, match="must hold its targets"):
        Plan.from_dict(json.loads(result.to_json()))


def test_a_plan_with_errors_cannot_be_loaded(scenario) -> None:
    case = {"setup": {VOLUME: {"spec.sizeGiB": 8}}, "manifest": {VOLUME: {"spec.sizeGiB": 4}}}
    result, *_ = scenario(case)
    assert result.errors
    with pytest.raises(ValueError, match="errors"):
        Plan.from_dict(json.loads(result.to_json(redact=False)))


# --- ordering -------------------------------------------------------------------------


def test_creates_follow_the_creates_of_what_they_reference(write_manifests) -> None:
    p = _plan_docs(write_manifests, BASE)
    pos = _position(p)
    for before, after in [
        (TENANT, NET),
        (NET, VM),
        (VOLUME, VM),
        (IMAGE, VM),
        (GROUP, VM),
        (NET, ROUTER),
        (TENANT, BUCKET),
    ]:
        assert (before, after) in p.edges
        assert pos[before] < pos[after], (before, after)
    _assert_valid_order(p)


def test_deletes_run_in_reverse(scenario) -> None:
    case = {
        "setup": {VOLUME: {"spec.deletionPolicy": "Delete"}, BUCKET: {"spec.deletionPolicy": "Delete"}},
        "manifest": {i: DROP for i in ALL_IDS},
    }
    result, *_ = scenario(case)
    pos = _position(result)
    for before, after in [
        (VM, NET),
        (NET, TENANT),
        (VM, TENANT),
        (VM, VOLUME),
        (VM, IMAGE),
        (VM, GROUP),
        (ROUTER, NET),
        (BUCKET, TENANT),
    ]:
        assert (before, after) in result.edges
        assert pos[before] < pos[after], (before, after)
    assert result.changes[-1].id == TENANT


def test_instance_detaching_a_volume_runs_before_its_delete(scenario) -> None:
    case = {
        "setup": {VOLUME: {"spec.deletionPolicy": "Delete"}},
        "manifest": {VOLUME: DROP, VM: {"spec.volumes": DROP}},
    }
    result, *_ = scenario(case)
    assert (VM, VOLUME) in result.edges
    pos = _position(result)
    assert pos[VM] < pos[VOLUME]
    assert [c.id for c in result.actionable] == [VM, VOLUME]


def test_replaced_network_notes_name_every_instance_on_it(scenario) -> None:
    second = _doc(
        "Instance", "vm2", {"image": "tiny", "networks": [{"network": "web"}]}
    )
    case = {
        "setup": {},
        "add": [second],
        "manifest": {NET: {"spec.subnets.0.cidr": "10.30.0.0/24"}},
    }
    result, *_ = scenario(case)
    change = _changes(result)[NET]
    assert change.action is Action.REPLACE
    assert "every instance on it loses its address meanwhile: Instance acme/vm, Instance acme/vm2" in change.notes
    assert "the old object is destroyed before the new one is created" in change.notes
    # the new instance is created after the network is (re)created
    assert (NET, "Instance/acme/vm2") in result.edges


def test_router_deleted_while_its_network_is_replaced_goes_first(scenario) -> None:
    case = {
        "manifest": {ROUTER: DROP, NET: {"spec.subnets.0.cidr": "10.30.0.0/24"}},
    }
    result, *_ = scenario(case)
    changes = _changes(result)
    assert changes[ROUTER].action is Action.DELETE
    assert changes[NET].action is Action.REPLACE
    # the router stops using the old network before that network is destroyed
    assert (ROUTER, NET) in result.edges
    pos = _position(result)
    assert pos[ROUTER] < pos[NET]


def test_deletes_honour_depends_on_in_reverse(write_manifests) -> None:
    logs = _doc("Bucket", "logs", {"deletionPolicy": "Delete"})
    app = _doc("Bucket", "app", {"deletionPolicy": "Delete"}, dependsOn=["Bucket/logs"])
    first = _plan_docs(write_manifests, [BASE[0], logs, app])
    assert ("Bucket/acme/logs", "Bucket/acme/app") in first.edges
    obs = _apply(first)
    assert _find(obs, "Bucket/acme/app").mark.depends_on == ("Bucket/logs",)
    gone = _plan_docs(write_manifests, [BASE[0]], obs)
    # app was created after logs, so it is deleted before it
    assert ("Bucket/acme/app", "Bucket/acme/logs") in gone.edges
    pos = _position(gone)
    assert pos["Bucket/acme/app"] < pos["Bucket/acme/logs"]


def test_example_cloud_plans_in_a_valid_order(example_manifests) -> None:
    desired, problems = load([example_manifests])
    assert problems == []
    p = plan(desired, Observation())
    assert p.errors == []
    assert {c.id for c in p.changes} == {str(k) for k in desired.resources}
    assert all(c.action is Action.CREATE for c in p.changes)
    _assert_valid_order(p)
    graph = build_graph(desired)
    pos = _position(p)
    for a, b in graph.edges:
        if not graph.nodes[a].get("missing"):
            assert pos[str(a)] < pos[str(b)], (a, b)
    obs = _apply(p)
    again = plan(desired, obs)
    assert not again.has_changes and again.edges == []


def _without_time(p: Plan) -> dict:
    data = json.loads(p.to_json(redact=False))
    data.pop("createdAt")
    return data


def test_plan_is_deterministic(scenario, write_manifests) -> None:
    case = {
        "add": [_net("db", "10.10.2.0/24"), _net("ops", "10.10.3.0/24")],
        "manifest": {ROUTER: DROP, VM: {"spec.vcpus": 2}, BUCKET: {"spec.versioning": True}},
        "live": {NET: {"subnets.0.dhcp.enabled": False}},
        "duplicate": {IMAGE: {"identity": "zzz"}},
    }
    result, desired, obs, _ = scenario(case)
    again = plan(desired, obs)
    assert _without_time(again) == _without_time(result)
    shuffled = Observation(owned=list(reversed(obs.owned)))
    assert _without_time(plan(desired, shuffled)) == _without_time(result)
    explicit = plan(desired, obs, build_graph(desired))
    assert _without_time(explicit) == _without_time(result)


def test_plan_does_not_mutate_its_inputs(scenario) -> None:
    case = {"live": {BUCKET: {"metadata.billing": "ops"}}, "manifest": {BUCKET: {"spec.metadata": DROP}}}
    result, desired, obs, _ = scenario(case)
    before = copy.deepcopy([o.to_dict() for o in obs.owned])
    sets = copy.deepcopy({k: (r.spec_set, r.spec_full) for k, r in desired.resources.items()})
    plan(desired, obs)
    assert [o.to_dict() for o in obs.owned] == before
    assert {k: (r.spec_set, r.spec_full) for k, r in desired.resources.items()} == sets


def test_planner_does_no_io(scenario, monkeypatch) -> None:
    case = {
        "add": [_net("db", "10.10.2.0/24")],
        "manifest": {ROUTER: DROP, VM: {"spec.vcpus": 2}},
        "live": {NET: {"mtu": 1450}},
    }
    expected, desired, obs, _ = scenario(case)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the planner must not do I/O")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(socket, "socket", refuse)
    result = plan(desired, obs)
    destroyed = plan(desired, obs, destroy=True)
    monkeypatch.undo()
    assert _without_time(result) == _without_time(expected)
    assert {c.action for c in result.changes} >= {Action.CREATE, Action.UPDATE, Action.DELETE}
    assert destroyed.destroy is True


def test_summary_counts(scenario) -> None:
    case = {
        "add": [_net("db", "10.10.2.0/24")],
        "manifest": {ROUTER: DROP, BUCKET: DROP, VM: {"spec.vcpus": 2}, IMAGE: {"spec.source": "/x.qcow2"}},
    }
    result, *_ = scenario(case)
    assert result.summary() == "Plan: 1 to add, 1 to change, 1 to replace, 1 to destroy, 1 to orphan (retained)."
    assert json.loads(result.to_json())["summary"] == {
        "noop": len(result.changes) - 5,
        "create": 1,
        "update": 1,
        "replace": 1,
        "delete": 1,
        "orphan": 1,
    }
