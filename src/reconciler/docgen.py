"""Generate the manifests reference (docs/manifests.md) from the models; never by hand.

    python -m reconciler.docgen docs/manifests.md            # write it
    python -m reconciler.docgen docs/manifests.md --check    # exit 1 when it is out of date

Everything about a field comes from its declaration in :mod:`reconciler.models`: the
annotation (type and constraints), the default, the description, and the change-policy
extras of :mod:`reconciler.models._fields` (`x-update`, `x-shrink`, `x-host-default`,
`x-merge-keys`, `x-sensitive`). The example of each kind is a document of the example
cloud in `manifests/`. The output is deterministic: no dates, no absolute paths.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import typing
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from reconciler import API_VERSION
from reconciler.loader import MANIFEST_SUFFIXES, MAX_FILE_BYTES, find_manifest_files
from reconciler.models import KINDS, NAME_PATTERN, Metadata, Spec, UpdatePolicy, document_model
from reconciler.models._fields import X_HOST_DEFAULT, X_MERGE_KEYS, X_SENSITIVE, X_SHRINK, X_UPDATE

GENERATED_BY = "python -m reconciler.docgen docs/manifests.md"

POLICY_WORDS = {
    UpdatePolicy.IN_PLACE: "in place",
    UpdatePolicy.RESTART: "in place, needs restart",
    UpdatePolicy.REPLACE: "forces replacement",
}
_RANK = {UpdatePolicy.IN_PLACE: 0, UpdatePolicy.RESTART: 1, UpdatePolicy.REPLACE: 2}

NOTE_SENSITIVE = "sensitive: hidden in plans and logs"
NOTE_HOST_DEFAULT = "host default: when omitted, the host's value stands"
NOTE_MERGE_KEYS = (
    "merge keys: keys set by others on the host are kept; keys you remove after an apply "
    "are removed"
)
NOTE_BY_POSITION = "entries are compared by position"


# --- reading the models -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldDoc:
    """One row of a field table: a field of a model, nested ones included."""

    path: str  # e.g. "subnets[].dhcp.start"
    type: str
    default: str
    change: str
    notes: tuple[str, ...]
    description: str


@dataclass(frozen=True, slots=True)
class _Extras:
    policy: UpdatePolicy
    shrink: str | None
    host_default: bool
    merge_keys: bool
    sensitive: bool


def _extras(info: FieldInfo) -> _Extras:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return _Extras(
        policy=UpdatePolicy(extra.get(X_UPDATE, UpdatePolicy.IN_PLACE.value)),
        shrink=extra.get(X_SHRINK),  # type: ignore[arg-type]
        host_default=bool(extra.get(X_HOST_DEFAULT, False)),
        merge_keys=bool(extra.get(X_MERGE_KEYS, False)),
        sensitive=bool(extra.get(X_SENSITIVE, False)),
    )


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, whether None was allowed)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, _UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # type: ignore[return-value]
    return annotation, False


_UnionType = type(int | None)


def _unwrap_annotated(annotation: Any, metadata: Sequence[Any]) -> tuple[Any, list[Any]]:
    """Peel `Annotated[...]`, collecting its metadata (and that of FieldInfos inside)."""
    found = list(metadata)
    while typing.get_origin(annotation) is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        for item in extra:
            if isinstance(item, FieldInfo):
                found.extend(item.metadata)
                if isinstance(item.json_schema_extra, dict) and "pattern" in item.json_schema_extra:
                    found.append(_Pattern(str(item.json_schema_extra["pattern"])))
            else:
                found.append(item)
        annotation = inner
    return annotation, found


@dataclass(frozen=True, slots=True)
class _Pattern:
    pattern: str


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(nested model, is a list of it) of a field annotation."""
    annotation, _ = _strip_optional(annotation)
    annotation, _ = _unwrap_annotated(annotation, ())
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        inner, _ = _model_of(item)
        return inner, inner is not None
    return None, False


def _is_name(metadata: Sequence[Any]) -> bool:
    return any(getattr(m, "pattern", None) == NAME_PATTERN for m in metadata)


_SCALARS: dict[Any, tuple[str, str]] = {
    str: ("string", "strings"),
    int: ("integer", "integers"),
    float: ("number", "numbers"),
    bool: ("boolean", "booleans"),
    IPv4Address: ("IPv4 address", "IPv4 addresses"),
    IPv4Network: ("IPv4 network (CIDR)", "IPv4 networks (CIDR)"),
}


def _code(text: str) -> str:
    return f"`{text}`"


