"""Shared parts of the bad-input suite (tests/property/test_bad_input*.py).

- :class:`Harness` runs `reconciler validate` and `reconciler plan` in-process (typer's
  CliRunner) on a folder of manifests, with the in-memory drivers wrapped in a
  :class:`RecordingDriver` that logs every object it is given, under a hang guard, and
  checks each run: no traceback, no escaping exception, exit codes, every error printed as
  `FILE:LINE: ...` with a line inside the file, invalid manifests never reaching a driver,
  and what reaches one valid for its kind.
- :func:`emit` writes documents as YAML by hand (block and flow styles, every YAML 1.1
  spelling of ints and bools, quoted and plain strings, comments, document markers) and
  returns the line of every field, so a test knows where an error must point.
- Strategies: valid clouds of every kind, hostile strings (shell and XML metacharacters,
  RTL, combining characters, emoji, NUL, line separators), numbers out of every range.
- The JSON Schemas in schemas/ say what a field is (type, bounds, pattern, required,
  nullable), which is what mutations use to know whether a change must be rejected.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import math
import random
import re
import signal
import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pydantic
import typer.main
import typer.testing
import yaml
from hypothesis import strategies as st
from typer.testing import CliRunner

from reconciler.cli.app import app
from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import format_path
from reconciler.models import KINDS, Key

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "manifests"
API = "reconciler/v1"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # src/reconciler/naming.py's rule
INT64 = (-(2**63), 2**63 - 1)
HANG_SECONDS = 30  # per CLI run; generous: a case takes milliseconds
#: a file a `!!python/...` tag would create if it were ever constructed
SENTINEL_NAME = "constructed-by-yaml"

Path_ = tuple[Any, ...]
Doc = Any


# --- the JSON Schemas: what each field is ----------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    kind: json.loads((ROOT / "schemas" / f"{kind.lower()}.json").read_text()) for kind in KINDS
}


@dataclass(frozen=True)
class FieldInfo:
    """What the schema says about the node at a path of a document."""

    schema: dict[str, Any]  # the non-null branch, $ref resolved
    nullable: bool
    required: bool  # listed in its parent's `required`
    in_model: bool  # its parent is a model (unknown keys are errors)
    map_value: bool  # a value of a free map (labels, bucket metadata)

    @property
    def type(self) -> str:
        s = self.schema
        if "type" in s:
            return s["type"]
        if "const" in s or "enum" in s:
            return "string"
        if "properties" in s or "patternProperties" in s or "additionalProperties" in s:
            return "object"
        return "any"

    @property
    def is_model(self) -> bool:
        return self.type == "object" and "properties" in self.schema

    @property
    def constrained(self) -> bool:
        s = self.schema
        return any(k in s for k in ("pattern", "format", "enum", "const"))


def _resolve(root: dict[str, Any], node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    nullable = False
    while True:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = {**root["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        if "anyOf" in node:
            branches = [b for b in node["anyOf"] if b.get("type") != "null"]
            nullable = nullable or len(branches) < len(node["anyOf"])
            node = {**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}
            continue
        return node, nullable


def field_info(kind: str, path: Path_) -> FieldInfo | None:
    """The schema of `path` in a document of `kind` (None: the schema does not know it)."""
    root = SCHEMAS.get(kind)
    if root is None:
        return None
    node, nullable = _resolve(root, root)
    required, in_model, map_value = True, False, False
    for part in path:
        if isinstance(part, int):
            if "items" not in node:
                return None
            child, required, in_model, map_value = node["items"], True, False, False
        elif part in node.get("properties", {}):
            child = node["properties"][part]
            required, in_model, map_value = part in node.get("required", ()), True, False
        elif "patternProperties" in node:
            child = next(iter(node["patternProperties"].values()))
            required, in_model, map_value = False, False, True
        elif isinstance(node.get("additionalProperties"), dict):
            child, required, in_model, map_value = node["additionalProperties"], False, False, True
        else:
            return None
        node, nullable = _resolve(root, child)
    if kind != "Tenant" and path == ("metadata", "tenant"):
        required = True  # every kind but Tenant needs one (a loader check, not the schema)
    return FieldInfo(node, nullable, required, in_model, map_value)


#: strings the schema leaves free but a validator or a cross-check constrains
_CHECKED_STRINGS = (
    re.compile(r"^spec\.rules\[\d+\]\.remote$"),  # a CIDR or a group name
    re.compile(r"^metadata\.dependsOn\[\d+\]$"),  # Kind/name of a resource of the tenant
)


def string_class(kind: str, path: Path_) -> str:
    """'free' (any text within maxLength is valid), 'path' (Image.source: an absolute path),
    'header' (a bucket metadata value: an HTTP header value, see header_ok) or 'checked' (a
    pattern, format, enum, name or reference: metacharacters are invalid)."""
    info = field_info(kind, path)
    if info is None:
        return "checked"
    text = format_path(path)
    if kind == "Image" and path == ("spec", "source"):
        return "path"
    if kind == "Bucket" and path[:2] == ("spec", "metadata") and len(path) == 3:
        return "header"
    if info.constrained or any(p.match(text) for p in _CHECKED_STRINGS):
        return "checked"
    return "free"


def header_ok(value: str) -> bool:
    """What an HTTP header value (Swift metadata, S3 tag) can carry back unchanged."""
    return not any(unicodedata.category(c) == "Cc" for c in value) and value == value.strip(" ")


def map_key_class(kind: str, path: Path_) -> str:
    """For a free map at `path`: 'free' keys (labels) or 'checked' (bucket metadata)."""
    info = field_info(kind, path)
    if info is not None and "patternProperties" in info.schema:
        return "checked"
    return "free"


# --- hostile values ---------------------------------------------------------------------------

SNIPPETS = (
    ";", "|", "&", "$", "(", ")", "<", ">", "'", '"', "`", "\\", "\n", "{", "}", "]]>", "&amp;",
    "<!ENTITY xxe SYSTEM 'file:///etc/passwd'>", "<![CDATA[", "$(id)", "`id`", "; rm -rf / #",
    "${HOME}", "%s%n%x", "\x00", "\x1b[31m", "\x7f", "\u202e", "\u200f", "\u061c", "שלום",
    "مرحبا", "e\u0301\u0301", "\U0001F600", "\U0001F468\u200d\U0001F469\u200d\U0001F467",
    "\u2028", "\u2029", "\x85", "\t", "\r\n", "\r", " ", "---", "...", "# x", "*a", "&a",
    "!!python/object:os.system", "<<", "~", "null", "\ufeff", "\ufffd", "\uffff", "0x1F",
    ": ", "- ", "? ", "@", "%", "[link](javascript:x)", "' OR 1=1 --", "../../etc/passwd",
)
#: characters no name, pattern, address or enum accepts
METACHARS = ";|&$()<>'\"`{}\n\\"

hostile_text = st.lists(
    st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=6)), min_size=1, max_size=6
).map("".join).filter(bool)


@st.composite
def hostile_checked(draw: st.DrawFn) -> str:
    """Hostile text that no constrained string field accepts (it holds a metacharacter)."""
    text = draw(hostile_text)
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(METACHARS)) + text[at:]


@st.composite
def hostile_path(draw: st.DrawFn) -> str:
    """An absolute path full of metacharacters that Image.source accepts (no NUL, no '..')."""
    text = "/var/lib/images/" + draw(hostile_text).replace("\x00", "")
    while "/../" in text + "/":
        text = text.replace("/../", "/").replace("/..", "/x")
    return text


class Raw(str):
    """Text written as it is (one line) where a value goes: bombs, deep nesting, tags."""


NUMBERS: tuple[Any, ...] = (
    0, -1, 1, 63, 64, 65, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1,
    10**30, 1.5, -0.0, 1e308, -1e308, 1e-300, math.inf, -math.inf, math.nan,
    Raw("0x" + "f" * 5000),  # a 6000-digit int in hex: no digit limit on the way in
    Raw("0b" + "1" * 200), Raw("-0x" + "F" * 40), Raw("1:2:3:4:5:6:7:8:9:10:11:12:13:14:15:16"),
    Raw("9" * 5000),  # more digits than Python converts
    Raw("1.0e+400"), Raw("0777"), Raw("1_000_000_000_000_000_000_000"),
)


def number_value(n: Any) -> float | int | None:
    """The number a NUMBERS entry means (None: the YAML layer cannot read it)."""
    if isinstance(n, Raw):
        try:
            return yaml.safe_load(str(n))
        except ValueError:
            return None
    return n


def long_text(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    alphabet = string.ascii_letters + "é中\U0001F600;<&\"' "
    return "".join(rnd.choice(alphabet) for _ in range(n))


# --- valid clouds -----------------------------------------------------------------------------

def _pools(seed: int = 9) -> tuple[list[str], list[str]]:
    """Names (every edge of the naming rule) and hostile texts, made once: drawing one is
    one choice, not one per character (generation dominated the suite's time)."""
    rnd = random.Random(seed)
    first, rest = string.ascii_lowercase + string.digits, string.ascii_lowercase + string.digits + "-"
    names = ["0", "a", "z9", "a-", "0-0", "9" * 63, "a" + "-" * 62, "null", "true", "no", "on", "yes",
             "1e3", "0x1f", "010", "2020-01-01", "nan", "inf", "tilde"]
    while len(names) < 400:
        n = rnd.choice([1, 2, 3, 5, 8, 12, 20, 40, 62, 63])
        names.append(rnd.choice(first) + "".join(rnd.choice(rest) for _ in range(n - 1)))
    texts = []
    for _ in range(600):
        parts = [rnd.choice(SNIPPETS) if rnd.random() < 0.7 else
                 "".join(chr(rnd.choice([rnd.randrange(32, 127), rnd.randrange(0xA0, 0x3000),
                                         rnd.randrange(0x10000, 0x10FFFF)]))
                         for _ in range(rnd.randrange(1, 6)))
                 for _ in range(rnd.randrange(1, 7))]
        text = "".join(parts)
        texts.append("".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF))
    return sorted(set(names)), texts


