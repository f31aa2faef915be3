"""The manifest loader: every user mistake comes back as a Problem naming file, line and field.

Each test writes manifests with the `write_manifests` fixture and checks the exact file,
the exact line, the field path and the words of the message a user has to act on. The
last tests run the command line to check that broken manifests never reach a driver.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
from typer.testing import CliRunner

from reconciler.cli.app import app
from reconciler.errors import Problem
from reconciler.loader import MAX_DEPTH, MAX_NODES_PER_FILE, load
from reconciler.models import Key

Write = Callable[..., Path]

TENANTS = """\
apiVersion: reconciler/v1
kind: Tenant
metadata:
  name: acme
---
apiVersion: reconciler/v1
kind: Tenant
metadata:
  name: globex
"""


def show(problems: Sequence[Problem]) -> str:
    return "\n".join(str(p) for p in problems) or "(no problems)"


def load_cloud(write_manifests: Write, text: str | bytes, **more: str) -> tuple[Path, Path, list[Problem], int]:
    """Write tenants.yaml (acme, globex) and cloud.yaml = text; load the folder.

    Returns (folder, cloud.yaml, problems, number of resources loaded).
    """
    files: dict[str, str] = {"tenants.yaml": TENANTS, **more}
    if isinstance(text, str):
        files["cloud.yaml"] = text
    root = write_manifests(files)
    if isinstance(text, bytes):
        (root / "cloud.yaml").write_bytes(text)
    desired, problems = load([root])
    return root, root / "cloud.yaml", problems, len(desired)


def expect_one(
    problems: Sequence[Problem],
    file: Path,
    line: int,
    path: str | None,
    words: Sequence[str],
    resource: str | None = None,
) -> Problem:
    """Exactly one problem, at FILE:LINE on PATH, whose message has every word."""
    assert [(p.file, p.line, p.path) for p in problems] == [(str(file), line, path)], show(problems)
    problem = problems[0]
    for word in words:
        assert word in problem.message, f"{word!r} not in: {problem}"
    if resource is not None:
        assert problem.resource == resource, str(problem)
    printed = str(problem)
    assert printed.startswith(f"{file}:{line}: "), printed
    if path is not None:
        assert f": {path}: " in printed, printed
    return problem


# --- one document against its kind's model ------------------------------------------------

SCHEMA_CASES = [
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Netwrk
        metadata:
          name: web
          tenant: acme
        """,
        2, "kind", ["unknown kind 'Netwrk'", "did you mean 'Network'?"], "Netwrk acme/web",
        id="unknown-kind-did-you-mean",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: VirtualMachine
        metadata:
          name: vm
          tenant: acme
        """,
        2, "kind", ["unknown kind 'VirtualMachine'", "Instance", "Network", "Bucket"], None,
        id="unknown-kind-lists-kinds",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          type: vxlan
          subnet:
            - cidr: 10.0.0.0/24
        """,
        8, "spec.subnet", ["unknown field 'subnet'", "did you mean 'subnets'?"], "Network acme/web",
        id="unknown-field-did-you-mean",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.0/24
              gatway: 10.0.0.1
        """,
        9, "spec.subnets[0].gatway", ["unknown field 'gatway'", "did you mean 'gateway'?"], None,
        id="unknown-nested-field",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
          label: {tier: db}
        spec:
          sizeGiB: 1
        """,
        6, "metadata.label", ["unknown field 'label'", "did you mean 'labels'?"], None,
        id="unknown-metadata-field",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGiB: 1
          colour: red
        """,
        8, "spec.colour", ["unknown field 'colour'", "allowed here:", "sizeGiB", "multiattach"], None,
        id="unknown-field-lists-allowed",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Instance
        metadata:
          name: vm
          tenant: acme
        spec:
          image: tiny
          vcpus: two
        """,
        8, "spec.vcpus", ["valid integer", "'two'"], "Instance acme/vm",
        id="wrong-type-int",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Router
        metadata:
          name: edge
          tenant: acme
        spec:
          networks: web
        """,
        7, "spec.networks", ["valid list", "'web'"], None,
        id="wrong-type-list",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          external: maybe
        """,
        7, "spec.external", ["valid boolean", "'maybe'"], None,
        id="wrong-type-bool",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          subnets:
            cidr: 10.0.0.0/24
        """,
        7, "spec.subnets", ["valid list"], None,
        id="wrong-type-mapping-for-list",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          type: vxaln
        """,
        7, "spec.type", ["'vxaln' is not allowed", "'flat'", "'vxlan'", "'vlan'"], None,
        id="wrong-enum-value",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          mtu: 9001
        """,
        7, "spec.mtu", ["less than or equal to 9000"], None,
        id="number-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          wipe: true
        """,
        6, "spec.sizeGiB", ["required field is missing"], "Volume acme/data",
        id="missing-required-field",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        """,
        1, "spec.sizeGiB", ["required field is missing"], "Volume acme/data",
        id="missing-required-field-no-spec",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Image
        metadata:
          tenant: acme
        spec:
          source: /images/tiny.qcow2
        """,
        3, "metadata.name", ["required field is missing"], "Image acme/?",
        id="missing-metadata-name",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Image
        spec:
          source: /images/tiny.qcow2
        """,
        1, "metadata", ["required field is missing"], None,
        id="missing-metadata",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v2
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGiB: 1
        """,
        1, "apiVersion", ["unsupported apiVersion 'reconciler/v2'", "use reconciler/v1"], "Volume acme/data",
        id="bad-api-version",
    ),
    pytest.param(
        """\
        # no apiVersion
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGiB: 1
        """,
        2, "apiVersion", ["apiVersion is missing", "reconciler/v1"], None,
        id="missing-api-version",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        metadata:
          name: data
          tenant: acme
        """,
        1, "kind", ["kind is missing", "Volume"], None,
        id="missing-kind",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
        spec:
          sizeGiB: 1
        """,
        3, "metadata.tenant", ["every Volume needs metadata.tenant"], "Volume ?/data",
        id="missing-tenant",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Bucket
        metadata:
          name: assets
        """,
        3, "metadata.tenant", ["every Bucket needs metadata.tenant"], None,
        id="missing-tenant-no-spec",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata:
          name: initech
          tenant: acme
        """,
        5, "metadata.tenant", ["a Tenant belongs to no tenant", "remove this field"], "Tenant initech",
        id="tenant-with-tenant",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: [Volume]
        metadata:
          name: data
          tenant: acme
        """,
        2, "kind", ["unknown kind ['Volume']"], None,
        id="kind-is-a-list",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.1/24
        """,
        8, "spec.subnets[0].cidr", ["'10.0.0.1/24'", "host bits set", "10.0.0.0/24"], None,
        id="cidr-host-bits-set",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.0/24
            - cidr: banana
        """,
        9, "spec.subnets[1].cidr", ["'banana'", "not an IPv4 network", "CIDR"], None,
        id="cidr-garbage",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.0/33
        """,
        8, "spec.subnets[0].cidr", ["'10.0.0.0/33'", "not an IPv4 network"], None,
        id="cidr-prefix-too-long",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: web
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.0/24
              gateway: 10.0.0.300
        """,
        9, "spec.subnets[0].gateway", ["'10.0.0.300'", "not an IPv4 address"], None,
        id="gateway-not-an-address",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: SecurityGroup
        metadata:
          name: web
          tenant: acme
        spec:
          rules:
            - {protocol: tcp, ports: "80"}
            - {protocol: tcp, ports: "70000"}
        """,
        9, "spec.rules[1].ports", ["'70000'", "between 1 and 65535"], None,
        id="port-out-of-range",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: SecurityGroup
        metadata:
          name: web
          tenant: acme
        spec:
          rules:
            - remote: 10.0.0.0/33
        """,
        8, "spec.rules[0].remote", ["'10.0.0.0/33'", "not a valid IPv4 CIDR"], None,
        id="rule-remote-bad-cidr",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Image
        metadata:
          name: tiny
          tenant: acme
        spec:
          source: images/tiny.qcow2
        """,
        7, "spec.source", ["'images/tiny.qcow2'", "absolute path"], None,
        id="image-relative-path",
    ),
]