def _one_of(values: Sequence[Any]) -> str:
    words = [_code(str(v)) for v in values]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _constraints(metadata: Sequence[Any], is_text: bool) -> list[str]:
    lo = hi = None
    lo_len = hi_len = None
    pattern = None
    for m in metadata:
        if isinstance(m, Ge):
            lo = f"{m.ge}"
        elif isinstance(m, Gt):
            lo = f"more than {m.gt}"
        elif isinstance(m, Le):
            hi = f"{m.le}"
        elif isinstance(m, Lt):
            hi = f"less than {m.lt}"
        elif isinstance(m, MinLen):
            lo_len = m.min_length
        elif isinstance(m, MaxLen):
            hi_len = m.max_length
        elif getattr(m, "pattern", None):
            pattern = m.pattern
    out = []
    if lo is not None and hi is not None:
        out.append(f"{lo} to {hi}")
    elif lo is not None:
        out.append(f"at least {lo}")
    elif hi is not None:
        out.append(f"at most {hi}")
    unit = "characters" if is_text else "entries"
    if lo_len is not None and hi_len is not None:
        out.append(f"{lo_len} to {hi_len} {unit}")
    elif hi_len is not None:
        out.append(f"at most {hi_len} {unit}")
    elif lo_len is not None:
        out.append(f"at least {lo_len} {unit}")
    if pattern is not None and pattern != NAME_PATTERN:
        out.append(f"matching {_code(pattern)}")
    return out


def type_text(annotation: Any, metadata: Sequence[Any] = (), extra: dict[str, Any] | None = None,
              plural: bool = False) -> str:
    """A field's type in words, with its constraints: `integer, 1 to 64`, `list of names`."""
    annotation, _ = _strip_optional(annotation)
    annotation, metadata = _unwrap_annotated(annotation, metadata)
    if extra and "pattern" in extra:
        metadata = [*metadata, _Pattern(str(extra["pattern"]))]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + _one_of(args)
    if origin is list:
        return "list of " + type_text(args[0], plural=True)
    if origin is dict:
        return f"map of {type_text(args[0], plural=True)} to {type_text(args[1], plural=True)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "objects" if plural else "object"
    if annotation is str and _is_name(metadata):
        base = "names" if plural else "name"
    elif annotation in _SCALARS:
        base = _SCALARS[annotation][1 if plural else 0]
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ("one of " if not plural else "") + _one_of([e.value for e in annotation])
    else:  # pragma: no cover - a new kind of annotation: say it plainly
        base = getattr(annotation, "__name__", str(annotation))
    more = _constraints(metadata, annotation is str)
    return ", ".join([base, *more])


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "see its fields"
        return value_text(value)
    if info.default is PydanticUndefined:
        return "**required**"
    return value_text(info.default)


def value_text(value: Any) -> str:
    """A default as it would be written in YAML: `vxlan`, `true`, `[]`; None is "unset"."""
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str) and value:
        return _code(value)
    return _code(json.dumps(value))


def change_text(policy: UpdatePolicy, shrink: str | None) -> str:
    """A change policy in words: "in place", "grows in place; shrinking is refused"..."""
    if shrink == "replace":
        grow = POLICY_WORDS[policy] if policy is not UpdatePolicy.REPLACE else "forces replacement"
        return f"grows {grow}; shrinking forces replacement"
    if shrink == "error":
        return f"grows {POLICY_WORDS[policy]}; shrinking is refused"
    return POLICY_WORDS[policy]


def _worst(a: UpdatePolicy, b: UpdatePolicy) -> UpdatePolicy:
    return a if _RANK[a] >= _RANK[b] else b


def _description(info: FieldInfo, nested: type[BaseModel] | None) -> str:
    text = (info.description or "").strip()
    doc = _own_doc(nested) if nested is not None else ""
    if doc and doc not in text:
        text = f"{text} {doc}".strip()
    return text


