"""The journal: what an apply through the controller records, and what it never records."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from reconciler.controller import Controller
from reconciler.drivers.memory import MemoryDriver
from reconciler.errors import PermanentError, StalePlan
from reconciler.hostconfig import HostConfig
from reconciler.journal import Journal
from reconciler.models import KINDS, Key
from reconciler.planner import Action
from reconciler.state import FieldDiff, Observation, Observed, Target

SECRET = "s3cr3t-token-7Qx9-user-data"
SECRET2 = "another-s3cr3t-Zk41-rotated"


class FailingDriver:
    """A MemoryDriver that fails `create` of chosen keys with PermanentError."""

    name = "failing"

    def __init__(self, inner: MemoryDriver, fail: dict[str, str]):
        self.inner = inner
        self.kinds = inner.kinds
        self.max_parallel = inner.max_parallel
        self.fail = fail

    def observe(self) -> Observation:
        return self.inner.observe()

    def host_name(self, key: Key) -> str:
        return self.inner.host_name(key)

    def create(self, target: Target) -> Observed:
        if str(target.key) in self.fail:
            raise PermanentError(self.fail[str(target.key)])
        return self.inner.create(target)

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        return self.inner.update(target, observed, diffs)

    def delete(self, observed: Observed) -> None:
        self.inner.delete(observed)

    def orphan(self, observed: Observed) -> Observed:
        return self.inner.orphan(observed)


def rows(state_dir: Path, sql: str) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(state_dir / "journal.sqlite3")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql).fetchall()]


def journal_bytes(state_dir: Path) -> bytes:
    """The database and any side file SQLite left next to it."""
    return b"".join(p.read_bytes() for p in sorted(state_dir.glob("journal.sqlite3*")))


INSTANCE = """
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: web, tenant: acme}
spec:
  subnets:
    - cidr: 10.10.1.0/24
---
apiVersion: reconciler/v1
kind: Image
metadata: {name: tiny, tenant: acme}
spec: {source: /images/tiny.qcow2}
---
apiVersion: reconciler/v1
kind: Instance
metadata: {name: web-1, tenant: acme}
spec:
  memoryMiB: 128
  image: tiny
  networks:
    - {network: web}
  userData: |
    #cloud-config
    password: USERDATA
