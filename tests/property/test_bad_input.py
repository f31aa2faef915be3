"""Bad input, part 1: valid clouds of every kind, and the same clouds broken one way each.

Hypothesis builds a valid cloud (or takes the example cloud of manifests/), writes it as
YAML by hand in varied styles across files, then breaks it in one way: a wrong type in a
field, a huge or non-finite number, shell/XML metacharacters and odd Unicode in a string,
an unknown or duplicated key, a dropped or nulled field, deep nesting, an alias bomb, a
`!!python/...` tag, a duplicated document, or damage to the text itself (truncation, raw
control characters, random bytes, UTF-16, CRLF, a BOM). `reconciler validate` and
`reconciler plan` run in-process on recording in-memory drivers; see badinput.Harness for
what every run must hold. Where the JSON Schema (schemas/) says a change must be rejected,
the case must be rejected with an error naming that field on its line; where it says the
change is harmless (free text, CRLF, a BOM, another spelling of a number), the case must
still validate and plan.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import badinput as bi
from figures import LEVEL, count, record
from reconciler.loader import MAX_NODES_PER_FILE

pytestmark = pytest.mark.reliability

CASES = count(ci=1250, release=12500)  # of the suite's 2,000 / 20,000 (the rest: test_bad_input_raw)
SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=LEVEL == "ci",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)
EXAMPLE_DOCS = bi.example_docs()


class Case:
    def __init__(self, files: dict[str, str | bytes], expect: bi.Expect, detailed: bool, note: str):
        self.files, self.expect, self.detailed, self.note = files, expect, detailed, note

    def __repr__(self) -> str:
        return f"Case({self.note}; {self.expect})"


# --- mutations of the documents -----------------------------------------------------------------

WRONG = {
    "string": [["x"], {"k": "v"}, 1.5, [], {}],
    "integer": ["forty-two", [1], {"a": 1}, 1.5, "", "1e3"],
    "number": ["forty-two", [1], {"a": 1}],
    "boolean": ["maybe", 2, 0.5, [True], {"a": True}, ""],
    "array": ["x", 5, {"a": 1}, True],
    "object": ["x", 5, ["a"], True, 1.5],
}


def _kind(doc: Any) -> str:
    return doc.get("kind") if isinstance(doc, dict) and isinstance(doc.get("kind"), str) else ""


def _info(doc: Any, path: bi.Path_) -> bi.FieldInfo | None:
    return bi.field_info(_kind(doc), path)


def _number_expectation(info: bi.FieldInfo | None, value: Any) -> bool | None:
    """Valid (True), invalid (False) or not decided by the field alone (None)."""
    if info is None:
        return False
    v = bi.number_value(value)
    if v is None:
        return False  # the YAML layer cannot read it
    kind = info.type
    if kind == "boolean":
        return v in (0, 1)
    if kind == "string":
        return None if info.schema.get("format") in ("ipv4", "ipv4network") and isinstance(v, int) else False
    if kind not in ("integer", "number"):
        return False
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf")) or not v.is_integer()):
        return False
    if isinstance(v, int) and not bi.INT64[0] <= v <= bi.INT64[1]:
        return False
    if isinstance(v, float) and not -(2.0**63) <= v < 2.0**63:
        return False
    if "minimum" in info.schema and v < info.schema["minimum"]:
        return False
    if "maximum" in info.schema and v > info.schema["maximum"]:
        return False
    return None  # in range: cross-resource checks (quotas, unique ids) decide


def _bomb_nodes(width: int, depth: int) -> int:
    """Nodes of _bomb(width, depth) once expanded, as the loader counts them."""
    counts = [1 + width]
    for _ in range(depth):
        counts.append(1 + width * counts[-1])
    return 1 + sum(counts)


def _bomb(width: int, depth: int) -> bi.Raw:
    """A billion-laughs flow sequence on one line: width**depth nodes once expanded."""
    parts = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for d in range(1, depth + 1):
        parts.append(f"&l{d} [" + ", ".join([f"*l{d - 1}"] * width) + "]")
    return bi.Raw("[" + ", ".join(parts) + "]")


TAGGED = (
    "!!python/object/apply:builtins.open [{sentinel}, w]",
    "!!python/object/new:builtins.open [{sentinel}, w]",
    "!!python/object:builtins.object {{a: 1}}",
    "!!python/name:os.system",
    "!!python/object/apply:os.system [touch {sentinel}]",
    "!<tag:yaml.org,2002:python/object/apply:builtins.open> [{sentinel}, w]",
    "!ruby/object:Gem::Installer {{i: x}}",
    "!custom x",
)


@st.composite
def mutate(draw: st.DrawFn, docs: list[Any], sentinel: str) -> tuple[bi.Expect, str, Any]:
    """Break (or harmlessly vary) `docs` in place. Returns the expectation without lines,
    the mutation's name, and a duplicate-key request for the emitter (or None)."""
    what = draw(st.sampled_from([
        "none", "none", "wrong_type", "wrong_type", "hostile_string", "hostile_string", "hostile_key",
        "near_miss", "near_miss", "near_miss",
        "number", "number", "drop", "null", "dup_key", "too_long", "surrogate", "deep", "bomb", "tag",
        "dup_doc", "drop_doc", "swap_kind",
    ]))
    i = draw(st.integers(0, len(docs) - 1))
    doc = docs[i]
    label = bi.resource_label(doc)
    paths = [p for p, _ in bi.walk_paths(doc) if p]

    def expect(valid: bool | None, path: bi.Path_ | None = None, **kw: Any) -> bi.Expect:
        kw.setdefault("resource", label if path and path[0] == "spec" else None)
        return bi.Expect(valid, path=(i,) + path if path is not None else None, **kw)

    if what == "none":
        return bi.Expect(True, resources=len(docs), why="unchanged"), what, None
    if what == "wrong_type":
        path = draw(st.sampled_from(paths + [()]))
        info = _info(doc, path)
        kind = "object" if path == () else (info.type if info else "string")
        value = draw(st.sampled_from(WRONG.get(kind, WRONG["string"])))
        if path == ():
            docs[i] = value
            return expect(False, (), resource=None, why="document is not a mapping"), what, None
        bi.set_at(doc, path, value)
        return expect(False, path, why=f"{kind} field given {value!r}"), what, None
    if what in ("hostile_string", "near_miss", "surrogate", "too_long"):
        strings = [p for p, v in bi.walk_paths(doc) if isinstance(v, str) and p]
        if not strings:
            return bi.Expect(True, resources=len(docs), why="no string to change"), "none", None
        path = draw(st.sampled_from(strings))
        cls = bi.string_class(_kind(doc), path)
        if what == "surrogate":
            old = bi.get_at(doc, path)
            at = draw(st.integers(0, len(old)))
            bi.set_at(doc, path, old[:at] + draw(st.sampled_from(["\ud800", "\udfff", "\udbff\udc00"])) + old[at:])
            return expect(False, None, why="a lone surrogate escaped in YAML"), what, (i, path)
        if what == "too_long":
            info = _info(doc, path)
            limit = info.schema.get("maxLength") if info else None
            seed = draw(st.integers(0, 99))
            if cls == "checked" or limit is None:
                n = draw(st.sampled_from([300, 5000]))
                bi.set_at(doc, path, bi.long_text(n, seed))
                valid = True if cls == "free" else None
                return expect(valid, path if valid is None else None, resources=len(docs) if valid else None,
                              why=f"{n} characters in a {cls} field without a limit"), what, None
            over = draw(st.integers(0, 3))
            value = bi.long_text(limit + over, seed)
            value = "/" + value[1:] if cls == "path" else value
            bi.set_at(doc, path, value)
            if over == 0 and (cls != "header" or bi.header_ok(value)):
                return expect(True, resources=len(docs), why=f"exactly maxLength {limit}"), what, None
            return expect(False, path, why=f"{over} over maxLength {limit}"), what, None
        if what == "near_miss":  # a valid value and one character more at either end
            old, affix = bi.get_at(doc, path), draw(st.sampled_from(NEAR))
            value = old + affix if draw(st.booleans()) else affix + old
            bi.set_at(doc, path, value)
            valid = {"free": True, "checked": False, "header": bi.header_ok(value),
                     "path": value.startswith("/") and "\x00" not in value and "/../" not in value + "/"}[cls]
            return expect(valid, path if not valid else None, resources=len(docs) if valid else None,
                          why=f"{affix!r} around a {cls} string"), what, None
        if cls == "free":
            bi.set_at(doc, path, draw(bi.hostile_text))
            return expect(True, resources=len(docs), why="metacharacters in free text"), what, None
        if cls == "path":
            bi.set_at(doc, path, draw(bi.hostile_path()))
            return expect(True, resources=len(docs), why="metacharacters in an absolute path"), what, None
        if cls == "header":
            value = draw(bi.hostile_text)
            bi.set_at(doc, path, value)
            if bi.header_ok(value):
                return expect(True, resources=len(docs), why="metacharacters in a header value"), what, None
            return expect(False, path, why="a control character or edge space in a header value"), what, None
        bi.set_at(doc, path, draw(bi.hostile_checked()))
        return expect(False, path, why="metacharacters in a checked string"), what, None
    if what == "hostile_key":
        maps = [p for p, v in bi.walk_paths(doc) if isinstance(v, dict)]
        path = draw(st.sampled_from(maps))
        target = bi.get_at(doc, path)
        if target and draw(st.booleans()):
            old = draw(st.sampled_from(sorted(map(str, target))))
            key = old.swapcase() if old.swapcase() != old else old + "s"  # a typo: sizeGib
        else:
            key = draw(bi.hostile_text)
        if key in target or any(not isinstance(k, str) for k in target):
            return bi.Expect(True, resources=len(docs), why="key exists"), "none", None
        info = _info(doc, path)
        target[key] = "x"
        if info is not None and info.is_model or path == ():
            return expect(False, path + (key,), why="unknown field"), what, None
        if bi.map_key_class(_kind(doc), path) == "free":
            return expect(True, resources=len(docs), why="a free label key"), what, None
        return expect(None, path + (key,), why="a bucket metadata key"), what, None
    if what == "number":
        path = draw(st.sampled_from([p for p in paths if not isinstance(bi.get_at(doc, p), (dict, list))] or paths))
        value = draw(st.sampled_from(bi.NUMBERS))
        info = _info(doc, path)
        bi.set_at(doc, path, value)
        valid = _number_expectation(info, value)
        v = bi.number_value(value)
        readable = v is not None and not (isinstance(v, int) and not bi.INT64[0] <= v <= bi.INT64[1])
        resource = label if readable else None  # the YAML layer reports what it cannot read
        return expect(valid, path if valid is False else None, resource=resource if path[0] == "spec" else None,
                      why=f"{value!r:.40} in a {info.type if info else '?'} field"), what, None
    if what == "drop":
        keyed = [p for p in paths if isinstance(p[-1], str)]
        path = draw(st.sampled_from(keyed))
        info = _info(doc, path)
        del bi.get_at(doc, path[:-1])[path[-1]]
        if info is not None and info.required:
            return expect(False, path, why="required field dropped"), what, None
        return expect(None, why="optional field dropped"), what, None
    if what == "null":
        path = draw(st.sampled_from(paths))
        info = _info(doc, path)
        bi.set_at(doc, path, None)
        if path == ("spec",) or info is None or info.nullable:
            return expect(None, why="null where null may be allowed"), what, None
        return expect(False, path, why="null in a non-nullable field"), what, None
    if what == "dup_key":
        keyed = [p for p in paths if isinstance(p[-1], str)]
        path = draw(st.sampled_from(keyed))
        return (bi.Expect(False, path=(i,) + path, message="duplicate key", why="duplicate key"), what,
                (i, path, draw(st.sampled_from(["x", 1, None, [1], {"a": "b"}]))))
    if what == "deep":
        path = draw(st.sampled_from(paths))
        depth = draw(st.sampled_from([2, 3, 50, 99, 100, 101, 500, 3000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("[{a: ", "}]")]))
        reps = max(1, depth // (2 if len(opener) > 3 else 1))
        bi.set_at(doc, path, bi.Raw(opener * reps + "x" + closer * reps))
        return expect(False, None, resource=None, why=f"{depth} levels of nesting"), what, (i, path)
    if what == "bomb":
        path = draw(st.sampled_from(paths))
        # mostly under the node budget here (a value of the wrong type, at its line); the
        # raw suite throws the big ones
        width, depth = draw(st.integers(2, 12)), draw(st.sampled_from([1, 2, 3, 4, 5, 9]))
        bi.set_at(doc, path, _bomb(width, depth))
        nodes = _bomb_nodes(width, depth)
        if nodes > MAX_NODES_PER_FILE:  # the whole file is refused, at its first line
            return expect(False, None, resource=None, message=f"more than {MAX_NODES_PER_FILE} YAML nodes",
                          why=f"alias bomb of {nodes} nodes"), what, (i, None)
        # near the budget the rest of the file decides: no line asked then
        near = nodes > MAX_NODES_PER_FILE - 100_000
        return expect(False, None, resource=None, why=f"alias bomb of {nodes} nodes"), what, (i, None if near else path)
    if what == "tag":
        path = draw(st.sampled_from(paths))
        bi.set_at(doc, path, bi.Raw(draw(st.sampled_from(TAGGED)).format(sentinel=sentinel)))
        return expect(False, None, resource=None, why="a language-specific tag"), what, (i, path)
    if what == "dup_doc":
        if label is None:
            return bi.Expect(True, resources=len(docs), why="nothing to duplicate"), "none", None
        docs.insert(draw(st.integers(0, len(docs))), bi.deep_copy([doc])[0])
        # which of the two is reported depends on the order files load in: no line asked
        return bi.Expect(False, message="duplicate name", resource=label,
                         why="a resource declared twice"), what, None
    if what == "drop_doc":
        del docs[i]
        if not docs:
            return bi.Expect(True, resources=0, why="nothing left"), what, None
        return bi.Expect(None, why="a document dropped"), what, None
    # swap_kind
    other = draw(st.sampled_from([k for k in bi.KINDS if k != _kind(doc)]))
    if isinstance(doc, dict):
        doc["kind"] = other
    return bi.Expect(None, why=f"kind changed to {other}"), what, None


# --- damage to the text -------------------------------------------------------------------------

#: one character that turns a valid name, address, enum or pattern value invalid
NEAR = ("\n", "\n", "\n", "\r\n", "\r", " ", "\t", "\x00", ".", "_", "A", "é", "\u200b", "\ufeff", "/")

CONTROL = ("\x00", "\x01", "\x08", "\x1b", "\x7f", "\x80", "\x9f", "\ufffe", "\uffff")


@st.composite
def damage(draw: st.DrawFn, text: str, expect: bi.Expect) -> tuple[str | bytes, bi.Expect, str]:
    """Maybe damage a file's text; returns the content and the new expectation."""
    how = draw(st.sampled_from(["none"] * 8 + ["crlf", "bom", "truncate", "bytes", "control", "utf16",
                                               "tab", "nul-bytes"]))
    if how == "none":
        return text, expect, how
    if how == "crlf":
        return text.replace("\n", "\r\n"), expect, how
    if how == "bom":
        return "\ufeff" + text, expect, how
    raw = text.encode("utf-8", "surrogatepass")
    either = bi.Expect(None, why=how)
    if how == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))], either, how
    if how == "bytes":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:], either, how
    if how == "nul-bytes":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + b"\x00" * draw(st.integers(1, 4)) + raw[at:], bi.Expect(False, why=how), how
    if how == "utf16":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"]))
        if not text.strip():
            return text, expect, "none"
        message = None if codec.endswith(("-le", "-be")) else "not UTF-8 text"  # no BOM: NULs, not bad UTF-8
        return text.encode(codec, "surrogatepass"), bi.Expect(False, message=message, why=codec), how
    if how == "tab":
        lines = text.split("\n")
        indented = [n for n, line in enumerate(lines) if line.startswith("  ")]
        if not indented:
            return text, expect, "none"
        n = draw(st.sampled_from(indented))
        lines[n] = "\t" + lines[n].lstrip(" ")
        return "\n".join(lines), either, how
    # a raw control character (YAML allows none of these outside escapes)
    at = draw(st.integers(0, len(text)))
    line = text.count("\n", 0, at) + 1
    ch = draw(st.sampled_from(CONTROL))
    return text[:at] + ch + text[at:], bi.Expect(False, lines=(line, line), why=f"raw {ch!r} on line {line}"), how


