"""Bad input, part 2: files that are not manifests at all, and the limits the loader enforces.

Hypothesis writes random bytes, random text, YAML token soup, empty files and empty
documents, nesting thousands of levels deep (flow and block), alias and merge-key bombs,
`!!python/...` and `%TAG` tricks, duplicate keys, UTF-16/32 and BOMs, invalid UTF-8, and
hundreds of documents; sometimes next to a valid cloud, whose files then must draw no
error. Explicit tests cover files over the size limit, a file just under it, and run the
real `reconciler` console script (a subprocess) on the nastiest inputs.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import badinput as bi
from figures import LEVEL, count, record
from reconciler.loader import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES_PER_FILE

pytestmark = pytest.mark.reliability

CASES = count(ci=750, release=7500)  # with test_bad_input's 1,250 / 12,500: 2,000 / 20,000
SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=LEVEL == "ci",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)
TENANT = "apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: {name}\n"

YAML_TOKENS = (
    "- ", ": ", "{", "}", "[", "]", ", ", "&a ", "*a", "&b ", "*b", "!!", "!!str ", "!!int ", "!!map ",
    "!!python/object/apply:builtins.open ", "!!binary ", "? ", "|", "|-", ">", "---", "...",
    "%YAML 1.1", "%TAG ! tag:yaml.org,2002:python/object/apply:", "\n", "  ", "    ", "'", '"',
    "# c", "<<: ", "<<: *a", "@", "`", "\t", "apiVersion: reconciler/v1", "kind: Tenant",
    "kind: Volume", "metadata:", "  name: x", "  tenant: x", "spec:", "  sizeGiB: ", "null", "~",
    "0x10", ".inf", ".nan", "2020-13-45", "\\", "\x00", "\ufeff", "\u2028", "\x85", "\r", "\U0001F600",
)
yaml_soup = st.lists(st.one_of(st.sampled_from(YAML_TOKENS), bi.hostile_text), max_size=60).map("".join)

#: files that hold no document: valid, zero resources (not "...\n" alone: libyaml wants a
#: document before an end marker, a syntax error)
EMPTY = ("", "\n", "   \n\n", "# only a comment\n", "---\n", "---\n---\n...\n", "\ufeff",
         "\ufeff---\n", "---\n# c\n...\n", "\r\n\r\n", "--- \n...\n---\n")


def _billion_laughs(width: int, depth: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for d in range(1, depth + 1):
        lines.append(f"a{d}: &a{d} [" + ", ".join([f"*a{d - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int, width: int) -> str:
    def level(k: int) -> str:
        if k == 0:
            return "&m0 {a: 1, b: 2}"
        return f"&m{k} {{<<: [{level(k - 1)}, " + ", ".join([f"*m{k - 1}"] * (width - 1)) + "]}"

    return "spec: " + level(levels) + "\n"


def _expanded(width: int, depth: int) -> int:
    """Nodes of _billion_laughs once aliases are expanded, as the loader counts them: the
    root mapping, each key, each anchored sequence with what its aliases repeat."""
    counts = [1 + width]
    for _ in range(depth):
        counts.append(1 + width * counts[-1])
    return 1 + sum(1 + c for c in counts)


@st.composite
def garbage(draw: st.DrawFn, sentinel: str) -> tuple[str | bytes, bi.Expect, str]:
    """One file's content and what it must give."""
    kind = draw(st.sampled_from([
        "binary", "text", "soup", "soup", "empty", "deep_flow", "deep_block", "bomb", "merge_bomb", "tag",
        "dup_keys", "encoding", "bad_utf8", "many_docs", "anchors_ok", "control",
    ]))
    either = bi.Expect(None, why=kind)
    if kind == "binary":
        return draw(st.binary(max_size=4096)), either, kind
    if kind == "text":
        return draw(st.text(max_size=2000)), either, kind
    if kind == "soup":
        return draw(yaml_soup), either, kind
    if kind == "empty":
        return draw(st.sampled_from(EMPTY)), bi.Expect(True, resources=0, why="no document"), kind
    if kind == "deep_flow":
        n = draw(st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 1000, 10_000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("[{a: ", "}]"), ("{", "}")]))
        balanced = draw(st.booleans())
        text = "x: " + opener * n + "v" + (closer * n if balanced else "") + "\n"
        return text, bi.Expect(False, lines=(1, 2), why=f"{n} levels of {opener!r}"), kind
    if kind == "deep_block":
        n = draw(st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH + 1, 500, 2000]))
        if draw(st.booleans()):
            text = "".join(" " * i + "a:\n" for i in range(n)) + " " * n + "b: x\n"
        else:
            text = "- " * n + "x\n"
        return text, bi.Expect(False, why=f"{n} block levels"), kind
    if kind == "bomb":
        width, depth = draw(st.integers(2, 12)), draw(st.integers(1, 12))
        big = _expanded(width, depth) > MAX_NODES_PER_FILE
        message = f"more than {MAX_NODES_PER_FILE} YAML nodes" if big else None
        return _billion_laughs(width, depth), bi.Expect(False, message=message, why=f"bomb {width}**{depth}"), kind
    if kind == "merge_bomb":
        levels, width = draw(st.integers(1, 14)), draw(st.integers(2, 10))
        return _merge_bomb(levels, width), bi.Expect(False, why=f"merge bomb {width}**{levels}"), kind
    if kind == "tag":
        text = draw(st.sampled_from([
            f"!!python/object/apply:builtins.open [{sentinel}, w]\n",
            f"--- !!python/object/new:builtins.open [{sentinel}, w]\n",
            f"%TAG !p! tag:yaml.org,2002:python/object/apply:\n--- !p!builtins.open [{sentinel}, w]\n",
            f"%TAG ! tag:yaml.org,2002:python/\n---\napiVersion: reconciler/v1\nkind: Tenant\n"
            f"metadata: !object/apply:builtins.open [{sentinel}, w]\n",
            f"apiVersion: reconciler/v1\nkind: Tenant\nmetadata: {{name: x}}\nspec:\n"
            f"  description: !!python/object/apply:builtins.open [{sentinel}, w]\n",
            "apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: x\n  labels:"
            " !!python/object:builtins.dict {a: b}\n",
            "x: !!python/name:os.system\n", "x: !<tag:example.com,2000:app/foo> bar\n",
            "x: !!binary AAAA\ny: !!timestamp 2001-12-14\nz: !!set {a, b}\nw: !!omap [{a: 1}]\n",
        ]))
        valid_yaml = text.startswith("x: !!binary")  # standard tags only: a non-manifest, still an error
        return text, bi.Expect(False, why="tag" + (" (standard)" if valid_yaml else "")), kind
    if kind == "dup_keys":
        keys = draw(st.lists(st.sampled_from(["apiVersion", "kind", "metadata", "a", "b"]), min_size=2, max_size=8))
        if len(set(keys)) == len(keys):
            keys.append(keys[0])
        text = "".join(f"{k}: {draw(st.sampled_from(['x', '1', '[1]', '{a: b}', '~']))}\n" for k in keys)
        second = next(n for n, k in enumerate(keys) if k in keys[:n]) + 1
        return text, bi.Expect(False, lines=(second, second), message="duplicate key", why="dup keys"), kind
    if kind == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"]))
        data = TENANT.format(name="enc").encode(codec)
        if codec == "utf-8-sig":
            return data, bi.Expect(True, resources=1, why="UTF-8 with a BOM"), kind
        if codec in ("utf-16-le", "utf-16-be"):  # no BOM: ASCII text is valid UTF-8 with NULs in it
            return data, bi.Expect(False, lines=(1, 1), why=codec), kind
        return data, bi.Expect(False, message="not UTF-8 text", why=codec), kind
    if kind == "bad_utf8":
        lines = TENANT.format(name="utf").encode().split(b"\n")
        n = draw(st.integers(0, len(lines) - 2))
        at = draw(st.integers(0, len(lines[n])))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]))
        lines[n] = lines[n][:at] + bad + lines[n][at:]
        expect = bi.Expect(False, lines=(n + 1, n + 1), message="not UTF-8 text", why="bad UTF-8")
        return b"\n".join(lines), expect, kind
    if kind == "many_docs":
        n = draw(st.integers(1, 300))
        text = "".join("---\n" + TENANT.format(name=f"t{i}") for i in range(n))
        return text, bi.Expect(True, resources=n, why=f"{n} documents"), kind
    if kind == "anchors_ok":
        text = (
            "apiVersion: reconciler/v1\nkind: Tenant\nmetadata:\n  name: &n anchored\n"
            "  labels: &l {team: &t web, '<<': literal}\nspec:\n  description: *t\n---\n"
            "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: net, tenant: anchored}\n"
            "spec:\n  subnets:\n    - &s {cidr: 10.9.0.0/24, dhcp: &d {enabled: true}}\n"
            "    - {<<: *s, cidr: 10.9.1.0/24}\n"
        )
        return text, bi.Expect(True, resources=2, why="anchors, aliases and a merge key"), kind
    # a raw control character in a valid manifest
    text = TENANT.format(name="ctl")
    at = draw(st.integers(0, len(text)))
    line = text.count("\n", 0, at) + 1
    ch = draw(st.sampled_from(["\x00", "\x07", "\x1b", "\x7f", "\x9b", "\ufffe"]))
    return text[:at] + ch + text[at:], bi.Expect(False, lines=(line, line), why=f"raw {ch!r}"), kind


