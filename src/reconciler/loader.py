"""Read manifests (files or folders) into a Desired state, collecting every error.

`load(paths)` parses YAML keeping the line of every node, validates each document
against its kind's model, then runs the cross-resource checks of
:mod:`reconciler.checks`. It never raises on bad input: every problem comes back as a
:class:`~reconciler.errors.Problem` naming file, line, resource and field path.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Iterable

import pydantic
import yaml

from reconciler import API_VERSION
from reconciler._yamldocs import YAML_LOADER, Document, Path_, TooDeep, TooLarge, read_documents
from reconciler.errors import Problem, format_path, printable
from reconciler.models import KINDS, Desired, Key, Resource, Source, document_model
from reconciler.models._fields import X_SENSITIVE
from reconciler.models._resource import line_at

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_NODES_PER_FILE = 500_000  # bounds alias expansion ("billion laughs") and huge input
MAX_DEPTH = 100  # nesting levels (deeper is refused, not parsed)
MANIFEST_SUFFIXES = (".yaml", ".yml")
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # YAML 1.1's line breaks



_Document = Document


def find_manifest_files(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Problem]]:
    """Manifest files under the given files or folders (sorted; hidden folders skipped)."""
    files: list[Path] = []
    problems: list[Problem] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.suffix in MANIFEST_SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(str(path), 0, "no such file or folder"))
    return files, problems


def _parse_file(file: Path, problems: list[Problem]) -> list[_Document]:
    name = str(file)
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            problems.append(
                Problem(name, 1, f"file is {size} bytes; manifests are limited to {MAX_FILE_BYTES}")
            )
            return []
        raw = file.read_bytes()
    except OSError as exc:
        problems.append(Problem(name, 0, f"cannot read: {exc.strerror or exc}"))
        return []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(name, raw[: exc.start].count(b"\n") + 1, "not UTF-8 text"))
        return []

    def sink(line: int, message: str, path: Path_) -> None:
        problems.append(Problem(name, line, message, path=format_path(path) or None))

    docs: list[_Document] = []
    try:
        read_documents(text, sink, budget=MAX_NODES_PER_FILE, max_depth=MAX_DEPTH, into=docs)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        msg = " ".join(str(m) for m in (exc.context, exc.problem) if m)
        problems.append(Problem(name, min(line, _last_line(text)), f"YAML syntax error: {msg}"))
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position] if YAML_LOADER is yaml.SafeLoader else raw[: exc.position]
        line = before.count("\n" if isinstance(before, str) else b"\n") + 1
        problems.append(Problem(name, line, f"YAML error: {str(exc).splitlines()[0]}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(name, 1, f"YAML error: {exc}"))
    except TooLarge:
        problems.append(
            Problem(
                name,
                1,
                f"more than {MAX_NODES_PER_FILE} YAML nodes after expanding aliases; "
                "refusing to load (alias bomb or far too large)",
            )
        )
        return []
    except TooDeep as exc:
        problems.append(
            Problem(name, exc.line, f"YAML nesting is deeper than {MAX_DEPTH} levels; refusing to load")
        )
        return []
    except RecursionError:
        problems.append(Problem(name, 1, "YAML nesting is too deep"))
        return []
    return docs


def _last_line(text: str) -> int:
    """The number of a text's last line. An error at the end of the input is reported there:
    libyaml puts the end of a stream without a final line break on the line after it."""
    breaks = len(_LINE_BREAK.findall(text))
    ends = text.endswith(("\n", "\r", "\x85", "\u2028", "\u2029"))
    return max(1, breaks if ends else breaks + 1)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _friendly(err: dict[str, Any], data: Any) -> str:
    """A pydantic error in words a user can act on (never quoting a sensitive field's value)."""
    kind = err["type"]
    loc = err["loc"]
    value = err.get("input")
    if _sensitive(data, tuple(loc)):
        value = _Hidden(value)
    if kind == "extra_forbidden":
        field = str(loc[-1])
        allowed = _allowed_fields(data, loc[:-1])
        hint = _suggest(field, allowed)
        return f"unknown field {_short(field)}{hint}" + (
            f"; allowed here: {', '.join(sorted(allowed))}" if allowed and not hint else ""
        )
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{_short(value)} is not allowed; use one of {expected}"
    if kind.startswith("ip_v4"):
        what = {"ip_v4_network": "an IPv4 network in CIDR notation like 10.0.0.0/24",
                "ip_v4_address": "an IPv4 address like 10.0.0.1"}.get(kind, "an IPv4 value")
        if kind == "ip_v4_network" and isinstance(value, str):
            try:
                network = ipaddress.IPv4Network(value, strict=False)
            except ValueError:
                pass
            else:
                return f"{_short(value)} has host bits set; the network is {network}"
        return f"{_short(value)} is not {what}"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind in ("int_parsing", "int_type", "bool_parsing", "bool_type", "string_type",
                "list_type", "dict_type", "model_type", "float_type", "int_from_float"):
        msg = f"{msg}, got {_short(value)}"
    return msg[0].lower() + msg[1:] if msg else msg


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Hidden:
    """The value of a sensitive field (userData) in an error: its type, never its text."""

    def __init__(self, value: Any):
        self.type = type(value).__name__

    def __repr__(self) -> str:
        return f"a value of type {self.type} (sensitive: not shown)"


def _sensitive(data: Any, loc: tuple[Any, ...]) -> bool:
    """Whether `loc` of a document is in a field declared sensitive (or inside one)."""
    try:
        model: Any = document_model(data.get("kind"))
        for part in loc:
            if isinstance(part, int):
                continue
            info = model.model_fields[part]
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get(X_SENSITIVE):
                return True
            model = _inner_model(info.annotation)
            if model is None:
                return False
    except Exception:  # noqa: BLE001 - unknown kind or path: nothing declared sensitive
        return False
    return False


def _allowed_fields(data: Any, loc: tuple[Any, ...]) -> set[str]:
    """Field names of the model at `loc` of a document (for "did you mean")."""
    try:
        kind = data.get("kind")
        model: Any = document_model(kind)
        for part in loc:
            if isinstance(part, int):
                continue
            annotation = model.model_fields[part].annotation
            model = _inner_model(annotation)
            if model is None:
                return set()
        return set(model.model_fields)
    except Exception:  # noqa: BLE001 - a hint only; never fail on it
        return set()


def _inner_model(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _resource_label(data: dict[str, Any]) -> str | None:
    kind = data.get("kind")
    meta = data.get("metadata")
    if not isinstance(kind, str) or not isinstance(meta, dict):
        return None
    name = _label_part(meta.get("name", "?"))
    if kind == "Tenant":
        return f"Tenant {name}"
    return f"{_label_part(kind)} {_label_part(meta.get('tenant') or '?')}/{name}"


def _label_part(value: Any) -> str:
    """A kind or name in a resource label, kept on one line (it is not validated yet)."""
    return printable(value, limit=100) if isinstance(value, str) else _short(value)


def _key_guess(data: Any) -> Key | None:
    """The key a broken document was meant to have, when its kind and names say it."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or data["kind"] not in KINDS:
        return None
    meta = data.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    name = meta["name"]
    tenant = name if data["kind"] == "Tenant" else meta.get("tenant")
    return Key(data["kind"], tenant, name) if isinstance(tenant, str) else None


def _build(doc: _Document, file: str, problems: list[Problem],
           reported: frozenset[tuple[int, str | None]] = frozenset()) -> Resource | None:
    """The resource of a document, or None after adding its problems. `reported`: the
    (line, path) of values the YAML layer already reported (and kept as text): the
    model's complaint about the same value is not repeated."""
    data = doc.data

    def problem(path: Path_, message: str, resource: str | None = None, again: bool = True) -> None:
        line = line_at(doc.lines, path, doc.line)
        if not again and (line, format_path(path) or None) in reported:
            return
        problems.append(Problem(file, line, message, resource, format_path(path) or None))

    if not isinstance(data, dict):
        problem((), f"a manifest document must be a mapping, not {type(data).__name__}")
        return None
    label = _resource_label(data)
    api = data.get("apiVersion")
    kind = data.get("kind")
    if api is None:
        problem(("apiVersion",), f"apiVersion is missing; use {API_VERSION}", label)
    elif api != API_VERSION:
        problem(("apiVersion",), f"unsupported apiVersion {_short(api)}; use {API_VERSION}", label, again=False)
    if kind is None:
        problem(("kind",), f"kind is missing; one of {', '.join(KINDS)}", label)
        return None
    if not isinstance(kind, str) or kind not in KINDS:
        problem(
            ("kind",),
            f"unknown kind {_short(kind)}{_suggest(str(kind), KINDS)}; one of {', '.join(KINDS)}",
            label,
            again=False,
        )
        return None
    try:
        # validate an omitted spec as an empty one, so its errors have the path spec.FIELD
        payload = dict(data)
        if payload.get("spec") is None:  # `spec:` left empty means all defaults
            payload["spec"] = {}
        model = document_model(kind).model_validate(payload)
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            if tuple(err["loc"]) == ("apiVersion",):
                continue  # reported above
            problem(tuple(err["loc"]), _friendly(err, data), label, again=False)
        return None
    if api != API_VERSION:
        return None
    meta = model.metadata  # type: ignore[attr-defined]
    if kind == "Tenant":
        if meta.tenant is not None and meta.tenant != meta.name:
            problem(("metadata", "tenant"), "a Tenant belongs to no tenant; remove this field", label)
            return None
    elif meta.tenant is None:
        problem(("metadata", "tenant"), f"every {kind} needs metadata.tenant", label)
        return None
    return Resource.build(meta, model.spec, Source(file, doc.line), doc.lines)  # type: ignore[attr-defined]


def load(paths: Iterable[str | os.PathLike[str]], *, check: bool = True) -> tuple[Desired, list[Problem]]:
    """Load manifests from files and folders; return the desired state and every problem.

    With `check` (the default) the cross-resource checks run too. The Desired returned
    with problems is partial and must not be planned.
    """
    files, problems = find_manifest_files(paths)
    desired = Desired()
    for file in files:
        before = len(problems)
        docs = _parse_file(file, problems)
        reported = frozenset((p.line, p.path) for p in problems[before:])
        for doc in docs:
            resource = _build(doc, str(file), problems, reported)
            if resource is None:
                key = _key_guess(doc.data)
                if key is not None:
                    desired.unloaded.add(key)
                continue
            other = desired.resources.get(resource.key)
            if other is not None:
                name_path = ("metadata", "name")
                problems.append(
                    Problem(
                        str(file),
                        resource.line_of(name_path),
                        f"duplicate name: {resource.key.display} is also declared at "
                        f"{other.source.file}:{other.line_of(name_path)}",
                        resource.key.display,
                        "metadata.name",
                    )
                )
                continue
            desired.resources[resource.key] = resource
    if check:
        from reconciler.checks import check_desired

        problems.extend(check_desired(desired))
    problems.sort(key=Problem.sort_key)
    return desired, problems


