"""Convergence: for any valid cloud, apply makes the host match and a new plan is empty.

Hypothesis generates random valid clouds (tenants with networks on non-overlapping
subnets, an optional router, security groups naming each other, an image, instances on
those networks with volumes attached once, buckets, Retain and Delete policies, quotas
large enough), writes them as YAML files, loads them, and drives the Controller on the
in-memory drivers in a fresh state directory per example.
"""

from __future__ import annotations

import ipaddress
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from reconciler.controller import Controller
from reconciler.hostconfig import HostConfig
from reconciler.loader import load
from reconciler.models import KINDS, Desired
from reconciler.planner import Action, Plan
from reconciler.state import Observed

API = "reconciler/v1"
TENANTS = ("ta", "tb", "tc", "td")
NETWORKS = ("n1", "n2", "n3", "n4")
GROUPS = ("sg1", "sg2")
VOLUMES = ("v1", "v2", "v3")
INSTANCES = ("i1", "i2", "i3", "i4", "i5")
BUCKETS = ("b1", "b2")
BIG_QUOTA = {"instances": 100, "vcpus": 1000, "memoryMiB": 1_000_000, "volumeGiB": 10_000, "buckets": 100}

Key3 = tuple[str, str, str]
Doc = dict[str, Any]

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- documents ---------------------------------------------------------------------------


def document(kind: str, name: str, tenant: str | None, spec: dict[str, Any], **meta: Any) -> Doc:
    metadata: dict[str, Any] = {"name": name}
    if tenant is not None:
        metadata["tenant"] = tenant
    metadata.update({k: v for k, v in meta.items() if v})
    doc: Doc = {"apiVersion": API, "kind": kind, "metadata": metadata}
    if spec:
        doc["spec"] = spec
    return doc


def key_of(doc: Doc) -> Key3:
    meta = doc["metadata"]
    return (doc["kind"], meta.get("tenant", meta["name"]), meta["name"])


def maybe(draw: st.DrawFn, spec: dict[str, Any], name: str, values: st.SearchStrategy[Any]) -> None:
    """Set spec[name] to a drawn value, or leave it out (the model default applies)."""
    if draw(st.booleans()):
        spec[name] = draw(values)


def subset(draw: st.DrawFn, items: list[str] | tuple[str, ...], max_size: int | None = None) -> list[str]:
    if not items:
        return []
    return draw(st.lists(st.sampled_from(list(items)), unique=True, max_size=max_size or len(items)))