@st.composite
def raw_cases(draw: st.DrawFn, sentinel: str) -> tuple[dict[str, str | bytes], bi.Expect, str]:
    content, expect, kind = draw(garbage(sentinel))
    name = draw(st.sampled_from(["bad.yaml", "sub/bad.yml", "x.yaml"]))
    files: dict[str, str | bytes] = {name: content}
    if draw(st.booleans()):  # next to a valid cloud: only the bad file may draw errors
        docs = draw(bi.clouds())
        good = bi.emit(docs, random.Random(draw(st.integers(0, 2**32))))
        files["good/cloud.yaml"] = good.text
        resources = None if expect.resources is None else expect.resources + len(docs)
        expect = bi.Expect(expect.valid, file=Path(name), lines=expect.lines, message=expect.message,
                           resources=resources, only_file=True, why=expect.why + " next to a valid cloud")
    else:
        expect.file = Path(name)
    return files, expect, kind


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield bi.Harness(tmp_path_factory.mktemp("bad-input-raw"), mp)


def test_garbage_files_never_crash_and_errors_name_file_and_line(harness: bi.Harness) -> None:
    stats = bi.Stats()

    @SETTINGS
    @given(case=raw_cases(str(harness.sentinel)))
    def run(case: tuple[dict[str, str | bytes], bi.Expect, str]) -> None:
        files, expect, kind = case
        note(f"{kind}: {expect}")
        folder, written = harness.write(files)
        harness.check(folder, written, dataclasses.replace(expect, file=folder / expect.file if expect.file else None),
                      stats)

    try:
        run()
    finally:
        stats.record(record)
    assert stats.valid >= CASES // 20 and stats.invalid >= CASES // 2, stats


