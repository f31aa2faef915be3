"""Volumes on the real storage driver: observe and plan with many LVs and qcow2 files;
writes a section of docs/benchmarks.md.

    python -m benchmarks.volumes --write docs/benchmarks.md

A command, never a test. Needs root, lvm2 and qemu-utils (scripts/setup-storage.sh).
Each run makes its own throwaway LVM volume group `rcbvol<hex>` on a loop device over a
sparse file (a devices filter shows lvm that loop device alone; activation disabled
where the kernel has no device-mapper, as here) and a pool directory under
/var/lib/reconciler/bench, and removes both at the end.

- `--volumes` (500) volumes of 1 GiB on each backend (LVM thick LVs, qcow2 files), all
  made by one `reconciler apply` (timed; the LVM ones one at a time: one lvm2 writer
  per volume group). The file backend has `overcommit: 20` (500 sparse GiB on a disk with
  less free: capacity admission refuses that at 1.0).
- then `--repeat` (5) times: the storage driver's observe of each backend alone (in this
  process: one `lvs` of the VG; one directory scan, `/proc/locks` and a header read per
  file), and a whole `reconciler plan` process over all of them (must plan no change).
- then `reconciler destroy` of everything (deletionPolicy: Delete), timed.

Figures are medians with min and max. With `--write FILE` only the part of FILE between
`<!-- volumes:begin -->` and `<!-- volumes:end -->` is replaced.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import _section
from benchmarks._section import log, run, spread_ms
from benchmarks._section import timed_cli as cli
from reconciler.drivers.storage._lvm2 import has_device_mapper

BEGIN = "<!-- volumes:begin -->"
END = "<!-- volumes:end -->"
ROOT = Path("/var/lib/reconciler/bench")
REPO = Path(__file__).resolve().parents[1]


class LoopVg:
    """A VG on a loop device over a sparse file, seen by lvm alone through a filter."""

    def __init__(self, root: Path, size_gib: int):
        self.name = "rcbvol" + secrets.token_hex(3)
        self.backing = root / f"{self.name}.img"
        with open(self.backing, "wb") as f:
            f.truncate(size_gib * 1024**3)
        self.loop = run("losetup", "--find", "--show", str(self.backing)).stdout.strip()
        accept = f'["a|^{self.loop}$|","r|.*|"]'
        self.config = (f"devices{{filter={accept} global_filter={accept} use_devicesfile=0 hints=\"none\" "
                       "obtain_device_list_from_udev=0} backup{backup=0 archive=0}")
        if not has_device_mapper():
            self.config += " global{activation=0}"
        # 500 LVs with their tags need more than the default 1 MiB of metadata space
        run("pvcreate", "--config", self.config, "--metadatasize", "32m", self.loop)
        run("vgcreate", "--config", self.config, self.name, self.loop)

    def remove(self) -> None:
        run("vgremove", "--config", self.config, "-f", self.name, check=False)
        run("pvremove", "--config", self.config, "-f", self.loop, check=False)
        run("losetup", "-d", self.loop, check=False)
        self.backing.unlink(missing_ok=True)
        for leftover in (*Path("/etc/lvm/archive").glob(f"{self.name}_*.vg"), Path("/etc/lvm/backup", self.name)):
            leftover.unlink(missing_ok=True)  # this VG's own metadata copies, if lvm kept any


def manifests(folder: Path, tenant: str, n: int) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    docs: list[dict[str, Any]] = [{"apiVersion": "reconciler/v1", "kind": "Tenant",
                                   "metadata": {"name": tenant}, "spec": {}}]
    for backend in ("vg", "files"):
        for i in range(n):
            docs.append({"apiVersion": "reconciler/v1", "kind": "Volume",
                         "metadata": {"name": f"{backend}-{i:04d}", "tenant": tenant},
                         "spec": {"sizeGiB": 1, "backend": backend, "deletionPolicy": "Delete"}})
    (folder / "volumes.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def measure(n: int, repeat: int) -> dict[str, Any]:
    from reconciler.drivers.storage import FileBackend, Lvm2, LvmBackend, StorageDriver
    from reconciler.drivers.registry import home_of
    from reconciler.hostconfig import load_host_config

    ROOT.mkdir(parents=True, exist_ok=True)
    tenant = "rcbvol" + secrets.token_hex(3)
    work = ROOT / tenant
    work.mkdir()
    vg = LoopVg(work, size_gib=n + 64)
    try:
        config = work / "host.yaml"
        drivers = {k: "memory" for k in ("Tenant", "Network", "Router", "SecurityGroup", "Image", "Instance",
                                         "Bucket")}
        drivers["Volume"] = "storage"
        config.write_text(yaml.safe_dump({
            "stateDir": str(work / "state"),
            "drivers": drivers,
            "volumeBackends": {
                "files": {"driver": "file", "path": str(work / "pool"), "default": True, "overcommit": 20},
                "vg": {"driver": "lvm", "vg": vg.name, "lvmConfig": vg.config},
            },
        }))
        folder = manifests(work / "manifests", tenant, n)
        log(f"apply: {n} LVs in {vg.name} and {n} qcow2 files")
        apply_s, result = cli(config, "apply", str(folder), "--yes", "--parallelism", "8")
        if result.returncode != 0:
            raise RuntimeError(f"apply failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        lvs = run("lvs", "--config", vg.config, "--noheadings", "-o", "lv_name", vg.name).stdout.split()
        files = list((work / "pool").glob("*.qcow2"))
        assert len(lvs) == n and len(files) == n, (len(lvs), len(files))

        host = load_host_config(config)
        home = home_of(host)
        lvm_driver = StorageDriver({"vg": LvmBackend("vg", vg.name, home, Lvm2(extra_config=vg.config))}, "vg")
        file_driver = StorageDriver({"files": FileBackend("files", work / "pool", home)}, "files")
        observe_lvm, observe_files, plan_s = [], [], []
        for i in range(repeat):
            for driver, out in ((lvm_driver, observe_lvm), (file_driver, observe_files)):
                started = time.perf_counter()
                seen = driver.observe()
                out.append(time.perf_counter() - started)
                assert len(seen.owned) == n, len(seen.owned)
            took, result = cli(config, "plan", str(folder), "--detailed-exitcode")
            if result.returncode != 0:
                raise RuntimeError(f"the no-op plan planned changes or failed:\n{result.stdout[-2000:]}")
            plan_s.append(took)
            log(f"repeat {i + 1}: observe lvm {observe_lvm[-1] * 1000:.0f} ms, files "
                f"{observe_files[-1] * 1000:.0f} ms, plan process {took:.2f} s")
        log("destroy")
        destroy_s, result = cli(config, "destroy", str(folder), "--yes", "--parallelism", "8")
        if result.returncode != 0:
            raise RuntimeError(f"destroy failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        left = run("lvs", "--config", vg.config, "--noheadings", "-o", "lv_name", vg.name).stdout.split()
        assert left == [] and list((work / "pool").glob("*")) == [], (left, list((work / "pool").glob("*")))
        lvm_version = run("lvm", "version").stdout.splitlines()[0].split(":", 1)[1].strip()
        return {"n": n, "apply": apply_s, "destroy": destroy_s, "observe_lvm": observe_lvm,
                "observe_files": observe_files, "plan": plan_s, "lvm": lvm_version,
                "dm": has_device_mapper()}
    finally:
        vg.remove()
        shutil.rmtree(work, ignore_errors=True)


def machine(r: dict[str, Any]) -> dict[str, str]:
    from benchmarks.plan import machine as planner_machine

    info = planner_machine()
    info.pop("libraries", None)
    dm = "yes" if r["dm"] else "no: lvm2 ran with activation disabled (metadata only), as in CI"
    qemu_img = run("qemu-img", "--version", check=False).stdout.splitlines()[:1]
    info["storage tools"] = f"lvm {r['lvm']}; {qemu_img[0] if qemu_img else 'qemu-img ?'}; device-mapper: {dm}"
    return info


def report(r: dict[str, Any], command: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n = r["n"]
    return "\n".join([
        BEGIN,
        "## Volumes on the storage driver (LVM and qcow2 files)",
        "",
        "Generated by `benchmarks/volumes.py`; a measurement, never a test. It rewrites only the part "
        "of this file between its markers.",
        "",
        "### How to reproduce",
        "",
        "From the project root, as root, with lvm2 and qemu-utils (`scripts/setup-storage.sh`, part of "
        "`make services`):",
        "",
        *_section.reproduce(command, now, machine(r)),
        "",
        "The LVs live in a throwaway volume group on a loop device over a sparse file; the files "
        "in a directory of the root filesystem (ext4).",
        "",
        f"### Observe and plan with {n} LVs and {n} qcow2 files",
        "",
        "| what | median | min | max |",
        "|---|---|---|---|",
        f"| observe {n} LVs (one `lvs` of the volume group) | {spread_ms(r['observe_lvm'])} |",
        f"| observe {n} qcow2 files (one scan, `/proc/locks`, a header read each) | {spread_ms(r['observe_files'])} |",
        f"| whole `reconciler plan` process, {2 * n} volumes, no change | {spread_ms(r['plan'])} |",
        "",
        f"Apply of all {2 * n} from scratch: {r['apply']:.1f} s (the LVs one at a time: one lvm2 writer "
        f"per volume group; each `lvcreate` commits the VG metadata); destroy of all: {r['destroy']:.1f} s.",
        END,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("lvm") is None or shutil.which("qemu-img") is None:
        print("benchmarks.volumes needs root, lvm2 and qemu-utils (scripts/setup-storage.sh)", file=sys.stderr)
        return 2
    results = measure(args.volumes, args.repeat)
    command = "python -m benchmarks.volumes " + " ".join(
        a for a in [f"--volumes {args.volumes}", f"--repeat {args.repeat}",
                    f"--write {args.write}" if args.write else ""] if a)
    section = report(results, command)
    print(section)
    if args.write:
        _section.write_section(args.write, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
