"""The lvm2 boundary: lvm's command-line tools, run with argument lists, their JSON
reports parsed and their errors translated into ours, here and nowhere else.

What this relies on, as lvm2 2.03.16 (Debian 12) behaves:

- Reports: ``--reportformat json --units b --nosuffix`` gives every size as a string of
  plain bytes (``"8388608"``) and an empty string for a field that does not apply
  (``data_percent`` of a linear LV); ``json_std`` (numbers as numbers) only came in
  2.03.17. ``report/time_format="%s"`` makes ``lv_time`` seconds since the epoch.
- Without the kernel's device-mapper every command runs with ``global{activation=0}``:
  metadata changes work, but ``lvcreate -Wy`` fails ("Failed to wipe start of new LV"),
  so thick LVs are created with ``-Wn -Zn`` there; thin pools and snapshots cannot be
  created at all; and ``lvchange -ay`` exits 0 doing nothing, so `Lvm2.activate`
  refuses by itself. libdevmapper creates ``/dev/mapper/control`` (10:236) whenever it
  is missing, even with no driver behind it, so `has_device_mapper` also asks the kernel.
- lvm does not limit a tag's length (a 5000-character tag is accepted): we keep to the
  documented 1024. Tags are reported sorted and comma-separated (',' is not a tag character).
- One ``lvchange`` with several ``--addtag``/``--deltag`` is one metadata commit; a tag
  given to both is removed, so `Lvm2.retag` refuses such a request.
- ``VG/LV`` longer than 125 characters fails ("Internal error: LV name ... length N is
  not supported") although each name alone may have 127.
- Tags live in the VG's metadata area, which all its LVs share: about 510 KiB of text
  with vgcreate's default, some 500 bytes per LV plus its tags. A change that does not
  fit fails whole ("exceeds maximum metadata size"); `VgInfo.metadata_free` shows the room.
- lvm waits for a VG's lock for as long as it takes (``global/wait_for_locks=1``): the
  command's timeout turns a stuck wait into a TransientError.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import subprocess
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from reconciler.errors import Conflict, DriverError, NotFound, PermanentError, TransientError

REPORT_TIMEOUT_S = 60.0
ACTION_TIMEOUT_S = 120.0
SECTOR = 512
MAX_NAME = 127  # lvm's NAME_LEN (128) with its NUL
MAX_FULL_NAME = 125  # "VG/LV", measured
MAX_TAG = 1024
TAG_CHUNK = 1000
INSTALL_HINT = "lvm2 is not installed: apt-get install lvm2 (or run scripts/setup-storage.sh)"
DM_NEEDED = "needs the kernel's device-mapper driver, which this host lacks"

_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")
_TAG = re.compile(r"[A-Za-z0-9_+.\-/=!:&#]+")
_INDEX = re.compile(r"[0-9]{1,6}")
#: lvm reserves these inside LV names for its own sub-volumes (lib/misc/lvm-string.c)
RESERVED_SUBSTRINGS = (
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_iorig", "_imeta",
    "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata",
    "_vorigin",
)
RESERVED_PREFIXES = ("snapshot", "pvmove")

LV_FIELDS = ("lv_name", "vg_name", "lv_size", "lv_tags", "lv_attr", "origin", "pool_lv",
             "data_percent", "metadata_percent", "lv_time", "lv_path")
VG_FIELDS = ("vg_name", "vg_size", "vg_free", "vg_extent_size", "vg_mda_free")


# --- names and tags -------------------------------------------------------------------


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise PermanentError(f"{what} name {name!r} is empty or not a string")
    if len(name) > MAX_NAME:
        raise PermanentError(f"{what} name {name[:40]!r}... is {len(name)} characters long "
                             f"(lvm allows at most {MAX_NAME})")
    if name in (".", ".."):
        raise PermanentError(f"{what} name {name!r} is not allowed by lvm")
    if not _NAME.fullmatch(name):
        raise PermanentError(f"{what} name {name!r} is not allowed by lvm: use A-Z a-z 0-9 "
                             "+ _ . - and do not start with '-'")
    return name


def check_vg_name(name: str) -> str:
    """`name` if lvm accepts it as a VG name; PermanentError otherwise. (lvm's reserved
    LV substrings do not apply to VGs, and an existing host VG must stay usable.)"""
    return _check_name(name, "volume group")


def check_lv_name(name: str, vg: str | None = None) -> str:
    """`name` if lvm accepts it as an LV name (in `vg`); PermanentError otherwise."""
    _check_name(name, "logical volume")
    for prefix in RESERVED_PREFIXES:
        if name.startswith(prefix):
            raise PermanentError(f"logical volume name {name!r}: names starting {prefix!r} "
                                 "are reserved by lvm")
    for reserved in RESERVED_SUBSTRINGS:
        if reserved in name:
            raise PermanentError(f"logical volume name {name!r}: names containing "
                                 f"{reserved!r} are reserved by lvm")
    if vg is not None and len(vg) + 1 + len(name) > MAX_FULL_NAME:
        raise PermanentError(f"logical volume {vg}/{name[:40]}...: '{vg}/<name>' may have at "
                             f"most {MAX_FULL_NAME} characters in lvm")
    return name


def check_tag(tag: str) -> str:
    """`tag` if lvm accepts it (and it has at most 1024 characters); PermanentError otherwise."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise PermanentError(f"lvm tag {tag!r} is not allowed: "
                             "use A-Z a-z 0-9 and _ + . - / = ! : & #")
    if len(tag) > MAX_TAG:
        raise PermanentError(f"lvm tag {tag[:40]!r}... has {len(tag)} characters (at most {MAX_TAG})")
    return tag


