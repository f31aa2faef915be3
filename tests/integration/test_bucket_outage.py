"""The object store goes down in the middle of an apply: the bucket changes fail as
transient, every other change (real qcow2 volumes, in-memory networks) finishes, and an
apply after the store is back converges.

The test runs a proxy of its own (the all-in-one's config on another port, the same
rings, servers and memcached), so stopping it takes nothing away from tests running
alongside; it is killed from the executor's `on_start` hook of the first change, after
the apply observed the store up.
"""

from __future__ import annotations

import configparser
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

import objstore
from reconciler.controller import Controller
from reconciler.hostconfig import HostConfig
from reconciler.planner import Action

PORT = 8089


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


class Proxy:
    """A swift-proxy-server of the test's own on `port` (started, stopped, restarted)."""

    def __init__(self, root: Path, port: int = PORT):
        self.port = port
        parser = configparser.ConfigParser(interpolation=None)
        parser.read("/etc/swift/proxy-server.conf")
        parser["DEFAULT"]["bind_port"] = str(port)
        parser["DEFAULT"]["user"] = "root"
        self.conf = root / "proxy-server.conf"
        with open(self.conf, "w") as f:
            parser.write(f)
        self.log = root / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["swift-proxy-server", str(self.conf), "-v"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _answers(f"http://127.0.0.1:{self.port}/healthcheck"):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the test proxy did not answer in 30 s"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)  # our child: reaped, no zombie
        self.proc = None


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    objstore.require_swift()
    p = Proxy(tmp_path)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def test_store_down_mid_apply_fails_buckets_only_and_the_next_apply_converges(
        proxy: Proxy, tmp_path: Path) -> None:
    tenant = objstore.unique()
    config = HostConfig.model_validate({
        "stateDir": str(tmp_path / "state"),
        "drivers": {"Tenant": "memory", "Network": "memory", "Router": "memory", "SecurityGroup": "memory",
                    "Image": "memory", "Instance": "memory", "Volume": "storage", "Bucket": "objectstore"},
        "volumeBackends": {"local": {"driver": "file", "path": str(tmp_path / "volumes")}},
        "objectStores": {"local": {"driver": "swift", "authUrl": f"http://127.0.0.1:{PORT}/auth/v1.0",
                                   "timeoutSeconds": 3}},
    })
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "cloud.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: reconciler/v1
        kind: Tenant
        metadata: {{name: {tenant}}}
        ---
        apiVersion: reconciler/v1
        kind: Network
        metadata: {{name: web, tenant: {tenant}}}
        spec:
          subnets: [{{cidr: 10.250.9.0/24}}]
        ---
        apiVersion: reconciler/v1
        kind: Volume
        metadata: {{name: data, tenant: {tenant}}}
        spec: {{sizeGiB: 1}}
        ---
        apiVersion: reconciler/v1
        kind: Bucket
        metadata: {{name: assets, tenant: {tenant}}}
        spec: {{acl: public-read}}
        ---
        apiVersion: reconciler/v1
        kind: Bucket
        metadata: {{name: logs, tenant: {tenant}}}
        spec: {{versioning: true}}
        """))
    controller = Controller(config)
    admin = objstore.conn(objstore.ADMIN, "AUTH_" + tenant)
    try:
        desired = controller.load([folder])
        first = controller.plan(desired)
        assert not first.errors, first.errors
        assert {c.key.kind for c in first.actionable} == {"Tenant", "Network", "Volume", "Bucket"}

        stopped: list[str] = []

        def stop_store(change: object) -> None:
            if not stopped:
                proxy.stop()
                stopped.append("yes")

        result = controller.apply(first, on_start=stop_store)
        by_kind: dict[str, set[str]] = {}
        for outcome in result.outcomes:
            by_kind.setdefault(outcome.change.key.kind, set()).add(outcome.status)
            if outcome.change.key.kind == "Bucket":
                assert outcome.error and outcome.error.startswith("TransientError"), outcome.error
                assert "unreachable" in outcome.error
        assert by_kind == {"Tenant": {"applied"}, "Network": {"applied"}, "Volume": {"applied"},
                           "Bucket": {"failed"}}, by_kind
        images = list((tmp_path / "volumes").glob("*.qcow2"))
        assert len(images) == 1
        info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(images[0])],
                              capture_output=True, text=True, check=True).stdout
        assert '"virtual-size": 1073741824' in info
        assert not list(objstore.containers(admin))  # nothing half made on the store

        proxy.start()
        again = controller.plan(controller.load([folder]))
        assert [c.key.kind for c in again.actionable] == ["Bucket", "Bucket"]
        assert all(c.action is Action.CREATE for c in again.actionable)
        result = controller.apply(again)
        assert result.ok, [(o.change.id, o.error) for o in result.outcomes]
        assert sorted(objstore.containers(admin)) == ["assets", "logs"]
        assert admin.head_container("assets").get("x-container-read") == ".r:*,.rlistings"
        assert admin.head_container("logs").get("x-versions-enabled") == "True"
        final = controller.plan(controller.load([folder]))
        assert not final.actionable, [c.id for c in final.actionable]
    finally:
        if proxy.proc is None:
            proxy.start()
        objstore.remove_account("AUTH_" + tenant)