@st.composite
def clouds(draw: st.DrawFn) -> list[Doc]:
    """The documents of a random valid cloud."""
    tenants = draw(st.lists(st.sampled_from(TENANTS), min_size=1, max_size=3, unique=True))
    docs: list[Doc] = []
    # tenant -> network name -> (subnets, external)
    networks: dict[str, dict[str, tuple[list[ipaddress.IPv4Network], bool]]] = {}

    for tenant in tenants:
        spec: dict[str, Any] = {}
        maybe(draw, spec, "description", st.sampled_from(["", "a tenant", "Ünïcode tenant"]))
        if draw(st.booleans()):
            spec["quota"] = draw(st.sampled_from([BIG_QUOTA, {"instances": 50}, {}]))
        docs.append(document("Tenant", tenant, None, spec, labels=draw(st.sampled_from([{}, {"team": "x"}]))))

        t_index = TENANTS.index(tenant)
        names = draw(st.lists(st.sampled_from(NETWORKS), max_size=3, unique=True))
        slots = draw(st.lists(st.integers(0, 6), min_size=len(names), max_size=len(names), unique=True))
        networks[tenant] = {}
        for name, slot in zip(names, slots):
            spec = {}
            maybe(draw, spec, "type", st.sampled_from(["vxlan", "vlan", "flat"]))
            maybe(draw, spec, "mtu", st.sampled_from([1280, 1400, 1450, 1500, 9000]))
            external = draw(st.integers(0, 3)) == 0
            if external:
                spec["external"] = True
            cidrs = [ipaddress.IPv4Network(f"10.{t_index}.{slot}.0/24")]
            extra = draw(st.integers(0, 4))
            if extra == 0:
                cidrs = []  # a network without a subnet
            elif extra == 1:
                cidrs.append(ipaddress.IPv4Network(f"10.{t_index}.{100 + slot}.0/25"))
            subnets = []
            for cidr in cidrs:
                subnet: dict[str, Any] = {"cidr": str(cidr)}
                maybe(draw, subnet, "gateway", st.sampled_from([str(cidr.network_address + 1),
                                                                 str(cidr.network_address + 2)]))
                maybe(draw, subnet, "dhcp", st.sampled_from([
                    {"enabled": False},
                    {"enabled": True},
                    {"start": str(cidr.network_address + 50), "end": str(cidr.network_address + 99)},
                ]))
                maybe(draw, subnet, "dnsServers", st.sampled_from([[], ["9.9.9.9"], ["1.1.1.1", "8.8.8.8"]]))
                subnets.append(subnet)
            if subnets or draw(st.booleans()):
                spec["subnets"] = subnets
            networks[tenant][name] = (cidrs, external)
            docs.append(document("Network", name, tenant, spec))

    for tenant in tenants:
        own = networks[tenant]
        routable = [n for n, (cidrs, _) in own.items() if cidrs]
        groups = subset(draw, GROUPS)
        volumes = subset(draw, VOLUMES)
        instances = subset(draw, INSTANCES, max_size=4)
        buckets = subset(draw, BUCKETS)

        # a router over some of the networks
        if own and draw(st.booleans()):
            joined = subset(draw, routable)
            spec = {"networks": joined} if joined or draw(st.booleans()) else {}
            outside = [n for n in own if n not in joined]
            shared = [f"{t}/{n}" for t in tenants if t != tenant
                      for n, (_, ext) in networks[t].items() if ext]
            choices = [None, *outside, *shared]
            external = draw(st.sampled_from(choices))
            if external is not None:
                spec["external"] = external
            maybe(draw, spec, "snat", st.booleans())
            docs.append(document("Router", "r", tenant, spec))

        # security groups, possibly naming each other (or themselves)
        for name in groups:
            rules = []
            for _ in range(draw(st.integers(0, 3))):
                rule: dict[str, Any] = {}
                maybe(draw, rule, "direction", st.sampled_from(["ingress", "egress"]))
                protocol = draw(st.sampled_from([None, "tcp", "udp", "icmp", "any"]))
                if protocol is not None:
                    rule["protocol"] = protocol
                if protocol in ("tcp", "udp"):
                    maybe(draw, rule, "ports", st.sampled_from(["22", "80", "8000-8080"]))
                maybe(draw, rule, "remote", st.sampled_from(["0.0.0.0/0", "10.0.0.0/8", *groups]))
                rules.append(rule)
            spec = {}
            maybe(draw, spec, "description", st.sampled_from(["", "web", "db"]))
            if rules or draw(st.booleans()):
                spec["rules"] = rules
            docs.append(document("SecurityGroup", name, tenant, spec))

        # an image, when something boots from it (and sometimes otherwise)
        if instances or draw(st.booleans()):
            spec = {"source": draw(st.sampled_from(["/images/tiny.qcow2", "/images/other.raw"]))}
            maybe(draw, spec, "format", st.sampled_from(["qcow2", "raw"]))
            docs.append(document("Image", "img", tenant, spec))

        for name in volumes:
            spec = {"sizeGiB": draw(st.integers(1, 3))}
            maybe(draw, spec, "deletionPolicy", st.sampled_from(["Retain", "Delete"]))
            maybe(draw, spec, "wipe", st.booleans())
            docs.append(document("Volume", name, tenant, spec))

        # each volume attached to one instance at most
        owner = {v: draw(st.sampled_from([None, *instances])) for v in volumes}
        taken_ips: dict[str, set[str]] = defaultdict(set)
        for name in instances:
            spec = {"image": "img"}
            maybe(draw, spec, "vcpus", st.integers(1, 2))
            maybe(draw, spec, "memoryMiB", st.sampled_from([64, 128, 256]))
            maybe(draw, spec, "rootDiskGiB", st.integers(1, 3))
            maybe(draw, spec, "powerState", st.sampled_from(["running", "stopped"]))
            maybe(draw, spec, "restartPolicy", st.sampled_from(["Never", "Allowed"]))
            nics = []
            for net in subset(draw, list(own)):
                nic: dict[str, Any] = {"network": net}
                cidrs = own[net][0]
                if cidrs and draw(st.booleans()):
                    ip = str(cidrs[0].network_address + draw(st.integers(3, 8)))
                    if ip not in taken_ips[net]:
                        taken_ips[net].add(ip)
                        nic["ip"] = ip
                if groups and draw(st.booleans()):
                    nic["securityGroups"] = subset(draw, groups)
                nics.append(nic)
            if nics or draw(st.booleans()):
                spec["networks"] = nics
            mine = [v for v in volumes if owner[v] == name]
            if mine:
                devices = iter(["vdb", "vdc", "vdd"])
                spec["volumes"] = [
                    {"volume": v, **({"device": next(devices)} if draw(st.booleans()) else {})} for v in mine
                ]
            maybe(draw, spec, "userData", st.sampled_from(["#cloud-config\nhostname: x\n", "secret: s3cr3t"]))
            maybe(draw, spec, "sshAuthorizedKeys", st.sampled_from([[], ["ssh-ed25519 AAAA test"]]))
            depends = ["Bucket/" + draw(st.sampled_from(buckets))] if buckets and draw(st.booleans()) else []
            docs.append(document("Instance", name, tenant, spec, dependsOn=depends))

        for name in buckets:
            spec = {}
            maybe(draw, spec, "acl", st.sampled_from(["private", "public-read"]))
            maybe(draw, spec, "versioning", st.booleans())
            maybe(draw, spec, "quota", st.sampled_from([{"bytes": 1024}, {"objects": 10}, {}]))
            maybe(draw, spec, "metadata", st.sampled_from([{}, {"owner": "me"}, {"a": "1", "b": "2"}]))
            maybe(draw, spec, "deletionPolicy", st.sampled_from(["Retain", "Delete"]))
            maybe(draw, spec, "purgeOnDelete", st.booleans())
            docs.append(document("Bucket", name, tenant, spec))
    return docs


