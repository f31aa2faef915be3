"""Faults of the state directory on the real drivers: its disk full (a small tmpfs) and
its journal locked by another process, each before an apply, in the middle of one, and
during the daemon's loop.

Expected (issue 9): a clear message naming the journal or the file and why, never a
traceback; what does not need the state directory goes on (a file volume's pool is
elsewhere); nothing is lost (what was on the host stays, the journal is whole); when
the space or the lock comes back, the next apply, or the daemon by itself, converges.
Checked with `ip`, `qemu-img`, /proc and plain sqlite3, not with our code.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import figures
from conftest import REPO, run, wait_for
from netns import NetEnv, bridge_of, free_subnets, link, net_env
from test_daemon import running_daemon

pytestmark = pytest.mark.reliability

SUITE = "faults"


def doc(kind: str, tenant: str | None, name: str, spec: dict) -> str:
    meta = {"name": name, **({"tenant": tenant} if tenant else {})}
    return f"---\napiVersion: reconciler/v1\nkind: {kind}\nmetadata: {json.dumps(meta)}\nspec: {json.dumps(spec)}\n"


def cloud(env: NetEnv, subnets: list[str], volumes: list[str]) -> str:
    text = doc("Tenant", None, env.tenant, {})
    for i, cidr in enumerate(subnets):
        text += doc("Network", env.tenant, f"net{i}", {"subnets": [{"cidr": cidr}]})
    for name in volumes:
        text += doc("Volume", env.tenant, name, {"sizeGiB": 1, "deletionPolicy": "Delete"})
    return text


def use_file_volumes(env: NetEnv) -> Path:
    """Volumes on the real storage driver, their pool outside the state directory."""
    pool = env.root / "volumes"
    pool.mkdir(mode=0o700, exist_ok=True)
    config = json.loads(env.host_config.read_text())
    config["drivers"]["Volume"] = "storage"
    config["volumeBackends"] = {"local": {"driver": "file", "path": str(pool), "default": True}}
    env.host_config.write_text(json.dumps(config, indent=2) + "\n")
    return pool


def volume_files(pool: Path) -> dict[str, int]:
    """qcow2 file -> virtual size, as qemu-img reads them."""
    out = {}
    for path in sorted(pool.glob("*.qcow2")):
        info = json.loads(run("qemu-img", "info", "--output=json", "-U", str(path)).stdout)
        out[path.name] = info["virtual-size"]
    return out


def dnsmasq_pids(bridge: str) -> list[int]:
    """Live dnsmasq processes serving `bridge` (read from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        serves = any(f"/dhcp/{bridge}/".encode() in arg for arg in cmd)  # its files are the bridge's
        if cmd and cmd[0].endswith(b"dnsmasq") and serves and state != "Z":
            pids.append(int(d.name))
    return pids


def apply_ok(env: NetEnv, manifest: Path) -> None:
    result = env.cli("apply", "--yes", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr


def no_traceback(result: subprocess.CompletedProcess[str]) -> str:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    return text


# --- the state directory on a small tmpfs -------------------------------------------------


@contextmanager
def small_state_dir(env: NetEnv, size: str = "4m") -> Iterator[None]:
    """env.state_dir on a tmpfs of its own; at the end everything of the test is
    destroyed (with room again), and it is unmounted before the env's own teardown."""
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "rctest-state", str(env.state_dir))
    try:
        yield
    finally:
        free(env)
        if env.last_manifest is not None:
            result = env.cli("destroy", "--yes", str(env.last_manifest))
            assert result.returncode == 0, result.stdout + result.stderr
            env.last_manifest = None
        run("umount", "-l", str(env.state_dir))


def fill(env: NetEnv) -> None:
    """Fill the state directory's file system to the last byte."""
    fd = os.open(env.state_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    assert os.statvfs(env.state_dir).f_bavail == 0


def free(env: NetEnv) -> None:
    (env.state_dir / "filler").unlink(missing_ok=True)


def journal_rows(env: NetEnv, sql: str) -> list[sqlite3.Row]:
    path = env.state_dir / "journal.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        return db.execute(sql).fetchall()


def test_disk_full_before_an_apply_changes_nothing_and_the_next_apply_converges() -> None:
    with net_env() as env, small_state_dir(env):
        pool = use_file_volumes(env)
        a, b = free_subnets(2)
        manifest = env.write_manifest(cloud(env, [a], ["data"]), "cloud.yaml")
        env.last_manifest = manifest
        apply_ok(env, manifest)
        before = volume_files(pool)
        bridge_a = bridge_of(env.tenant, "net0")
        dnsmasq_a = dnsmasq_pids(bridge_a)
        assert link(bridge_a) and dnsmasq_a and len(before) == 1

        fill(env)
        manifest.write_text(cloud(env, [a, b], ["data", "logs"]))
        plan = env.cli("plan", str(manifest))  # reads only: works on a full disk
        assert plan.returncode == 0 and "2 to add" in no_traceback(plan), plan.stdout + plan.stderr
        result = env.cli("apply", "--yes", str(manifest))
        text = no_traceback(result)
        assert result.returncode == 1, text
        assert "journal" in text and "full" in text, text  # names the journal and why
        assert link(bridge_of(env.tenant, "net1")) is None  # nothing was changed
        assert volume_files(pool) == before
        assert link(bridge_a) and dnsmasq_pids(bridge_a) == dnsmasq_a  # nothing was lost

        free(env)
        result = env.cli("apply", "--yes", str(manifest))
        assert result.returncode == 0, no_traceback(result)
        assert link(bridge_of(env.tenant, "net1")) is not None
        assert set(volume_files(pool)) > set(before)
        assert "No changes" in env.cli("plan", str(manifest)).stdout
        figures.record(SUITE, injected=1, survived=1, cases=["state dir full before an apply"])


def test_disk_full_in_the_middle_of_an_apply_fails_what_needs_it_and_loses_nothing() -> None:
    from reconciler.controller import Controller
    from reconciler.hostconfig import load_host_config

    with net_env() as env, small_state_dir(env):
        pool = use_file_volumes(env)
        a, b = free_subnets(2)
        manifest = env.write_manifest(cloud(env, [a], []), "cloud.yaml")
        env.last_manifest = manifest
        apply_ok(env, manifest)
        manifest.write_text(cloud(env, [a, b], ["data"]))

        controller = Controller(load_host_config(str(env.host_config)))
        the_plan = controller.plan(controller.load([manifest]))
        assert sorted(c.key.kind for c in the_plan.actionable) == ["Network", "Volume"]
        filled: list[bool] = []

        def fill_first(change: object) -> None:
            if not filled:
                fill(env)  # the disk fills as the first change starts
                filled.append(True)

        result = controller.apply(the_plan, on_start=fill_first, parallelism=1)
        by_kind = {o.change.key.kind: o for o in result.outcomes}
        # the volume's pool is elsewhere: created; the network keeps files in the state dir
        assert by_kind["Volume"].status == "applied", by_kind["Volume"].error
        assert list(volume_files(pool).values()) == [1 << 30]
        network = by_kind["Network"]
        if network.status != "applied":
            assert network.error and "No space left on device" in network.error, network.error
        assert result.journal_error and "full" in result.journal_error  # said, not a traceback

        free(env)
        result = env.cli("apply", "--yes", str(manifest))  # converges: no conflict, no duplicate
        assert result.returncode == 0, no_traceback(result)
        bridge_b = bridge_of(env.tenant, "net1")
        assert link(bridge_b) is not None and len(dnsmasq_pids(bridge_b)) == 1
        assert "No changes" in env.cli("plan", str(manifest)).stdout
        applies = journal_rows(env, "SELECT outcome FROM applies ORDER BY id")
        assert [r["outcome"] for r in applies][-1] == "ok"
        figures.record(SUITE, injected=1, survived=1, cases=["state dir full in the middle of an apply"])


def test_disk_full_during_the_daemon_loop_backs_off_and_converges_when_there_is_room() -> None:
    with net_env() as env, small_state_dir(env):
        a, b = free_subnets(2)
        folder = env.root / "manifests"
        folder.mkdir()
        manifest = folder / "cloud.yaml"
        manifest.write_text(cloud(env, [a], []))
        env.last_manifest = manifest
        with running_daemon(env, "--source", str(folder), "--backoff-cap", "2s") as daemon:
            bridge_a, bridge_b = bridge_of(env.tenant, "net0"), bridge_of(env.tenant, "net1")
            wait_for(lambda: link(bridge_a) is not None, 60, what=f"{bridge_a} made by the daemon")
            wait_for(lambda: "RevisionApplied" in daemon.output(), 30, what="the first revision recorded")
            fill(env)
            manifest.write_text(cloud(env, [a, b], []))
            wait_for(lambda: "ReconcileFailed" in daemon.output(), 60,
                     what="the daemon's pass to fail on the full journal")
            assert "cannot be written: database or disk is full" in daemon.output(), daemon.output()
            daemon.check_alive()
            assert link(bridge_b) is None  # its apply could not begin: nothing half done
            free(env)
            wait_for(lambda: link(bridge_b) is not None, 60, what=f"{bridge_b} once there is room")
            daemon.check_alive()
        reasons = [r["reason"] for r in journal_rows(env, "SELECT reason FROM events ORDER BY id")]
        assert "ReconcileFailed" in reasons  # kept while the disk was full, written afterwards
        assert "No changes" in env.cli("plan", str(manifest)).stdout
        figures.record(SUITE, injected=1, survived=1, cases=["state dir full during the daemon loop"])


# --- the journal locked by another process ------------------------------------------------

LOCKER = textwrap.dedent("""\
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    db.execute("ROLLBACK")
""")


@contextmanager
def journal_locked(env: NetEnv) -> Iterator[subprocess.Popen[str]]:
    """Another process holding an exclusive lock on the journal while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(env.state_dir / "journal.sqlite3")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)  # our child: reaped


def test_a_locked_journal_refuses_an_apply_clearly_and_the_next_one_converges() -> None:
    with net_env() as env:
        a, b = free_subnets(2)
        manifest = env.write_manifest(cloud(env, [a], []), "cloud.yaml")
        env.last_manifest = manifest
        apply_ok(env, manifest)
        manifest.write_text(cloud(env, [a, b], []))
        with journal_locked(env):
            result = env.cli("apply", "--yes", str(manifest))
            text = no_traceback(result)
            assert result.returncode == 1, text
            assert "is locked by another process" in text, text
            assert link(bridge_of(env.tenant, "net1")) is None
        result = env.cli("apply", "--yes", str(manifest))
        assert result.returncode == 0, no_traceback(result)
        assert link(bridge_of(env.tenant, "net1")) is not None
        assert "No changes" in env.cli("plan", str(manifest)).stdout
        figures.record(SUITE, injected=1, survived=1, cases=["journal locked before an apply"])


def test_a_locked_journal_during_the_daemon_loop_backs_off_and_converges() -> None:
    with net_env() as env:
        a, b = free_subnets(2)
        folder = env.root / "manifests"
        folder.mkdir()
        manifest = folder / "cloud.yaml"
        manifest.write_text(cloud(env, [a], []))
        env.last_manifest = manifest
        with running_daemon(env, "--source", str(folder), "--backoff-cap", "2s") as daemon:
            bridge_b = bridge_of(env.tenant, "net1")
            wait_for(lambda: link(bridge_of(env.tenant, "net0")) is not None, 60, what="the first network")
            wait_for(lambda: "RevisionApplied" in daemon.output(), 30, what="the first revision recorded")
            with journal_locked(env):
                manifest.write_text(cloud(env, [a, b], []))
                wait_for(lambda: "ReconcileFailed" in daemon.output(), 90,
                         what="the daemon's pass to fail on the locked journal")
                assert "is locked by another process" in daemon.output(), daemon.output()
                daemon.check_alive()
                assert link(bridge_b) is None
            wait_for(lambda: link(bridge_b) is not None, 90, what=f"{bridge_b} once the lock is gone")
            daemon.check_alive()
        reasons = [r["reason"] for r in journal_rows(env, "SELECT reason FROM events ORDER BY id")]
        assert "ReconcileFailed" in reasons
        assert "No changes" in env.cli("plan", str(manifest)).stdout
        figures.record(SUITE, injected=1, survived=1, cases=["journal locked during the daemon loop"])