def _check_prefix(prefix: str) -> None:
    if not _TAG.fullmatch(prefix) or "=" in prefix or len(prefix) > 16:
        raise ValueError(f"tag prefix {prefix!r}: 1-16 lvm tag characters, no '='")


def encode_tags(prefix: str, payload: bytes) -> list[str]:
    """`payload` as lvm tags ``PREFIX.<index>=<chunk>``: unpadded base64url of the payload
    and its CRC-32 (so a lost or changed chunk is noticed), in chunks of at most 1000
    characters; the index makes their order irrelevant."""
    _check_prefix(prefix)
    data = payload + zlib.crc32(payload).to_bytes(4, "big")
    text = base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    return [check_tag(f"{prefix}.{n}={text[i:i + TAG_CHUNK]}")
            for n, i in enumerate(range(0, len(text), TAG_CHUNK))]


def _indexed(prefix: str, tags: Iterable[str]) -> Iterable[tuple[str, int, str]]:
    lead = prefix + "."
    for tag in tags:
        if not tag.startswith(lead):
            continue
        index, sep, chunk = tag[len(lead):].partition("=")
        if sep and _INDEX.fullmatch(index):  # else another prefix's tag ("P.x.0=...")
            yield tag, int(index), chunk


def prefixed_tags(prefix: str, tags: Iterable[str]) -> list[str]:
    """The tags of `tags` that `encode_tags(prefix, ...)` could have written (to remove
    them when the payload changes)."""
    _check_prefix(prefix)
    return [tag for tag, _, _ in _indexed(prefix, tags)]


def decode_tags(prefix: str, tags: Iterable[str]) -> bytes | None:
    """The payload `encode_tags(prefix, ...)` stored in `tags`; None when there is none,
    or a chunk is missing, doubled or garbled."""
    _check_prefix(prefix)
    chunks: dict[int, str] = {}
    for _, index, chunk in _indexed(prefix, tags):
        if index in chunks:
            return None
        chunks[index] = chunk
    if not chunks or sorted(chunks) != list(range(len(chunks))):
        return None
    text = "".join(chunks[i] for i in range(len(chunks)))
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) < 4 or zlib.crc32(data[:-4]).to_bytes(4, "big") != data[-4:]:
        return None
    return data[:-4]


