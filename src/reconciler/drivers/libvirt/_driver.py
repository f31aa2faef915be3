"""The libvirt driver: Instance as a QEMU/KVM domain, Image as a registered image file.

Layout on the host (directories readable by libvirt's QEMU, files private)::

    IMAGE_DIR/rc-<hash>-<sha12>.<fmt>     a registered image (never changed once there)
    IMAGE_DIR/rc-<hash>-<sha12>.json      its mark: key, spec, sha256 (the ownership mark)
    INSTANCE_DIR/<domain>/owner.json       the folder's mark: key and installation (written first)
    INSTANCE_DIR/<domain>/root.qcow2       the root disk: a qcow2 overlay on the image
    INSTANCE_DIR/<domain>/seed.iso         the NoCloud seed (0600: it holds user-data)
    INSTANCE_DIR/<domain>/seed.json        what the seed was built from (0600)
    INSTANCE_DIR/<domain>/console.log      the serial console

A domain is ours when its <metadata> carries our element (see `_config`); observe is
one `listAllDomains` plus each domain's XML, and one listing of INSTANCE_DIR (a folder
with an instance's name, no domain and no mark of ours is in the way of that instance).
Secrets (userData) never go into the domain XML: the mark there holds their SHA-256,
and observe restores them from seed.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid as uuidlib
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from reconciler import diskimage, faults
from reconciler.drivers.libvirt._config import (
    DiskConfig,
    DomainConfig,
    InterfaceConfig,
    NS,
    OwnerMetadata,
    XMLParseError,
)
from reconciler.drivers.libvirt._host import Host, libvirt, translated
from reconciler.drivers.libvirt._probe import DomainType, choose_domain_type
from reconciler.drivers.libvirt._seed import NicSeed, SeedData, write_seed_iso
from reconciler.drivers.libvirt._watch import LibvirtWatch, start_watch
from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from reconciler.fileio import read_json_object, write_atomic
from reconciler.models import Key, UpdatePolicy
from reconciler.models.network import NetworkSpec, gateway_of
from reconciler.naming import host_name, mac_address, tap_name
from reconciler.state import FieldDiff, HostEvent, Mark, Observation, Observed, Target, Unowned

GIB = 1024**3
SENSITIVE_FIELDS = ("userData",)
REDACTED = "sha256:"
ROOT_TARGET = "vda"
SEED_TARGET = "hdc"
MAX_ROOT_GIB = 65536
OWNER_FILE = "owner.json"


@dataclasses.dataclass(frozen=True)
class LibvirtSettings:
    uri: str = "qemu:///system"
    domain_type: str = "auto"  # auto | kvm | qemu
    image_dir: Path = Path("/var/lib/reconciler/libvirt/images")
    instance_dir: Path = Path("/var/lib/reconciler/libvirt/instances")
    probe_image: Path = Path("/var/lib/reconciler/images/tiny.qcow2")
    shutdown_timeout_s: float = 60.0
    max_parallel: int = 8


class LibvirtDriver:
    """Realises Image and Instance through libvirt (see the module docstring)."""

    name = "libvirt"
    kinds = ("Image", "Instance")

    def __init__(
        self,
        settings: LibvirtSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.max_parallel = settings.max_parallel
        self.host = Host(settings.uri)
        self.sleep = sleep
        self.clock = clock
        self._domain_type: DomainType | None = None
        self._type_lock = threading.Lock()
        self._image_lock = threading.Lock()
        #: instance folders being filled by a create in this process, not yet defined (under
        #: _image_lock): not leftovers (see `_sweep_unfinished`)
        self._creating: set[str] = set()

    # --- reading ---------------------------------------------------------------------

    def observe(self) -> Observation:
        result = Observation()
        result.extend(self._observe_images())
        result.extend(self._observe_instances())
        return result

    def host_name(self, key: Key) -> str:
        return host_name(key)

    def watch(self, notify: Callable[[HostEvent], None]) -> LibvirtWatch:
        """Report lifecycle and device events of our domains as they happen (see
        `_watch`): from libvirt's event thread, until the returned watch's `close()`."""
        return start_watch(self.settings.uri, self.name, notify)

    def describe(self) -> dict[str, str]:
        """For `reconciler status`: where it connects and which domain type it uses."""
        chosen = self.domain_type()
        return {"uri": self.settings.uri, "domainType": chosen.type, "why": chosen.reason}

    def domain_type(self) -> DomainType:
        """kvm or qemu, decided once per driver (the probe itself is cached on disk)."""
        with self._type_lock:
            if self._domain_type is None:
                self._domain_type = choose_domain_type(
                    self.host,
                    self.settings.domain_type,
                    self.settings.instance_dir.parent / "domain-type.json",
                    self.settings.probe_image,
                    self.settings.instance_dir,
                )
            return self._domain_type

    def _observe_instances(self) -> Observation:
        result = Observation()
        conn = self.host.conn()
        with translated("listing domains"):
            domains = conn.listAllDomains(0)
        names: set[str] = set()
        for dom in domains:
            try:
                with translated("reading a domain"):
                    name = dom.name()
                    names.add(name)
                    cfg = DomainConfig.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                    state = dom.state()[0]
                    live = DomainConfig.parse(dom.XMLDesc(0)) if dom.isActive() else None
            except NotFound:
                continue  # undefined while we listed
            except XMLParseError as exc:
                result.unowned.append(Unowned("Instance", "?", f"unreadable domain XML: {exc}"))
                continue
            if cfg.owner is None or cfg.owner.mark.get("kind") != "Instance":
                result.unowned.append(Unowned("Instance", name, f"domain {name} has no reconciler mark"))
                continue
            if not self._home(cfg):
                result.unowned.append(Unowned(
                    "Instance", name, f"domain {name} is managed by another reconciler "
                    f"installation (instance dir {cfg.owner.home})"))
                continue
            try:
                result.owned.append(self._instance_observed(cfg, live, state, dom))
            except (KeyError, TypeError, ValueError) as exc:
                result.unowned.append(Unowned("Instance", name, f"domain {name}: unreadable mark: {exc}"))
        result.unowned.extend(self._folders_in_the_way(names))
        return result

    def _folders_in_the_way(self, domains: set[str]) -> list[Unowned]:
        """Folders of INSTANCE_DIR with an instance's name (`rc-<hash>`), no domain and
        no mark of ours: someone else's (a create's leftover carries our mark)."""
        folder = self.settings.instance_dir
        if not folder.is_dir():
            return []
        out = []
        for entry in sorted(folder.iterdir()):
            if entry.name in domains or not _OUR_NAME.fullmatch(entry.name) or not entry.is_dir():
                continue
            owner = folder_owner(entry)
            if owner is None or owner[1] != self._home_dir():
                out.append(Unowned("Instance", entry.name, f"folder {entry} exists (no domain) without our mark"))
        return out

    def _instance_observed(self, cfg: DomainConfig, live: DomainConfig | None, state: int, dom=None) -> Observed:
        assert cfg.owner is not None
        seed = self._seed_json(cfg.name)
        mark = _restore_mark(Mark.from_dict(cfg.owner.mark), seed)
        stored = dict(cfg.owner.spec)
        for name in SENSITIVE_FIELDS:
            if _is_redacted(stored.get(name)):
                stored[name] = _unredact(stored[name], seed.get(name) if seed else None)
        spec = dict(stored)
        spec["vcpus"] = cfg.vcpus
        spec["memoryMiB"] = cfg.memory_kib // 1024
        spec["powerState"] = _power_state(state)
        root = cfg.disk(ROOT_TARGET)
        header = diskimage.read_qcow2_header(Path(root.source)) if root is not None else None
        spec["rootDiskGiB"] = -(-header.virtual_size // GIB) if header else 0
        key = mark.key
        # NICs are matched by their stable MAC; one we did not put there shows as unknown
        macs = {i.mac: i for i in cfg.interfaces}
        nics = []
        for nic in stored.get("networks") or []:
            if mac_address(key.tenant, key.name, nic["network"]) in macs:
                nics.append(nic)
                macs.pop(mac_address(key.tenant, key.name, nic["network"]))
        for mac, iface in macs.items():
            nics.append({"network": f"(unknown NIC {mac} on {iface.bridge})", "ip": None,
                         "securityGroups": []})
        spec["networks"] = nics
        # volumes are matched by their disk serial (the volume's host name)
        serials = {d.serial: d for d in cfg.disks if d.device == "disk" and d.target != ROOT_TARGET}
        vols = []
        sizes: dict[str, int] = {}
        live_disks = _volume_disks(live) if live is not None else {}
        for att in stored.get("volumes") or []:
            serial = _volume_serial(key.tenant, att["volume"])
            disk = serials.pop(serial, None)
            if disk is not None:
                vols.append({**att, "device": disk.target if att.get("device") else None})
                size = _disk_size(dom, live_disks.get(serial), disk)
                if size is not None:
                    sizes[att["volume"]] = -(-size // GIB)
        for serial, disk in serials.items():
            vols.append({"volume": f"(unknown disk {serial or disk.source})", "device": disk.target})
        spec["volumes"] = vols
        host = {
            "domain": cfg.name,
            "state": _STATE_NAMES.get(state, str(state)),
            "domainType": cfg.domain_type,
        }
        live_limits: dict[str, int] = {"rootDiskGiB": MAX_ROOT_GIB}
        if live is not None:
            pending = []
            if live.vcpus != cfg.vcpus:
                pending.append(f"vcpus {live.vcpus}->{cfg.vcpus}")
            if live.memory_kib < cfg.memory_kib:  # above what it booted with: needs a restart
                pending.append(f"memoryMiB {live.memory_kib // 1024}->{cfg.memory_kib // 1024}")
            if pending:
                host["pending"] = ", ".join(pending) + " (applies at restart)"
            if live.memballoon:
                live_limits["memoryMiB"] = live.memory_kib // 1024
        derived = {"volumeGiB": sizes} if sizes else {}
        return Observed(key, cfg.uuid or cfg.name, spec, mark, host, live_limits, derived=derived)

    def _observe_images(self) -> Observation:
        result = Observation()
        folder = self.settings.image_dir
        if not folder.is_dir():
            return result
        for meta in sorted(folder.glob("rc-*.json")):
            data = read_json_object(meta)
            if data is None or data.get("retired"):
                continue
            try:
                mark = Mark.from_dict(data["mark"])
            except (KeyError, TypeError):
                result.unowned.append(Unowned("Image", meta.stem.rsplit("-", 1)[0], f"{meta}: no mark"))
                continue
            spec = dict(data.get("spec") or {})
            image = folder / data.get("file", "")
            drift = () if data.get("file") and image.exists() else (f"registered file {image} is missing",)
            result.owned.append(Observed(mark.key, meta.stem, spec, mark,
                                         {"image": str(image), "format": str(data.get("format", ""))},
                                         drift=drift))
        known = {m.stem for m in folder.glob("rc-*.json")}
        for path in sorted(folder.glob("rc-*")):
            if path.suffix != ".json" and path.name.split(".", 1)[0] not in known:
                base = "-".join(path.name.split(".", 1)[0].split("-")[:2])
                result.unowned.append(Unowned("Image", base, f"{path} has no reconciler mark"))
        return result

    # --- acting ----------------------------------------------------------------------

    def create(self, target: Target) -> Observed:
        if target.key.kind == "Image":
            return self._create_image(target)
        return self._create_instance(target)

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        if target.key.kind == "Image":
            return self._update_image(target, observed)
        return self._update_instance(target, observed, diffs)

    def delete(self, observed: Observed) -> None:
        if observed.key.kind == "Image":
            self._delete_image(observed)
        else:
            self._delete_instance(observed)

    def orphan(self, observed: Observed) -> Observed:
        mark = dataclasses.replace(observed.mark, orphaned=True)
        if observed.key.kind == "Image":
            meta = self.settings.image_dir / f"{observed.identity}.json"
            data = read_json_object(meta)
            if data is None:
                raise NotFound(f"{observed.key.display}: {meta} is gone")
            data["mark"] = mark.to_dict()
            _write_json(meta, data, mode=0o644)
        else:
            dom = self._domain(observed)
            cfg = self._ours(dom, observed.key)
            assert cfg.owner is not None
            owner = OwnerMetadata(_redact_mark(mark), cfg.owner.spec, self._home_dir())
            with translated(f"flagging {observed.key.display} orphaned"):
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, owner.to_metadata_xml(), "rc",
                                NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return dataclasses.replace(observed, mark=mark)

    def adopt(self, unowned_name: str, target: Target) -> Observed:
        """Put our mark on an existing domain (``reconciler import``); nothing else changes."""
        if target.key.kind != "Instance":
            raise PermanentError(f"{target.key.kind} cannot be imported by the libvirt driver")
        conn = self.host.conn()
        with translated(f"looking up domain {unowned_name}"):
            dom = conn.lookupByName(unowned_name)
            cfg = DomainConfig.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if cfg.owner is not None:
            raise Conflict(f"domain {unowned_name} already carries a reconciler mark")
        stored = _redact_spec(dict(target.spec))
        owner = OwnerMetadata(_redact_mark(target.mark), stored, self._home_dir())
        with translated(f"marking domain {unowned_name}"):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, owner.to_metadata_xml(), "rc",
                            NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        return self._observe_domain(dom)

    # --- images ----------------------------------------------------------------------

    def _create_image(self, target: Target) -> Observed:
        spec = target.spec
        source = Path(spec["source"])
        if not source.is_file():
            raise PermanentError(f"{target.key.display}: image source {source} does not exist")
        folder = self.settings.image_dir
        _make_dirs(folder)
        fmt, _size = diskimage.image_info(source)
        if fmt != spec.get("format", "qcow2"):
            raise PermanentError(
                f"{target.key.display}: {source} is a {fmt} image but format says {spec.get('format')}"
            )
        base = self.host_name(target.key)
        sha = _sha256_of(source)  # the mark's name holds the checksum, and the mark goes first
        if spec.get("sha256") and spec["sha256"] != sha:
            raise PermanentError(
                f"{target.key.display}: checksum mismatch for {source}: expected "
                f"{spec['sha256']}, got {sha}"
            )
        stem = f"{base}-{sha[:12]}"
        meta = folder / f"{stem}.json"
        if meta.exists() and not (read_json_object(meta) or {}).get("retired"):
            data = read_json_object(meta) or {}
            if _mark_key(data) != target.key:
                raise Conflict(f"{meta} belongs to another resource")
        final = folder / f"{stem}.{fmt}"
        if final.exists() and not (meta.exists() and _mark_key(read_json_object(meta) or {}) == target.key):
            raise Conflict(f"{target.key.display}: {final} exists and is not ours; not touching it")
        # the mark first, then the file: a crash in between leaves a mark whose file is
        # missing (drift: the next update copies it), never an unmarked file in the way
        _write_json(meta, {"mark": target.mark.to_dict(), "spec": dict(spec), "file": final.name,
                           "format": fmt, "sha256": sha}, mode=0o644)
        faults.point("libvirt.image-marked")
        _copy_image(source, final, sha, target.key, meta)
        return Observed(target.key, stem, dict(spec), target.mark, {"image": str(final), "format": fmt})

    def _update_image(self, target: Target, observed: Observed) -> Observed:
        meta = self.settings.image_dir / f"{observed.identity}.json"
        data = read_json_object(meta)
        if data is None:
            raise NotFound(f"{observed.key.display}: {meta} is gone")
        if _mark_key(data) != observed.key:
            raise Conflict(f"{meta} is no longer ours")
        data["mark"] = target.mark.to_dict()
        data["spec"] = dict(target.spec)
        _write_json(meta, data, mode=0o644)
        image = self.settings.image_dir / str(data.get("file", ""))
        if data.get("file") and data.get("sha256") and not image.exists():
            # a create killed after the mark, before its file was in place
            _copy_image(Path(target.spec["source"]), image, str(data["sha256"]), target.key, meta)
        return Observed(target.key, observed.identity, dict(target.spec), target.mark, observed.host)

    def _delete_image(self, observed: Observed) -> None:
        folder = self.settings.image_dir
        meta = folder / f"{observed.identity}.json"
        with self._image_lock:
            self._sweep_unfinished()  # a leftover folder is no user of the image
            data = read_json_object(meta)
            if data is None:
                return
            if _mark_key(data) != observed.key:
                raise Conflict(f"{meta} is no longer ours; not touching it")
            image = folder / str(data.get("file", ""))
            if data.get("file") and image.exists() and self._image_users(image):
                # root disks still read from it: keep the file, drop it from what we own,
                # and remove it once the last instance on it is gone
                data["retired"] = True
                _write_json(meta, data, mode=0o644)
            else:
                if data.get("file"):
                    image.unlink(missing_ok=True)
                    _partial(image).unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
            self._collect_retired()

    def _image_users(self, image: Path) -> list[str]:
        users = []
        folder = self.settings.instance_dir
        if folder.is_dir():
            for root in folder.glob("*/root.qcow2"):
                header = diskimage.read_qcow2_header(root)
                if header and header.backing_file and Path(header.backing_file) == image:
                    users.append(root.parent.name)
        return users

    def _sweep_unfinished(self) -> None:
        """Remove the folders of this installation's instances that have no domain and
        are not being created: left by a create killed before define, or a delete killed
        between undefine and removing the folder; and the `.tmp-<name>` of a claim or
        removal killed half way (see `claim_folder`). Nothing else would ever remove them
        (no domain: nothing observed), and their root disks would keep their image
        retired for ever. Call under _image_lock."""
        folder = self.settings.instance_dir
        if not folder.is_dir():
            return
        for entry in sorted(folder.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            if entry.name.startswith(".tmp-rc-"):  # a claim or removal killed half way
                if entry.name[len(".tmp-"):] not in self._creating:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            owner = folder_owner(entry)
            if (entry.name not in self._creating and owner is not None and owner[1] == self._home_dir()
                    and self._lookup(entry.name) is None):
                discard_folder(entry)

    def _collect_retired(self) -> None:
        self._sweep_unfinished()
        for meta in self.settings.image_dir.glob("rc-*.json"):
            data = read_json_object(meta)
            if data and data.get("retired"):
                image = self.settings.image_dir / str(data.get("file", ""))
                if not data.get("file") or not self._image_users(image):
                    if data.get("file"):
                        image.unlink(missing_ok=True)
                    meta.unlink(missing_ok=True)

    def _image_file(self, tenant: str, name: str, related: Mapping[Key, Observed]) -> tuple[Path, str]:
        key = Key("Image", tenant, name)
        obs = related.get(key)
        if obs is None:
            candidates = [o for o in self._observe_images().owned if o.key == key]
            if not candidates:
                raise PermanentError(f"image {tenant}/{name} is not registered on this host")
            obs = max(candidates, key=lambda o: Path(o.host.get("image", "")).stat().st_mtime
                      if Path(o.host.get("image", "")).exists() else 0)
        path = Path(obs.host.get("image", ""))
        if not path.is_file():
            raise PermanentError(f"image {tenant}/{name}: file {path} is missing")
        return path, obs.host.get("format", "qcow2")

    # --- instances -------------------------------------------------------------------

    def _create_instance(self, target: Target) -> Observed:
        key, spec = target.key, target.spec
        name = self.host_name(key)
        conn = self.host.conn()
        existing = self._lookup(name)
        if existing is not None:
            self._ours(existing, key)
            # ours from an interrupted run: bring it to the target instead of a duplicate
            observed = self._observe_domain(existing)
            return self._update_instance(target, observed, ())
        image, image_format = self._image_file(key.tenant, spec["image"], target.related)
        directory = self.settings.instance_dir / name
        with self._image_lock:
            self._creating.add(name)
        try:
            claim_folder(directory, key, self._home_dir())
            diskimage.create_overlay(directory / "root.qcow2", image, image_format, int(spec["rootDiskGiB"]))
            self._write_seed(directory, key, spec, target.related, instance_id=str(uuidlib.uuid4()))
            config = self._domain_config(target, uuid=None)
            faults.point("libvirt.before-define")
            with translated(f"defining domain {name}"):
                dom = conn.defineXML(config.to_xml())
        finally:
            with self._image_lock:
                self._creating.discard(name)
        faults.point("libvirt.after-define")
        if spec.get("powerState", "running") == "running":
            self._start(dom, key)
        return self._observe_domain(dom)

    def _update_instance(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        key, spec = target.key, target.spec
        dom = self._domain(observed)
        old = self._ours(dom, key)
        name = old.name
        directory = self.settings.instance_dir / name
        running = self._active(dom)
        _make_dirs(directory)
        old_root = old.disk(ROOT_TARGET)
        # an imported domain keeps its own name and root disk
        root = Path(old_root.source) if old_root is not None else directory / "root.qcow2"
        new = self._domain_config(target, uuid=old.uuid, name=name, root=root,
                                  root_format=old_root.format if old_root is not None else "qcow2")
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if running:
            # hot-plug NICs and volumes (the persistent config follows by defineXML below)
            old_nics = {i.mac: i for i in DomainConfig.parse(dom.XMLDesc(0)).interfaces}
            new_nics = {i.mac: i for i in new.interfaces}
            old_disks = _volume_disks(DomainConfig.parse(dom.XMLDesc(0)))
            new_disks = _volume_disks(new)
            with translated(f"hot-plugging devices of {key.display}"):
                for mac in old_nics.keys() - new_nics.keys():
                    dom.detachDeviceFlags(old_nics[mac].to_xml(), flags)
                for serial in old_disks.keys() - new_disks.keys():
                    dom.detachDeviceFlags(old_disks[serial].to_xml(), flags)
                for mac in new_nics.keys() - old_nics.keys():
                    dom.attachDeviceFlags(new_nics[mac].to_xml(), flags)
                for serial in new_disks.keys() - old_disks.keys():
                    dom.attachDeviceFlags(new_disks[serial].to_xml(), flags)
        if running:
            self._grow_volumes(dom, key, target.derived.get("volumeGiB") or {})
        header = diskimage.read_qcow2_header(root)
        want = int(spec["rootDiskGiB"]) * GIB
        if header is not None and want > header.virtual_size:
            if running:
                with translated(f"growing the root disk of {key.display}"):
                    dom.blockResize(ROOT_TARGET, want, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            else:
                diskimage.resize(root, int(spec["rootDiskGiB"]))
        if running and any(d.path == ("memoryMiB",) and d.policy is UpdatePolicy.IN_PLACE for d in diffs):
            with translated(f"changing the memory of {key.display} live"):
                dom.setMemoryFlags(int(spec["memoryMiB"]) * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        self._write_seed(directory, key, spec, target.related, instance_id=self._instance_id(directory))
        with translated(f"redefining domain {name}"):
            dom = self.host.conn().defineXML(new.to_xml())
        want_running = spec.get("powerState", "running") == "running"
        if running and not want_running:
            self._shutdown(dom, key)
        elif not running and want_running:
            self._start(dom, key)
        elif running and spec.get("restartPolicy") == "Allowed" and self._pending(dom):
            self._shutdown(dom, key)
            self._start(dom, key)
        return self._observe_domain(dom)

    def _grow_volumes(self, dom, key: Key, sizes: Mapping[str, int]) -> None:
        """Volumes that grew while attached to this running guest: the hypervisor resizes
        them (a qcow2 file it holds open can be grown by nobody else; a grown LV needs
        the guest told), and the guest sees the new size at once."""
        with translated(f"reading the disks of {key.display}"):
            disks = _volume_disks(DomainConfig.parse(dom.XMLDesc(0)))
        for volume, size_gib in sorted(sizes.items()):
            disk = disks.get(_volume_serial(key.tenant, volume))
            if disk is None:
                continue
            want = int(size_gib) * GIB
            with translated(f"growing volume {key.tenant}/{volume} in {key.display}"):
                capacity = dom.blockInfo(disk.target)[0]
                if capacity < want:
                    dom.blockResize(disk.target, want, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    def _delete_instance(self, observed: Observed) -> None:
        try:
            dom = self._domain(observed)
        except NotFound:
            dom = None
        if dom is not None:
            cfg = self._ours(dom, observed.key)
            if self._active(dom):
                self._shutdown(dom, observed.key)
            with translated(f"undefining {observed.key.display}"):
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                )
            faults.point("libvirt.after-undefine")
            name = cfg.name
        else:
            name = self.host_name(observed.key)
        discard_folder(self.settings.instance_dir / name)
        with self._image_lock:
            self._collect_retired()

    # --- instance helpers ------------------------------------------------------------

    def _domain_config(self, target: Target, uuid: str | None, name: str | None = None,
                       root: Path | None = None, root_format: str = "qcow2") -> DomainConfig:
        key, spec = target.key, target.spec
        name = name or self.host_name(key)
        directory = self.settings.instance_dir / name
        dtype = self.domain_type().type
        disks = [
            DiskConfig(str(root or directory / "root.qcow2"), ROOT_TARGET, root_format),
            DiskConfig(str(directory / "seed.iso"), SEED_TARGET, "raw", device="cdrom", bus="ide",
                       readonly=True),
        ]
        used = {ROOT_TARGET}
        wanted = [a.get("device") for a in spec.get("volumes") or [] if a.get("device")]
        for att in spec.get("volumes") or []:
            vol_key = Key("Volume", key.tenant, att["volume"])
            vol = target.related.get(vol_key)
            path = vol.host.get("path") if vol is not None else None
            if not path:
                driver = vol.host.get("driver", "?") if vol is not None else "none"
                raise PermanentError(
                    f"{key.display}: volume {key.tenant}/{att['volume']} has no device path on "
                    f"this host (its driver: {driver})"
                )
            device = att.get("device") or _next_device(used | set(wanted))
            used.add(device)
            disks.append(DiskConfig(
                path, device, vol.host.get("format", "raw"), serial=_volume_serial(key.tenant, att["volume"]),
                block=vol.host.get("block") == "true", shareable=bool(vol.spec.get("multiattach")),
            ))
        nics = []
        for nic in spec.get("networks") or []:
            bridge = _bridge_of(key.tenant, nic["network"], target.related)
            nics.append(InterfaceConfig(mac_address(key.tenant, key.name, nic["network"]), bridge,
                                        mtu=_bridge_mtu(bridge),
                                        target=tap_name(key.tenant, key.name, nic["network"])))
        stored = _redact_spec(dict(spec))
        return DomainConfig(
            name=name,
            domain_type=dtype,
            uuid=uuid,
            title=f"{key.tenant}/{key.name}",
            description=f"Instance {key.tenant}/{key.name}, managed by reconciler: change it in "
            "the manifests, not here.",
            memory_kib=int(spec["memoryMiB"]) * 1024,
            vcpus=int(spec["vcpus"]),
            cpu_model="qemu64" if dtype == "qemu" else None,
            disks=disks,
            interfaces=nics,
            console_log=str(directory / "console.log"),
            owner=OwnerMetadata(_redact_mark(target.mark), stored, self._home_dir()),
        )

    def _write_seed(self, directory: Path, key: Key, spec: Mapping[str, Any],
                    related: Mapping[Key, Observed], instance_id: str) -> None:
        nics = []
        for i, nic in enumerate(spec.get("networks") or []):
            address, gateway, dns = None, None, ()
            if nic.get("ip"):
                # with DHCP on its subnet the guest asks, and gets its reservation; else static
                address, gateway, dns, dhcp = _static_address(key, i, nic, related)
                if dhcp:
                    address, gateway, dns = None, None, ()
            bridge = _bridge_of(key.tenant, nic["network"], related)
            nics.append(NicSeed(mac_address(key.tenant, key.name, nic["network"]), address,
                                gateway if not nics else None, _bridge_mtu(bridge), dns))
        seed = SeedData(
            instance_id=instance_id,
            hostname=key.name,
            nics=tuple(nics),
            user_data=spec.get("userData"),
            ssh_authorized_keys=tuple(spec.get("sshAuthorizedKeys") or ()),
        )
        text = seed.to_json()
        sidecar = directory / "seed.json"
        if sidecar.exists() and (directory / "seed.iso").exists() and sidecar.read_text() == text:
            return  # unchanged: keep the ISO (the guest may have it open)
        write_seed_iso(directory / "seed.iso", seed)
        write_atomic(sidecar, text, 0o600)

    def _instance_id(self, directory: Path) -> str:
        data = read_json_object(directory / "seed.json") or {}
        return str(data.get("instance_id") or uuidlib.uuid4())

    def _seed_json(self, domain_name: str) -> dict[str, Any] | None:
        data = read_json_object(self.settings.instance_dir / domain_name / "seed.json")
        if data is None:
            return None
        return {"userData": data.get("user_data")}

    def _lookup(self, name: str):
        conn = self.host.conn()
        try:
            with translated(f"looking up domain {name}"):
                return conn.lookupByName(name)
        except NotFound:
            return None

    def _domain(self, observed: Observed):
        conn = self.host.conn()
        with translated(f"looking up {observed.key.display}"):
            try:
                return conn.lookupByUUIDString(observed.identity)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise NotFound(f"{observed.key.display}: domain {observed.identity} is gone") from None
                raise

    def _ours(self, dom, key: Key) -> DomainConfig:
        with translated(f"reading {key.display}"):
            cfg = DomainConfig.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if cfg.owner is None:
            problem = ("has no reconciler mark (remove it, or adopt it with "
                       f"`reconciler import {key} {cfg.name} -m MANIFESTS`)")
        elif Mark.from_dict(cfg.owner.mark).key != key:
            problem = f"belongs to {Mark.from_dict(cfg.owner.mark).key.display}"
        elif not self._home(cfg):
            problem = f"is managed by another reconciler installation (instance dir {cfg.owner.home})"
        else:
            return cfg
        raise Conflict(f"{key.display}: domain {cfg.name} {problem}; not touching it")

    def _home_dir(self) -> str:
        return str(self.settings.instance_dir)

    def _home(self, cfg: DomainConfig) -> bool:
        """Whether a marked domain belongs to this installation (this instance dir)."""
        return cfg.owner is not None and cfg.owner.home == self._home_dir()

    def _observe_domain(self, dom) -> Observed:
        with translated("reading a domain"):
            cfg = DomainConfig.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            state = dom.state()[0]
            live = DomainConfig.parse(dom.XMLDesc(0)) if dom.isActive() else None
        return self._instance_observed(cfg, live, state, dom)

    def _active(self, dom) -> bool:
        with translated("reading domain state"):
            return bool(dom.isActive())

    def _pending(self, dom) -> bool:
        with translated("reading domain XML"):
            cfg = DomainConfig.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            live = DomainConfig.parse(dom.XMLDesc(0))
        # memory below the boot maximum was applied live (balloon); above it needs a restart
        return live.vcpus != cfg.vcpus or live.memory_kib < cfg.memory_kib

    def _start(self, dom, key: Key) -> None:
        for nic in DomainConfig.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).interfaces:
            if not Path("/sys/class/net", nic.bridge).exists():
                raise TransientError(f"{key.display}: bridge {nic.bridge} does not exist (yet)")
        with translated(f"starting {key.display}"):
            dom.create()

    def _shutdown(self, dom, key: Key) -> None:
        """Graceful (ACPI) shutdown; forced off when it has not stopped in time."""
        with translated(f"shutting down {key.display}"):
            deadline = self.clock() + self.settings.shutdown_timeout_s
            next_press = self.clock()
            while dom.isActive() and self.clock() < deadline:
                if self.clock() >= next_press:
                    # pressed again every 2 s: a guest still booting misses the first press
                    try:
                        dom.shutdown()
                    except libvirt.libvirtError as exc:
                        if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                            raise
                    next_press = self.clock() + 2.0
                self.sleep(0.2)
            if dom.isActive():
                try:
                    dom.destroy()
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                        raise


_STATE_NAMES = {}
if libvirt is not None:
    _STATE_NAMES = {
        libvirt.VIR_DOMAIN_NOSTATE: "nostate",
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_BLOCKED: "blocked",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
        libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
    }


def _power_state(state: int) -> str:
    name = _STATE_NAMES.get(state, "")
    if name in ("running", "blocked"):
        return "running"
    if name in ("paused", "suspended"):
        return name  # neither running nor stopped: the plan shows it and resumes or stops it
    return "stopped"


def _static_address(key: Key, index: int, nic: Mapping[str, Any], related: Mapping[Key, Observed]
                    ) -> tuple[IPv4Interface, IPv4Address, tuple[IPv4Address, ...], bool]:
    """A NIC's address as the guest configures it: with its subnet's prefix, gateway and
    DNS, and whether the subnet serves DHCP (then the guest asks for its reservation)."""
    where = f"{key.display}: spec.networks[{index}].ip {nic['ip']}"
    net = related.get(Key("Network", key.tenant, nic["network"]))
    if net is None:
        raise TransientError(f"{where}: network {key.tenant}/{nic['network']} is not on this host (yet)")
    ip = IPv4Address(nic["ip"])
    for subnet in NetworkSpec.model_validate(dict(net.spec)).subnets:
        if ip in subnet.cidr:
            return (IPv4Interface(f"{ip}/{subnet.cidr.prefixlen}"), gateway_of(subnet),
                    tuple(subnet.dnsServers), subnet.dhcp.enabled)
    raise PermanentError(f"{where} is in no subnet of network {key.tenant}/{nic['network']}")


def _volume_serial(tenant: str, volume: str) -> str:
    """The disk serial a volume has inside the guest (virtio-blk allows 20 characters)."""
    return host_name(Key("Volume", tenant, volume))


def _disk_size(dom, live_disk: DiskConfig | None, disk: DiskConfig) -> int | None:
    """Bytes of an attached volume as its guest sees them: the running hypervisor's view
    (blockInfo), or the file or block device's size when the domain is off."""
    if dom is not None and live_disk is not None:
        try:
            return int(dom.blockInfo(live_disk.target)[0])
        except libvirt.libvirtError:
            return None
    path = Path(disk.source)
    try:
        if disk.block:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        facts = diskimage.read_image(path)
    except (OSError, PermanentError):
        return None
    return facts.virtual_size if facts is not None else None