def write_cloud(folder: Path, docs: list[Doc]) -> Path:
    """One file of tenants, one file per tenant for the rest."""
    folder.mkdir(parents=True)
    files: dict[str, list[Doc]] = defaultdict(list)
    for doc in docs:
        files["tenants.yaml" if doc["kind"] == "Tenant" else f"{doc['metadata']['tenant']}/cloud.yaml"].append(doc)
    for name, file_docs in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(file_docs, sort_keys=False, allow_unicode=True))
    return folder


# --- the host ------------------------------------------------------------------------------


def controller_for(state: Path) -> Controller:
    return Controller(HostConfig(stateDir=state, drivers="memory"))


def loaded(folder: Path) -> Desired:
    desired, problems = load([folder])
    assert problems == [], "a generated cloud is valid:\n" + "\n".join(map(str, problems))
    return desired


def describe(the_plan: Plan) -> str:
    lines = [f"{c.action.value} {c.key.display}: {c.reason} {[d.to_dict() for d in c.diffs]}"
             for c in the_plan.actionable]
    return "\n".join(lines + [str(e) for e in the_plan.errors])


def apply_ok(controller: Controller, the_plan: Plan) -> None:
    assert not the_plan.errors, describe(the_plan)
    result = controller.apply(the_plan, parallelism=4)
    failures = [f"{o.change.key.display}: {o.status}: {o.error}" for o in result.outcomes if o.status != "applied"]
    assert result.ok, "\n".join(failures)
    assert len(result.outcomes) == len(the_plan.actionable)


def owned(controller: Controller) -> dict[Key3, list[Observed]]:
    out: dict[Key3, list[Observed]] = defaultdict(list)
    for obs in controller.observe().owned:
        out[tuple(obs.key)].append(obs)  # type: ignore[index]
    return out


def check_host_matches(controller: Controller, desired: Desired, unchanged: set[Key3] = frozenset()) -> None:
    """The host holds exactly one sound object per resource, marked with what was applied.

    `unchanged`: resources the last apply had nothing to do for; their mark still
    records the apply before (whose manifest may have said the same in other words).
    """
    objects = owned(controller)
    live = {k: v for k, v in objects.items() if not any(o.mark.orphaned for o in v)}
    assert set(live) == {tuple(k) for k in desired.resources}
    assert controller.observe().unowned == []
    for key, found in live.items():
        assert len(found) == 1, f"{key}: {len(found)} host objects"
        res = desired.resources[found[0].key]
        if key in unchanged:
            continue
        assert found[0].mark.spec_hash == res.spec_hash, key
        assert dict(found[0].mark.applied) == res.spec_set, key
    check_host_is_sound(objects)