# --- reports --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LvInfo:
    """One logical volume as ``lvs`` reports it (hidden sub-volumes are never listed)."""

    name: str
    vg: str
    size: int  # bytes
    tags: tuple[str, ...]
    attr: str  # lv_attr, e.g. "-wi-a-----"; "-wi-XX----" when activation is disabled
    origin: str | None = None  # the origin of a snapshot
    pool_lv: str | None = None  # the thin pool of a thin volume
    data_percent: float | None = None  # thin volumes, thin pools, snapshots
    metadata_percent: float | None = None  # thin pools
    created: datetime | None = None  # lv_time (UTC)
    path: str | None = None  # lv_path, /dev/VG/LV

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[:1] == "t"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S") or (self.is_thin and self.origin is not None)

    @property
    def active(self) -> bool | None:
        """None: unknown (activation is disabled: lvm shows 'X')."""
        state = self.attr[4:5]
        return None if state in ("X", "") else state == "a"

    @property
    def open(self) -> bool | None:
        """Held open (a running guest, a mount); None: unknown."""
        state = self.attr[5:6]
        return None if state in ("X", "") else state == "o"


@dataclass(frozen=True, slots=True)
class VgInfo:
    name: str
    size: int  # bytes
    free: int  # bytes
    extent_size: int  # bytes; every LV size is rounded up to a multiple of it
    metadata_free: int | None = None  # bytes left for metadata text (tags count)


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A thin pool: its data size and how full it is."""

    name: str
    vg: str
    size: int  # bytes
    data_percent: float | None
    metadata_percent: float | None = None


def _int(text: Any) -> int:
    return int(str(text).strip() or 0)


def _float(text: Any) -> float | None:
    text = str(text).strip()
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _time(text: Any) -> datetime | None:
    text = str(text).strip()
    try:
        return datetime.fromtimestamp(int(text), tz=timezone.utc) if text else None
    except (ValueError, OverflowError, OSError):
        return None


def _lv_info(row: dict[str, Any]) -> LvInfo:
    return LvInfo(
        name=row["lv_name"], vg=row["vg_name"], size=_int(row["lv_size"]),
        tags=tuple(t for t in str(row.get("lv_tags", "")).split(",") if t),
        attr=row.get("lv_attr", ""), origin=row.get("origin") or None,
        pool_lv=row.get("pool_lv") or None, data_percent=_float(row.get("data_percent", "")),
        metadata_percent=_float(row.get("metadata_percent", "")),
        created=_time(row.get("lv_time", "")), path=row.get("lv_path") or None,
    )


def _vg_info(row: dict[str, Any]) -> VgInfo:
    mda = str(row.get("vg_mda_free", "")).strip()
    return VgInfo(name=row["vg_name"], size=_int(row["vg_size"]), free=_int(row["vg_free"]),
                  extent_size=_int(row["vg_extent_size"]), metadata_free=int(mda) if mda else None)


def _rows(stdout: str, kind: str, doing: str) -> list[dict[str, Any]]:
    try:
        report = json.loads(stdout)["report"]
        return [row for part in report for row in part.get(kind, [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PermanentError(f"{doing}: lvm's report is not the JSON expected: "
                             f"{stdout.strip()[:200]!r}") from None


# --- errors ---------------------------------------------------------------------------

_NOISE = re.compile(
    r"^(WARNING: Activation disabled\.|WARNING: Skipping zeroing"
    r"|WARNING: Logical volume \S+ not zeroed"
    r"|WARNING: This metadata update is NOT backed up|WARNING: Running as a non-root user"
    r"|File descriptor \d+ .* leaked on|Run `\w+ --help' for more information"
    r"|WARNING: Ignoring duplicate config value|Cannot process volume group"
    r"|Error during parsing of command line)"
)
#: what lvm says when an action needs device-mapper; and (on every command that tries it,
#: also a successful one) when it cannot reach it at all
_DM_NEEDED = re.compile(r"without using device-mapper kernel driver"
                        r"|device-mapper target\(s\) not detected")
_DM_UNREACHABLE = re.compile(r"communicate with kernel device-mapper driver"
                             r"|/dev/mapper/control: open failed")
_DENIED = re.compile(r"Permission denied|Operation not permitted")
_VG_MISSING = re.compile(r'Volume group "([^"]+)" not found')
_LV_MISSING = re.compile(
    r'Failed to find logical volume "[^"]+"|Logical volume \S+ not found in volume group'
    r"|Pool \S+ not found in Volume group|Snapshot origin LV \S+ not found"
    r"|logical volume\(s\) not found"
)
_EXISTS = re.compile(r"already exists")
_NO_SPACE = (  # (free extents, needed extents) or (needed more,)
    re.compile(r"insufficient free space \((?P<free>\d+) extents?\): (?P<needed>\d+) required"),
    re.compile(r"Insufficient free space: (?P<needed>\d+) extents? needed, "
               r"but only (?P<free>\d+) available"),
    re.compile(r"Insufficient suitable allocatable extents .*?: (?P<more>\d+) more required"),
)
_LOCKED = re.compile(r"Can't get lock|flock failed|Resource temporarily unavailable"
                     r"|Failed to acquire .*lock|lock .*(timed out|busy)")
_METADATA_FULL = re.compile(r"metadata on \S+ \((\d+) bytes\) "
                            r"exceeds maximum metadata size \((\d+) bytes\)")
_IN_USE = re.compile(r"Logical volume \S+ in use|Can't remove open logical volume"
                     r"|contains a filesystem in use")


def _lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.strip()]


def last_message(stderr: str, returncode: int | None = None) -> str:
    """lvm's last meaningful stderr line (its warnings about disabled activation,
    leaked descriptors and --help hints left out)."""
    lines = _lines(stderr)
    meaningful = [line for line in lines if not _NOISE.match(line)]
    if meaningful:
        return meaningful[-1]
    if lines:
        return lines[-1]
    return f"exit status {returncode}" if returncode is not None else "(no message)"


def _human(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def translate(stderr: str, doing: str, returncode: int | None = None,
              extent_size: int | None = None, vgs_here: Sequence[str] | None = None) -> DriverError:
    """Our error for a failed lvm command (`doing`: what it was for, e.g.
    "lvcreate vg/data"), from its stderr."""
    text = "\n".join(_lines(stderr))
    last = last_message(stderr, returncode)
    if _DM_NEEDED.search(text):
        return _dm_error(stderr, doing, _DM_NEEDED)
    if _DENIED.search(text) and os.geteuid() != 0:
        return PermanentError(f"{doing}: lvm needs root ({last})")
    if match := _VG_MISSING.search(text):
        here = ("" if vgs_here is None
                else f" (volume groups here: {', '.join(vgs_here) or 'none'})")
        return PermanentError(f"{doing}: volume group {match.group(1)!r} does not exist: the host "
                              f"config names a VG that does not exist on this host{here}")
    if _LV_MISSING.search(text):
        return NotFound(f"{doing}: {last}")
    if _EXISTS.search(text):
        return Conflict(f"{doing}: {last}")
    for pattern in _NO_SPACE:
        if match := pattern.search(text):
            return PermanentError(f"{doing}: not enough free space in the volume group: "
                                  f"{_space(match.groupdict(), extent_size)}")
    if match := _METADATA_FULL.search(text):
        return PermanentError(f"{doing}: the volume group's metadata area is full ({match.group(1)} "
                              f"bytes needed, at most {match.group(2)}): every LV and tag takes "
                              "space there; remove volumes, or use a VG made with a bigger "
                              "vgcreate --metadatasize")
    if _LOCKED.search(text):
        return TransientError(f"{doing}: another lvm command holds the volume group's lock ({last})")
    if _IN_USE.search(text):
        return TransientError(f"{doing}: the volume is in use ({last})")
    if _DM_UNREACHABLE.search(text):
        return _dm_error(stderr, doing, _DM_UNREACHABLE)
    return PermanentError(f"{doing}: {last}")


def _dm_error(stderr: str, doing: str, pattern: re.Pattern[str]) -> PermanentError:
    line = next(line for line in _lines(stderr) if pattern.search(line))
    return PermanentError(f"{doing}: {DM_NEEDED} (lvm: {line})")


def _space(found: dict[str, str | None], extent_size: int | None) -> str:
    def amount(extents: str) -> str:
        n = int(extents)
        return f"{n} extents ({_human(n * extent_size)})" if extent_size else f"{n} extents"

    if found.get("more"):
        return f"{amount(found['more'])} more needed"  # type: ignore[arg-type]
    return f"needs {amount(found['needed'])}, {amount(found['free'])} free"  # type: ignore[arg-type]


# --- the commands ---------------------------------------------------------------------


def has_device_mapper(dev: Path = Path("/dev"), proc: Path = Path("/proc")) -> bool:
    """Whether the kernel's device-mapper is there, so LVs can be activated.

    lvm creates /dev/mapper/control itself when it is missing (also with no driver
    behind it), so the node alone proves nothing: the driver is there when /proc/misc
    lists it, or (a module not loaded yet: opening the node loads it, as lvm does) when
    the node opens."""
    try:
        misc = (proc / "misc").read_text()
    except OSError:
        misc = None
    if misc is not None and any(line.split()[1:] == ["device-mapper"] for line in misc.splitlines()):
        return True
    control = dev / "mapper" / "control"
    try:
        if not stat.S_ISCHR(control.stat().st_mode):
            return False
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # missing; ENODEV: no driver; EACCES: not ours to use
        return False
    os.close(fd)
    return True


def _env() -> dict[str, str]:
    path = os.environ.get("PATH") or "/usr/bin:/bin"
    for extra in ("/usr/sbin", "/sbin"):  # lvm lives in sbin, which a user's PATH may lack
        if extra not in path.split(":"):
            path += ":" + extra
    env = {"PATH": path, "LC_ALL": "C", "LANG": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
    if "LVM_SYSTEM_DIR" in os.environ:  # an admin's other /etc/lvm
        env["LVM_SYSTEM_DIR"] = os.environ["LVM_SYSTEM_DIR"]
    return env


def _size_arg(size_bytes: int, what: str) -> str:
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise PermanentError(f"{what}: size {size_bytes!r} is not a positive number of bytes")
    sectors = -(-size_bytes // SECTOR)  # lvm takes whole sectors and rounds up to an extent
    return f"{sectors * SECTOR}b"


class Lvm2:
    """lvm2's tools for one host. `activation`: whether LVs can be activated (None: when
    the kernel has device-mapper); without it every command runs with
    ``global{activation=0}`` (metadata only). `extra_config` is added to every command's
    ``--config`` (the tests' devices filter that shows only their loop device)."""

    def __init__(self, activation: bool | None = None, extra_config: str = "",
                 binary: str = "lvm", timeout: float = ACTION_TIMEOUT_S,
                 report_timeout: float = REPORT_TIMEOUT_S):
        self.activation: bool = has_device_mapper() if activation is None else bool(activation)
        self.extra_config = extra_config.strip()
        self.binary = binary
        self.timeout = timeout
        self.report_timeout = report_timeout

    def __repr__(self) -> str:
        return f"Lvm2(activation={self.activation}, extra_config={self.extra_config!r})"

    # --- running ---

    def config(self, report: bool = False) -> str:
        """The one --config argument every command gets ("" for none)."""
        parts = []
        if not self.activation and "activation=0" not in self.extra_config.replace(" ", ""):
            # (a value given twice makes lvm warn "Ignoring duplicate config value")
            parts.append("global{activation=0}")
        if report:  # epoch seconds, and never the command log inside the JSON
            parts.append('report{time_format="%s"} log{report_command_log=0}')
        if self.extra_config:
            parts.append(self.extra_config)
        return " ".join(parts)

    def argv(self, command: str, args: Sequence[str], report: bool = False) -> list[str]:
        config = self.config(report)
        return [self.binary, command, *(["--config", config] if config else []), *args]

    def run(self, command: str, args: Sequence[str], doing: str, *, report: bool = False,
            vg: str | None = None) -> str:
        """Run ``lvm COMMAND ARGS``; its stdout, or our error for its failure."""
        argv = self.argv(command, args, report)
        timeout = self.report_timeout if report else self.timeout
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  env=_env(), timeout=timeout, close_fds=True, check=False)
        except FileNotFoundError:
            raise PermanentError(f"{doing}: {INSTALL_HINT}") from None
        except subprocess.TimeoutExpired:
            raise TransientError(f"{doing}: lvm {command} did not finish in {timeout:.0f} s "
                                 "(another lvm command may hold the volume group's lock)") from None
        except OSError as exc:
            raise PermanentError(f"{doing}: cannot run {self.binary}: {exc.strerror or exc}") from None
        if proc.returncode != 0:
            raise self._failure(proc, doing, vg)
        return proc.stdout

    def _failure(self, proc: subprocess.CompletedProcess[str], doing: str,
                 vg: str | None) -> DriverError:
        extent_size = vgs_here = None
        text = proc.stderr
        try:  # best effort: a more useful message costs one more report, on failure only
            if any(p.search(text) for p in _NO_SPACE) and vg is not None:
                extent_size = self.vg(vg).extent_size
            elif _VG_MISSING.search(text):
                vgs_here = self.vg_names()
        except DriverError:
            pass
        return translate(text, doing, proc.returncode, extent_size, vgs_here)

    # --- reports ---

    def _report(self, command: str, fields: Sequence[str], target: str, kind: str, doing: str,
                vg: str) -> list[dict[str, Any]]:
        out = self.run(command, ["--reportformat", "json", "--units", "b", "--nosuffix",
                                 "-o", ",".join(fields), target], doing, report=True, vg=vg)
        return _rows(out, kind, doing)

    def vg_names(self) -> list[str]:
        """Every VG lvm sees (through the configured filters)."""
        out = self.run("vgs", ["--reportformat", "json", "-o", "vg_name"], "listing volume groups",
                       report=True)
        return sorted(row["vg_name"] for row in _rows(out, "vg", "listing volume groups"))

    def vg(self, vg: str) -> VgInfo:
        check_vg_name(vg)
        rows = self._report("vgs", VG_FIELDS, vg, "vg", f"reading volume group {vg}", vg)
        if len(rows) != 1:
            raise PermanentError(f"reading volume group {vg}: lvm reported {len(rows)} rows")
        return _vg_info(rows[0])

    def lvs(self, vg: str) -> list[LvInfo]:
        """Every (visible) LV of `vg`, in one command."""
        check_vg_name(vg)
        rows = self._report("lvs", LV_FIELDS, vg, "lv", f"listing the volumes of {vg}", vg)
        return [_lv_info(row) for row in rows]

    def report(self, vg: str) -> tuple[VgInfo, list[LvInfo]]:
        """The VG and its LVs: one command (``lvs`` with the VG's fields on every row),
        two when the VG has no LV."""
        check_vg_name(vg)
        rows = self._report("lvs", LV_FIELDS + VG_FIELDS[1:], vg, "lv",
                            f"reading volume group {vg}", vg)
        if not rows:
            return self.vg(vg), []
        return _vg_info(rows[0]), [_lv_info(row) for row in rows]

    def lv(self, vg: str, name: str) -> LvInfo | None:
        """One LV; None when it does not exist (a missing VG is still an error)."""
        target = f"{check_vg_name(vg)}/{check_lv_name(name)}"
        try:
            rows = self._report("lvs", LV_FIELDS, target, "lv", f"reading {target}", vg)
        except NotFound:
            return None
        return _lv_info(rows[0]) if rows else None

    def pool(self, vg: str, pool: str) -> PoolInfo | None:
        """A thin pool's size and fill; None when there is no LV of that name."""
        info = self.lv(vg, pool)
        if info is None:
            return None
        if not info.is_thin_pool:
            raise PermanentError(f"{vg}/{pool} is not a thin pool (lv_attr {info.attr})")
        return PoolInfo(info.name, info.vg, info.size, info.data_percent, info.metadata_percent)

    # --- actions ---

    def _full(self, vg: str, name: str) -> str:
        return f"{check_vg_name(vg)}/{check_lv_name(name, vg)}"

    def _tag_args(self, option: str, tags: Iterable[str]) -> list[str]:
        args: list[str] = []
        for tag in tags:
            args += [option, check_tag(tag)]
        return args

    def create(self, vg: str, name: str, size_bytes: int, tags: Sequence[str] = (),
               thin_pool: str | None = None) -> None:
        """A new LV: thick (-L, size rounded up to an extent), or thin (-V) in `thin_pool`."""
        full = self._full(vg, name)
        doing = f"creating logical volume {full}"
        size = _size_arg(size_bytes, doing)
        args = ["-n", name, *self._tag_args("--addtag", tags), "--yes"]
        if thin_pool is not None:
            args += ["-V", size, "-T", f"{vg}/{check_lv_name(thin_pool, vg)}"]
        else:  # -Wy fails where activation is disabled ("Failed to wipe start of new LV")
            args += ["-L", size, *(["-Wy", "-Zy"] if self.activation else ["-Wn", "-Zn"]), vg]
        self.run("lvcreate", args, doing, vg=vg)

    def extend(self, vg: str, name: str, size_bytes: int) -> None:
        """Grow the LV to `size_bytes` (absolute). Already that big (after lvm's rounding
        to an extent): nothing to do. Bigger: PermanentError (LVs are never shrunk)."""
        full = self._full(vg, name)
        doing = f"extending logical volume {full}"
        try:
            self.run("lvextend", ["-L", _size_arg(size_bytes, doing), full], doing, vg=vg)
        except PermanentError as exc:
            if "matches existing size" in str(exc):
                return
            if "not larger than existing size" in str(exc):
                raise PermanentError(f"{doing} to {_human(size_bytes)}: it is already bigger, and "
                                     "logical volumes are never shrunk") from None
            raise

    def retag(self, vg: str, name: str, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
        """Remove and add tags in one lvchange (one metadata commit). Removing a tag the
        LV lacks is fine; a tag in both lists is refused (lvm would remove it)."""
        full = self._full(vg, name)
        both = set(add) & set(remove)
        if both:
            raise PermanentError(f"retagging {full}: tags both added and removed: {sorted(both)}")
        if not add and not remove:
            return
        args = [*self._tag_args("--deltag", remove), *self._tag_args("--addtag", add), full]
        self.run("lvchange", args, f"retagging logical volume {full}", vg=vg)

    def remove(self, vg: str, name: str) -> None:
        """Remove exactly the LV VG/NAME (a path, never a pattern or a tag). Removing the
        origin of snapshots removes them too (lvm asks; --yes answers)."""
        full = self._full(vg, name)
        self.run("lvremove", ["--yes", full], f"removing logical volume {full}", vg=vg)

    def snapshot(self, vg: str, origin: str, name: str, size_bytes: int | None = None,
                 tags: Sequence[str] = ()) -> None:
        """A snapshot of VG/ORIGIN named `name`: thick (copy-on-write space `size_bytes`)
        or, with no size, thin (the origin must be a thin volume)."""
        source = self._full(vg, origin)
        doing = f"snapshotting {source} as {check_lv_name(name, vg)}"
        args = ["-s", "-n", name, *self._tag_args("--addtag", tags), "--yes"]
        if size_bytes is not None:
            args += ["-L", _size_arg(size_bytes, doing)]
        try:
            self.run("lvcreate", [*args, source], doing, vg=vg)
        except PermanentError as exc:
            if size_bytes is None and "specify either size or extents" in str(exc):
                raise PermanentError(f"{doing}: {source} is not a thin volume: a snapshot of it "
                                     "needs a size (its copy-on-write space)") from None
            raise

    def device_path(self, vg: str, name: str) -> Path:
        """Where an active LV's block device is: /dev/VG/NAME."""
        return Path("/dev") / check_vg_name(vg) / check_lv_name(name)

    def activate(self, vg: str, name: str) -> Path:
        """Activate the LV (also a thin snapshot, which lvm marks to skip activation);
        its device path."""
        full = self._full(vg, name)
        doing = f"activating logical volume {full}"
        if not self.activation:
            raise PermanentError(f"{doing}: {DM_NEEDED} (lvm runs with activation disabled)")
        self.run("lvchange", ["-ay", "-K", full], doing, vg=vg)
        return self.device_path(vg, name)