def _volume_disks(cfg: DomainConfig) -> dict[str, DiskConfig]:
    return {d.serial or d.source: d for d in cfg.disks if d.device == "disk" and d.target != ROOT_TARGET}


def _next_device(used: set[str]) -> str:
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    raise PermanentError("no free virtio disk name left (vdb..vdz)")


def _bridge_of(tenant: str, network: str, related: Mapping[Key, Observed]) -> str:
    obs = related.get(Key("Network", tenant, network))
    if obs is not None and obs.host.get("bridge"):
        return obs.host["bridge"]
    return host_name(Key("Network", tenant, network))


def _bridge_mtu(bridge: str) -> int | None:
    try:
        return int(Path("/sys/class/net", bridge, "mtu").read_text())
    except (OSError, ValueError):
        return None


def _redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    for name in SENSITIVE_FIELDS:
        value = spec.get(name)
        if isinstance(value, str) and not _is_redacted(value):
            spec[name] = REDACTED + hashlib.sha256(value.encode()).hexdigest()
    return spec


def _redact_mark(mark: Mark) -> dict[str, Any]:
    data = mark.to_dict()
    data["applied"] = _redact_spec(dict(data["applied"]))
    return data


def _restore_mark(mark: Mark, seed: Mapping[str, Any] | None) -> Mark:
    applied = dict(mark.applied)
    changed = False
    for name in SENSITIVE_FIELDS:
        if _is_redacted(applied.get(name)):
            applied[name] = _unredact(applied[name], seed.get(name) if seed else None)
            changed = True
    return dataclasses.replace(mark, applied=applied) if changed else mark