NAMES, TEXTS = _pools()
name_st = st.sampled_from(NAMES)
free_text = st.one_of(st.just(""), st.sampled_from(TEXTS), st.sampled_from(TEXTS), hostile_text, st.text(max_size=20))
labels_st = st.dictionaries(st.one_of(name_st, hostile_text), free_text, max_size=3)


def _doc(kind: str, name: str, tenant: str | None, spec: dict[str, Any] | None, draw: st.DrawFn) -> Doc:
    meta: dict[str, Any] = {"name": name}
    if tenant is not None:
        meta["tenant"] = tenant
    if draw(st.booleans()):
        meta["labels"] = draw(labels_st)
    if draw(st.integers(0, 5)) == 0:
        meta["drift"] = draw(st.sampled_from(["heal", "report"]))
    doc: dict[str, Any] = {"apiVersion": API, "kind": kind, "metadata": meta}
    if spec is not None:
        doc["spec"] = spec
    return doc


def _maybe(draw: st.DrawFn, spec: dict[str, Any], key: str, values: st.SearchStrategy[Any]) -> None:
    if draw(st.booleans()):
        spec[key] = draw(values)


@st.composite
def clouds(draw: st.DrawFn) -> list[Doc]:
    """A valid cloud: 1-2 tenants (and maybe a provider tenant with an external network),
    each with networks, a router, security groups, an image, instances, volumes, buckets."""
    docs: list[Doc] = []
    subnet_ids = iter(range(1, 250))
    vnis = iter(range(100, 10_000))
    vlans = iter(range(1, 4095))  # VNIs and VLAN ids are unique across the cloud
    provider_net = None
    tenants = draw(st.lists(name_st, min_size=1, max_size=2, unique=True))
    if draw(st.booleans()):
        prov = draw(name_st.filter(lambda n: n not in tenants))
        pub = draw(name_st)
        cidr = f"10.250.{next(subnet_ids)}.0/24"
        docs.append(_doc("Tenant", prov, None, None, draw))
        docs.append(_doc("Network", pub, prov, {
            "type": "flat", "external": True,
            "subnets": [{"cidr": cidr, "gateway": cidr.replace("0/24", "1"), "dhcp": {"enabled": False}}],
        }, draw))
        provider_net = f"{prov}/{pub}"
    for tenant in tenants:
        tspec: dict[str, Any] = {}
        _maybe(draw, tspec, "description", free_text)
        if draw(st.booleans()):
            tspec["quota"] = {k: draw(st.integers(10**7, 2**62)) for k in
                              draw(st.lists(st.sampled_from(["instances", "vcpus", "memoryMiB", "volumeGiB",
                                                              "buckets"]), unique=True))}
        docs.append(_doc("Tenant", tenant, None, tspec if tspec or draw(st.booleans()) else None, draw))
        # networks
        nets: dict[str, list[ipaddress.IPv4Network]] = {}
        for net in draw(st.lists(name_st, max_size=3, unique=True)):
            spec: dict[str, Any] = {}
            ntype = draw(st.sampled_from(["vxlan", "flat", "vlan", None]))
            if ntype is not None:
                spec["type"] = ntype
            if ntype in ("vxlan", None) and draw(st.booleans()):
                spec["vni"] = next(vnis)
            if ntype == "vlan" and draw(st.booleans()):
                spec["vlanId"] = next(vlans)
            _maybe(draw, spec, "mtu", st.integers(576, 9000))
            subnets = []
            for _ in range(draw(st.integers(0, 2))):
                cidr = ipaddress.IPv4Network(f"10.{next(subnet_ids)}.{draw(st.integers(0, 255))}.0/24")
                sub: dict[str, Any] = {"cidr": str(cidr)}
                if draw(st.booleans()):
                    sub["gateway"] = str(cidr.network_address + 1)
                dhcp = draw(st.sampled_from(["default", "range", "off"]))
                if dhcp == "range":
                    sub["dhcp"] = {"start": str(cidr.network_address + 100), "end": str(cidr.network_address + 199)}
                elif dhcp == "off":
                    sub["dhcp"] = {"enabled": False}
                _maybe(draw, sub, "dnsServers", st.lists(st.sampled_from(["1.1.1.1", "9.9.9.9", "10.0.0.53"]),
                                                           max_size=2))
                subnets.append(sub)
            if subnets or draw(st.booleans()):
                spec["subnets"] = subnets
            nets[net] = [ipaddress.IPv4Network(s["cidr"]) for s in subnets]
            docs.append(_doc("Network", net, tenant, spec, draw))
        routed = [n for n, subs in nets.items() if subs]
        if draw(st.booleans()):
            rspec: dict[str, Any] = {"networks": draw(st.lists(st.sampled_from(routed), unique=True)) if routed else []}
            if provider_net and draw(st.booleans()):
                rspec["external"] = provider_net
            _maybe(draw, rspec, "snat", st.booleans())
            docs.append(_doc("Router", draw(name_st), tenant, rspec, draw))
        # security groups
        groups = draw(st.lists(name_st, max_size=2, unique=True))
        for group in groups:
            rules = []
            for _ in range(draw(st.integers(0, 4))):
                rule: dict[str, Any] = {}
                proto = draw(st.sampled_from(["tcp", "udp", "icmp", "any", None]))
                if proto is not None:
                    rule["protocol"] = proto
                _maybe(draw, rule, "direction", st.sampled_from(["ingress", "egress"]))
                if proto in ("tcp", "udp") and draw(st.booleans()):
                    lo = draw(st.integers(1, 65535))
                    hi = draw(st.integers(lo, 65535))
                    rule["ports"] = str(lo) if lo == hi else f"{lo}-{hi}"
                if draw(st.booleans()):
                    if draw(st.booleans()):
                        rule["remote"] = draw(st.sampled_from(groups))
                    else:
                        prefix = draw(st.integers(0, 32))
                        addr = draw(st.integers(0, 2**32 - 1))
                        rule["remote"] = str(ipaddress.IPv4Network((addr, prefix), strict=False))
                _maybe(draw, rule, "description", free_text)
                rules.append(rule)
            gspec: dict[str, Any] = {"rules": rules}
            _maybe(draw, gspec, "description", free_text)
            docs.append(_doc("SecurityGroup", group, tenant, gspec, draw))
        # volumes, image, instances
        volumes: dict[str, bool] = {}
        for vol in draw(st.lists(name_st, max_size=3, unique=True)):
            vspec: dict[str, Any] = {"sizeGiB": draw(st.integers(1, 65536))}
            _maybe(draw, vspec, "multiattach", st.booleans())
            _maybe(draw, vspec, "wipe", st.booleans())
            _maybe(draw, vspec, "deletionPolicy", st.sampled_from(["Retain", "Delete"]))
            _maybe(draw, vspec, "snapshots", st.lists(st.text(alphabet="abc123-", min_size=1, max_size=32)
                                                      .filter(lambda s: s[0] != "-"), unique=True, max_size=3))
            volumes[vol] = bool(vspec.get("multiattach"))
            docs.append(_doc("Volume", vol, tenant, vspec, draw))
        if draw(st.booleans()):
            image = draw(name_st)
            ispec: dict[str, Any] = {"source": draw(st.one_of(st.just("/var/lib/images/tiny.qcow2"), hostile_path()))}
            _maybe(draw, ispec, "format", st.sampled_from(["qcow2", "raw"]))
            _maybe(draw, ispec, "sha256", st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
            docs.append(_doc("Image", image, tenant, ispec, draw))
            attached: set[str] = set()
            used_ips: dict[str, set[int]] = {n: set() for n in nets}
            for inst in draw(st.lists(name_st, max_size=3, unique=True)):
                spec = {"image": image}
                _maybe(draw, spec, "vcpus", st.integers(1, 64))
                _maybe(draw, spec, "memoryMiB", st.integers(64, 1048576))
                _maybe(draw, spec, "rootDiskGiB", st.integers(1, 65536))
                _maybe(draw, spec, "powerState", st.sampled_from(["running", "stopped"]))
                _maybe(draw, spec, "restartPolicy", st.sampled_from(["Never", "Allowed"]))
                nics = []
                for net in draw(st.lists(st.sampled_from(routed), unique=True, max_size=2)) if routed else []:
                    nic: dict[str, Any] = {"network": net}
                    if draw(st.booleans()):
                        free = [i for i in range(20, 90) if i not in used_ips[net]]
                        host = draw(st.sampled_from(free))
                        used_ips[net].add(host)
                        nic["ip"] = str(nets[net][0].network_address + host)
                    if groups and draw(st.booleans()):
                        nic["securityGroups"] = draw(st.lists(st.sampled_from(groups), unique=True))
                    nics.append(nic)
                if nics:
                    spec["networks"] = nics
                atts = []
                devices = iter("bcdefghijklmnopqrstuvwxyz")
                for vol in draw(st.lists(st.sampled_from(sorted(volumes)), unique=True, max_size=2)) if volumes else []:
                    if vol in attached and not volumes[vol]:
                        continue
                    attached.add(vol)
                    att: dict[str, Any] = {"volume": vol}
                    device = next(devices)
                    if draw(st.booleans()):
                        att["device"] = "vd" + device
                    atts.append(att)
                if atts:
                    spec["volumes"] = atts
                _maybe(draw, spec, "userData", st.one_of(free_text, st.just("#cloud-config\nhostname: x\n")))
                _maybe(draw, spec, "sshAuthorizedKeys", st.lists(free_text, max_size=2))
                doc = _doc("Instance", inst, tenant, spec, draw)
                if draw(st.integers(0, 3)) == 0:
                    doc["metadata"]["dependsOn"] = [f"Image/{image}"]
                docs.append(doc)
        for bucket in draw(st.lists(name_st, max_size=2, unique=True)):
            bspec: dict[str, Any] = {}
            _maybe(draw, bspec, "acl", st.sampled_from(["private", "public-read"]))
            _maybe(draw, bspec, "versioning", st.booleans())
            if draw(st.booleans()):
                bspec["quota"] = {k: draw(st.integers(0, 2**63 - 1)) for k in
                                  draw(st.lists(st.sampled_from(["bytes", "objects"]), unique=True))}
            _maybe(draw, bspec, "metadata", st.dictionaries(
                st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20)
                .filter(lambda k: k[0] != "-" and not k.startswith("rc-") and not k.startswith("quota-")
                        and not k.startswith("temp-url-key")),
                st.one_of(st.just(""), hostile_text).filter(header_ok), max_size=3))
            _maybe(draw, bspec, "deletionPolicy", st.sampled_from(["Retain", "Delete"]))
            _maybe(draw, bspec, "purgeOnDelete", st.booleans())
            docs.append(_doc("Bucket", bucket, tenant, bspec, draw))
    return docs


