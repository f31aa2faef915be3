"""Cross-resource checks: addresses, references, tenants, cycles, quotas, attachments.

Every case loads a valid base cloud (base.yaml) plus the manifest under test (cloud.yaml)
through `reconciler.loader.load` and checks the exact file, line and field path of each
problem, and the words of a message a user can act on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest

from reconciler.checks import check_desired
from reconciler.errors import Problem
from reconciler.loader import load

Write = Callable[..., Path]

# Tenants acme and globex; acme has network web (10.0.0.0/24, gateway 10.0.0.1), image tiny,
# security group web and volume data; globex has networks shared (internal) and public
# (external: true).
BASE = """\
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: globex}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: web, tenant: acme}
spec:
  subnets:
    - cidr: 10.0.0.0/24
---
apiVersion: reconciler/v1
kind: Image
metadata: {name: tiny, tenant: acme}
spec: {source: /images/tiny.qcow2}
---
apiVersion: reconciler/v1
kind: SecurityGroup
metadata: {name: web, tenant: acme}
---
apiVersion: reconciler/v1
kind: Volume
metadata: {name: data, tenant: acme}
spec: {sizeGiB: 1}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: shared, tenant: globex}
spec:
  subnets:
    - cidr: 192.168.0.0/24
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: public, tenant: globex}
spec:
  type: flat
  external: true
  subnets:
    - cidr: 203.0.113.0/24