def _is_redacted(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(REDACTED) and len(value) == len(REDACTED) + 64


def _unredact(redacted: str, candidate: str | None) -> str:
    """The secret, when the sidecar still holds the one the hash names; else the hash
    (which then differs from any manifest value, so the seed is written again)."""
    if candidate is not None and REDACTED + hashlib.sha256(candidate.encode()).hexdigest() == redacted:
        return candidate
    return redacted


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _partial(image: Path) -> Path:
    """Where `image` is copied to before it is renamed into place: one name per image, so
    a copy killed half way is overwritten by the next one, or removed with the image."""
    return image.with_name(".tmp-" + image.name)


def _copy_image(source: Path, image: Path, sha: str, key: Key, meta: Path) -> None:
    """Copy `source` to `image` (whole or not at all), which must have checksum `sha`;
    when the source has changed since, the registration (`meta`) is void and goes."""
    tmp = _partial(image)
    tmp.unlink(missing_ok=True)
    try:
        digest = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha:
            meta.unlink(missing_ok=True)
            raise PermanentError(f"{key.display}: {source} changed while it was registered (its checksum "
                                 f"is now {digest.hexdigest()}, was {sha}): apply again")
        os.chmod(tmp, 0o644)
        tmp.replace(image)
    finally:
        tmp.unlink(missing_ok=True)


def _mark_key(data: Mapping[str, Any]) -> Key | None:
    try:
        return Mark.from_dict(data["mark"]).key
    except (KeyError, TypeError, AttributeError):
        return None


_OUR_NAME = re.compile(r"^rc-[0-9a-f]{10}$")


def folder_owner(directory: Path) -> tuple[str, str] | None:
    """(key, installation) of an instance folder's mark; None without one."""
    data = read_json_object(directory / OWNER_FILE)
    if data is None or not isinstance(data.get("key"), str) or not isinstance(data.get("home"), str):
        return None
    return data["key"], data["home"]


def claim_folder(directory: Path, key: Key, home: str) -> None:
    """Make `directory` the new instance's folder, marked before anything goes in. One
    already there is the leftover of a create killed before define when it carries our
    mark for `key` (it is made again); anything else is someone else's, left alone.

    The folder is made with its mark under a temporary name and renamed into place, so
    it never exists without the mark: a claim killed half way leaves `.tmp-<name>`,
    which the next claim (or `LibvirtDriver._sweep_unfinished`) removes."""
    if directory.exists() or directory.is_symlink():
        if directory.is_symlink() or folder_owner(directory) != (str(key), home):
            raise Conflict(f"{key.display}: folder {directory} exists and is not ours; not touching it")
        discard_folder(directory)
    staging = _staging(directory)
    shutil.rmtree(staging, ignore_errors=True)
    _make_dirs(staging)
    _write_json(staging / OWNER_FILE, {"key": str(key), "home": home}, mode=0o644)
    staging.rename(directory)


def discard_folder(directory: Path) -> None:
    """Remove an instance folder of ours: renamed out of the way (`.tmp-<name>`) first,
    so a removal killed half way never leaves the folder without its mark."""
    staging = _staging(directory)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        directory.rename(staging)
    except FileNotFoundError:
        return
    shutil.rmtree(staging, ignore_errors=True)


def _staging(directory: Path) -> Path:
    return directory.with_name(".tmp-" + directory.name)


def _make_dirs(path: Path) -> None:
    """Create with 0755: libvirt's QEMU (another user) must reach the files inside."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)




def _write_json(path: Path, data: Mapping[str, Any], mode: int) -> None:
    write_atomic(path, json.dumps(data, sort_keys=True), mode)