def check_host_is_sound(objects: dict[Key3, list[Observed]]) -> None:
    """Every live spec is a valid spec of its kind; ids and addresses are consistent."""
    specs = {key: found[0].spec for key, found in objects.items()}
    for (kind, tenant, name), spec in specs.items():
        KINDS[kind].model_validate(dict(spec))
    segment: dict[str, dict[int, Key3]] = {"vni": {}, "vlanId": {}}
    for key, spec in specs.items():
        if key[0] != "Network":
            continue
        needed = {"vxlan": "vni", "vlan": "vlanId"}.get(spec["type"])
        for field, ids in segment.items():
            value = spec.get(field)
            if field == needed:
                assert isinstance(value, int), f"{key}: {spec['type']} network without {field}"
            else:
                assert value is None, f"{key}: {spec['type']} network with {field} {value}"
            if value is not None:
                assert value not in ids, f"{field} {value} used by {key} and {ids[value]}"
                ids[value] = key
    addresses: dict[tuple[str, str], dict[str, Key3]] = defaultdict(dict)
    for key, spec in specs.items():
        if key[0] != "Instance":
            continue
        for nic in spec["networks"]:
            assert ("Network", key[1], nic["network"]) in specs, f"{key} on a network that is not there"
            if nic.get("ip") is None:
                continue
            net = specs[("Network", key[1], nic["network"])]
            ip = ipaddress.IPv4Address(nic["ip"])
            assert any(ip in ipaddress.IPv4Network(s["cidr"]) for s in net["subnets"]), (
                f"{key}: {ip} is in no subnet of network {nic['network']}")
            seen = addresses[(key[1], nic["network"])]
            assert nic["ip"] not in seen, f"{nic['ip']} on {nic['network']} used by {key} and {seen[nic['ip']]}"
            seen[nic["ip"]] = key


def keys_of(docs: list[Doc]) -> set[Key3]:
    return {key_of(d) for d in docs}


def retained_by(docs: list[Doc], gone: set[Key3]) -> set[Key3]:
    """What removing `gone` from the manifests keeps on the host, orphaned."""
    kept = {key_of(d) for d in docs if key_of(d) in gone and KINDS[d["kind"]].stateful
            and (d.get("spec") or {}).get("deletionPolicy", "Retain") == "Retain"}
    tenants = {("Tenant", t, t) for _, t, _ in kept}
    return kept | (tenants & gone)


# --- properties ----------------------------------------------------------------------------


@SETTINGS
@given(cloud=clouds())
def test_a_valid_cloud_converges_in_one_apply(cloud: list[Doc]) -> None:
    with tempfile.TemporaryDirectory(prefix="converge-") as name:
        tmp = Path(name)
        note(yaml.safe_dump_all(cloud, sort_keys=False))
        desired = loaded(write_cloud(tmp / "cloud", cloud))
        assert {tuple(k) for k in desired.resources} == keys_of(cloud)
        controller = controller_for(tmp / "state")

        first = controller.plan(desired)
        assert not first.errors, describe(first)
        assert {c.action for c in first} == {Action.CREATE}
        assert len(first.changes) == len(cloud)
        # every change comes after the changes of what it depends on
        position = {c.id: i for i, c in enumerate(first.changes)}
        assert all(position[a] < position[b] for a, b in first.edges)
        apply_ok(controller, first)

        again = controller.plan(desired)
        assert not again.has_changes, describe(again)
        assert not again.errors
        check_host_matches(controller, desired)


def _grow_only(a: list[Doc], b: list[Doc]) -> list[Doc]:
    """B with every volume A also has at least as big (volumes only grow: shrinking is refused)."""
    sizes = {key_of(d): d["spec"]["sizeGiB"] for d in a if d["kind"] == "Volume"}
    out = []
    for doc in b:
        if doc["kind"] == "Volume" and key_of(doc) in sizes:
            doc = {**doc, "spec": {**doc["spec"], "sizeGiB": max(doc["spec"]["sizeGiB"], sizes[key_of(doc)])}}
        out.append(doc)
    return out