"""
BASE_RESOURCES = 8
BASE_WEB_CIDR_LINE = 14


def show(problems: Sequence[Problem]) -> str:
    return "\n".join(str(p) for p in problems) or "(no problems)"


def load_cloud(write_manifests: Write, text: str) -> tuple[Path, list[Problem], int]:
    """Load base.yaml + cloud.yaml; return (cloud.yaml, problems, number of resources)."""
    root = write_manifests({"base.yaml": BASE, "cloud.yaml": text})
    desired, problems = load([root])
    return root / "cloud.yaml", problems, len(desired)


def expect_one(
    problems: Sequence[Problem], file: Path, line: int, path: str, words: Sequence[str],
    resource: str | None = None,
) -> Problem:
    assert [(p.file, p.line, p.path) for p in problems] == [(str(file), line, path)], show(problems)
    problem = problems[0]
    for word in words:
        assert word in problem.message, f"{word!r} not in: {problem}"
    if resource is not None:
        assert problem.resource == resource
    assert str(problem).startswith(f"{file}:{line}: {problem.resource}: {path}: "), str(problem)
    return problem


def run_cases(write_manifests: Write, text: str, line: int, path: str, words: Sequence[str]) -> Problem:
    cloud, problems, _ = load_cloud(write_manifests, text)
    return expect_one(problems, cloud, line, path, words)


def test_base_cloud_is_valid(write_manifests: Write) -> None:
    _, problems, count = load_cloud(write_manifests, "")
    assert problems == [], show(problems)
    assert count == BASE_RESOURCES


def _network(*subnet_lines: str, name: str = "net") -> str:
    """A Network of acme whose `subnets:` has these lines (line 6 is the first)."""
    body = "".join(f"    {line}\n" for line in subnet_lines)
    return (
        "apiVersion: reconciler/v1\nkind: Network\n"
        f"metadata: {{name: {name}, tenant: acme}}\nspec:\n  subnets:\n{body}"
    )


# --- subnets: one network at a time ---------------------------------------------------------

SUBNET_CASES = [
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  gateway: 10.2.0.1"),
        7, "spec.subnets[0].gateway", ["gateway 10.2.0.1 is outside the subnet 10.1.0.0/24"],
        id="gateway-outside-subnet",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "- cidr: 10.3.0.0/24", "  gateway: 10.3.0.0"),
        8, "spec.subnets[1].gateway", ["gateway 10.3.0.0", "network or broadcast address of 10.3.0.0/24"],
        id="gateway-is-network-address",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  gateway: 10.1.0.254", "  dhcp:", "    start: 10.1.0.0", "    end: 10.1.0.100"),
        9, "spec.subnets[0].dhcp.start", ["DHCP range start 10.1.0.0", "outside the usable addresses of 10.1.0.0/24"],
        id="dhcp-start-outside",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  dhcp: {end: 10.1.1.5}"),
        7, "spec.subnets[0].dhcp.end", ["DHCP range end 10.1.1.5", "outside the usable addresses of 10.1.0.0/24"],
        id="dhcp-end-outside",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  dhcp:", "    start: 10.1.0.200", "    end: 10.1.0.100"),
        8, "spec.subnets[0].dhcp.start", ["DHCP range starts at 10.1.0.200", "after its end 10.1.0.100"],
        id="dhcp-start-after-end",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  gateway: 10.1.0.50", "  dhcp: {start: 10.1.0.10, end: 10.1.0.100}"),
        7, "spec.subnets[0].gateway", ["gateway 10.1.0.50 is inside the DHCP range 10.1.0.10-10.1.0.100"],
        id="gateway-inside-dhcp-range",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  gateway: 10.1.0.100"),
        7, "spec.subnets[0].gateway", ["gateway 10.1.0.100 is inside the DHCP range 10.1.0.10-10.1.0.254"],
        id="gateway-inside-default-dhcp-range",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/31"),
        6, "spec.subnets[0].cidr", ["10.1.0.0/31 is too small", "at least a /30"],
        id="subnet-too-small-31",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "- {cidr: 10.1.1.1/32, gateway: 10.1.1.1}"),
        7, "spec.subnets[1].cidr", ["10.1.1.1/32 is too small", "/30"],
        id="subnet-too-small-32",
    ),
    pytest.param(
        _network("- cidr: 10.1.0.0/24", "  dhcp: {start: 10.1.0.2, end: 10.1.0.254}"),
        7, "spec.subnets[0].dhcp.start", ["no address is left for the DHCP server", "10.1.0.2-10.1.0.254"],
        id="no-room-for-the-dhcp-server",
    ),
]


@pytest.mark.parametrize("text, line, path, words", SUBNET_CASES)
def test_subnet_problem(write_manifests: Write, text: str, line: int, path: str, words: list[str]) -> None:
    run_cases(write_manifests, text, line, path, words)


@pytest.mark.parametrize(
    "subnet_lines",
    [
        pytest.param(["- cidr: 10.1.0.0/30", "  dhcp: {enabled: false}"], id="smallest-subnet-30-without-dhcp"),
        pytest.param(["- cidr: 10.1.0.0/29"], id="smallest-subnet-29-with-dhcp"),
        pytest.param(["- cidr: 10.1.0.0/24", "  gateway: 10.1.0.254", "  dhcp: {end: 10.1.0.200}"], id="gateway-after-range"),
        pytest.param(["- cidr: 10.1.0.0/24", "  gateway: 10.1.0.254"], id="gateway-last-default-range-stops-before"),
        pytest.param(["- cidr: 10.1.0.0/24", "  gateway: 10.1.0.10"], id="gateway-first-default-range-starts-after"),
        pytest.param(["- cidr: 10.1.0.0/24", "  gateway: 10.1.0.50", "  dhcp: {enabled: false}"], id="no-dhcp"),
        pytest.param(["- cidr: 10.1.0.0/24", "  dhcp: {start: 10.1.0.3, end: 10.1.0.254}"], id="widest-range"),
    ],
)
def test_valid_subnets_are_accepted(write_manifests: Write, subnet_lines: list[str]) -> None:
    _, problems, count = load_cloud(write_manifests, _network(*subnet_lines))
    assert problems == [], show(problems)
    assert count == BASE_RESOURCES + 1


# --- overlapping subnets, segment ids ----------------------------------------------------------


@pytest.mark.parametrize(
    "type_, field, line",
    [pytest.param("flat", "vni: 5000", 6, id="vni-on-flat"), pytest.param("vxlan", "vlanId: 42", 6, id="vlanid-on-vxlan")],
)
def test_segment_id_must_match_the_type(write_manifests: Write, type_: str, field: str, line: int) -> None:
    name = field.split(":")[0]
    text = (
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: a, tenant: acme}\n"
        f"spec:\n  type: {type_}\n  {field}\n"
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(problems, cloud, line, f"spec.{name}", [f"{name} is only valid with type", f"not {type_}"])


def test_overlapping_subnets_across_two_networks_of_a_tenant(write_manifests: Write) -> None:
    text = _network("- cidr: 10.1.0.0/16", name="big") + "---\n" + _network(
        "- cidr: 172.16.0.0/24", "- cidr: 10.1.5.0/24", name="small"
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(
        problems, cloud, 14, "spec.subnets[1].cidr",
        ["10.1.5.0/24 overlaps 10.1.0.0/16 of Network acme/big", f"({cloud}:6)", "must not overlap"],
        "Network acme/small",
    )


def test_overlap_with_a_network_in_another_file_points_at_both(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _network("- cidr: 10.0.0.0/16", name="wide"))
    base = cloud.with_name("base.yaml")
    # the narrower subnet is the one reported, wherever it is
    expect_one(
        problems, base, BASE_WEB_CIDR_LINE, "spec.subnets[0].cidr",
        ["10.0.0.0/24 overlaps 10.0.0.0/16 of Network acme/wide", f"({cloud}:6)"],
        "Network acme/web",
    )


def test_same_cidr_twice_in_one_network(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _network("- cidr: 10.1.0.0/24", "- cidr: 10.1.0.0/24"))
    expect_one(problems, cloud, 7, "spec.subnets[1].cidr", ["10.1.0.0/24 overlaps 10.1.0.0/24 of Network acme/net"])


def test_same_cidr_in_two_tenants_is_fine(write_manifests: Write) -> None:
    text = (
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: web, tenant: globex}\n"
        "spec:\n  subnets:\n    - cidr: 10.0.0.0/24\n"
    )
    _, problems, count = load_cloud(write_manifests, text)
    assert problems == [], show(problems)
    assert count == BASE_RESOURCES + 1


def test_adjacent_subnets_do_not_overlap(write_manifests: Write) -> None:
    _, problems, _ = load_cloud(
        write_manifests, _network("- cidr: 10.0.1.0/24", "- cidr: 10.0.2.0/23", "- cidr: 9.255.255.0/24")
    )
    assert problems == [], show(problems)


@pytest.mark.parametrize(
    "field, kind_line",
    [pytest.param("vni: 4242", "type: vxlan", id="vni"), pytest.param("vlanId: 42", "type: vlan", id="vlan")],
)
def test_segment_id_used_twice(write_manifests: Write, field: str, kind_line: str) -> None:
    name, value = field.split(": ")
    text = (
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: a, tenant: acme}\n"
        f"spec:\n  {kind_line}\n  {field}\n"
        "---\n"
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: b, tenant: globex}\n"
        f"spec:\n  {kind_line}\n  {field}\n"
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(
        problems, cloud, 13, f"spec.{name}",
        [f"{name} {value} is already used by Network acme/a", f"({cloud}:6)"],
        "Network globex/b",
    )


# --- references ---------------------------------------------------------------------------

def _instance(spec_lines: str, name: str = "vm", tenant: str = "acme", meta: str = "") -> str:
    """An Instance; metadata on line 3, spec lines from line 5 (image tiny unless given)."""
    return (
        f"apiVersion: reconciler/v1\nkind: Instance\nmetadata: {{name: {name}, tenant: {tenant}{meta}}}\n"
        f"spec:\n{spec_lines}"
    )


REFERENCE_CASES = [
    pytest.param(
        _instance("  image: nope\n"),
        5, "spec.image", ["no Image named 'nope' in tenant 'acme'"],
        id="image",
    ),
    pytest.param(
        _instance("  image: tinny\n"),
        5, "spec.image", ["no Image named 'tinny'", "did you mean 'tiny'?"],
        id="image-typo",
    ),
    pytest.param(
        _instance("  image: tiny\n  networks:\n    - {network: web}\n    - {network: nope}\n"),
        8, "spec.networks[1].network", ["no Network named 'nope' in tenant 'acme'"],
        id="nic-network",
    ),
    pytest.param(
        _instance("  image: tiny\n  networks:\n    - network: web\n      securityGroups: [web, nope]\n"),
        8, "spec.networks[0].securityGroups[1]", ["no SecurityGroup named 'nope' in tenant 'acme'"],
        id="nic-security-group",
    ),
    pytest.param(
        _instance("  image: tiny\n  volumes:\n    - volume: dta\n"),
        7, "spec.volumes[0].volume", ["no Volume named 'dta'", "did you mean 'data'?"],
        id="volume",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: SecurityGroup\nmetadata: {name: db, tenant: acme}\nspec:\n  rules:\n"
        "    - {protocol: tcp, ports: \"5432\", remote: web}\n    - {protocol: tcp, ports: \"22\", remote: admins}\n",
        7, "spec.rules[1].remote", ["no SecurityGroup named 'admins' in tenant 'acme'"],
        id="rule-remote-group",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Router\nmetadata: {name: edge, tenant: acme}\nspec:\n"
        "  networks:\n    - web\n    - nope\n",
        7, "spec.networks[1]", ["no Network named 'nope' in tenant 'acme'"],
        id="router-network",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Router\nmetadata: {name: edge, tenant: acme}\nspec:\n"
        "  networks: [web]\n  external: uplink\n",
        6, "spec.external", ["no Network named 'uplink' in tenant 'acme'"],
        id="router-external-same-tenant",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Volume\nmetadata:\n  name: logs\n  tenant: acme\n"
        "  dependsOn:\n    - Volume/data\n    - Bucket/nope\nspec: {sizeGiB: 1}\n",
        8, "metadata.dependsOn[1]", ["no Bucket named 'nope' in tenant 'acme'"],
        id="depends-on-missing",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Volume\nmetadata:\n  name: logs\n  tenant: acme\n"
        "  dependsOn:\n    - Bukcet/nope\nspec: {sizeGiB: 1}\n",
        7, "metadata.dependsOn[0]", ["'Bukcet/nope' must be Kind/name", "Bucket"],
        id="depends-on-bad-kind",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Volume\nmetadata:\n  name: logs\n  tenant: acme\n"
        "  dependsOn: [data]\nspec: {sizeGiB: 1}\n",
        6, "metadata.dependsOn[0]", ["'data' must be Kind/name"],
        id="depends-on-no-kind",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Bucket\nmetadata:\n  name: assets\n  tenant: initech\n",
        5, "metadata.tenant", ["tenant 'initech' is not declared", "add a Tenant named 'initech'"],
        id="undeclared-tenant",
    ),
]


@pytest.mark.parametrize("text, line, path, words", REFERENCE_CASES)
def test_dangling_reference(write_manifests: Write, text: str, line: int, path: str, words: list[str]) -> None:
    run_cases(write_manifests, text, line, path, words)


def test_every_dangling_reference_of_a_resource_is_reported(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(
        write_manifests,
        _instance(
            "  image: nope\n"
            "  networks:\n"
            "    - {network: nope, securityGroups: [nope]}\n"
            "  volumes:\n"
            "    - {volume: nope}\n",
            meta=", dependsOn: [Router/nope]",
        ),
    )
    assert [(p.line, p.path) for p in problems] == [
        (3, "metadata.dependsOn[0]"),
        (5, "spec.image"),
        (7, "spec.networks[0].network"),
        (7, "spec.networks[0].securityGroups[0]"),
        (9, "spec.volumes[0].volume"),
    ], show(problems)
    assert {p.file for p in problems} == {str(cloud)}
    kinds = ["Router", "Image", "Network", "SecurityGroup", "Volume"]
    for problem, kind in zip(problems, kinds):
        assert f"no {kind} named 'nope' in tenant 'acme'" in problem.message


def test_reference_to_a_broken_document_is_not_reported_twice(write_manifests: Write) -> None:
    text = (
        "apiVersion: reconciler/v1\nkind: Image\nmetadata: {name: big, tenant: acme}\nspec: {source: relative.img}\n"
        "---\n" + _instance("  image: big\n")
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(problems, cloud, 4, "spec.source", ["must be an absolute path"])


def test_security_groups_naming_each_other_are_not_a_cycle(write_manifests: Write) -> None:
    text = (
        "apiVersion: reconciler/v1\nkind: SecurityGroup\nmetadata: {name: a, tenant: acme}\n"
        "spec: {rules: [{remote: b}]}\n---\n"
        "apiVersion: reconciler/v1\nkind: SecurityGroup\nmetadata: {name: b, tenant: acme}\n"
        "spec: {rules: [{remote: a}]}\n"
    )
    _, problems, _ = load_cloud(write_manifests, text)
    assert problems == [], show(problems)


# --- across tenants ----------------------------------------------------------------------

def test_instance_naming_another_tenants_network(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(
        write_manifests, _instance("  image: tiny\n  networks:\n    - network: shared\n")
    )
    expect_one(
        problems, cloud, 7, "spec.networks[0].network",
        ["no Network named 'shared' in tenant 'acme'", "Network globex/shared exists", "tenant 'globex'",
         "cannot cross tenants"],
    )


def test_instance_naming_another_tenants_network_with_its_tenant(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(
        write_manifests, _instance("  image: tiny\n  networks:\n    - network: globex/shared\n")
    )
    expect_one(problems, cloud, 7, "spec.networks[0].network", ["'globex/shared' cannot be a host object name"])


def test_instance_naming_another_tenants_image_and_volume(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(
        write_manifests, _instance("  image: tiny\n  volumes: [{volume: data}]\n", tenant="globex")
    )
    assert [(p.file, p.line, p.path) for p in problems] == [
        (str(cloud), 5, "spec.image"),
        (str(cloud), 6, "spec.volumes[0].volume"),
    ], show(problems)
    assert "no Image named 'tiny' in tenant 'globex'" in problems[0].message
    assert "Image acme/tiny exists, but in tenant 'acme'" in problems[0].message
    assert "no Volume named 'data' in tenant 'globex'" in problems[1].message


def _router(spec_lines: str, name: str = "edge") -> str:
    return f"apiVersion: reconciler/v1\nkind: Router\nmetadata: {{name: {name}, tenant: acme}}\nspec:\n{spec_lines}"


def test_router_external_network_of_another_tenant_must_be_external(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _router("  networks: [web]\n  external: globex/shared\n"))
    expect_one(
        problems, cloud, 6, "spec.external",
        ["reference across tenants", "Network globex/shared belongs to tenant 'globex'", "external: true"],
        "Router acme/edge",
    )


def test_router_external_network_with_external_true_is_accepted(write_manifests: Write) -> None:
    _, problems, count = load_cloud(write_manifests, _router("  networks: [web]\n  external: globex/public\n"))
    assert problems == [], show(problems)
    assert count == BASE_RESOURCES + 1


def test_router_external_network_of_another_tenant_that_does_not_exist(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _router("  external: globex/publik\n"))
    expect_one(problems, cloud, 5, "spec.external",
               ["no Network named 'publik' in tenant 'globex'", "did you mean 'public'?"])


def test_router_internal_leg_on_another_tenants_external_network(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _router("  networks: [web, public]\n"))
    expect_one(problems, cloud, 5, "spec.networks[1]",
               ["no Network named 'public' in tenant 'acme'", "Network globex/public exists"])


def test_router_external_also_listed_as_internal(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _router("  networks: [web]\n  external: web\n"))
    expect_one(problems, cloud, 6, "spec.external", ["network 'web' cannot be both external and internal"])


# --- dependency cycles ----------------------------------------------------------------------

def _volume(name: str, depends: str) -> str:
    return (
        f"apiVersion: reconciler/v1\nkind: Volume\nmetadata:\n  name: {name}\n  tenant: acme\n"
        f"  dependsOn: [{depends}]\nspec: {{sizeGiB: 1}}\n"
    )


def test_cycle_of_three_names_every_resource(write_manifests: Write) -> None:
    text = "---\n".join([_volume("a", "Volume/b"), _volume("b", "Volume/c"), _volume("c", "Volume/a")])
    cloud, problems, _ = load_cloud(write_manifests, text)
    problem = expect_one(problems, cloud, 6, "metadata.dependsOn", ["dependency cycle"], "Volume acme/a")
    assert "Volume acme/a -> Volume acme/b -> Volume acme/c -> Volume acme/a" in problem.message


def test_cycle_order_follows_depends_on_whatever_the_names(write_manifests: Write) -> None:
    text = "---\n".join([_volume("a", "Volume/c"), _volume("c", "Volume/b"), _volume("b", "Volume/a")])
    cloud, problems, _ = load_cloud(write_manifests, text)
    problem = expect_one(problems, cloud, 6, "metadata.dependsOn", ["dependency cycle"])
    assert "Volume acme/a -> Volume acme/c -> Volume acme/b -> Volume acme/a" in problem.message


def test_resource_depending_on_itself(write_manifests: Write) -> None:
    cloud, problems, _ = load_cloud(write_manifests, _volume("loop", "Volume/loop"))
    expect_one(problems, cloud, 6, "metadata.dependsOn", ["dependency cycle: Volume acme/loop -> Volume acme/loop"])


def test_cycle_through_a_spec_reference(write_manifests: Write) -> None:
    text = (
        "apiVersion: reconciler/v1\nkind: Network\nmetadata:\n  name: lan\n  tenant: acme\n"
        "  dependsOn: [Router/edge]\nspec:\n  subnets: [{cidr: 10.5.0.0/24}]\n---\n"
        + _router("  networks: [lan]\n")
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    problem = expect_one(problems, cloud, 6, "metadata.dependsOn", ["dependency cycle"], "Network acme/lan")
    assert "Network acme/lan -> Router acme/edge -> Network acme/lan" in problem.message


def test_two_separate_cycles_are_both_reported(write_manifests: Write) -> None:
    text = "---\n".join(
        [_volume("a", "Volume/b"), _volume("b", "Volume/a"), _volume("x", "Volume/y"), _volume("y", "Volume/x")]
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    assert [(p.file, p.line, p.path, p.resource) for p in problems] == [
        (str(cloud), 6, "metadata.dependsOn", "Volume acme/a"),
        (str(cloud), 22, "metadata.dependsOn", "Volume acme/x"),
    ], show(problems)
    assert "Volume acme/a -> Volume acme/b -> Volume acme/a" in problems[0].message
    assert "Volume acme/x -> Volume acme/y -> Volume acme/x" in problems[1].message


def test_dependency_chain_without_cycle_is_fine(write_manifests: Write) -> None:
    text = "---\n".join([_volume("a", "Volume/b"), _volume("b", "Volume/c"), _volume("c", "Volume/data")])
    _, problems, _ = load_cloud(write_manifests, text)
    assert problems == [], show(problems)


# --- quotas --------------------------------------------------------------------------------

QUOTA_TENANT = """\
apiVersion: reconciler/v1
kind: Tenant
metadata: {{name: initech}}
spec:
  quota:
    {quota}
