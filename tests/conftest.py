"""Shared fixtures: an isolated host config on the in-memory drivers, manifest writers."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest

from reconciler.controller import Controller
from reconciler.drivers.memory import MemoryDriver
from reconciler.hostconfig import HostConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "manifests"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def host_config_file(tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host config selecting the in-memory drivers, exported as $RECONCILER_HOST_CONFIG."""
    path = tmp_path / "host.yaml"
    path.write_text(f"stateDir: {state_dir}\ndrivers: memory\nlockTimeoutSeconds: 2\n")
    monkeypatch.setenv("RECONCILER_HOST_CONFIG", str(path))
    monkeypatch.setenv("NO_COLOR", "1")
    return path


@pytest.fixture
def memory_driver(state_dir: Path) -> MemoryDriver:
    return MemoryDriver(state_dir / "memory")


@pytest.fixture
def controller(state_dir: Path) -> Controller:
    return Controller(HostConfig(stateDir=state_dir, drivers="memory"))


@pytest.fixture
def write_manifests(tmp_path: Path) -> Callable[..., Path]:
    """write_manifests({"a.yaml": "...", "sub/b.yaml": "..."}) -> folder (text dedented)."""
    counter = [0]

    def write(files: dict[str, str] | str, folder: str | None = None) -> Path:
        counter[0] += 1
        root = tmp_path / (folder or f"manifests{counter[0]}")
        root.mkdir(parents=True, exist_ok=True)
        if isinstance(files, str):
            files = {"cloud.yaml": files}
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).lstrip("\n"))
        return root

    return write


@pytest.fixture
def example_manifests() -> Path:
    return EXAMPLE
