"""Fixtures for integration tests against the real host: libvirtd, Linux bridges, guests.

Everything a test creates is tied to a unique test tenant `rctest<hex>`:

- the state dir /var/lib/reconciler/test-tmp/<tenant>/ (libvirt's QEMU runs as another
  user and must traverse it, so it is not under pytest's 0700 tmp dirs);
- domains, found again by their <title> `<tenant>/<name>` (their names are hashes);
- bridges, named like the network driver would name them, and created (and recorded)
  by the fixture itself.

Teardown removes exactly those (domains: `virsh destroy` + `undefine`, in parallel) and
nothing else on the host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import textwrap
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostcheck import require_host
from reconciler.models import Key
from reconciler.naming import host_name

REPO = Path(__file__).resolve().parents[2]
IMAGE = Path(os.environ.get("RECONCILER_TEST_IMAGE", "/var/lib/reconciler/images/tiny.qcow2"))
TEST_TMP = Path("/var/lib/reconciler/test-tmp")
URI = "qemu:///system"
VIRSH = ["virsh", "-q", "-c", URI]
RECONCILER = REPO / ".venv" / "bin" / "reconciler"
TENANT_PREFIX = "rctest"
# one third octet per test environment, 10.253.X.0/24, picked among the unused ones
SUBNET_BASE = "10.253"


def run(*args: str, check: bool = True, timeout: float = 120,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}"
        )
    return result


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*VIRSH, *args, check=check)


def domstate(name: str, reason: bool = False) -> str:
    args = ("domstate", "--reason", name) if reason else ("domstate", name)
    result = virsh(*args, check=False)
    return result.stdout.strip() if result.returncode == 0 else f"(none: {result.stderr.strip()})"


def domain_titles() -> dict[str, str]:
    """Every domain on the host (running or not): name -> title ('' when none)."""
    names = [n for n in virsh("list", "--all", "--name").stdout.split() if n]
    titles = {}
    for name in names:
        result = virsh("desc", "--title", name, check=False)
        if result.returncode == 0:  # else: undefined meanwhile
            titles[name] = result.stdout.strip()
    return titles


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def http_get(url: str, timeout: float = 3.0) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(url, timeout=timeout) as response:
        return response.read().decode()


@dataclass(frozen=True)
class Bridge:
    network: str
    name: str
    subnet: ipaddress.IPv4Network
    mtu: int

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def ip(self, host: int) -> str:
        return str(self.subnet.network_address + host)


@dataclass
class HostEnv:
    """One test's share of the host: tenant, state dir, host config, bridges."""

    tenant: str
    root: Path
    bridges: dict[str, Bridge] = field(default_factory=dict)
    _manifests: int = 0
    _plans: int = 0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def host_config(self) -> Path:
        return self.root / "host.yaml"

    @property
    def instance_dir(self) -> Path:
        return self.state_dir / "libvirt" / "instances"

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "libvirt" / "images"

    @property
    def volume_pool(self) -> Path:
        """The file backend `local` of host_env(volumes=True)."""
        return self.root / "volumes"

    def domain_name(self, instance: str) -> str:
        return host_name(Key("Instance", self.tenant, instance))

    def bridge_name(self, network: str) -> str:
        return host_name(Key("Network", self.tenant, network))

    # --- host objects ----------------------------------------------------------------

    def add_bridge(self, network: str, mtu: int | None = None) -> Bridge:
        """The Linux bridge the network driver would give `network`, with X.1/24 on it."""
        name = self.bridge_name(network)
        subnet = _free_subnet()
        run("ip", "link", "add", "name", name, "type", "bridge")
        self.bridges[network] = bridge = Bridge(network, name, subnet, 0)  # recorded first
        if mtu is not None:
            run("ip", "link", "set", "dev", name, "mtu", str(mtu))
        run("ip", "addr", "add", f"{bridge.gateway}/{subnet.prefixlen}", "dev", name)
        run("ip", "link", "set", "dev", name, "up")
        actual = int(Path("/sys/class/net", name, "mtu").read_text())
        self.bridges[network] = bridge = Bridge(network, name, subnet, actual)
        return bridge

    def domains(self) -> dict[str, str]:
        """This test's domains: name -> title (those titled `<tenant>/...`)."""
        return {n: t for n, t in domain_titles().items() if t.startswith(self.tenant + "/")}

    # --- the CLI ---------------------------------------------------------------------

    def write_manifest(self, text: str, name: str | None = None) -> Path:
        """Write a manifest file (dedented) under the test root; returns its path."""
        self._manifests += 1
        folder = self.root / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (name or f"cloud-{self._manifests}.yaml")
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def cli(self, *args: str, env: Mapping[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the reconciler CLI as a subprocess with this host config; never raises
        on a non-zero exit (tests assert on returncode/stdout/stderr)."""
        full = {k: v for k, v in os.environ.items() if k != "RECONCILER_FAULTS"}
        full.update({
            "RECONCILER_HOST_CONFIG": str(self.host_config),
            "NO_COLOR": "1",
            "COLUMNS": "250",  # rich wraps at the terminal width: keep messages on one line
            "TERM": "dumb",
        })
        full.update(env or {})
        return subprocess.run([str(RECONCILER), *args], capture_output=True, text=True,
                              timeout=timeout, env=full, stdin=subprocess.DEVNULL)

    def apply(self, manifest: Path, env: Mapping[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`reconciler apply` of `manifest`, as plan --out + apply of that exact plan, so
        that nothing outside this test's tenant is touched: a plan that would change
        another tenant's resources (e.g. the domains of another test session on this
        libvirtd) fails the test instead of being applied. A plan with errors returns
        the plan's result (nothing was applied)."""
        self._plans += 1
        plan_file = self.root / f"plan-{self._plans}.json"
        result = self.cli("plan", "--json", "--out", str(plan_file), str(manifest), timeout=timeout)
        if result.returncode != 0:
            return result
        changes = json.loads(plan_file.read_text())["changes"]
        foreign = [f"{c['action']} {c['kind']} {c['tenant']}/{c['name']}" for c in changes
                   if c["action"] != "noop" and c["tenant"] != self.tenant
                   and not (c["kind"] == "Tenant" and c["name"] == self.tenant)]
        if foreign:
            pytest.fail(
                f"refusing to apply {manifest}: its plan would change resources outside the "
                f"test tenant {self.tenant}: {', '.join(foreign)} (another reconciler state dir "
                "using this libvirtd at the same time? its marked domains count as ours)",
                pytrace=False,
            )
        return self.cli("apply", str(plan_file), env=env, timeout=timeout)

    # --- teardown --------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove this test's domains, bridges and state dir; returns what failed."""
        problems: list[str] = []

        def remove(name: str) -> None:
            virsh("destroy", name, check=False)  # ~1.5 s each here: run them in parallel
            result = virsh("undefine", "--nvram", name, check=False)
            if result.returncode != 0:
                result = virsh("undefine", name, check=False)
            if result.returncode != 0 and name in domain_titles():
                problems.append(f"undefine {name}: {result.stderr.strip()}")

        mine = list(self.domains())
        if mine:
            with ThreadPoolExecutor(max_workers=len(mine)) as pool:
                list(pool.map(remove, mine))
        for bridge in self.bridges.values():
            result = run("ip", "link", "del", "dev", bridge.name, check=False)
            if result.returncode != 0 and Path("/sys/class/net", bridge.name).exists():
                problems.append(f"ip link del {bridge.name}: {result.stderr.strip()}")
        shutil.rmtree(self.root, ignore_errors=True)
        return problems


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    """A CLI result with exit `code` and no traceback (else its output in the failure)."""
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\n--- stdout\n{result.stdout}\n"
        f"--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def plan_is_zero(env: HostEnv, manifest: Path) -> None:
    """`plan` of `manifest` has nothing to do."""
    result = env.cli("plan", "--detailed-exitcode", str(manifest))
    others = {n: t for n, t in domain_titles().items() if t and not t.startswith(env.tenant + "/")}
    hint = (f"\n(other domains on this host, e.g. of a concurrent test session, which the "
            f"plan may count as ours to remove: {others})" if others else "")
    assert result.returncode == 0 and "No changes" in result.stdout, (
        f"exit {result.returncode}\n{result.stdout}{result.stderr}{hint}")


def _free_subnet() -> ipaddress.IPv4Network:
    used = run("ip", "-4", "-o", "addr", "show").stdout
    routes = run("ip", "-4", "route", "show").stdout
    for _ in range(200):
        x = random.randint(1, 254)
        prefix = f"{SUBNET_BASE}.{x}."
        if f" {prefix}" not in used and not any(line.startswith(prefix) for line in routes.splitlines()):
            return ipaddress.IPv4Network(f"{prefix}0/24")
    raise RuntimeError(f"no free {SUBNET_BASE}.X.0/24 on this host")


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


@contextmanager
def host_env(domain_type: str = "qemu", shutdown_timeout: float = 10, *, volumes: bool = False,
             volume_backends: Mapping[str, Mapping[str, object]] | None = None) -> Iterator[HostEnv]:
    """A fresh test tenant (see the module docstring). `volumes`: Volume on the real
    "storage" driver, with one file backend `local` (the default) in `env.volume_pool`;
    `volume_backends`: more backends beside it (host config `volumeBackends` entries;
    implies `volumes`). Otherwise Volume stays in memory."""
    require_host()
    if not RECONCILER.exists():
        pytest.fail(f"{RECONCILER} missing: install the project into .venv", pytrace=False)
    tenant = f"{TENANT_PREFIX}{secrets.token_hex(4)}"
    _make_dir(TEST_TMP.parent)
    _make_dir(TEST_TMP)
    env = HostEnv(tenant=tenant, root=TEST_TMP / tenant)
    _make_dir(env.root)
    _make_dir(env.state_dir)
    drivers = {k: "memory" for k in ("Tenant", "Network", "Router", "SecurityGroup", "Volume", "Bucket")}
    drivers.update(Image="libvirt", Instance="libvirt")
    config: dict[str, object] = {
        "stateDir": str(env.state_dir),
        "drivers": drivers,
        "lockTimeoutSeconds": 60,
        "libvirt": {"uri": URI, "domainType": domain_type, "shutdownTimeoutSeconds": shutdown_timeout,
                    "probeImage": str(IMAGE)},
    }
    if volumes or volume_backends:
        drivers["Volume"] = "storage"
        _make_dir(env.volume_pool)  # under env.root (teardown removes it), 0755 for QEMU
        backends: dict[str, object] = {"local": {"driver": "file", "path": str(env.volume_pool),
                                                 "default": True}}
        backends.update({name: dict(b) for name, b in (volume_backends or {}).items()})
        config["volumeBackends"] = backends
    env.host_config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    try:
        yield env
    finally:
        problems = env.cleanup()
        if problems:
            raise AssertionError("teardown left things behind:\n" + "\n".join(problems))


@pytest.fixture
def rc_env() -> Iterator[HostEnv]:
    """A fresh test tenant with its own state dir and host config (per test)."""
    with host_env() as env:
        yield env


@pytest.fixture(scope="module")
def rc_env_module() -> Iterator[HostEnv]:
    """Like `rc_env`, shared by the tests of a module (one cloud reused across tests)."""
    with host_env() as env:
        yield env


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate()` until it returns a true value; that value, else AssertionError."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, AssertionError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def guest_info(ip: str, timeout: float = 90.0) -> dict[str, list[str]]:
    """GET http://IP/cgi-bin/info (polled until it answers): key -> values."""
    text = wait_for(lambda: http_get(f"http://{ip}/cgi-bin/info"), timeout, what=f"HTTP from {ip}")
    info: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def dumpxml(name: str, inactive: bool = False) -> ET.Element:
    args = ("dumpxml", "--inactive", name) if inactive else ("dumpxml", name)
    return ET.fromstring(virsh(*args).stdout)


def qemu_img_info(path: Path) -> dict:
    # -U: the running QEMU holds the image lock
    return json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)