def example_docs() -> list[Doc]:
    """The example cloud of manifests/ (23 resources of every kind)."""
    docs = []
    for path in sorted(EXAMPLE.rglob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


# --- YAML by hand, with the line of every field -------------------------------------------------

_PLAIN_SAFE = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./ -]*$")
_RESOLVER = yaml.resolver.Resolver()
_STR_TAG = "tag:yaml.org,2002:str"
_ESCAPES = {"\x00": "\\0", "\x07": "\\a", "\x08": "\\b", "\t": "\\t", "\n": "\\n", "\x0b": "\\v",
            "\x0c": "\\f", "\r": "\\r", "\x1b": "\\e", "\x85": "\\N", "\xa0": "\\_",
            "\u2028": "\\L", "\u2029": "\\P"}


def _yaml_printable(ch: str) -> bool:
    o = ord(ch)
    return (0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or 0x10000 <= o <= 0x10FFFF) \
        and ch not in "\ufeff\u2028\u2029"  # a BOM, and YAML 1.1's line separators


def double_quoted(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04X}")  # a lone surrogate, escaped: no Unicode text can hold it
        elif _yaml_printable(ch):
            out.append(ch)
        elif o <= 0xFF:
            out.append(f"\\x{o:02X}")
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04X}")
        else:
            out.append(f"\\U{o:08X}")
    out.append('"')
    return "".join(out)