# --- explicit limits ------------------------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_unread(harness: bi.Harness) -> None:
    stats = bi.Stats()
    folder = harness.folder()
    big = folder / "big.yaml"
    with open(big, "wb") as f:  # sparse: the loader must refuse it by its size, unread
        f.truncate(MAX_FILE_BYTES + 1)
    (folder / "tenants.yaml").write_text(TENANT.format(name="acme"))
    expect = bi.Expect(False, file=big, lines=(1, 1), message=f"limited to {MAX_FILE_BYTES}")
    try:
        harness.check(folder, {big: b"\n", folder / "tenants.yaml": TENANT.encode()}, expect, stats)
    finally:
        stats.record(record)


@pytest.mark.parametrize("what", ["comments", "nodes"])
def test_a_file_just_under_the_size_limit(harness: bi.Harness, what: str) -> None:
    """8 MiB of comments is a valid (if odd) manifest; 8 MiB of list items is more nodes
    than a file may hold, and is refused at the node budget, not read to the end."""
    stats = bi.Stats()
    head = TENANT.format(name="big")
    if what == "comments":
        line = "# " + "x" * 97 + "\n"
        body = line * ((MAX_FILE_BYTES - len(head)) // len(line))
        expect = bi.Expect(True, resources=1)
    else:
        head += "  labels:\n"
        line = "    - x\n"
        body = line * ((MAX_FILE_BYTES - len(head)) // len(line))
        expect = bi.Expect(False, message=f"more than {MAX_NODES_PER_FILE} YAML nodes")
    data = (head + body).encode()
    assert len(data) <= MAX_FILE_BYTES
    folder, written = harness.write({"big.yaml": data})
    expect.file = folder / "big.yaml"
    try:
        harness.check(folder, written, expect, stats)
    finally:
        stats.record(record)


# --- the real console script on the nastiest inputs ------------------------------------------------

NASTY: dict[str, bytes] = {
    "alias-bomb": _billion_laughs(10, 12).encode(),
    "merge-bomb": _merge_bomb(12, 9).encode(),
    "deep-100k": ("a: " + "[" * 100_000 + "]" * 100_000 + "\n").encode(),
    "binary": bytes(random.Random(9).randrange(256) for _ in range(65536)),
    "python-tag": b"x: !!python/object/apply:builtins.open [SENTINEL, w]\n"
                  b"---\n!!python/object/apply:os.system [touch SENTINEL]\n",
    "huge-int": (TENANT.format(name="n") + "spec: {quota: {instances: 0x" + "f" * 6000 + "}}\n").encode(),
    "name-newline-rtl": (TENANT.format(name='"a\\nb\\u202e"') + "  labels: {\"k\\ny\": v}\n"
                         "spec: {\"\\u202equota\": 1}\n").encode(),
}


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("reconciler")
    return [str(script)] if script.exists() else [sys.executable, "-m", "reconciler.cli.app"]


def test_the_real_cli_on_the_nastiest_inputs(tmp_path: Path) -> None:
    """The console script itself (a subprocess, as a user runs it), once per command on a
    folder of every nasty file: each draws its own error, on a line of that file."""
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "host.yaml"
    config.write_text(f"stateDir: {state}\ndrivers: memory\nlockTimeoutSeconds: 2\n")
    sentinel = tmp_path / bi.SENTINEL_NAME
    folder = tmp_path / "manifests"
    folder.mkdir()
    files: dict[str, bytes] = {}
    for name, data in NASTY.items():
        data = data.replace(b"SENTINEL", str(sentinel).encode())
        (folder / f"{name}.yaml").write_bytes(data)
        files[str(folder / f"{name}.yaml")] = data
    (folder / "tenants.yaml").write_text(TENANT.format(name="acme"))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS")}
    env.update(RECONCILER_HOST_CONFIG=str(config), NO_COLOR="1")
    stats = bi.Stats(manifests=len(NASTY), invalid=len(NASTY))
    try:
        for command in ("validate", "plan"):
            try:
                result = subprocess.run([*_console_script(), command, str(folder)], env=env, capture_output=True,
                                        text=True, stdin=subprocess.DEVNULL, timeout=bi.HANG_SECONDS * 2)
            except subprocess.TimeoutExpired:
                stats.hangs += 1
                raise AssertionError(f"reconciler {command} did not answer") from None
            stats.cli_runs += 1
            report = f"{command}: exit {result.returncode}\n{result.stdout}\n--- stderr\n{result.stderr[:5000]}"
            stats.tracebacks += "Traceback" in result.stdout + result.stderr
            assert "Traceback" not in result.stdout + result.stderr, report
            assert result.returncode == 1 and result.stdout == "", report
            *errors, summary = result.stderr.splitlines()
            where = [m for m in map(bi.ERROR_LINE.match, errors)]
            bad_lines = [e for e, m in zip(errors, where) if not (
                m and m.group("file") in files and 1 <= int(m.group("line")) <= bi.line_count(files[m.group("file")]))]
            stats.errors_without_file_line += len(bad_lines)
            assert not bad_lines, report
            m = bi.SUMMARY.match(summary)
            assert m and int(m.group(1)) == len(errors), report
            assert {m.group("file") for m in where if m} == set(files), "a nasty file drew no error\n" + report
            assert not sentinel.exists(), "a YAML tag was constructed\n" + report
            assert not (state / "memory").exists(), report
    finally:
        stats.record(record)


def test_the_expansion_estimate_matches_the_loader() -> None:
    """_expanded() decides whether a generated bomb must hit the node budget: check it."""
    from reconciler._yamldocs import TooLarge, read_documents

    for width, depth in [(2, 1), (3, 2), (5, 3), (10, 4)]:
        budget = _expanded(width, depth)
        read_documents(_billion_laughs(width, depth), lambda *a: None, budget=budget, max_depth=MAX_DEPTH)
        with pytest.raises(TooLarge):
            read_documents(_billion_laughs(width, depth), lambda *a: None, budget=budget - 1, max_depth=MAX_DEPTH)
