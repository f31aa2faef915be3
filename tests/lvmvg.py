"""A throwaway LVM volume group on a loop device, for the tests that run real lvm2.

`loop_vg(tmp_path)` makes a sparse file, a loop device on it, a PV and a VG named
``rvtest<random hex>``, and yields its name, loop device and the lvm ``--config`` text
that every command on it must get (also the driver's: ``Lvm2(extra_config=vg.config)``).
That config lets lvm see this loop device alone (``filter`` and ``global_filter``), so a
test never scans or touches another disk or VG of the host; it ignores the host's
devices file (``use_devicesfile=0``: lvm 2.03 would otherwise skip a device missing from
/etc/lvm/devices/system.devices, and pvcreate would add ours to it), uses no hints and
writes no metadata backups or archives under /etc/lvm; without device-mapper it also
turns activation off, so a raw lvm command given it works too. On exit (also after a failed
test) it removes every LV, the VG, the PV, the loop device and the file.

`require_lvm()` skips (or, with RECONCILER_REQUIRE_HOST=1, fails) like hostcheck's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hostcheck import require

PREFIX = "rvtest"
TIMEOUT_S = 60
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin", "LC_ALL": "C",
       "LVM_SUPPRESS_FD_WARNINGS": "1"}


@functools.cache
def lvm_unready() -> tuple[str, ...]:
    """Why the real-lvm tests cannot run here (empty: they can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (loop devices, lvm)")
    if shutil.which("lvm", path=ENV["PATH"]) is None:
        reasons.append("lvm missing: run scripts/setup-storage.sh")
    if shutil.which("losetup", path=ENV["PATH"]) is None:
        reasons.append("losetup missing (util-linux)")
    if not Path("/dev/loop-control").exists():
        reasons.append("no loop devices here (/dev/loop-control is missing)")
    return tuple(reasons)


def require_lvm() -> None:
    """Skip (or, with RECONCILER_REQUIRE_HOST=1, fail) when real lvm cannot run here."""
    require(lvm_unready())


def device_mapper() -> bool:
    """Whether LVs can be activated here (the driver's own answer)."""
    from reconciler.drivers.storage._lvm2 import has_device_mapper

    return has_device_mapper()


@dataclass(frozen=True, slots=True)
class LoopVg:
    name: str  # the VG: rvtest<hex>
    loop: str  # /dev/loopN
    config: str  # lvm --config text: this loop device alone (Lvm2(extra_config=...))
    backing: Path


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=ENV, timeout=TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def lvm_config(loop: str) -> str:
    """The --config text that shows lvm only `loop` and leaves /etc/lvm alone."""
    accept = f'["a|^{loop}$|","r|.*|"]'
    config = (f"devices{{filter={accept} global_filter={accept} use_devicesfile=0 hints=\"none\" "
              f"obtain_device_list_from_udev=0}} backup{{backup=0 archive=0}}")
    if not device_mapper():  # (Lvm2 then does not add it again: lvm warns about duplicates)
        config += " global{activation=0}"
    elif not Path("/run/udev/control").exists():  # no udevd (a container): never wait for it
        config += " activation{udev_sync=0 udev_rules=0}"
    return config


@contextlib.contextmanager
def loop_vg(tmp_path: Path, size_mib: int = 2048, name: str | None = None) -> Iterator[LoopVg]:
    """A VG on a loop device over a sparse file in `tmp_path`; everything removed on exit."""
    name = name or f"{PREFIX}{secrets.token_hex(4)}"
    assert name.startswith(PREFIX), f"test VGs are named {PREFIX}...: {name}"
    backing = tmp_path / f"{name}.img"
    with open(backing, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    loop = config = None
    pv = vg = False
    try:
        loop = _run("losetup", "--find", "--show", str(backing)).stdout.strip()
        config = lvm_config(loop)
        _run("pvcreate", "--config", config, loop)
        pv = True
        _run("vgcreate", "--config", config, name, loop)
        vg = True
        yield LoopVg(name, loop, config, backing)
    finally:
        problems = _teardown(name, loop, config, pv, vg, backing)
        if problems:
            raise RuntimeError(f"cleaning up test VG {name}: " + "; ".join(problems))


def _teardown(name: str, loop: str | None, config: str | None, pv: bool, vg: bool,
              backing: Path) -> list[str]:
    """Undo loop_vg's steps, each tried even when one before failed; what went wrong."""
    problems = []

    def attempt(*argv: str) -> None:
        try:
            _run(*argv)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))

    if vg and config:
        listed = _run("lvs", "--config", config, "--noheadings", "-o", "lv_name", name, check=False)
        for lv in listed.stdout.split():
            attempt("lvremove", "--config", config, "--yes", f"{name}/{lv}")
        attempt("vgremove", "--config", config, "--yes", "--force", name)
    if pv and config and loop:
        attempt("pvremove", "--config", config, "--yes", loop)
    if loop:
        back = _run("losetup", "--list", "--noheadings", "-O", "BACK-FILE", loop, check=False)
        if back.stdout.strip() == str(backing):  # still ours: never detach another's device
            attempt("losetup", "--detach", loop)
    backing.unlink(missing_ok=True)
    return problems