def plain_ok(s: str) -> bool:
    return bool(_PLAIN_SAFE.fullmatch(s)) and not s.endswith(" ") and len(s) < 200 \
        and _RESOLVER.resolve(yaml.ScalarNode, s, (True, False)) == _STR_TAG


@dataclass
class Emitted:
    text: str
    #: (document index, path) -> (first line, last line) of the field (key line for a map value)
    lines: dict[tuple[int, Path_], tuple[int, int]]
    #: the line of the second key of a duplicated key, when asked for one
    dup_line: int | None = None


class _Emitter:
    def __init__(self, rnd: random.Random, dup: tuple[int, Path_, Any] | None, styles: bool):
        self.rnd = rnd
        self.styles = styles  # vary spellings and layout (off: one plain, predictable style)
        self.out: list[str] = []
        self.lines: dict[tuple[int, Path_], tuple[int, int]] = {}
        self.doc = 0
        self.dup = dup
        self.dup_line: int | None = None

    def chance(self, p: float) -> bool:
        return self.styles and self.rnd.random() < p

    # scalars
    def scalar(self, v: Any) -> str:
        if isinstance(v, Raw):
            return str(v)
        if v is None:
            return self.rnd.choice(["null", "~", "Null"]) if self.styles else "null"
        if isinstance(v, bool):
            if self.chance(0.5):
                return self.rnd.choice(["yes", "on", "True", "TRUE"] if v else ["no", "off", "False", "FALSE"])
            return "true" if v else "false"
        if isinstance(v, int):
            if self.chance(0.2) and v >= 0:
                return self.rnd.choice([hex(v), f"0{v:o}" if v else "0", f"{v:_}", f"+{v}", f"0b{v:b}"])
            return str(v)
        if isinstance(v, float):
            if math.isnan(v):
                return self.rnd.choice([".nan", ".NaN"]) if self.styles else ".nan"
            if math.isinf(v):
                return ("-" if v < 0 else "") + (self.rnd.choice([".inf", ".Inf"]) if self.styles else ".inf")
            text = repr(v)
            mantissa, _, exp = text.partition("e")
            if "." not in mantissa:
                mantissa += ".0"
            return mantissa + ("e" + exp if exp else "")
        if isinstance(v, str):
            return self.string(v)
        raise TypeError(f"cannot emit {type(v)}")

    def string(self, s: str) -> str:
        if plain_ok(s) and not self.chance(0.2):
            return s
        if self.chance(0.3) and all(_yaml_printable(c) for c in s) and s == s.strip(" "):
            return "'" + s.replace("'", "''") + "'"
        return double_quoted(s)

    def key(self, k: Any) -> str:
        return self.string(k) if isinstance(k, str) else self.scalar(k)

    def flow(self, v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{self.key(k)}: {self.flow(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(self.flow(x) for x in v) + "]"
        return self.scalar(v)

    # lines
    def line(self, text: str) -> int:
        self.out.append(text)
        return len(self.out)

    def mark_all(self, path: Path_, v: Any, line: int) -> None:
        self.lines[(self.doc, path)] = (line, line)
        if isinstance(v, dict):
            for k, x in v.items():
                self.mark_all(path + (k,), x, line)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                self.mark_all(path + (i,), x, line)

    def comment(self, indent: int) -> None:
        if self.chance(0.05):
            text = "".join(c for c in self.rnd.choice(SNIPPETS) if _yaml_printable(c))
            self.line(" " * indent + "# " + text)
        elif self.chance(0.03):
            self.line("")

    def block(self, v: Any, path: Path_) -> bool:
        """Whether a value is written in block style (a container holding the duplicated key
        always is, so the duplicate is on a line of its own)."""
        if not isinstance(v, (dict, list)) or not v:
            return False
        if self.dup is not None and self.dup[0] == self.doc and self.dup[1][: len(path)] == path \
                and len(path) < len(self.dup[1]):
            return True
        return not self.chance(0.15)

    def mapping(self, d: dict[Any, Any], indent: int, path: Path_, prefix: str | None = None) -> None:
        """Block mapping; `prefix` ("- " at some indent) goes before the first key."""
        dup = self.dup if self.dup and self.dup[0] == self.doc and self.dup[1][:-1] == path else None
        for n, (k, v) in enumerate(d.items()):
            if n > 0:
                self.comment(indent)
            self.entry(prefix if (n == 0 and prefix is not None) else " " * indent, k, v, indent, path)
            if dup is not None and k == dup[1][-1]:
                self.dup_line = len(self.out) + 1
                self.entry(" " * indent, k, dup[2], indent, path, record=False)

    def entry(self, lead: str, k: Any, v: Any, indent: int, path: Path_, record: bool = True) -> None:
        sub = path + (k,)
        head = lead + self.key(k) + ":"
        if self.block(v, sub):
            start = self.line(head)
            if isinstance(v, dict):
                self.mapping(v, indent + 2, sub)
            else:
                self.sequence(v, indent + (0 if self.chance(0.3) else 2), sub)
            if record:
                self.lines[(self.doc, sub)] = (start, len(self.out))
        else:
            start = self.line(head if v is None and self.chance(0.3) else head + " " + self.flow(v))
            if record:
                self.mark_all(sub, v, start)

    def sequence(self, items: list[Any], indent: int, path: Path_) -> None:
        for i, v in enumerate(items):
            sub = path + (i,)
            if isinstance(v, dict) and self.block(v, sub):
                if self.chance(0.2):
                    self.line(" " * indent + "-")
                    start = len(self.out) + 1
                    self.mapping(v, indent + 2, sub)
                else:
                    start = len(self.out) + 1
                    self.mapping(v, indent + 2, sub, prefix=" " * indent + "- ")
                self.lines[(self.doc, sub)] = (start, len(self.out))
            elif isinstance(v, list) and self.block(v, sub):
                self.line(" " * indent + "-")
                start = len(self.out) + 1
                self.sequence(v, indent + 2, sub)
                self.lines[(self.doc, sub)] = (start, len(self.out))
            else:
                start = self.line(" " * indent + "- " + self.flow(v))
                self.mark_all(sub, v, start)

    def document(self, doc: Doc, index: int, marker: bool) -> None:
        self.doc = index
        if marker or self.chance(0.3):
            self.line("---" + (" # " + str(index) if self.chance(0.1) else ""))
        start = len(self.out) + 1
        if isinstance(doc, dict) and self.block(doc, ()):
            self.mapping(doc, 0, ())
            self.lines[(index, ())] = (start, len(self.out))
        else:
            start = self.line(self.flow(doc))
            self.mark_all((), doc, start)
        if self.chance(0.1):
            self.line("...")


def emit(docs: list[Doc], rnd: random.Random, *, dup: tuple[int, Path_, Any] | None = None,
         styles: bool = True, first: int = 0) -> Emitted:
    """YAML text for `docs` (numbered from `first` in the line map); `dup` = (document,
    path of a key, value): write that key a second time with that value."""
    e = _Emitter(rnd, dup, styles)
    directive = e.chance(0.05)
    if directive:
        e.line("%YAML 1.1")
    for i, doc in enumerate(docs):
        e.document(doc, first + i, marker=i > 0 or directive)
    return Emitted("\n".join(e.out) + ("\n" if e.out else ""), e.lines, e.dup_line)


# --- running the CLI -----------------------------------------------------------------------------


class Hang(BaseException):
    """A CLI run did not return within HANG_SECONDS (BaseException: nothing may catch it)."""


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_SECONDS) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class RecordingDriver(MemoryDriver):
    """The in-memory driver, logging every resource and spec it is handed (and answering
    the optional driver protocols, so `plan` hands it every resource's spec)."""

    def __init__(self, root: Path, log: list[tuple[Any, ...]]):
        super().__init__(root)
        self.log = log

    def observe(self):  # type: ignore[no-untyped-def]
        self.log.append(("observe",))
        return super().observe()

    def host_name(self, key: Key) -> str:
        self.log.append(("host_name", key, None))
        return super().host_name(key)

    def problems(self, kind: str, tenant: str, name: str, spec: Any) -> list[Any]:
        self.log.append(("problems", Key(kind, tenant, name), spec))
        return []

    def defaults(self, kind: str) -> dict[str, Any]:
        self.log.append(("defaults", kind))
        return {}

    def admit(self, proposals: Any) -> list[Any]:
        for p in proposals:
            self.log.append(("admit", p.key, p.spec))
        return []

    def attach_problem(self, kind: str, tenant: str, name: str, spec: Any) -> None:
        self.log.append(("attach", Key(kind, tenant, name), spec))
        return None

    def create(self, target):  # type: ignore[no-untyped-def]
        self.log.append(("create", target.key, target.spec))
        return super().create(target)

    def update(self, target, observed, diffs):  # type: ignore[no-untyped-def]
        self.log.append(("update", target.key, target.spec))
        return super().update(target, observed, diffs)


def bad_driver_data(entry: tuple[Any, ...]) -> str | None:
    """Why a driver call's data is invalid, or None: names follow the naming rule, a spec
    validates as its kind's model, every int fits 64 bits, every string is encodable."""
    if len(entry) < 3:
        return None
    _, key, spec = entry
    if key.kind not in KINDS:
        return f"unknown kind {key.kind!r}"
    for part in (key.tenant, key.name):
        if not isinstance(part, str) or not NAME_RE.fullmatch(part):
            return f"{key}: {part!r} breaks the naming rule"
    if spec is None:
        return None
    try:
        KINDS[key.kind].model_validate(dict(spec))
    except pydantic.ValidationError as exc:
        return f"{key}: spec does not validate as {key.kind}: {exc}"

    def walk(v: Any) -> str | None:
        if isinstance(v, bool) or v is None:
            return None
        if isinstance(v, int):
            return None if INT64[0] <= v <= INT64[1] else f"int beyond 64 bits: {v.bit_length()} bits"
        if isinstance(v, float):
            return None if math.isfinite(v) else f"non-finite float {v}"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"string not encodable: {v!r}"
            return None
        if isinstance(v, dict):
            return next((w for w in (walk(k) or walk(x) for k, x in v.items()) if w), None)
        if isinstance(v, (list, tuple)):
            return next((w for w in map(walk, v) if w), None)
        return f"unexpected type {type(v).__name__}"

    why = walk(spec)
    return f"{key}: {why}" if why else None


ERROR_LINE = re.compile(r"^(?P<file>/[^\n]*?):(?P<line>\d+): (?P<rest>.*\S.*)$")
SUMMARY = re.compile(r"^(\d+) error\(s\); nothing was changed\.$")
_BREAKS = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")


def line_count(raw: bytes) -> int:
    """The number of a file's last line (as `wc -l` counts, plus a last line without a line
    break), with every YAML 1.1 line break; at least 1 (an empty file has line 1)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        breaks, ends = raw.count(b"\n"), raw.endswith(b"\n")
    else:
        breaks, ends = len(_BREAKS.findall(text)), text.endswith(("\n", "\r", "\x85", "\u2028", "\u2029"))
    return max(1, breaks if ends else breaks + 1)


@dataclass
class Expect:
    """What a case must give: valid or not (None: either), and for a broken one where the
    error must point: a field path of a document and the lines it may be on."""

    valid: bool | None
    file: Path | None = None
    path: Path_ | None = None  # an error names this field (or one inside it)
    lines: tuple[int, int] | None = None  # ... on one of these lines
    message: str | None = None  # ... and says this
    resource: str | None = None  # ... about this resource
    resources: int | None = None  # a valid case declares this many resources
    only_file: bool = False  # every error names `file` (the other files hold a valid cloud)
    why: str = ""


@dataclass
class Stats:
    manifests: int = 0
    valid: int = 0
    invalid: int = 0
    tracebacks: int = 0
    hangs: int = 0
    errors_without_file_line: int = 0
    driver_calls_with_invalid_data: int = 0
    invalid_reaching_a_driver: int = 0
    cli_runs: int = 0

    def record(self, figures_record: Callable[..., None]) -> None:
        figures_record("bad_input", manifests=self.manifests, valid=self.valid, invalid=self.invalid,
                       tracebacks=self.tracebacks, hangs=self.hangs,
                       errors_without_file_line=self.errors_without_file_line,
                       driver_calls_with_invalid_data=self.driver_calls_with_invalid_data,
                       invalid_reaching_a_driver=self.invalid_reaching_a_driver, cli_runs=self.cli_runs)


@dataclass
class Run:
    command: str
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    calls: list[tuple[Any, ...]] = field(default_factory=list)


class Harness:
    """validate + plan on a folder, in-process, on recording in-memory drivers."""

    def __init__(self, base: Path, monkeypatch: Any):
        self.base = base
        self.state = base / "state"
        self.state.mkdir()
        self.config = base / "host.yaml"
        self.config.write_text(f"stateDir: {self.state}\ndrivers: memory\nlockTimeoutSeconds: 2\n")
        self.sentinel = base / SENTINEL_NAME
        self.log: list[tuple[Any, ...]] = []
        self.cases = 0
        import reconciler.controller as controller

        def build(config: Any) -> dict[str, Any]:
            self.log.append(("build",))
            drv = RecordingDriver(config.stateDir / "memory", self.log)
            return {kind: drv for kind in KINDS}

        monkeypatch.setattr(controller, "build_drivers", build)
        # typer's CliRunner builds the click command from the app on every invoke (~15 ms,
        # a third of a small case): build it once (setattr fails loudly if typer renames it)
        built = typer.testing._get_command(app)
        monkeypatch.setattr(typer.testing, "_get_command", lambda a: built if a is app else typer.main.get_command(a))
        self.runner = CliRunner()
        self.env = {"RECONCILER_HOST_CONFIG": str(self.config), "NO_COLOR": "1", "COLUMNS": "200"}

    def folder(self) -> Path:
        self.cases += 1
        path = self.base / f"case{self.cases}"
        path.mkdir()
        return path

    def write(self, files: dict[str, bytes | str]) -> tuple[Path, dict[Path, bytes]]:
        folder = self.folder()
        written: dict[Path, bytes] = {}
        for name, content in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
            path.write_bytes(data)
            written[path] = data
        return folder, written

    def invoke(self, args: list[str]) -> Run:
        self.log.clear()
        try:
            with hang_guard():
                result = self.runner.invoke(app, args, env=self.env)
        except Hang as exc:
            return Run(args[0], -1, "", "", exc, list(self.log))
        exc = result.exception if not isinstance(result.exception, SystemExit) else None
        return Run(args[0], result.exit_code, result.stdout, result.stderr, exc, list(self.log))

    def check(self, folder: Path, written: dict[Path, bytes], expect: Expect, stats: Stats,
              detailed: bool = False) -> None:
        """Run validate and plan on `folder` and check everything a run must hold."""
        import shutil

        stats.manifests += 1
        runs = [self.invoke(["validate", str(folder)]),
                self.invoke(["plan", str(folder)] + (["--detailed-exitcode"] if detailed else []))]
        stats.cli_runs += 2
        try:
            self._check(runs, written, expect, stats, detailed)
            # validate and plan change nothing, whatever the input
            assert list(self.state.iterdir()) == [], "validate or plan wrote to the state directory"
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _check(self, runs: list[Run], written: dict[Path, bytes], expect: Expect, stats: Stats,
               detailed: bool) -> None:
        validate, plan = runs

        def context() -> str:  # the report of a failure (built only then)
            report = [f"expected: {expect}"]
            for path, data in written.items():
                report.append(f"--- {path} ({len(data)} bytes)\n{data[:1500]!r}")
            for run in runs:
                report.append(f"--- {run.command}: exit {run.code}\n{run.stdout}\n--- stderr\n{run.stderr}")
            return "\n".join(report)[:20_000]

        # never a traceback, never a hang, never an escaping exception
        hangs = sum(isinstance(r.exception, Hang) for r in runs)
        stats.hangs += hangs
        tracebacks = sum(1 for r in runs if (r.exception is not None and not isinstance(r.exception, Hang))
                         or "Traceback" in r.stdout + r.stderr)
        stats.tracebacks += tracebacks
        if hangs or tracebacks:
            import traceback as tb

            escaped = [r.exception for r in runs if r.exception is not None]
            detail = "".join(tb.format_exception(escaped[0])) if escaped else ""
            raise AssertionError(f"{'a hang' if hangs else 'a traceback'}:\n{detail}\n{context()}")
        assert validate.code in (0, 1), context()
        assert plan.code in ((0, 1, 2) if detailed else (0, 1)), context()
        ok = validate.code == 0
        assert (plan.code in (0, 2)) == ok, "validate and plan disagree\n" + context()
        stats.valid += ok
        stats.invalid += not ok
        if expect.valid is not None:
            assert ok == expect.valid, f"expected {'valid' if expect.valid else 'invalid'} ({expect.why})\n{context()}"
        # the sentinel a python tag would create
        assert not self.sentinel.exists(), "a YAML tag was constructed\n" + context()
        if ok:
            self._check_valid(runs, expect, stats, context)
        else:
            self._check_errors(runs, written, expect, stats, context)

    def _check_valid(self, runs: list[Run], expect: Expect, stats: Stats, context: Callable[[], str]) -> None:
        validate, plan = runs
        m = re.fullmatch(r"Valid: (\d+) resources\.\n", validate.stdout)
        assert m, context()
        if expect.resources is not None:
            assert int(m.group(1)) == expect.resources, context()
        assert validate.calls == [], "validate reached a driver\n" + context()
        n = int(m.group(1))
        assert (f"Plan: {n} to add, 0 to change, 0 to replace, 0 to destroy." in plan.stdout) if n else \
            ("No changes." in plan.stdout), context()
        assert plan.stderr == "", context()
        bad = [why for why in map(bad_driver_data, plan.calls) if why]
        stats.driver_calls_with_invalid_data += len(bad)
        assert not bad, "a driver was handed invalid data:\n" + "\n".join(bad) + "\n" + context()
        handed = {c[1] for c in plan.calls if c[0] == "problems"}
        assert len(handed) == n, f"plan handed {len(handed)} of {n} resources to the driver\n" + context()

    def _check_errors(self, runs: list[Run], written: dict[Path, bytes], expect: Expect, stats: Stats,
                      context: Callable[[], str]) -> None:
        lines_of = {str(p): line_count(data) for p, data in written.items()}
        reached = sum(1 for r in runs if r.calls)
        stats.invalid_reaching_a_driver += reached
        assert not reached, "invalid manifests reached a driver\n" + context()
        parsed: list[tuple[str, int, str]] = []
        for run in runs:
            assert run.stdout == "", context()
            lines = run.stderr.splitlines()
            assert lines, context()
            summary = SUMMARY.match(lines[-1])
            bad = []
            for text in lines[:-1]:
                m = ERROR_LINE.match(text)
                if not m or not 1 <= int(m.group("line")) <= lines_of.get(m.group("file"), 0):
                    bad.append(text)
                else:
                    parsed.append((m.group("file"), int(m.group("line")), m.group("rest")))
            if not summary or int(summary.group(1)) != len(lines) - 1:
                bad.append(lines[-1])
            stats.errors_without_file_line += len(bad)
            assert not bad, "error lines without FILE:LINE in the file:\n" + "\n".join(map(repr, bad)) \
                + "\n" + context()
        if expect.only_file:
            others = sorted({f for f, _, _ in parsed if f != str(expect.file)})
            assert not others, f"errors in files that hold a valid cloud: {others}\n" + context()
        if expect.path is not None or expect.lines is not None or expect.message is not None:
            assert any(_matches(expect, f, ln, rest) for f, ln, rest in parsed), \
                "no error where expected\n" + context()


def _matches(expect: Expect, file: str, line: int, rest: str) -> bool:
    if expect.file is not None and file != str(expect.file):
        return False
    if expect.lines is not None and not expect.lines[0] <= line <= expect.lines[1]:
        return False
    if expect.message is not None and expect.message not in rest:
        return False
    if expect.resource is not None and not rest.startswith(expect.resource + ": "):
        return False
    if expect.path is not None:
        want = format_path(expect.path)
        if want and not any(rest.startswith(p) or f": {p}" in rest for p in (
                f"{want}: ", f"{want}.", f"{want}[")):
            return False
    return True


def resource_label(doc: Doc) -> str | None:
    """How errors name a document's resource when its kind and names are good."""
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS or not isinstance(doc.get("metadata"), dict):
        return None
    meta = doc["metadata"]
    name, tenant = meta.get("name"), meta.get("tenant")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None
    if doc["kind"] == "Tenant":
        return f"Tenant {name}"
    if not isinstance(tenant, str) or not NAME_RE.fullmatch(tenant):
        return None
    return f"{doc['kind']} {tenant}/{name}"


def walk_paths(v: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    yield path, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from walk_paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from walk_paths(x, path + (i,))


def get_at(doc: Doc, path: Path_) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def set_at(doc: Doc, path: Path_, value: Any) -> None:
    get_at(doc, path[:-1])[path[-1]] = value


def deep_copy(docs: list[Doc]) -> list[Doc]:
    return copy.deepcopy(docs)