"""


# --- what an apply records -----------------------------------------------------------------


def test_apply_records_one_applies_row_and_one_row_per_change(
    controller: Controller, state_dir: Path, example_manifests: Path,
) -> None:
    the_plan = controller.plan(controller.load([example_manifests]))
    result = controller.apply(the_plan, command="apply", source=str(example_manifests))
    assert result.ok

    (applies,) = rows(state_dir, "SELECT * FROM applies")
    assert applies["command"] == "apply"
    assert applies["source"] == str(example_manifests)
    assert applies["outcome"] == "ok"
    assert applies["created"] == 23
    assert (applies["updated"], applies["replaced"], applies["deleted"], applies["orphaned"]) == (0, 0, 0, 0)
    assert (applies["failed"], applies["skipped"]) == (0, 0)
    assert applies["duration_s"] is not None and applies["duration_s"] >= 0
    assert applies["finished_at"] is not None and applies["finished_at"] >= applies["started_at"]

    changes = rows(state_dir, "SELECT * FROM changes")
    assert len(changes) == len(the_plan.actionable) == 23
    assert {(c["kind"], c["tenant"], c["name"]) for c in changes} == {tuple(c.key) for c in the_plan.actionable}
    for row in changes:
        assert row["apply_id"] == applies["id"]
        assert (row["action"], row["outcome"], row["error"]) == ("create", "applied", None)
        assert row["duration_s"] is not None and row["duration_s"] >= 0

    assert controller.journal.last_source() == str(example_manifests)
    assert Journal(state_dir).applies()[0]["id"] == applies["id"]


def test_destroy_counts_deleted_and_orphaned(
    controller: Controller, state_dir: Path, example_manifests: Path,
) -> None:
    desired = controller.load([example_manifests])
    assert controller.apply(controller.plan(desired)).ok
    destroy_plan = controller.plan(desired, destroy=True)
    counts = destroy_plan.counts()
    assert counts[Action.DELETE] > 0 and counts[Action.ORPHAN] > 0

    result = controller.apply(destroy_plan, command="destroy")
    assert result.ok

    last = rows(state_dir, "SELECT * FROM applies ORDER BY id DESC LIMIT 1")[0]
    assert last["command"] == "destroy" and last["outcome"] == "ok"
    assert last["deleted"] == counts[Action.DELETE]
    assert last["orphaned"] == counts[Action.ORPHAN]
    assert last["created"] == 0
    actions = rows(state_dir, f"SELECT action, COUNT(*) AS n FROM changes WHERE apply_id = {last['id']} "
                              "GROUP BY action")
    assert {r["action"]: r["n"] for r in actions} == {"delete": counts[Action.DELETE],
                                                        "orphan": counts[Action.ORPHAN]}
    assert controller.journal.last_source() is None  # destroy is not an apply of a source


def test_failed_change_and_its_skips_are_recorded_with_their_errors(
    state_dir: Path, example_manifests: Path,
) -> None:
    inner = MemoryDriver(state_dir / "memory")
    failing = FailingDriver(inner, {"Network/acme/web": "bridge rc-web is busy"})
    controller = Controller(HostConfig(stateDir=state_dir, drivers="memory"), {k: failing for k in KINDS})
    the_plan = controller.plan(controller.load([example_manifests]))

    result = controller.apply(the_plan)
    assert not result.ok

    (applies,) = rows(state_dir, "SELECT * FROM applies")
    assert applies["outcome"] == "failed"
    assert applies["failed"] == 1
    assert applies["skipped"] == 3
    assert applies["created"] == 23 - 4

    by_name = {(r["kind"], r["tenant"], r["name"]): r for r in rows(state_dir, "SELECT * FROM changes")}
    assert len(by_name) == 23
    net = by_name[("Network", "acme", "web")]
    assert net["outcome"] == "failed"
    assert net["error"] == "PermanentError: bridge rc-web is busy"
    for key in (("Instance", "acme", "web-1"), ("Instance", "acme", "web-2"), ("Router", "acme", "edge")):
        assert by_name[key]["outcome"] == "skipped"
        assert by_name[key]["error"] == "skipped: Network acme/web failed"
    assert by_name[("Network", "acme", "db")]["outcome"] == "applied"

    last = controller.journal.last_changes()
    assert last[("Network", "acme", "web")].error == "PermanentError: bridge rc-web is busy"

    # fixed on the host: the next apply records success as the latest change
    failing.fail.clear()
    assert controller.apply(controller.plan(controller.load([example_manifests]))).ok
    last = controller.journal.last_changes()
    assert last[("Network", "acme", "web")].outcome == "applied"
    assert last[("Network", "acme", "web")].error is None
    assert [a["outcome"] for a in controller.journal.applies()] == ["ok", "failed"]


def test_an_apply_that_raises_is_recorded_as_error(
    controller: Controller, state_dir: Path, example_manifests: Path, memory_driver: MemoryDriver,
) -> None:
    the_plan = controller.plan(controller.load([example_manifests]))
    tenant = next(c for c in the_plan.actionable if str(c.key) == "Tenant/acme/acme")
    assert tenant.target is not None
    memory_driver.create(tenant.target)  # the host changed after the plan

    with pytest.raises(StalePlan):
        controller.apply(the_plan)

    (applies,) = rows(state_dir, "SELECT * FROM applies")
    assert applies["outcome"] == "error"
    assert rows(state_dir, "SELECT * FROM changes") == []


# --- what it never records -----------------------------------------------------------------


@pytest.fixture
def cli_env(host_config_file: Path) -> Iterator[dict[str, str]]:
    yield dict(os.environ)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli.app", *args], capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)


def test_user_data_never_reaches_the_journal_or_the_plan_json(
    controller: Controller, state_dir: Path, write_manifests: Callable[..., Path], cli_env: dict[str, str],
) -> None:
    v1 = write_manifests(INSTANCE.replace("USERDATA", SECRET))
    v2 = write_manifests(INSTANCE.replace("USERDATA", SECRET2))

    shown = run_cli(cli_env, "plan", "--json", str(v1))
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout and SECRET not in shown.stderr
    created = json.loads(shown.stdout)
    assert {c["name"]: c["action"] for c in created["changes"]}["web-1"] == "create"

    assert controller.apply(controller.plan(controller.load([v1])), source=str(v1)).ok
    # the secret really went to the host (so its absence below means something)
    instance_files = list((state_dir / "memory" / "Instance").glob("*.json"))
    assert len(instance_files) == 1 and SECRET in instance_files[0].read_text()

    shown = run_cli(cli_env, "plan", "--json", str(v2))
    assert shown.returncode == 0, shown.stderr
    for secret in (SECRET, SECRET2):
        assert secret not in shown.stdout and secret not in shown.stderr
    updated = json.loads(shown.stdout)
    (change,) = [c for c in updated["changes"] if c["name"] == "web-1"]
    assert change["action"] == "update"
    (diff,) = [d for d in change["diffs"] if d["path"] == ["userData"]]
    assert diff["old"] == diff["new"] == "(sensitive)" and diff["sensitive"] is True

    # an update of userData, and a failed one, through the controller
    assert controller.apply(controller.plan(controller.load([v2]))).ok
    assert SECRET2 in instance_files[0].read_text()
    inner = MemoryDriver(state_dir / "memory")
    failing = FailingDriver(inner, {"Instance/acme/web-1": "domain define failed"})
    broken = Controller(controller.config, {k: failing for k in KINDS})
    (state_dir / "memory" / "Instance" / instance_files[0].name).unlink()
    assert not broken.apply(broken.plan(broken.load([v1]))).ok

    data = journal_bytes(state_dir)
    assert len(rows(state_dir, "SELECT * FROM changes")) == 4 + 1 + 1
    for secret in (SECRET, SECRET2):
        assert secret.encode() not in data
        assert b"s3cr3t" not in data
        assert b"cloud-config" not in data


def test_journal_and_memory_objects_are_private_even_with_a_lax_umask(
    state_dir: Path, example_manifests: Path,
) -> None:
    old = os.umask(0)
    try:
        controller = Controller(HostConfig(stateDir=state_dir, drivers="memory"))
        assert controller.apply(controller.plan(controller.load([example_manifests]))).ok
    finally:
        os.umask(old)

    journal = state_dir / "journal.sqlite3"
    assert journal.stat().st_mode & 0o777 == 0o600
    objects = sorted((state_dir / "memory").rglob("*.json"))
    assert len(objects) == 23
    for path in objects:
        assert path.stat().st_mode & 0o777 == 0o600, path