def switch(controller: Controller, folder: Path, old: list[Doc], new: list[Doc],
           orphans: set[Key3]) -> set[Key3]:
    """Apply `new` on a host that holds `old` (and the `orphans` retained before); check that
    it converges, with deletes and orphans for what `new` lacks. Returns the orphans after."""
    desired = loaded(write_cloud(folder, new))
    new_keys, old_keys = keys_of(new), keys_of(old)
    gone = old_keys - new_keys
    still_orphaned = orphans - new_keys
    retained = retained_by(old, gone)
    # a tenant stays (orphaned) while retained objects of it remain
    retained |= {("Tenant", t, t) for _, t, _ in still_orphaned} & gone
    the_plan = controller.plan(desired)
    actions = {tuple(c.key): c.action for c in the_plan}
    expected: dict[Key3, tuple[Action, ...]] = {}
    for key in gone:
        expected[key] = (Action.ORPHAN,) if key in retained else (Action.DELETE,)
    for key in still_orphaned:
        expected[key] = (Action.NOOP,)
    for key in new_keys & orphans:
        expected[key] = (Action.UPDATE, Action.REPLACE)  # adopted again
    for key in new_keys - old_keys - orphans:
        expected[key] = (Action.CREATE,)
    for key in new_keys & old_keys:
        expected[key] = (Action.NOOP, Action.UPDATE, Action.REPLACE)
    assert set(actions) == set(expected)
    wrong = {k: (actions[k], e) for k, e in expected.items() if actions[k] not in e}
    assert not wrong, f"(planned, expected): {wrong}\n{describe(the_plan)}"
    position = {c.id: i for i, c in enumerate(the_plan.changes)}
    assert all(position[a] < position[b] for a, b in the_plan.edges)
    apply_ok(controller, the_plan)

    again = controller.plan(desired)
    assert not again.has_changes, describe(again)
    assert not again.errors
    check_host_matches(controller, desired, {k for k, a in actions.items() if a is Action.NOOP})
    objects = owned(controller)
    orphaned = {k for k, found in objects.items() if all(o.mark.orphaned for o in found)}
    assert orphaned == still_orphaned | retained
    assert set(objects) == new_keys | orphaned
    return orphaned


@SETTINGS
@given(a=clouds(), b=clouds())
def test_switching_to_another_cloud_and_back_converges(a: list[Doc], b: list[Doc]) -> None:
    b = _grow_only(a, b)
    back = _grow_only(b, a)  # A again, volumes as grown by B
    with tempfile.TemporaryDirectory(prefix="converge-") as name:
        tmp = Path(name)
        note("A:\n" + yaml.safe_dump_all(a, sort_keys=False))
        note("B:\n" + yaml.safe_dump_all(b, sort_keys=False))
        controller = controller_for(tmp / "state")
        assert switch(controller, tmp / "a", [], a, set()) == set()
        orphans = switch(controller, tmp / "b", a, b, set())
        # back to A: what B orphaned is adopted again
        assert switch(controller, tmp / "back", b, back, orphans) == retained_by(b, keys_of(b) - keys_of(back))


# --- cases the properties found (regressions of planner bugs fixed since) -----------------


def _converge(tmp: Path, *clouds_: list[Doc]) -> Controller:
    controller = controller_for(tmp / "state")
    for i, cloud in enumerate(clouds_):
        desired = loaded(write_cloud(tmp / f"c{i}", cloud))
        apply_ok(controller, controller.plan(desired))
    return controller


def test_a_removed_tenant_with_a_retained_bucket_converges(tmp_path: Path) -> None:
    a = [document("Tenant", "t1", None, {}), document("Bucket", "b", "t1", {}),
         document("Tenant", "t2", None, {})]
    b = [document("Tenant", "t2", None, {})]
    controller = _converge(tmp_path, a, b)
    again = controller.plan(loaded(write_cloud(tmp_path / "again", b)))
    assert not again.has_changes, describe(again)


def test_a_network_changing_type_gets_the_ids_of_its_new_type(tmp_path: Path) -> None:
    net = {"subnets": [{"cidr": "10.0.0.0/24"}]}
    for old, new in (("vxlan", "vlan"), ("vlan", "vxlan"), ("flat", "vlan"), ("vxlan", "flat")):
        a = [document("Tenant", "t", None, {}), document("Network", "n", "t", {"type": old, **net})]
        b = [document("Tenant", "t", None, {}), document("Network", "n", "t", {"type": new, **net})]
        controller = _converge(tmp_path / f"{old}-{new}", a, b)
        check_host_is_sound(owned(controller))
        again = controller.plan(loaded(write_cloud(tmp_path / f"{old}-{new}" / "again", b)))
        assert not again.has_changes, describe(again)


