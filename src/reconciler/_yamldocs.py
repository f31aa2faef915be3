"""YAML text to plain data with the line of every path, in one iterative pass.

Built on the parser's event stream (libyaml when available), never on the composer:
the composer recurses (in C for libyaml, where deep nesting overflows the stack) and
builds a node tree we would only walk again. Here one loop with an explicit stack
builds dicts, lists and scalars directly, and bounds what input can cost:

- nesting deeper than `max_depth` stops the file (:class:`TooDeep`);
- every node counts against `budget`, and an alias or a merge key (`<<`) counts the
  whole subtree it repeats, so "billion laughs" and merge bombs stop early
  (:class:`TooLarge`) instead of expanding;
- keys repeated in one mapping, and keys that are not plain scalars, are problems;
  a key given by a merge is overridden by the mapping's own key silently (YAML's rule);
- a scalar that does not construct (`2020-13-45` as a timestamp), or an integer beyond
  64 bits (`0x` and 6,000 digits would construct, and then fail wherever it is printed), is
  a problem, and its text is kept;
- a tag that names no standard YAML type (`!!python/object/apply:...`) is refused on
  collections as on scalars: nothing but plain data is ever constructed.

Lines: a mapping value's line is its key's line; a list item's line is its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

Path_ = tuple[str | int, ...]
ProblemSink = Callable[[int, str, Path_], None]  # (line, message, path)

#: libyaml's parser when PyYAML was built with it, else the pure-Python one
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"
INT_TAG = "tag:yaml.org,2002:int"
INT_RANGE = (-(2**63), 2**63 - 1)  # what every consumer (JSON, SQLite, drivers) can hold
#: tags a mapping or a sequence may carry (read as plain mappings and lists)
COLLECTION_TAGS = frozenset(
    {None, "!"} | {f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "omap", "set", "pairs")}
)
_NO_KEY = object()
_SKIP = object()  # the value of a bad key: read and dropped
_MERGE = object()  # the value of `<<`


class TooLarge(Exception):
    """More nodes than the budget, counting what aliases and merges repeat."""


class TooDeep(Exception):
    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


@dataclass(slots=True)
class Document:
    data: Any
    lines: dict[Path_, int]
    line: int


@dataclass(slots=True)
class _Anchor:
    value: Any
    entries: list[tuple[Path_, int]]  # relative to the anchored node
    count: int


@dataclass(slots=True)
class _Frame:
    is_map: bool
    value: Any
    path: Path_
    line: int
    start: int  # index into the document's entries where this node's begin
    anchor: str | None
    start_mark: Any
    in_key: bool = False  # a collection used as a mapping key: read, then reported
    count: int = 1
    key: Any = _NO_KEY
    key_line: int = 0
    own: dict[str, int] = field(default_factory=dict)  # key -> line, for duplicates
    merges: list[tuple[dict[str, Any], list[tuple[Path_, int]]]] = field(default_factory=list)
    merge_start: int = -1


def read_documents(
    text: str, problem: ProblemSink, *, budget: int, max_depth: int, into: list[Document] | None = None
) -> list[Document]:
    """Every non-empty document of `text`, appended to `into` as each one ends (so the
    documents before an error are kept). Raises yaml.YAMLError, TooLarge, TooDeep."""
    docs = [] if into is None else into
    _Reader(problem, budget, max_depth).run(text, docs)
    return docs


class _Reader:
    def __init__(self, problem: ProblemSink, budget: int, max_depth: int):
        self.problem = problem
        self.budget = budget
        self.max_depth = max_depth
        self.resolver = Resolver()
        self.constructor = SafeConstructor()

    def run(self, text: str, docs: list[Document]) -> None:
        self.stack: list[_Frame] = []
        self.entries: list[tuple[Path_, int]] = []
        self.anchors: dict[str, _Anchor] = {}
        self.root: Any = _NO_KEY
        self.root_line = 1
        self.root_empty = False
        for event in yaml.parse(text, Loader=YAML_LOADER):
            kind = type(event)
            if kind is yaml.ScalarEvent:
                self._scalar(event)
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                self._start(event, kind is yaml.MappingStartEvent)
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                self._end()
            elif kind is yaml.AliasEvent:
                self._alias(event)
            elif kind is yaml.DocumentStartEvent:
                self.entries, self.anchors, self.root, self.root_empty = [], {}, _NO_KEY, False
            elif kind is yaml.DocumentEndEvent:
                if self.root is not _NO_KEY and not self.root_empty:
                    lines: dict[Path_, int] = {}
                    for path, line in self.entries:
                        lines.setdefault(path, line)
                    docs.append(Document(self.root, lines, self.root_line))

    # --- where a new node goes ------------------------------------------------------

    def _charge(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise TooLarge

    def _place(self, line: int) -> tuple[Path_, bool]:
        """(path of a node starting now, whether it is a mapping key); records its line."""
        if not self.stack:
            self.root_line = line
            self.entries.append(((), line))
            return (), False
        top = self.stack[-1]
        if not top.is_map:
            path = top.path + (len(top.value),)
            self.entries.append((path, line))
            return path, False
        if top.key is _NO_KEY:
            return top.path + ("<key>",), True
        if top.key is _MERGE or top.key is _SKIP:
            return top.path + ("<<",), False
        return top.path + (top.key,), False

    def _put(self, value: Any, count: int, start: int) -> None:
        """Attach a finished node to its parent."""
        if not self.stack:
            self.root = value
            return
        top = self.stack[-1]
        top.count += count
        if not top.is_map:
            top.value.append(value)
        elif top.key is _SKIP:
            del self.entries[start:]
            top.key = _NO_KEY
        elif top.key is _MERGE:
            self._merge_source(top, value, start)
            top.key = _NO_KEY
        else:
            top.value[top.key] = value
            top.key = _NO_KEY

    # --- events ---------------------------------------------------------------------

    def _scalar(self, event: Any) -> None:
        self._charge(1)
        line = event.start_mark.line + 1
        path, is_key = self._place(line)
        if is_key:
            self._key(event, line)
            return
        start = len(self.entries) - (0 if self.stack and self.stack[-1].is_map else 1)
        value = self._construct(event, path, line)
        if not self.stack:
            self.root_empty = event.value == "" and event.implicit[0] and event.tag in (None, "!")
        if event.anchor:
            self.anchors[event.anchor] = _Anchor(value, [((), line)], 1)
        self._put(value, 1, max(start, 0))

    def _key(self, event: Any, line: int) -> None:
        top = self.stack[-1]
        key = event.value
        if key == "<<" and event.tag is None and event.implicit[0]:
            top.key = _MERGE
            top.merge_start = len(self.entries)
            return
        path = top.path + (key,)
        if key in top.own:
            self.problem(line, f"duplicate key {_short(key)} (also on line {top.own[key]})", path)
        else:
            top.own[key] = line
        self.entries.append((path, line))
        top.key = key
        top.key_line = line
        if event.anchor:
            self.anchors[event.anchor] = _Anchor(key, [((), line)], 1)

    def _start(self, event: Any, is_map: bool) -> None:
        self._charge(1)
        line = event.start_mark.line + 1
        if event.tag not in COLLECTION_TAGS:
            raise ConstructorError(
                None, None, f"could not determine a constructor for the tag {event.tag!r}", event.start_mark
            )
        if len(self.stack) >= self.max_depth:
            raise TooDeep(line)
        path, is_key = self._place(line)
        start = len(self.entries) - (1 if self.stack and not self.stack[-1].is_map else 0)
        if not self.stack:
            start = 0
        frame = _Frame(is_map, {} if is_map else [], path, line, max(start, 0), event.anchor,
                       event.start_mark, in_key=is_key)
        self.stack.append(frame)

    def _end(self) -> None:
        frame = self.stack.pop()
        if frame.is_map and frame.merges:
            self._apply_merges(frame)
        if frame.anchor:
            base = len(frame.path)
            rel = [(p[base:], ln) for p, ln in self.entries[frame.start:]]
            self.anchors[frame.anchor] = _Anchor(frame.value, rel, frame.count)
        if frame.in_key:
            del self.entries[frame.start:]
            self.problem(frame.line, "mapping keys must be plain text", self.stack[-1].path)
            self.stack[-1].key = _SKIP
            self.stack[-1].count += frame.count
            return
        self._put(frame.value, frame.count, frame.start)

    def _alias(self, event: Any) -> None:
        line = event.start_mark.line + 1
        anchor = self.anchors.get(event.anchor)
        if anchor is None:
            raise yaml.composer.ComposerError(
                None, None, f"found undefined alias {event.anchor!r}", event.start_mark
            )
        self._charge(anchor.count)
        path, is_key = self._place(line)
        if is_key:
            self.problem(line, "mapping keys must be plain text", self.stack[-1].path)
            self.stack[-1].key = _SKIP
            return
        start = len(self.entries) - (1 if self.stack and not self.stack[-1].is_map else 0)
        self.entries.extend((path + rel, ln) for rel, ln in anchor.entries if rel)
        self._put(anchor.value, anchor.count, max(start, 0))

    # --- merge keys -----------------------------------------------------------------

    def _merge_source(self, frame: _Frame, value: Any, start: int) -> None:
        """`<<: MAPPING` or `<<: [MAPPING, ...]`: keep each source with relative lines."""
        base = frame.path + ("<<",)
        entries = self.entries[frame.merge_start:]
        del self.entries[frame.merge_start:]
        sources = value if isinstance(value, list) else [value]
        for i, source in enumerate(sources):
            if not isinstance(source, dict):
                raise ConstructorError(
                    "while constructing a mapping", frame.start_mark,
                    "expected a mapping or list of mappings for merging",
                    frame.start_mark,
                )
            prefix = base + (i,) if isinstance(value, list) else base
            n = len(prefix)
            rel = [(p[n:], ln) for p, ln in entries if p[:n] == prefix and len(p) > n]
            frame.merges.append((source, rel))

    def _apply_merges(self, frame: _Frame) -> None:
        """Keys from merge sources that the mapping does not set itself; earlier sources win."""
        merged: dict[str, Any] = {}
        lines: list[tuple[Path_, int]] = []
        for source, rel in frame.merges:
            self._charge(len(source) + len(rel))
            for key, value in source.items():
                if key not in merged and key not in frame.value:
                    merged[key] = value
            lines.extend((frame.path + p, ln) for p, ln in rel if p and p[0] in merged)
        frame.value = {**merged, **frame.value}
        frame.count += len(lines)
        self.entries.extend(lines)

    # --- scalars --------------------------------------------------------------------

    def _construct(self, event: Any, path: Path_, line: int) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolver.resolve(ScalarNode, event.value, event.implicit)
        if tag == STR_TAG:
            return event.value
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        constructors = self.constructor.yaml_constructors
        fn = constructors.get(tag) or constructors[None]
        try:
            value = fn(self.constructor, node)
        except ConstructorError:
            raise
        except (ValueError, LookupError, AttributeError, TypeError, OverflowError):  # `!!int ''`: IndexError
            if tag == INT_TAG and event.tag is None:  # resolved as an int: too many digits
                return self._out_of_range(event, path, line)
            what = str(tag).rsplit(":", 1)[-1]
            self.problem(line, f"{_short(event.value)} is not a valid {what}; quote it to use it as text", path)
            return event.value
        if isinstance(value, int) and not isinstance(value, bool) \
                and not INT_RANGE[0] <= value <= INT_RANGE[1]:
            return self._out_of_range(event, path, line)
        if isinstance(value, bytes | bytearray):
            return value.decode("utf-8", "replace")
        return value

    def _out_of_range(self, event: Any, path: Path_, line: int) -> str:
        self.problem(line, f"{_short(event.value)} is out of range: integers are limited to 64 bits "
                           f"({INT_RANGE[0]} to {INT_RANGE[1]})", path)
        return event.value


def _short(text: str) -> str:
    text = repr(text)
    return text if len(text) <= 60 else text[:57] + "..."