---
apiVersion: reconciler/v1
kind: Image
metadata: {{name: tiny, tenant: initech}}
spec: {{source: /images/tiny.qcow2}}
"""


def _in_initech(kind: str, name: str, spec: str) -> str:
    return f"---\napiVersion: reconciler/v1\nkind: {kind}\nmetadata: {{name: {name}, tenant: initech}}\nspec: {spec}\n"


QUOTA_CASES = [
    pytest.param(
        "instances: 2",
        [("Instance", "a", "{image: tiny}"), ("Instance", "b", "{image: tiny}"), ("Instance", "c", "{image: tiny}")],
        "instances", ["the manifests declare 3 instances", "the quota is 2", "(1 over)"],
        id="instances",
    ),
    pytest.param(
        "vcpus: 3",
        [("Instance", "a", "{image: tiny, vcpus: 2}"), ("Instance", "b", "{image: tiny, vcpus: 4}")],
        "vcpus", ["declare 6 vcpus", "the quota is 3", "(3 over)"],
        id="vcpus",
    ),
    pytest.param(
        "memoryMiB: 1000",
        [("Instance", "a", "{image: tiny, memoryMiB: 512}"), ("Instance", "b", "{image: tiny, memoryMiB: 512}")],
        "memoryMiB", ["declare 1024 MiB of memory", "the quota is 1000", "(24 over)"],
        id="memoryMiB",
    ),
    pytest.param(
        "memoryMiB: 1023",
        [("Instance", "a", "{image: tiny}"), ("Instance", "b", "{image: tiny}")],
        "memoryMiB", ["declare 1024 MiB of memory", "(1 over)"],
        id="memoryMiB-defaults",
    ),
    pytest.param(
        "volumeGiB: 10",
        [("Volume", "a", "{sizeGiB: 6}"), ("Volume", "b", "{sizeGiB: 7}")],
        "volumeGiB", ["declare 13 GiB of volumes", "the quota is 10", "(3 over)"],
        id="volumeGiB",
    ),
    pytest.param(
        "buckets: 0",
        [("Bucket", "a", "{}")],
        "buckets", ["declare 1 buckets", "the quota is 0", "(1 over)"],
        id="buckets",
    ),
]


@pytest.mark.parametrize("quota, resources, field, words", QUOTA_CASES)
def test_quota_exceeded(
    write_manifests: Write, quota: str, resources: list[tuple[str, str, str]], field: str, words: list[str]
) -> None:
    text = QUOTA_TENANT.format(quota=quota) + "".join(_in_initech(*r) for r in resources)
    cloud, problems, _ = load_cloud(write_manifests, text)
    problem = expect_one(problems, cloud, 6, f"spec.quota.{field}", ["quota exceeded", *words], "Tenant initech")
    assert str(problem).startswith(f"{cloud}:6: Tenant initech: spec.quota.{field}: quota exceeded")


def test_quota_exactly_reached_is_fine(write_manifests: Write) -> None:
    text = QUOTA_TENANT.format(
        quota="{instances: 2, vcpus: 3, memoryMiB: 1024, volumeGiB: 13, buckets: 1}"
    ) + "".join(
        _in_initech(*r)
        for r in [
            ("Instance", "a", "{image: tiny, vcpus: 2}"),
            ("Instance", "b", "{image: tiny, vcpus: 1}"),
            ("Volume", "v", "{sizeGiB: 13}"),
            ("Bucket", "b", "{}"),
        ]
    )
    _, problems, _ = load_cloud(write_manifests, text)
    assert problems == [], show(problems)


def test_every_quota_exceeded_is_reported_at_its_own_line(write_manifests: Write) -> None:
    text = QUOTA_TENANT.format(
        quota="instances: 1\n    vcpus: 1\n    memoryMiB: 100\n    volumeGiB: 1\n    buckets: 1"
    ) + "".join(
        _in_initech(*r)
        for r in [
            ("Instance", "a", "{image: tiny}"),
            ("Instance", "b", "{image: tiny}"),
            ("Volume", "v", "{sizeGiB: 2}"),
            ("Bucket", "b1", "{}"),
            ("Bucket", "b2", "{}"),
        ]
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    assert [(p.file, p.line, p.path) for p in problems] == [
        (str(cloud), 6, "spec.quota.instances"),
        (str(cloud), 7, "spec.quota.vcpus"),
        (str(cloud), 8, "spec.quota.memoryMiB"),
        (str(cloud), 9, "spec.quota.volumeGiB"),
        (str(cloud), 10, "spec.quota.buckets"),
    ], show(problems)
    assert [p.message.rsplit("(", 1)[1] for p in problems] == [
        "1 over)", "1 over)", "924 over)", "1 over)", "1 over)"
    ]


def test_quota_of_one_tenant_ignores_other_tenants(write_manifests: Write) -> None:
    text = QUOTA_TENANT.format(quota="{instances: 1}") + _in_initech("Instance", "a", "{image: tiny}") + "---\n" + _instance(
        "  image: tiny\n", name="other"
    )
    _, problems, _ = load_cloud(write_manifests, text)
    assert problems == [], show(problems)


def test_quota_not_checked_when_a_document_of_the_tenant_is_broken(write_manifests: Write) -> None:
    text = QUOTA_TENANT.format(quota="{instances: 0}") + _in_initech("Instance", "a", "{image: tiny, vcpus: many}")
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(problems, cloud, 16, "spec.vcpus", ["valid integer"])


# --- fixed addresses -------------------------------------------------------------------------

IP_CASES = [
    pytest.param("10.9.9.9", ["10.9.9.9 is in no subnet of network 'web'", "(subnets: 10.0.0.0/24)"], id="outside"),
    pytest.param("10.0.0.1", ["10.0.0.1 is the gateway of 10.0.0.0/24"], id="gateway"),
    pytest.param("10.0.0.255", ["10.0.0.255 is the network or broadcast address of 10.0.0.0/24"], id="broadcast"),
    pytest.param("10.0.0.0", ["10.0.0.0 is the network or broadcast address"], id="network-address"),
]


@pytest.mark.parametrize("ip, words", IP_CASES)
def test_fixed_ip_problem(write_manifests: Write, ip: str, words: list[str]) -> None:
    text = _instance(f"  image: tiny\n  networks:\n    - network: web\n      ip: {ip}\n")
    run_cases(write_manifests, text, 8, "spec.networks[0].ip", words)


def test_fixed_ip_taken_twice(write_manifests: Write) -> None:
    text = (
        _instance("  image: tiny\n  networks:\n    - {network: web, ip: 10.0.0.20}\n", name="a")
        + "---\n"
        + _instance("  image: tiny\n  networks:\n    - {network: web, ip: 10.0.0.21}\n    - {network: web, ip: 10.0.0.20}\n", name="b")
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(
        problems, cloud, 16, "spec.networks[1].ip",
        ["10.0.0.20 is already used by Instance acme/a", f"({cloud}:7)"], "Instance acme/b",
    )


def test_same_fixed_ip_in_two_tenants_is_fine(write_manifests: Write) -> None:
    text = (
        _instance("  image: tiny\n  networks:\n    - {network: web, ip: 10.0.0.20}\n")
        + "---\napiVersion: reconciler/v1\nkind: Image\nmetadata: {name: tiny, tenant: globex}\n"
        "spec: {source: /images/tiny.qcow2}\n"
        "---\napiVersion: reconciler/v1\nkind: Network\nmetadata: {name: web, tenant: globex}\n"
        "spec: {subnets: [{cidr: 10.0.0.0/24}]}\n---\n"
        + _instance("  image: tiny\n  networks:\n    - {network: web, ip: 10.0.0.20}\n", tenant="globex")
    )
    _, problems, count = load_cloud(write_manifests, text)
    assert problems == [], show(problems)
    assert count == BASE_RESOURCES + 4


def test_fixed_ip_in_a_second_subnet_is_fine(write_manifests: Write) -> None:
    text = _network("- cidr: 10.1.0.0/24", "- cidr: 10.2.0.0/24", name="multi") + "---\n" + _instance(
        "  image: tiny\n  networks:\n    - {network: multi, ip: 10.2.0.30}\n"
    )
    _, problems, _ = load_cloud(write_manifests, text)
    assert problems == [], show(problems)


# --- volumes, routers ------------------------------------------------------------------------

def test_volume_attached_to_two_instances(write_manifests: Write) -> None:
    text = (
        _instance("  image: tiny\n  volumes: [{volume: data}]\n", name="a")
        + "---\n"
        + _instance("  image: tiny\n  volumes:\n    - volume: data\n", name="b")
    )
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(
        problems, cloud, 14, "spec.volumes[0].volume",
        ["volume 'data' is already attached to Instance acme/a", "set multiattach: true"],
        "Instance acme/b",
    )


def test_volume_with_multiattach_may_be_attached_twice(write_manifests: Write) -> None:
    text = (
        "apiVersion: reconciler/v1\nkind: Volume\nmetadata: {name: shared, tenant: acme}\n"
        "spec: {sizeGiB: 1, multiattach: true}\n---\n"
        + _instance("  image: tiny\n  volumes: [{volume: shared}]\n", name="a")
        + "---\n"
        + _instance("  image: tiny\n  volumes: [{volume: shared}]\n", name="b")
    )
    _, problems, count = load_cloud(write_manifests, text)
    assert problems == [], show(problems)
    assert count == BASE_RESOURCES + 3


def test_volume_attached_twice_to_one_instance(write_manifests: Write) -> None:
    text = _instance("  image: tiny\n  volumes:\n    - volume: data\n    - volume: data\n")
    run_cases(write_manifests, text, 8, "spec.volumes[1].volume", ["volume 'data' is attached twice to this instance"])


def test_device_used_twice(write_manifests: Write) -> None:
    text = (
        "apiVersion: reconciler/v1\nkind: Volume\nmetadata: {name: logs, tenant: acme}\nspec: {sizeGiB: 1}\n---\n"
        + _instance("  image: tiny\n  volumes:\n    - {volume: data, device: vdb}\n    - {volume: logs, device: vdb}\n")
    )
    run_cases(write_manifests, text, 13, "spec.volumes[1].device", ["device vdb is already used by volumes[0]"])


def test_network_joined_by_two_routers(write_manifests: Write) -> None:
    text = _router("  networks: [web]\n", name="r1") + "---\n" + _router("  networks:\n    - web\n", name="r2")
    cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(
        problems, cloud, 12, "spec.networks[0]",
        ["network 'web' is already joined by Router acme/r1", "one gateway"], "Router acme/r2",
    )


def test_network_listed_twice_in_a_router(write_manifests: Write) -> None:
    run_cases(write_manifests, _router("  networks: [web, web]\n"), 5, "spec.networks[1]", ["network 'web' is listed twice"])


def test_router_on_a_network_without_subnet(write_manifests: Write) -> None:
    text = "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: bare, tenant: acme}\n---\n" + _router(
        "  networks:\n    - web\n    - bare\n"
    )
    run_cases(write_manifests, text, 11, "spec.networks[1]", ["network 'bare' has no subnet to route"])


def test_two_routers_on_different_networks_are_fine(write_manifests: Write) -> None:
    text = (
        _network("- cidr: 10.1.0.0/24", name="lan")
        + "---\n" + _router("  networks: [web]\n  external: globex/public\n", name="r1")
        + "---\n" + _router("  networks: [lan]\n  external: globex/public\n", name="r2")
    )
    _, problems, _ = load_cloud(write_manifests, text)
    assert problems == [], show(problems)


# --- check_desired directly --------------------------------------------------------------------

def test_check_desired_collects_every_problem_without_stopping(write_manifests: Write) -> None:
    text = (
        _network("- cidr: 10.1.0.0/24", "  gateway: 10.2.0.1", name="a")
        + "---\n" + _instance("  image: nope\n  networks:\n    - {network: web, ip: 10.0.0.1}\n")
        + "---\n" + _router("  networks: [web]\n", name="r1")
        + "---\n" + _router("  networks: [web]\n", name="r2")
    )
    root = write_manifests({"base.yaml": BASE, "cloud.yaml": text})
    desired, loaded = load([root], check=False)
    assert loaded == []
    problems = sorted(check_desired(desired), key=Problem.sort_key)
    assert [(p.line, p.path) for p in problems] == [
        (7, "spec.subnets[0].gateway"),
        (13, "spec.image"),
        (15, "spec.networks[0].ip"),
        (27, "spec.networks[0]"),
    ], show(problems)
    _, with_checks = load([root])
    assert with_checks == problems