# --- the case -------------------------------------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn, sentinel: str) -> Case:
    base = draw(st.sampled_from(["example", "generated", "generated", "generated"]))
    docs = bi.deep_copy(EXAMPLE_DOCS) if base == "example" else draw(bi.clouds())
    expect, what, extra = draw(mutate(docs, sentinel))
    dup = extra if what == "dup_key" else None
    rnd = random.Random(draw(st.integers(0, 2**32)))
    # split the documents into files (consecutive runs), some in a sub-folder
    n_files = draw(st.integers(1, min(3, max(1, len(docs)))))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(docs) - 1)), min_size=n_files - 1,
                                max_size=n_files - 1, unique=True))) if len(docs) > 1 else []
    bounds = list(zip([0] + cuts, cuts + [len(docs)]))
    files: dict[str, str | bytes] = {}
    where: dict[int, tuple[str, bi.Emitted]] = {}
    for n, (lo, hi) in enumerate(bounds):
        name = draw(st.sampled_from([f"part{n}.yaml", f"sub/part{n}.yml", f"a b/{n}.yaml"]))
        em = bi.emit(docs[lo:hi], rnd, dup=dup if dup and lo <= dup[0] < hi else None, first=lo)
        files[name] = em.text
        for d in range(lo, hi):
            where[d] = (name, em)
    # where the error must be
    target = expect.path[0] if expect.path is not None else None
    if what in ("surrogate", "deep", "bomb", "tag"):
        target, path = extra
        name, em = where[target]
        expect.file = Path(name)
        expect.lines = (1, 1) if expect.message else em.lines.get((target, path)) if path is not None else None
    elif target is not None and target in where:
        name, em = where[target]
        path = expect.path[1:]
        expect.file = Path(name)
        if dup is not None:
            expect.lines = (em.dup_line, em.dup_line) if em.dup_line else None
            if em.dup_line is None:
                expect = bi.Expect(None, why="duplicate not written")
        else:
            found = None
            for n in range(len(path), -1, -1):  # a dropped field: its parent's lines
                found = em.lines.get((target, path[:n]))
                if found:
                    break
            expect.lines = found
        expect.path = path if expect.path is not None else None
    # damage one file's text
    name = draw(st.sampled_from(sorted(files)))
    content, new_expect, how = draw(damage(files[name], expect))
    if how not in ("none", "crlf", "bom"):
        new_expect.file = Path(name) if new_expect.message or new_expect.lines else None
        expect = new_expect
    files[name] = content
    detailed = draw(st.booleans())
    return Case(files, expect, detailed, f"{base}/{what}/{how}")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield bi.Harness(tmp_path_factory.mktemp("bad-input"), mp)


def test_generated_manifests_never_crash_and_errors_name_file_and_line(harness: bi.Harness) -> None:
    stats = bi.Stats()
    sentinel = str(harness.sentinel)

    @SETTINGS
    @given(case=cases(sentinel))
    def run(case: Case) -> None:
        note(repr(case))
        folder, written = harness.write(case.files)
        expect = dataclasses.replace(case.expect, file=folder / case.expect.file if case.expect.file else None)
        harness.check(folder, written, expect, stats, detailed=case.detailed)

    try:
        run()
    finally:
        stats.record(record)
    # the generator must not produce only rejects (nor only accepted manifests)
    assert stats.valid >= CASES // 10 and stats.invalid >= CASES // 3, stats
