"""End to end: `reconciler daemon`, `suspend`, `resume` and `status` as processes, on
the in-memory drivers: bad options refused with a message, a folder applied, metrics and
/healthz served on loopback, suspend told to the running daemon, SIGTERM, SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("reconciler")
    return [str(script)] if script.exists() else [sys.executable, "-m", "reconciler.cli.app"]


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "cloud"
    shutil.copytree(ROOT / "manifests", folder)
    config = tmp_path / "host.yaml"
    config.write_text(f"stateDir: {tmp_path / 'state'}\ndrivers: memory\n")
    return {"folder": folder, "config": config, "state": tmp_path / "state", "root": tmp_path}


def cli(site: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECONCILER_HOST_CONFIG": str(site["config"]), "NO_COLOR": "1", "COLUMNS": "250"}
    return subprocess.run([*_command(), *args], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def facts(site: dict[str, Path]) -> dict[str, Any]:
    path = site["state"] / "journal.sqlite3"
    if not path.exists():
        return {}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return {n: json.loads(v) for n, v in db.execute("SELECT name, value FROM daemon")}
        except sqlite3.OperationalError:
            return {}


def get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("args, message", [
    ((), "give exactly one of --source DIR or --git URL"),
    (("--source", "x", "--git", "y"), "give exactly one of --source DIR or --git URL"),
    (("--source", "x", "--resync", "soon"), "--resync 'soon': not a duration"),
    (("--source", "x", "--metrics-address", "0.0.0.0:9477"), "only a loopback address"),
    (("--source", "x", "--metrics-address", "localhost"), "expected HOST:PORT"),
    (("--source", "/nonexistent-rctest"), "--source /nonexistent-rctest: no such folder"),
    (("--git", "/nonexistent-rctest"), "--git /nonexistent-rctest: no such repository on this host"),
    (("--git", "/x", "--branch", "-evil"), "branch"),
    (("--git", "/x", "--path", "../up"), "path"),
])
def test_bad_daemon_options_are_refused_with_a_message(site, args, message):
    args = tuple(str(site["folder"]) if a == "x" else a for a in args)  # "x": a folder that exists
    result = cli(site, "daemon", *args)
    assert result.returncode == 1, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_suspend_targets_are_validated(site):
    for bad in ("Nope/acme/x", "ACME", "Instance/acme"):
        result = cli(site, "suspend", bad)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result
    result = cli(site, "resume", "acme")
    assert result.returncode == 1 and "'acme' is not suspended" in result.stderr
    assert "no daemon runs" in cli(site, "suspend", "Instance/acme/web-1").stdout
    assert "it already was" in cli(site, "suspend", "Instance/acme/web-1").stdout
    assert cli(site, "resume", "Instance/acme/web-1").returncode == 0


def test_the_daemon_applies_serves_metrics_obeys_suspend_and_stops_on_sigterm(site):
    env = {**os.environ, "RECONCILER_HOST_CONFIG": str(site["config"])}
    log = open(site["root"] / "daemon.log", "w")
    proc = subprocess.Popen([*_command(), "--log-level", "info", "daemon", "--source", str(site["folder"]),
                             "--metrics-address", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, stdin=subprocess.DEVNULL)
    try:
        f = wait_for(lambda: (x := facts(site)).get("appliedRevision") and x.get("metricsUrl") and x,
                     what="the first revision applied")
        url = f["metricsUrl"]
        assert url.startswith("http://127.0.0.1:")
        code, body = get(url + "/metrics")
        assert code == 200
        assert 'reconciler_changes_total{action="create",kind="Instance",outcome="applied"} 4.0' in body
        assert f'reconciler_applied_revision_info{{revision="{f["appliedRevision"]}"}} 1.0' in body
        assert "reconciler_queue_depth 0.0" in body
        code, body = get(url + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        assert get(url + "/nothing")[0] == 404

        # a manual apply is told that the daemon will take the host back
        manual = cli(site, "apply", "--yes", str(site["folder"]))
        assert manual.returncode == 0, manual
        assert f"a reconciler daemon (pid {proc.pid}) runs on this state directory" in manual.stderr

        # a second daemon on the same state directory is refused
        second = cli(site, "daemon", "--source", str(site["folder"]), "--metrics-address", "off")
        assert second.returncode == 1 and "another reconciler daemon runs" in second.stderr

        # suspend: the running daemon is told; an edit of that tenant waits, others go on
        told = cli(site, "suspend", "globex")
        assert f"the daemon (pid {proc.pid}) was told" in told.stdout
        cloud = site["folder"] / "globex" / "cloud.yaml"
        cloud.write_text(cloud.read_text().replace("mtu: 1400", "mtu: 1300"))
        acme = site["folder"] / "acme" / "network.yaml"
        acme.write_text(acme.read_text() + "\n# a comment: a new revision, nothing to change\n")
        status = wait_for(lambda: (s := cli(site, "status", "--json")).returncode == 0
                          and any(r["state"] == "suspended" and r["name"] == "batch" and "suspended (globex); pending: update" in r["detail"]
                                  for r in json.loads(s.stdout)) and s, what="globex suspended in status")
        rows = {(r["kind"], r["tenant"], r["name"]): r for r in json.loads(status.stdout)}
        assert rows[("Network", "acme", "web")]["state"] == "ready"
        batch = next(p for p in (site["state"] / "memory" / "Network").glob("*.json")
                     if json.loads(p.read_text())["mark"]["name"] == "batch")
        assert json.loads(batch.read_text())["spec"]["mtu"] == 1400  # not changed while suspended
        assert "resumed" not in cli(site, "resume", "globex").stderr
        wait_for(lambda: json.loads(batch.read_text())["spec"]["mtu"] == 1300, what="the edit applied on resume")

        # SIGHUP: the host config is read again
        proc.send_signal(signal.SIGHUP)
        shown = wait_for(lambda: "HostConfigReloaded" in (s := cli(site, "status")).stdout and s,
                         what="the reload in the events")
        assert "Daemon: running" in shown.stdout and "applied:" in shown.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (site["root"] / "daemon.log").read_text()
    assert "Traceback" not in out, out
    shown = cli(site, "status").stdout
    assert "Daemon: stopped" in shown
    assert "daemon" in shown and "Recent applies" in shown