@pytest.mark.parametrize("text, line, path, words, resource", SCHEMA_CASES)
def test_schema_error_is_reported_at_its_line_and_path(
    write_manifests: Write, text: str, line: int, path: str, words: list[str], resource: str | None
) -> None:
    _, cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(problems, cloud, line, path, words, resource)


BAD_NAMES = [
    pytest.param("Web", id="uppercase"),
    pytest.param("web_1", id="underscore"),
    pytest.param("a" * 64, id="64-chars"),
    pytest.param("-web", id="leading-dash"),
    pytest.param("web.1", id="dot"),
    pytest.param('""', id="empty"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_name_that_cannot_be_a_host_object_name(write_manifests: Write, name: str) -> None:
    _, cloud, problems, _ = load_cloud(
        write_manifests,
        f"""\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: {name}
          tenant: acme
        spec:
          sizeGiB: 1
        """,
    )
    expect_one(problems, cloud, 4, "metadata.name",
               ["cannot be a host object name", "lowercase letters, digits or '-'", "1 to 63"])


@pytest.mark.parametrize("name", BAD_NAMES[:4])
def test_bad_name_in_a_reference_and_in_tenant(write_manifests: Write, name: str) -> None:
    _, cloud, problems, _ = load_cloud(
        write_manifests,
        f"""\
        apiVersion: reconciler/v1
        kind: Instance
        metadata:
          name: vm
          tenant: acme
        spec:
          image: tiny
          networks:
            - network: {name}
        """,
    )
    expect_one(problems, cloud, 9, "spec.networks[0].network", ["cannot be a host object name"])

    _, cloud, problems, _ = load_cloud(
        write_manifests,
        f"""\
        apiVersion: reconciler/v1
        kind: Bucket
        metadata:
          name: assets
          tenant: {name}
        """,
    )
    expect_one(problems, cloud, 5, "metadata.tenant", ["cannot be a host object name"])


@pytest.mark.parametrize("name", ["a" * 63, "7up", "web-1", "9-lives"])
def test_names_at_the_limits_are_accepted(write_manifests: Write, name: str) -> None:
    _, _, problems, count = load_cloud(
        write_manifests,
        f"""\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: {name}
          tenant: acme
        spec:
          sizeGiB: 1
        """,
    )
    assert problems == [], show(problems)
    assert count == 3


# --- YAML itself -----------------------------------------------------------------------------

YAML_CASES = [
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: [data
          tenant: acme
        """,
        5, None, ["YAML syntax error", "flow sequence"],
        id="unclosed-flow-sequence",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
         metadata: oops
        """,
        3, None, ["YAML syntax error", "mapping values are not allowed"],
        id="bad-indentation",
    ),
    pytest.param(
        "apiVersion: reconciler/v1\nkind: Volume\nmetadata:\n\tname: data\n",
        4, None, ["YAML syntax error"],
        id="tab-indentation",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGiB: 1
          wipe: true
          sizeGiB: 2
        """,
        9, "spec.sizeGiB", ["duplicate key 'sizeGiB'", "also on line 7"],
        id="duplicate-key",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        kind: Bucket
        """,
        6, "kind", ["duplicate key 'kind'", "also on line 2"],
        id="duplicate-top-level-key",
    ),
    pytest.param(
        """\
        - apiVersion: reconciler/v1
          kind: Volume
        """,
        1, None, ["a manifest document must be a mapping", "list"],
        id="document-is-a-list",
    ),
    pytest.param(
        """\
        just some text
        """,
        1, None, ["a manifest document must be a mapping", "str"],
        id="document-is-a-scalar",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata:
          name: initech
          labels:
            since: 2020-13-45
        """,
        6, "metadata.labels.since", ["'2020-13-45'", "not a valid timestamp", "quote it"],
        id="invalid-timestamp-scalar",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata:
          name: initech
          labels:
            ok: !!bool maybe
        """,
        6, "metadata.labels.ok", ["'maybe'", "not a valid bool"],
        id="invalid-tagged-scalar",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata:
          name: initech
          labels:
            [a, b]: c
        """,
        6, "metadata.labels", ["mapping keys must be plain text"],
        id="non-scalar-key",
    ),
    pytest.param(
        """\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata:
          name: !!python/name:os.system ""
        """,
        4, None, ["YAML syntax error", "could not determine a constructor"],
        id="python-tag-refused",
    ),
]


@pytest.mark.parametrize("text, line, path, words", YAML_CASES)
def test_yaml_error_is_reported_at_its_line(
    write_manifests: Write, text: str, line: int, path: str | None, words: list[str]
) -> None:
    _, cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(problems, cloud, line, path, words)


def test_syntax_error_in_a_later_document_keeps_errors_of_earlier_ones(write_manifests: Write) -> None:
    _, cloud, problems, _ = load_cloud(
        write_manifests,
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGib: 1
        ---
        apiVersion: reconciler/v1
        kind: Volume
        metadata: {name: [oops, tenant: acme}
        """,
    )
    assert [(p.file, p.line) for p in problems] == [(str(cloud), 6), (str(cloud), 7), (str(cloud), 11)], show(problems)
    assert {p.path for p in problems[:2]} == {"spec.sizeGib", "spec.sizeGiB"}
    assert "YAML syntax error" in problems[2].message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# only a comment\n", id="comment-only"),
        pytest.param("---\n", id="separator-only"),
        pytest.param("# a\n---\n# b\n---\n", id="empty-documents"),
    ],
)
def test_empty_file_or_documents_are_no_error(write_manifests: Write, text: str) -> None:
    root = write_manifests({"cloud.yaml": text})
    desired, problems = load([root])
    assert problems == [], show(problems)
    assert len(desired) == 0


def test_trailing_separator_after_a_document_is_no_error(write_manifests: Write) -> None:
    _, _, problems, count = load_cloud(
        write_manifests,
        """\
        ---
        apiVersion: reconciler/v1
        kind: Volume
        metadata: {name: data, tenant: acme}
        spec: {sizeGiB: 1}
        ---
        """,
    )
    assert problems == [], show(problems)
    assert count == 3


@pytest.mark.parametrize(
    "raw, line",
    [
        pytest.param(
            b"apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: caf\xe9\n", 4, id="latin-1-byte"
        ),
        pytest.param(b"\xff\xfe\x00\x01" + bytes(range(256)) * 8, 1, id="binary-garbage"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", 1, id="png-header"),
    ],
)
def test_non_utf8_bytes(write_manifests: Write, raw: bytes, line: int) -> None:
    _, cloud, problems, count = load_cloud(write_manifests, raw)
    expect_one(problems, cloud, line, None, ["not UTF-8 text"])
    assert count == 2  # the tenants still load


@pytest.mark.parametrize(
    "raw, line",
    [
        pytest.param(b"apiVersion: reconciler/v1\x00\nkind: Tenant\n", 1, id="nul"),
        pytest.param(b"apiVersion: reconciler/v1\nkind: Tenant\n\x07\n", 3, id="bell"),
    ],
)
def test_control_characters(write_manifests: Write, raw: bytes, line: int) -> None:
    _, cloud, problems, _ = load_cloud(write_manifests, raw)
    problem = expect_one(problems, cloud, line, None, ["unacceptable character", "control characters"])
    assert "\n" not in str(problem)  # one line per problem, compiler-style


def _billion_laughs(levels: int, width: int) -> str:
    text = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]\n"
    return text


def _merge_bomb(levels: int, width: int) -> str:
    """Merge keys of aliases nested inside each other: 2 * width**levels keys once flattened."""

    def level(k: int) -> str:
        if k == 0:
            return "&m0 {a: 1, b: 2}"
        return f"&m{k} {{<<: [{level(k - 1)}, " + ", ".join([f"*m{k - 1}"] * (width - 1)) + "]}"

    return "spec: " + level(levels) + "\n"


@pytest.mark.parametrize(
    "text",
    [
        # 10 * 10**11 strings if expanded: never finishes unbounded
        pytest.param(_billion_laughs(12, 10), id="nested-anchors"),
        # 2 * 9**12 keys if merged: never finishes (and runs out of memory) unbounded
        pytest.param(_merge_bomb(12, 9), id="nested-merge-keys"),
    ],
)
def test_alias_bomb_is_refused(write_manifests: Write, text: str) -> None:
    _, cloud, problems, count = load_cloud(write_manifests, text)
    expect_one(problems, cloud, 1, None, [f"more than {MAX_NODES_PER_FILE} YAML nodes", "alias bomb"])
    assert count == 2


@pytest.mark.parametrize(
    "text, line",
    [
        pytest.param(
            "apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: deep\n  labels: "
            + "[" * 200_000 + "]" * 200_000 + "\n",
            5, id="flow-200000-levels",
        ),
        pytest.param(
            "apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: deep\nspec:\n"
            + "".join("  " * i + f"k{i}:\n" for i in range(1, 400)),
            5 + MAX_DEPTH, id="block-400-levels",
        ),
        pytest.param("- " * 5000 + "x\n", 1, id="compact-sequences-5000-levels"),
    ],
)
def test_very_deep_nesting_is_refused(write_manifests: Write, text: str, line: int) -> None:
    _, cloud, problems, count = load_cloud(write_manifests, text)
    expect_one(problems, cloud, line, None, ["YAML nesting is deeper than", str(MAX_DEPTH)])
    assert count == 2


def test_reasonable_nesting_is_accepted(write_manifests: Write) -> None:
    # labels values must be text, so this nests only YAML the loader reads, then reports the type
    text = (
        "apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: initech\n  labels:\n    a: "
        + "[" * 50 + "]" * 50 + "\n"
    )
    _, cloud, problems, _ = load_cloud(write_manifests, text)
    expect_one(problems, cloud, 6, "metadata.labels.a", ["valid string"])


def test_merge_keys_override_without_duplicate_key_errors(write_manifests: Write) -> None:
    root, _, _, _ = load_cloud(
        write_manifests,
        """\
        apiVersion: reconciler/v1
        kind: SecurityGroup
        metadata:
          name: web
          tenant: acme
        spec:
          rules:
            - &ssh {protocol: tcp, ports: "22", remote: 10.0.0.0/8}
            - <<: *ssh
              ports: "80"
            - <<: [{ports: "443"}, *ssh]
        """,
    )
    desired, problems = load([root])
    assert problems == [], show(problems)
    rules = desired.get(Key("SecurityGroup", "acme", "web")).spec.rules  # type: ignore[union-attr]
    assert [(r.protocol, r.ports, r.remote) for r in rules] == [
        ("tcp", "22", "10.0.0.0/8"),
        ("tcp", "80", "10.0.0.0/8"),
        ("tcp", "443", "10.0.0.0/8"),  # the first source of a merge list wins
    ]


def test_error_in_an_overriding_key_points_at_the_override(write_manifests: Write) -> None:
    _, cloud, problems, _ = load_cloud(
        write_manifests,
        """\
        apiVersion: reconciler/v1
        kind: SecurityGroup
        metadata:
          name: web
          tenant: acme
        spec:
          rules:
            - &ssh {protocol: tcp, ports: "22"}
            - <<: *ssh
              ports: "99999"
        """,
    )
    expect_one(problems, cloud, 10, "spec.rules[1].ports", ["'99999'", "between 1 and 65535"])


# --- duplicate names ----------------------------------------------------------------------

VOLUME = """\
# {comment}
apiVersion: reconciler/v1
kind: Volume
metadata:
  name: data
  tenant: acme
spec:
  sizeGiB: 1
"""


def test_duplicate_name_in_two_files_names_the_other_file_and_line(write_manifests: Write) -> None:
    root = write_manifests(
        {
            "tenants.yaml": TENANTS,
            "a/one.yaml": VOLUME.format(comment="first"),
            "b/two.yaml": "# padding\n# padding\n" + VOLUME.format(comment="second"),
        }
    )
    _, problems = load([root])
    expect_one(
        problems, root / "b" / "two.yaml", 7, "metadata.name",
        ["duplicate name", "Volume acme/data", f"also declared at {root / 'a' / 'one.yaml'}:5"],
        "Volume acme/data",
    )


def test_duplicate_name_in_one_file(write_manifests: Write) -> None:
    _, cloud, problems, _ = load_cloud(
        write_manifests, VOLUME.format(comment="first") + "---\n" + VOLUME.format(comment="second")
    )
    expect_one(problems, cloud, 14, "metadata.name", ["duplicate name", f"also declared at {cloud}:5"])


def test_duplicate_tenant(write_manifests: Write) -> None:
    root = write_manifests({"tenants.yaml": TENANTS, "more/tenants.yaml": TENANTS})
    _, problems = load([root])
    file = str(root / "tenants.yaml")
    assert [(p.file, p.line, p.path, p.resource) for p in problems] == [
        (file, 4, "metadata.name", "Tenant acme"),
        (file, 9, "metadata.name", "Tenant globex"),
    ], show(problems)
    assert f"also declared at {root / 'more' / 'tenants.yaml'}:4" in problems[0].message


def test_same_name_in_other_kind_or_other_tenant_is_fine(write_manifests: Write) -> None:
    _, _, problems, count = load_cloud(
        write_manifests,
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata: {name: data, tenant: acme}
        spec: {sizeGiB: 1}
        ---
        apiVersion: reconciler/v1
        kind: Volume
        metadata: {name: data, tenant: globex}
        spec: {sizeGiB: 1}
        ---
        apiVersion: reconciler/v1
        kind: Bucket
        metadata: {name: data, tenant: acme}
        """,
    )
    assert problems == [], show(problems)
    assert count == 5


# --- every error at once --------------------------------------------------------------------

def test_every_error_of_a_file_is_reported_sorted_by_line(write_manifests: Write) -> None:
    _, cloud, problems, _ = load_cloud(
        write_manifests,
        """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGiB: big
        ---
        apiVersion: reconciler/v1
        kind: Netwrk
        metadata:
          name: web
          tenant: acme
        ---
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: db
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.0/24
              gateway: 10.9.9.1
        ---
        apiVersion: reconciler/v1
        kind: Instance
        metadata:
          name: vm
          tenant: acme
        spec:
          image: nope
          flavour: small
        ---
        apiVersion: reconciler/v1
        kind: Router
        metadata:
          name: Edge
          tenant: acme
        ---
        apiVersion: reconciler/v1
        kind: Instance
        metadata:
          name: vm2
          tenant: acme
        spec:
          image: nope
          networks:
            - network: db
              ip: 10.1.0.5
        """,
    )
    got = [(p.file, p.line, p.path) for p in problems]
    file = str(cloud)
    assert got == [
        (file, 7, "spec.sizeGiB"),
        (file, 10, "kind"),
        (file, 23, "spec.subnets[0].gateway"),
        (file, 32, "spec.flavour"),
        (file, 37, "metadata.name"),
        (file, 46, "spec.image"),
        (file, 49, "spec.networks[0].ip"),
    ], show(problems)
    messages = [p.message for p in problems]
    assert "valid integer" in messages[0]
    assert "did you mean 'Network'?" in messages[1]
    assert "outside the subnet 10.0.0.0/24" in messages[2]
    assert "unknown field 'flavour'" in messages[3]
    assert "cannot be a host object name" in messages[4]
    assert "no Image named 'nope'" in messages[5]
    assert "10.1.0.5 is in no subnet of network 'db'" in messages[6]


def test_errors_of_several_files_are_sorted_by_file_then_line(write_manifests: Write) -> None:
    root = write_manifests(
        {
            "tenants.yaml": TENANTS,
            "z.yaml": "apiVersion: reconciler/v1\nkind: Volume\nmetadata: {name: a, tenant: acme}\nspec: {}\n",
            "a.yaml": "apiVersion: reconciler/v1\nkind: Bukcet\n---\napiVersion: reconciler/v0\n"
                      "kind: Bucket\nmetadata: {name: b, tenant: acme}\n",
            "m/x.yml": "{oops\n",
        }
    )
    _, problems = load([root])
    got = [(Path(p.file).relative_to(root).as_posix(), p.line, p.path) for p in problems]
    assert got == [
        ("a.yaml", 2, "kind"),
        ("a.yaml", 4, "apiVersion"),
        ("m/x.yml", 1, None),  # its last line: the end of the input is not a line of its own
        ("z.yaml", 4, "spec.sizeGiB"),
    ], show(problems)
    assert problems == sorted(problems, key=Problem.sort_key)


def test_hidden_folders_and_other_suffixes_are_not_read(write_manifests: Write) -> None:
    root = write_manifests(
        {"tenants.yaml": TENANTS, ".git/bad.yaml": "{oops", "notes.txt": "{oops", "README.md": "- x"}
    )
    desired, problems = load([root])
    assert problems == [], show(problems)
    assert len(desired) == 2


def test_missing_path_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    _, problems = load([missing])
    assert [(p.file, p.message) for p in problems] == [(str(missing), "no such file or folder")]


# --- the example cloud -------------------------------------------------------------------

def test_example_manifests_load_without_problems(example_manifests: Path) -> None:
    desired, problems = load([example_manifests])
    assert problems == [], show(problems)
    assert len(desired) == 23
    assert {r.key.kind for r in desired} == {
        "Tenant", "Network", "Router", "SecurityGroup", "Image", "Instance", "Volume", "Bucket"
    }
    web1 = desired.get(Key("Instance", "acme", "web-1"))
    assert web1 is not None
    assert web1.source.file == str(example_manifests / "acme" / "compute.yaml")
    assert web1.source.line == 11
    assert web1.line_of(("spec", "networks", 0, "ip")) == 23


def test_example_files_load_one_by_one_as_a_list_of_paths(example_manifests: Path) -> None:
    files = sorted(example_manifests.rglob("*.yaml"))
    desired, problems = load(files)
    assert problems == [], show(problems)
    assert len(desired) == 23


# --- broken manifests never reach a driver ------------------------------------------------

BROKEN = {
    "tenants.yaml": TENANTS,
    "cloud.yaml": """\
        apiVersion: reconciler/v1
        kind: Volume
        metadata:
          name: data
          tenant: acme
        spec:
          sizeGib: 1
        ---
        apiVersion: reconciler/v1
        kind: Netwrk
        metadata: {name: web, tenant: acme}
        """,
    "more/network.yaml": """\
        apiVersion: reconciler/v1
        kind: Network
        metadata:
          name: db
          tenant: acme
        spec:
          subnets:
            - cidr: 10.0.0.1/24
        """,
    "more/vm.yaml": """\
        apiVersion: reconciler/v1
        kind: Instance
        metadata: {name: vm, tenant: acme}
        spec:
          image: nope
        """,
}


def _broken_error_lines(root: Path) -> list[str]:
    cloud, net, vm = root / "cloud.yaml", root / "more" / "network.yaml", root / "more" / "vm.yaml"
    return [
        f"{cloud}:6: Volume acme/data: spec.sizeGiB: required field is missing",
        f"{cloud}:7: Volume acme/data: spec.sizeGib: unknown field 'sizeGib' (did you mean 'sizeGiB'?)",
        f"{cloud}:10: Netwrk acme/web: kind: unknown kind 'Netwrk' (did you mean 'Network'?);",
        f"{net}:8: Network acme/db: spec.subnets[0].cidr: '10.0.0.1/24' has host bits set",
        f"{vm}:5: Instance acme/vm: spec.image: no Image named 'nope' in tenant 'acme'",
    ]


def _memory_files(state_dir: Path) -> list[Path]:
    memory = state_dir / "memory"
    return sorted(p for p in memory.rglob("*") if p.is_file()) if memory.exists() else []


def _check_rejected(root: Path, code: int, stdout: str, stderr: str, state_dir: Path) -> None:
    assert code == 1, f"--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    expected = _broken_error_lines(root)
    found = [next((i for i, line in enumerate(lines) if line.startswith(want)), None) for want in expected]
    assert None not in found, "missing some of:\n" + "\n".join(expected) + f"\n--- stderr\n{stderr}"
    assert found == sorted(found)  # in file and line order
    assert "5 error(s); nothing was changed." in stderr
    assert _memory_files(state_dir) == []


@pytest.mark.parametrize("args", [["apply", "--yes"], ["plan"], ["validate"]], ids=["apply", "plan", "validate"])
def test_cli_rejects_broken_manifests_before_any_driver(
    write_manifests: Write, host_config_file: Path, state_dir: Path, args: list[str]
) -> None:
    root = write_manifests(BROKEN)
    result = CliRunner().invoke(app, [args[0], str(root), *args[1:]])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    _check_rejected(root, result.exit_code, result.stdout, result.stderr, state_dir)


def test_cli_subprocess_apply_rejects_broken_manifests(
    write_manifests: Write, host_config_file: Path, state_dir: Path
) -> None:
    root = write_manifests(BROKEN)
    script = Path(sys.executable).with_name("reconciler")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "reconciler.cli.app"]
    result = subprocess.run(
        [*command, "apply", str(root), "--yes"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    _check_rejected(root, result.returncode, result.stdout, result.stderr, state_dir)
    assert "will be created" not in result.stdout


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(_billion_laughs(12, 10), id="alias-bomb"),
        pytest.param(b"\xff\xfe garbage \x00", id="binary"),
        pytest.param("apiVersion: reconciler/v1\nkind: [Volume]\n", id="kind-list"),
        pytest.param("x: 2020-13-45\n", id="bad-date"),
        pytest.param("a: " + "[" * 100_000 + "]" * 100_000 + "\n", id="deep"),
    ],
)
def test_cli_apply_on_hostile_input_reports_without_traceback(
    write_manifests: Write, host_config_file: Path, state_dir: Path, text: str | bytes
) -> None:
    root = write_manifests({"tenants.yaml": TENANTS})
    bad = root / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = CliRunner().invoke(app, ["apply", str(root), "--yes"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines()[0].startswith(f"{bad}:"), result.stderr
    assert _memory_files(state_dir) == []


def test_cli_validate_example_exits_0(example_manifests: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(example_manifests)])
    assert result.exit_code == 0, result.output
    assert "Valid: 23 resources." in result.stdout
    assert result.stderr == ""


def test_an_empty_spec_means_all_defaults(write_manifests) -> None:
    folder = write_manifests("apiVersion: reconciler/v1\nkind: Tenant\nmetadata: {name: acme}\nspec:\n")
    desired, problems = load([folder])
    assert problems == []
    (tenant,) = desired
    assert tenant.spec.quota.instances is None


@pytest.mark.parametrize("value", [
    "\n    password: rc-canary-0001\n    keys: [rc-canary-0001]",  # a mapping: `|` forgotten
    " 12345678987654321",  # a number
    " [rc-canary-0001]",  # a list
])
def test_a_sensitive_field_of_the_wrong_type_is_never_quoted(write_manifests, value: str) -> None:
    """userData that is not a string: the error names the field and the type it got, never
    its content (it is a secret); other fields keep quoting what they got."""
    _, cloud, problems, _ = load_cloud(write_manifests, (
        "apiVersion: reconciler/v1\nkind: Instance\nmetadata: {name: vm, tenant: acme}\n"
        f"spec:\n  image: tiny\n  vcpus: many\n  userData:{value}\n"))
    printed = show(problems)
    assert "spec.userData: input should be a valid string, got a value of type " in printed, printed
    assert "(sensitive: not shown)" in printed, printed
    assert "rc-canary-0001" not in printed and "12345678987654321" not in printed, printed
    assert "spec.vcpus: input should be a valid integer" in printed and "got 'many'" in printed, printed