def _instance(name: str, *nics: dict[str, Any]) -> Doc:
    return document("Instance", name, "t", {"image": "img", "networks": list(nics)})


_BASE = [
    document("Tenant", "t", None, {}),
    document("Image", "img", "t", {"source": "/images/tiny.qcow2"}),
    document("Network", "n1", "t", {"subnets": [{"cidr": "10.0.1.0/24"}]}),
    document("Network", "n2", "t", {"subnets": [{"cidr": "10.0.2.0/24"}]}),
]


def test_a_nic_moved_to_another_network_does_not_keep_its_old_address(tmp_path: Path) -> None:
    a = _BASE + [_instance("i", {"network": "n1", "ip": "10.0.1.5"})]
    b = _BASE + [_instance("i", {"network": "n2"})]
    controller = _converge(tmp_path, a, b)
    check_host_is_sound(owned(controller))
    ip = owned(controller)[("Instance", "t", "i")][0].spec["networks"][0]["ip"]
    assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.0.2.0/24")  # allocated on n2


def test_an_address_no_longer_fixed_is_kept_on_the_same_network(tmp_path: Path) -> None:
    a = _BASE + [_instance("i", {"network": "n1", "ip": "10.0.1.5"})]
    b = _BASE + [_instance("i", {"network": "n1"})]
    controller = _converge(tmp_path, a, b)
    check_host_is_sound(owned(controller))
    assert owned(controller)[("Instance", "t", "i")][0].spec["networks"][0]["ip"] == "10.0.1.5"


def test_an_address_released_by_one_instance_can_be_fixed_by_another(tmp_path: Path) -> None:
    a = _BASE + [_instance("i", {"network": "n1", "ip": "10.0.1.5"})]
    b = _BASE + [_instance("i", {"network": "n1"}), _instance("j", {"network": "n1", "ip": "10.0.1.5"})]
    controller = _converge(tmp_path, a, b)
    check_host_is_sound(owned(controller))


def test_an_address_outside_the_new_subnet_is_not_kept(tmp_path: Path) -> None:
    a = _BASE + [_instance("i", {"network": "n1", "ip": "10.0.1.5"})]
    moved = document("Network", "n1", "t", {"subnets": [{"cidr": "10.0.3.0/24"}]})
    b = [moved if key_of(d) == key_of(moved) else d for d in _BASE] + [_instance("i", {"network": "n1"})]
    controller = _converge(tmp_path, a, b)
    check_host_is_sound(owned(controller))


def test_drift_after_a_no_op_manifest_edit_is_still_drift(tmp_path: Path) -> None:
    base = [document("Tenant", "t", None, {}), document("Image", "img", "t", {"source": "/images/tiny.qcow2"})]
    a = base + [document("Instance", "i", "t", {"image": "img", "powerState": "running"})]
    b = base + [document("Instance", "i", "t", {"image": "img"})]
    controller = _converge(tmp_path, a, b)
    desired = loaded(write_cloud(tmp_path / "again", b))
    obs = owned(controller)[("Instance", "t", "i")][0]
    path = tmp_path / "state" / "memory" / "Instance" / f"{obs.identity}.json"
    data = json.loads(path.read_text())
    data["spec"]["powerState"] = "stopped"
    path.write_text(json.dumps(data))
    change = next(c for c in controller.plan(desired) if c.key.name == "i")
    assert [(d.path, d.cause) for d in change.diffs] == [(("powerState",), "drift")]
    assert {r.name: r.state for r in controller.status(desired)}["i"] == "drifted"


def test_generated_clouds_are_written_as_loadable_yaml(tmp_path: Path) -> None:
    """The writer itself: every document survives the round trip through files unchanged."""
    docs = _BASE + [_instance("i", {"network": "n1", "ip": "10.0.1.5"})]
    desired = loaded(write_cloud(tmp_path / "c", docs))
    by_key = {tuple(k): r for k, r in desired.resources.items()}
    assert set(by_key) == keys_of(docs)
    for doc in docs:
        assert by_key[key_of(doc)].spec_set == doc.get("spec", {})