def _own_doc(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    base_docs = {(b.__doc__ or "") for b in model.__mro__[1:]}
    return " ".join(doc.split()) if doc and doc not in base_docs else ""


def field_docs(
    model: type[BaseModel],
    prefix: str = "",
    inherited: UpdatePolicy = UpdatePolicy.IN_PLACE,
) -> Iterator[FieldDoc]:
    """Every field of `model`, then recursively of its nested models, in declaration order.

    A nested field's change policy is the most disruptive of its own and its parents',
    as the planner's diff applies it.
    """
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        ex = _extras(info)
        policy = _worst(ex.policy, inherited)
        nested, is_list = _model_of(info.annotation)
        notes: list[str] = []
        if ex.sensitive:
            notes.append(NOTE_SENSITIVE)
        if ex.host_default:
            notes.append(NOTE_HOST_DEFAULT)
        if ex.merge_keys:
            notes.append(NOTE_MERGE_KEYS)
        if nested is not None and not is_list:
            change = "see its fields"
        elif nested is not None:
            change = f"{change_text(policy, ex.shrink)} (adding or removing entries); see their fields"
            notes.append(NOTE_BY_POSITION)
            identity = getattr(nested, "list_identity", None)
            if isinstance(identity, str) and any(_extras(f).host_default for f in nested.model_fields.values()):
                notes.append(f"an entry keeps its host defaults only while its `{identity}` is unchanged")
        else:
            change = change_text(policy, ex.shrink)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else None
        yield FieldDoc(
            path=path,
            type=type_text(info.annotation, info.metadata, extra),
            default=default_text(info),
            change=change,
            notes=tuple(notes),
            description=_description(info, nested),
        )
        if nested is not None:
            yield from field_docs(nested, f"{path}[]." if is_list else f"{path}.", policy)


# --- examples -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Example:
    kind: str
    file: str  # as shown: manifests/acme/network.yaml
    text: str


_DOC_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


def _leaf_paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        out: set[str] = set()
        for k, v in value.items():
            out |= _leaf_paths(v, f"{prefix}.{k}" if prefix else str(k)) or {f"{prefix}.{k}"}
        return out
    if isinstance(value, list):
        out = set()
        for v in value:
            out |= _leaf_paths(v, f"{prefix}[]")
        return out or {prefix}
    return {prefix}


def find_examples(manifests: Path) -> dict[str, Example]:
    """Per kind, the document of the example cloud that sets the most fields (first wins a tie)."""
    files, _ = find_manifest_files([manifests])
    best: dict[str, tuple[int, Example]] = {}
    for file in files:
        shown = f"{manifests.name}/{file.relative_to(manifests).as_posix()}"
        for chunk in _DOC_SEPARATOR.split(file.read_text(encoding="utf-8")):
            text = _trim(chunk)
            if not text:
                continue
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if not isinstance(data, dict) or data.get("kind") not in KINDS:
                continue
            kind = data["kind"]
            score = len(_leaf_paths(data.get("spec") or {})) + len(_leaf_paths(data.get("metadata") or {}))
            if kind not in best or score > best[kind][0]:
                best[kind] = (score, Example(kind, shown, text))
    return {kind: ex for kind, (_, ex) in best.items()}


def _trim(chunk: str) -> str:
    """A document without the comment lines above it and blank lines around it."""
    lines = chunk.strip("\n").splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(line.rstrip() for line in lines)


# --- rendering ----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or " "


def _table(rows: Sequence[FieldDoc], prefix: str = "") -> list[str]:
    out = [
        "| field | type | default | on change | notes | description |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    _code(prefix + r.path),
                    r.type,
                    r.default,
                    r.change,
                    "; ".join(r.notes),
                    r.description,
                )
            )
            + " |"
        )
    return out


def _anchor(kind: str) -> str:
    return kind.lower()


def _kind_summary(kind: str) -> str:
    spec = KINDS[kind]
    first = " ".join((spec.__doc__ or "").split())
    module_doc = (sys.modules[spec.__module__].__doc__ or "").strip().splitlines()
    lead = module_doc[0] if module_doc else ""
    if lead.lower().startswith(kind.lower() + ":"):
        lead = lead.split(":", 1)[1].strip()
        lead = lead[:1].upper() + lead[1:]
    return f"{first} {lead}".strip()


def _envelope_rows() -> list[FieldDoc]:
    doc = document_model("Tenant")
    fields = doc.model_fields
    rows = [
        FieldDoc("apiVersion", "string", "**required**", "", (),
                 f"Always {_code(API_VERSION)}."),
        FieldDoc("kind", "one of " + _one_of(list(KINDS)), "**required**", "", (),
                 fields["kind"].description or ""),
        FieldDoc("metadata", "object", "**required**", "", (), fields["metadata"].description or ""),
    ]
    for r in field_docs(Metadata, "metadata."):
        rows.append(FieldDoc(r.path, r.type, r.default, "", r.notes, r.description))
    rows.append(FieldDoc("spec", "object", "all defaults", "", (),
                         "The kind's settings, below. May be omitted when every field has a default."))
    return rows


