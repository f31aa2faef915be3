"""A driver that knows what its host cannot do makes `plan` fail up front, naming the
manifest file, line, resource and field (not a traceback at apply time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from reconciler.controller import Controller
from reconciler.drivers.memory import MemoryDriver
from reconciler.hostconfig import HostConfig

CLOUD = """\
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: lan, tenant: acme}
spec:
  type: vlan
  subnets: [{cidr: 10.1.0.0/24}]
"""


class NoVlanDriver(MemoryDriver):
    def problems(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]) -> list:
        if kind == "Network" and spec.get("type") == "vlan":
            return [(("type",), "type vlan needs VLAN (8021q) support, which this host's kernel lacks")]
        return []


def test_host_problems_become_plan_errors_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "cloud.yaml"
    manifest.write_text(CLOUD)
    driver = NoVlanDriver(tmp_path / "memory")
    controller = Controller(HostConfig(stateDir=tmp_path / "state", drivers="memory"),
                            {kind: driver for kind in driver.kinds})
    plan = controller.plan(controller.load([tmp_path / "m"]))
    assert [str(p) for p in plan.errors] == [
        f"{manifest}:9: Network acme/lan: spec.type: type vlan needs VLAN (8021q) support, "
        "which this host's kernel lacks"
    ]
    # a destroy plan does not need the host to be able to create anything
    assert controller.plan(controller.load([tmp_path / "m"]), destroy=True).errors == []
