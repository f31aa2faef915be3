"""End to end: volumes on the real file backend (qcow2 files), through the console script.

No guest and no root: only the storage driver is real (every other kind in memory), and
`qemu-img` (not our code) checks what it did. Guests using volumes are in
tests/integration/test_volumes.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from e2e.test_cli import cli, ok
from reconciler.models import Key
from reconciler.naming import host_name

TENANT = "acme"


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    from hostcheck import require

    require(("qemu-img missing: run scripts/setup-storage.sh",) if shutil.which("qemu-img") is None else ())


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    drivers = {k: "memory" for k in ("Tenant", "Network", "Router", "SecurityGroup", "Image", "Instance",
                                     "Bucket")}
    drivers["Volume"] = "storage"
    config = {
        "stateDir": str(tmp_path / "state"),
        "drivers": drivers,
        "volumeBackends": {"local": {"driver": "file", "path": str(tmp_path / "pool"), "default": True},
                           "other": {"driver": "file", "path": str(tmp_path / "other")}},
    }
    (tmp_path / "host.yaml").write_text(yaml.safe_dump(config))
    environ = dict(os.environ)
    environ.update(RECONCILER_HOST_CONFIG=str(tmp_path / "host.yaml"), NO_COLOR="1", COLUMNS="250")
    return environ


def manifests(tmp_path: Path, **volumes: dict) -> Path:
    folder = tmp_path / "manifests"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    docs = [{"apiVersion": "reconciler/v1", "kind": "Tenant", "metadata": {"name": TENANT}, "spec": {}}]
    for name, spec in volumes.items():
        docs.append({"apiVersion": "reconciler/v1", "kind": "Volume",
                     "metadata": {"name": name, "tenant": TENANT}, "spec": spec})
    (folder / "cloud.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def text(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def image(tmp_path: Path, name: str, pool: str = "pool") -> Path:
    return tmp_path / pool / f"{host_name(Key('Volume', TENANT, name))}.qcow2"


def virtual_size(path: Path) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                         text=True, check=True)
    return int(json.loads(out.stdout)["virtual-size"])


def test_create_grow_and_no_op(tmp_path: Path, env: dict[str, str]) -> None:
    m = manifests(tmp_path, data={"sizeGiB": 1})
    result = ok(cli("plan", m, env=env), 0)
    assert '+ backend = "local"' in result.stdout  # the host's default, filled in
    ok(cli("apply", m, "--yes", env=env))
    assert virtual_size(image(tmp_path, "data")) == 1024**3
    ok(cli("plan", m, "--detailed-exitcode", env=env), 0)
    m = manifests(tmp_path, data={"sizeGiB": 3})
    result = ok(cli("plan", m, "--detailed-exitcode", env=env), 2)
    assert "sizeGiB: 1 -> 3" in result.stdout
    ok(cli("apply", m, "--yes", env=env))
    assert virtual_size(image(tmp_path, "data")) == 3 * 1024**3
    ok(cli("plan", m, "--detailed-exitcode", env=env), 0)


def test_shrink_and_a_move_to_another_backend_are_refused(tmp_path: Path, env: dict[str, str]) -> None:
    ok(cli("apply", manifests(tmp_path, data={"sizeGiB": 2}), "--yes", env=env))
    result = ok(cli("plan", manifests(tmp_path, data={"sizeGiB": 1}), env=env), 1)
    assert "cloud.yaml:" in text(result) and "spec.sizeGiB" in text(result)
    assert "cannot shrink from 2 to 1" in text(result)
    result = ok(cli("plan", manifests(tmp_path, data={"sizeGiB": 2, "backend": "other"}), env=env), 1)
    assert "spec.backend" in text(result) and "destroy its data" in text(result)
    assert virtual_size(image(tmp_path, "data")) == 2 * 1024**3


def test_capacity_admission_fails_the_plan_before_any_change(tmp_path: Path, env: dict[str, str]) -> None:
    m = manifests(tmp_path, small={"sizeGiB": 1}, huge={"sizeGiB": 65536})
    result = ok(cli("apply", m, "--yes", env=env), 1)
    assert "not enough space on volume backend local" in text(result)
    assert "this plan needs 64.0 TiB" in text(result) and "is available" in text(result)
    assert "cloud.yaml:" in text(result)
    assert not (tmp_path / "pool").exists() or list((tmp_path / "pool").iterdir()) == []


def test_an_unknown_backend_is_a_plan_error(tmp_path: Path, env: dict[str, str]) -> None:
    result = ok(cli("plan", manifests(tmp_path, data={"sizeGiB": 1, "backend": "nope"}), env=env), 1)
    assert "spec.backend" in text(result) and "no volume backend 'nope'" in text(result)


def test_retain_orphans_and_delete_removes_with_a_warning(tmp_path: Path, env: dict[str, str]) -> None:
    ok(cli("apply", manifests(tmp_path, kept={"sizeGiB": 1},
                              gone={"sizeGiB": 1, "deletionPolicy": "Delete"}), "--yes", env=env))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 64k", str(image(tmp_path, "gone"))],
                   capture_output=True, check=True)
    empty = manifests(tmp_path)
    result = ok(cli("plan", empty, env=env))
    lines = result.stdout.splitlines()
    assert any(line.strip() == "! Volume acme/kept" for line in lines), result.stdout
    assert any(line.strip() == "- Volume acme/gone" for line in lines), result.stdout
    warning = [line for line in lines if line.strip().startswith("!!")]
    assert len(warning) == 1 and "holds data (" in warning[0] and "written" in warning[0], result.stdout
    ok(cli("apply", empty, "--yes", env=env))
    assert image(tmp_path, "kept").exists() and not image(tmp_path, "gone").exists()
    sidecar = json.loads(image(tmp_path, "kept").with_suffix(".json").read_text())
    assert sidecar["mark"]["orphaned"] is True
    ok(cli("plan", empty, "--detailed-exitcode", env=env), 0)  # orphaned stays orphaned
    # back in the manifests: adopted again, with its data
    back = manifests(tmp_path, kept={"sizeGiB": 1})
    result = ok(cli("plan", back, env=env))
    assert "adopted again" in result.stdout
    ok(cli("apply", back, "--yes", env=env))
    assert json.loads(image(tmp_path, "kept").with_suffix(".json").read_text())["mark"]["orphaned"] is False


def test_import_adopts_a_hand_made_qcow2_file(tmp_path: Path, env: dict[str, str]) -> None:
    path = image(tmp_path, "legacy")
    path.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "2G"], check=True)
    m = manifests(tmp_path, legacy={"sizeGiB": 2})
    result = ok(cli("plan", m, env=env), 1)
    assert "conflict" in text(result) and path.name[: -len(".qcow2")] in text(result)
    assert not path.with_suffix(".json").exists()
    result = ok(cli("import", "Volume/acme/legacy", "-m", m, env=env))
    assert "Imported Volume acme/legacy" in result.stdout
    assert json.loads(path.with_suffix(".json").read_text())["mark"]["name"] == "legacy"
    assert virtual_size(path) == 2 * 1024**3  # untouched
    result = ok(cli("plan", m, env=env))
    assert "Volume acme/legacy" not in result.stdout  # adopted as it is: nothing to change


def test_snapshots_through_the_cli(tmp_path: Path, env: dict[str, str]) -> None:
    ok(cli("apply", manifests(tmp_path, data={"sizeGiB": 1, "snapshots": ["before-upgrade"]}), "--yes", env=env))
    listed = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(image(tmp_path, "data"))],
                            capture_output=True, text=True, check=True).stdout
    assert "before-upgrade" in listed
    m = manifests(tmp_path, data={"sizeGiB": 1, "snapshots": ["nightly"]})
    result = ok(cli("plan", m, "--detailed-exitcode", env=env), 2)
    assert "snapshots" in result.stdout
    ok(cli("apply", m, "--yes", env=env))
    listed = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(image(tmp_path, "data"))],
                            capture_output=True, text=True, check=True).stdout
    assert "nightly" in listed and "before-upgrade" not in listed


def test_multiattach_on_qcow2_files_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    result = ok(cli("plan", manifests(tmp_path, shared={"sizeGiB": 1, "multiattach": True}), env=env), 1)
    assert "spec.multiattach" in text(result) and "cannot share" in text(result)