def _envelope_table(rows: Sequence[FieldDoc]) -> list[str]:
    out = ["| field | type | default | description |", "|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(c) for c in (_code(r.path), r.type, r.default, r.description)) + " |")
    return out


def _intro() -> list[str]:
    kinds = ", ".join(f"[{k}](#{_anchor(k)})" for k in KINDS)
    stateful = [k for k, s in KINDS.items() if s.stateful]
    cbd = [k for k, s in KINDS.items() if s.create_before_destroy]
    suffixes = " or ".join(_code(s) for s in MANIFEST_SUFFIXES)
    lines = [
        "# Manifests reference",
        "",
        f"<!-- Generated from the models in src/reconciler/models and the example cloud in manifests/ "
        f"by `{GENERATED_BY}` (`make docs`). Do not edit by hand. -->",
        "",
        "A cloud is declared in Kubernetes-style YAML documents. This reference is generated from "
        "the pydantic models that validate them, so it lists every field the loader accepts, "
        "with its type, default, and what changing it does to the running resource.",
        "",
        f"Kinds: {kinds}.",
        "",
        "## Documents",
        "",
        "```yaml",
        f"apiVersion: {API_VERSION}",
        "kind: Instance            # " + " | ".join(KINDS),
        "metadata:",
        "  name: web-1",
        "  tenant: acme            # every kind but Tenant belongs to a tenant",
        "  labels: {tier: web}",
        "  dependsOn: [Volume/pgdata]",
        "spec: {...}",
        "```",
        "",
        *_envelope_table(_envelope_rows()),
        "",
        "A **name** is 1 to 63 lowercase letters, digits or `-`, starting with a letter or digit "
        f"({_code(NAME_PATTERN)}); names reach the host only through derived, short, stable host "
        "object names.",
        "",
        "### Files",
        "",
        f"- `reconciler validate|plan|apply PATH...` reads every {suffixes} file under the given files "
        "and folders, in any folder layout (sorted by path; hidden folders are skipped).",
        "- A file holds one or several documents separated by `---`. YAML anchors, aliases and "
        "merge keys (`<<`) work; duplicate keys are errors.",
        f"- A file is at most {MAX_FILE_BYTES // (1024 * 1024)} MiB. Unknown fields are errors "
        "(with a \"did you mean\" hint), never silently ignored.",
        "- Every error is reported at once, compiler-style, with the file, the line and the field "
        "path: `manifests/acme/compute.yaml:31: Instance acme/web-2: spec.networks[0].network: "
        "no Network named 'wbe' in tenant 'acme' (did you mean 'web'?)`.",
        "",
        "### Identity and references",
        "",
        "- A resource is identified by `(kind, tenant, name)`. A Tenant's tenant is its own name: "
        "it has no `metadata.tenant`. Every other kind needs `metadata.tenant`, naming a Tenant "
        "declared in the manifests. Two documents with the same identity are an error naming both.",
        "- Renaming a resource (or moving it to another tenant) is a new identity: the old one is "
        "deleted (or orphaned) and the new one created.",
        "- Resources refer to each other **by name, within their tenant**: `image: tiny`, "
        "`networks: [{network: web}]`, `volumes: [{volume: pgdata}]`, `securityGroups: [web]`, "
        "a router's `networks: [web, db]`, a rule's `remote: web`. The loader resolves every "
        "reference; a dangling one is an error at the line of the field.",
        "- The one reference across tenants: a router's `external` may name a network of another "
        "tenant as `TENANT/NAME` (e.g. `external: infra/public`), and only when that network "
        "says `external: true` (a provider network).",
        "- References order the work: what is referenced is created first and deleted last. "
        "`metadata.dependsOn` adds ordering the fields do not imply: entries are `Kind/name` in "
        "the same tenant (`Tenant/name` for a tenant). A cycle is an error naming it.",
        "- A security group named in another group's rule (`remote: web`) must exist but implies "
        "no order: two groups may name each other.",
        "",
        "### Deletion",
        "",
        f"- Stateful kinds ({', '.join(stateful)}) have `deletionPolicy`, `Retain` by default: "
        "removing the document (or `reconciler destroy`) **orphans** the object: it stays on the "
        "host with its data, flagged orphaned, and `plan` says so (`!`). With `deletionPolicy: "
        "Delete` it is deleted. Putting an orphaned resource back in the manifests adopts it again.",
        "- Every other kind is deleted when its document is removed. A Tenant is kept while "
        "retained objects of it remain on the host.",
        "",
        "### What a change does",
        "",
        "The *on change* column says how a change of the field reaches the host:",
        "",
        "- **in place**: applied live; nothing restarts.",
        "- **in place, needs restart**: applied to the definition; it takes effect when the "
        "resource restarts (an Instance with `restartPolicy: Allowed` is restarted during apply).",
        "- **forces replacement**: the object is destroyed and created again. Kinds that create "
        f"the new object before destroying the old one: {', '.join(cbd)}; the others destroy first.",
        "- **grows in place; shrinking forces replacement / is refused**: a larger number is an "
        "in-place change, a smaller one replaces the resource or is an error at plan time.",
        "- A nested field changes with the most disruptive policy of itself and the fields "
        "containing it. Lists of objects are compared entry by entry, by position.",
        "",
        "The *notes* column:",
        "",
        "- **sensitive**: the value is shown as `(sensitive)` in plans (text and `--json`) and "
        "never logged; the journal holds no specs at all. It is still written to the host (in "
        "the object and its ownership mark) and to plans saved with `plan --out` (mode 0600).",
        "- **host default**: when the manifest omits the field, the value the host has (an "
        "allocated VNI, the default backend, an allocated address) stands and is not reverted.",
        "- **merge keys**: a map merged with what others set on the host: keys you never set are "
        "left alone; keys you set and later remove are removed.",
        "",
        "Fields you omit otherwise take their default, and a change on the host (drift) is "
        "reverted at the next apply; `plan` tells drift (\"drift on the host\") from your edits "
        "(\"manifest changed\") using the last applied spec kept in the ownership mark.",
        "",
        "### Editor support",
        "",
        "JSON Schemas generated from the same models are in `schemas/` (`reconciler schema --out "
        "schemas`, or `make schemas`): one per kind (`schemas/network.json`...) and "
        "`schemas/manifest.json` for files mixing kinds. With yaml-language-server (VS Code's "
        "YAML extension, Neovim, Helix...), a modeline as the first line of a file gives "
        "completion, descriptions and validation as you type:",
        "",
        "```yaml",
        "# yaml-language-server: $schema=../schemas/manifest.json",
        "```",
        "",
        "The path is relative to the manifest file.",
        "",
    ]
    return lines


def _kind_section(kind: str, example: Example | None) -> list[str]:
    spec: type[Spec] = KINDS[kind]
    lines = [f"## {kind}", "", _kind_summary(kind), ""]
    facts = []
    if kind == "Tenant":
        facts.append("Has no `metadata.tenant`: a Tenant's tenant is its own name.")
    else:
        facts.append("Belongs to a tenant: `metadata.tenant` is required.")
    if spec.stateful:
        facts.append("Stateful: `deletionPolicy` says whether removing it deletes or orphans it.")
    docs = list(field_docs(spec))
    if not any("replacement" in d.change for d in docs):
        facts.append("Never replaced: every field changes in place.")
    elif spec.create_before_destroy:
        facts.append("When replaced, the new object is created before the old one is destroyed.")
    else:
        facts.append("When replaced, the old object is destroyed before the new one is created.")
    facts.append(f"JSON Schema: [`schemas/{kind.lower()}.json`](../schemas/{kind.lower()}.json).")
    lines += [f"- {f}" for f in facts] + [""]
    lines += ["Fields of `spec`:", ""]
    lines += _table(docs)
    lines.append("")
    if example is not None:
        lines += [f"Example (from `{example.file}`):", "", "```yaml", example.text, "```", ""]
    return lines


def render(manifests: Path) -> str:
    """The whole reference as Markdown text."""
    examples = find_examples(manifests)
    lines = _intro()
    for kind in KINDS:
        lines += _kind_section(kind, examples.get(kind))
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reconciler.docgen",
        description="Generate the manifests reference from the models.",
    )
    parser.add_argument("out", nargs="?", default="docs/manifests.md", type=Path,
                        help="File to write (default: docs/manifests.md).")
    parser.add_argument("--manifests", default=Path("manifests"), type=Path,
                        help="Folder of the example cloud the examples come from (default: manifests).")
    parser.add_argument("--check", action="store_true",
                        help="Write nothing; exit 1 when the file differs from a fresh render.")
    args = parser.parse_args(argv)
    if not args.manifests.is_dir():
        print(f"docgen: {args.manifests} is not a folder (run from the project root or pass "
              "--manifests)", file=sys.stderr)
        return 2
    text = render(args.manifests)
    if args.check:
        try:
            current = args.out.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != text:
            print(f"{args.out} is out of date: run `{GENERATED_BY}` (make docs)", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
