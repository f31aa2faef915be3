"""`reconciler daemon` on the real drivers: libvirt guests, netlink networks.

The daemon runs as a process of its own (the CLI, as users run it) on a folder or a
local git repository. Everything is checked with `virsh`, `ip`, git and the journal
(SQLite, read directly), never through the daemon's own code:

- folder: a manifest written -> the instance runs and its network's bridge exists; an
  edit -> the bridge's MTU follows; `virsh destroy` -> the guest is started again (a
  libvirt lifecycle event, no polling); `ip link del` of the bridge -> it is back (a
  netlink notification); `metadata.drift: report` -> a destroyed guest is reported as
  drift and left shut off;
- git: each commit applied and recorded as the applied revision; a commit with an
  invalid manifest changes nothing and its error names the file (repository-relative)
  and line; the next good commit is applied;
- SIGTERM while an apply runs: the daemon finishes what runs, every apply and change in
  the journal has its outcome, and the next start converges.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import IMAGE, RECONCILER, domstate, ok, run, virsh, wait_for
from netns import NetEnv, bridge_of, free_subnets, link, net_env

HEAL_TIMEOUT = 60  # generous for a loaded CI machine; the benchmark measures the real latency
BOOT_TIMEOUT = 180


@pytest.fixture(autouse=True)
def _real_host() -> None:
    from hostcheck import require_host

    require_host()


# --- manifests ---------------------------------------------------------------------------


def doc(kind: str, tenant: str | None, name: str, spec: dict[str, Any], **meta: Any) -> str:
    metadata = {"name": name, **({"tenant": tenant} if tenant else {}), **meta}
    return ("---\napiVersion: reconciler/v1\n"
            f"kind: {kind}\nmetadata: {json.dumps(metadata)}\nspec: {json.dumps(spec)}\n")


def cloud(tenant: str, cidr: str, *, mtu: int = 1450, instance: bool = True,
          instance_meta: dict[str, Any] | None = None) -> str:
    text = doc("Tenant", None, tenant, {})
    text += doc("Network", tenant, "net", {"type": "vxlan", "mtu": mtu, "subnets": [{"cidr": cidr}]})
    if instance:
        text += doc("Image", tenant, "tiny", {"source": str(IMAGE)})
        text += doc("Instance", tenant, "vm", {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1,
                                                "networks": [{"network": "net"}]}, **(instance_meta or {}))
    return text


# --- the daemon process ------------------------------------------------------------------


class DaemonProc:
    def __init__(self, env: NetEnv, *args: str):
        self.env = env
        self.log = env.root / f"daemon-{time.monotonic_ns()}.log"
        full = {k: v for k, v in os.environ.items() if k != "RECONCILER_FAULTS"}
        full.update({"RECONCILER_HOST_CONFIG": str(env.host_config), "NO_COLOR": "1"})
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(RECONCILER), "--log-level", "info", "daemon", *args, "--metrics-address", "127.0.0.1:0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full)
        with open(env.root / "pids.txt", "a") as f:  # teardown checks none is left
            f.write(f"{self.proc.pid}\n")

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)  # our child: wait() reaps it, no zombie stays

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def check_alive(self) -> bool:
        assert self.proc.poll() is None, f"the daemon exited {self.proc.returncode}:\n{self.output()}"
        return True


@contextmanager
def running_daemon(env: NetEnv, *args: str) -> Iterator[DaemonProc]:
    daemon = DaemonProc(env, *args)
    try:
        yield daemon
    finally:
        code = daemon.stop()
        assert "Traceback" not in daemon.output(), daemon.output()
        assert code == 0, f"daemon exited {code}:\n{daemon.output()}"


def journal(env: NetEnv, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Rows of the daemon's journal, read with plain sqlite3 (an AssertionError, which
    wait_for retries, while the daemon has not made it yet)."""
    path = env.state_dir / "journal.sqlite3"
    if not path.exists():
        raise AssertionError(f"{path} does not exist yet")
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise AssertionError(f"{path}: {exc}") from None


def daemon_facts(env: NetEnv) -> dict[str, Any]:
    try:
        rows = journal(env, "SELECT name, value FROM daemon")
    except AssertionError:  # not created yet
        return {}
    return {r["name"]: json.loads(r["value"]) for r in rows}


def events(env: NetEnv, reason: str) -> list[sqlite3.Row]:
    try:
        return journal(env, "SELECT * FROM events WHERE reason = ? ORDER BY id", reason)
    except AssertionError:
        return []


def mtu_of(name: str) -> int | None:
    found = link(name)
    return None if found is None else int(found["mtu"])


def bridge_up(name: str) -> bool:
    found = link(name)
    return found is not None and "UP" in found.get("flags", [])


def status_json(env: NetEnv) -> dict[str, dict[str, Any]]:
    result = ok(env.cli("status", "--json"))
    return {f"{r['kind']}/{r['tenant']}/{r['name']}": r for r in json.loads(result.stdout)}


def write(path: Path, text: str) -> None:
    """As an editor saves: a temporary file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- folder ------------------------------------------------------------------------------


def test_a_folder_applied_edited_and_drift_healed_from_host_events() -> None:
    with net_env(compute="libvirt") as env:
        t = env.tenant
        (cidr,) = free_subnets(1)
        folder = env.root / "cloud"
        folder.mkdir()
        manifest = folder / "cloud.yaml"
        env.last_manifest = folder  # teardown destroys what the folder declares
        domain, bridge = env.domain_name("vm"), bridge_of(t, "net")

        with running_daemon(env, "--source", str(folder)) as daemon:
            wait_for(lambda: daemon.check_alive() and daemon_facts(env).get("pid"), 60, what="the daemon to start")
            write(manifest, cloud(t, cidr))
            wait_for(lambda: domstate(domain) == "running" and bridge_up(bridge), BOOT_TIMEOUT,
                     what=f"{domain} running and {bridge} up\n{daemon.output()}")
            assert mtu_of(bridge) == 1450
            tap = wait_for(lambda: [l["ifname"] for l in json.loads(run("ip", "-j", "link", "show", "master",
                                                                             bridge).stdout)
                                    if not l["ifname"].startswith(("rv-", "rd-"))], 30,
                           what=f"the guest's tap on {bridge}")
            first = daemon_facts(env)["appliedRevision"]
            assert first.startswith("sha256:")
            # what the daemon starts (dnsmasq, nft monitor) can be stopped with SIGTERM:
            # the daemon's own signal handling must not leave those signals blocked in them
            children = _children(daemon.proc.pid)
            assert children, "the daemon has no child process (nft monitor?)"
            for pid in children:
                assert not _blocked(pid) & (1 << (signal.SIGTERM - 1)), f"SIGTERM blocked in child {pid}"

            # an edit: the bridge follows
            write(manifest, cloud(t, cidr, mtu=1400))
            wait_for(lambda: mtu_of(bridge) == 1400, HEAL_TIMEOUT, what=f"mtu 1400 on {bridge}\n{daemon.output()}")
            wait_for(lambda: daemon_facts(env)["appliedRevision"] != first, 30, what="the new revision recorded")
            assert domstate(domain) == "running"

            # a guest destroyed by hand is started again (libvirt lifecycle event)
            virsh("destroy", domain)
            wait_for(lambda: domstate(domain) == "running", HEAL_TIMEOUT,
                     what=f"{domain} started again\n{daemon.output()}")
            # the event is written when the change's apply ends, just after the start
            wait_for(lambda: f"Instance/{t}/vm" in [e["resource"] for e in events(env, "DriftHealed")], 30,
                     what=f"the DriftHealed event of Instance/{t}/vm\n{daemon.output()}")

            # the bridge deleted by hand is made again, with its MTU and the guest's port
            run("ip", "link", "del", "dev", bridge)
            wait_for(lambda: bridge_up(bridge) and mtu_of(bridge) == 1400, HEAL_TIMEOUT,
                     what=f"{bridge} restored\n{daemon.output()}")
            wait_for(lambda: (link(tap[0]) or {}).get("master") == bridge, HEAL_TIMEOUT,
                     what=f"the guest's tap {tap[0]} on {bridge} again\n{daemon.output()}")
            wait_for(lambda: f"Network/{t}/net" in [e["resource"] for e in events(env, "DriftHealed")], 30,
                     what=f"the DriftHealed event of Network/{t}/net\n{daemon.output()}")

            # our nftables rules flushed by hand are put back (nft monitor)
            rules = wait_for(lambda: _rules(env), 10, what="our nftables rules")
            healed_before = len(events(env, "DriftHealed"))
            run("nft", "flush", "table", "inet", env.table)
            wait_for(lambda: _rules(env) == rules, HEAL_TIMEOUT,
                     what=f"our {len(rules)} nftables rules back\n{daemon.output()}")
            assert len(events(env, "DriftHealed")) > healed_before

            # drift: report -> a destroyed guest is reported, not started
            previous = daemon_facts(env)["appliedRevision"]
            write(manifest, cloud(t, cidr, mtu=1400, instance_meta={"drift": "report"}))
            wait_for(lambda: _applied_new(env, previous), 30, what="the drift: report revision in force")
            before = len(events(env, "Drift"))
            virsh("destroy", domain)
            drift = wait_for(lambda: [e for e in events(env, "Drift")[before:]
                                      if e["resource"] == f"Instance/{t}/vm"], HEAL_TIMEOUT,
                             what=f"the drift of the destroyed guest reported\n{daemon.output()}")
            assert "report only" in drift[0]["message"]
            assert domstate(domain) == "shut off"
            rows = status_json(env)
            assert rows[f"Instance/{t}/vm"]["state"] == "drifted", rows[f"Instance/{t}/vm"]
            assert domstate(domain) == "shut off"  # still: nothing healed it meanwhile

            # back to heal: the next pass starts it
            write(manifest, cloud(t, cidr, mtu=1400))
            wait_for(lambda: domstate(domain) == "running", HEAL_TIMEOUT, what=f"{domain} healed again")

        rows = status_json(env)
        assert {r["state"] for r in rows.values()} == {"ready"}, rows
        assert all(r["revision"] for r in rows.values()), rows


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _blocked(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


def _rules(env: NetEnv) -> list[str]:
    """Our inet table's rules, as `nft` lists them (handles left out)."""
    listed = json.loads(run("nft", "-j", "list", "table", "inet", env.table).stdout)["nftables"]
    return sorted(json.dumps({k: v for k, v in item["rule"].items() if k != "handle"}, sort_keys=True)
                  for item in listed if "rule" in item)


def _applied_new(env: NetEnv, previous: str) -> bool:
    facts = daemon_facts(env)
    return facts.get("appliedRevision") not in (None, previous) \
        and facts.get("appliedRevision") == facts.get("attemptedRevision")


# --- git ---------------------------------------------------------------------------------


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **GIT_ENV})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def test_b_git_commits_applied_whole_and_an_invalid_one_not_at_all() -> None:
    with net_env(compute="libvirt") as env:
        t = env.tenant
        (cidr,) = free_subnets(1)
        repo = env.root / "repo"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        good = env.root / "last-good.yaml"
        env.last_manifest = good
        bridge = bridge_of(t, "net")

        write(good, cloud(t, cidr, instance=False))
        first = commit(repo, {"cloud/net.yaml": good.read_text(), "README.md": "# not a manifest\n"}, "first")
        with running_daemon(env, "--git", str(repo), "--branch", "main", "--path", "cloud",
                            "--interval", "1h") as daemon:
            wait_for(lambda: daemon.check_alive() and daemon_facts(env).get("appliedRevision") == first, 60,
                     what=f"commit {first} applied\n{daemon.output()}")
            assert bridge_up(bridge) and mtu_of(bridge) == 1450
            applied = journal(env, "SELECT revision, outcome, created FROM applies WHERE command='daemon'")
            assert [(r["revision"], r["outcome"]) for r in applied] == [(first, "ok")]
            assert applied[0]["created"] == 2
            assert daemon_facts(env)["appliedSummary"] == "first"

            # an invalid manifest beside a valid edit: the commit is not applied at all
            bad_doc = doc("Network", t, "bad", {"subnets": [{"cidr": "10.0.0.0/33"}]})
            second = commit(repo, {"cloud/net.yaml": cloud(t, cidr, mtu=1400, instance=False),
                                   "cloud/bad.yaml": bad_doc}, "second: broken")
            facts = wait_for(lambda: (f := daemon_facts(env)).get("attemptedRevision") == second
                             and f.get("attemptedErrors") and f, 60,
                             what=f"commit {second} rejected\n{daemon.output()}")
            errors = facts["attemptedErrors"]
            line = bad_doc.splitlines().index(next(l for l in bad_doc.splitlines() if l.startswith("spec:"))) + 1
            assert errors[0].startswith(f"cloud/bad.yaml:{line}: "), errors
            assert "10.0.0.0/33" in errors[0]
            assert facts["appliedRevision"] == first
            assert mtu_of(bridge) == 1450  # the valid edit of the same commit did not happen
            assert link(bridge_of(t, "bad")) is None
            rejected = events(env, "RevisionRejected")
            assert rejected and second[:12] in rejected[-1]["message"] and "cloud/bad.yaml" in rejected[-1]["message"]
            shown = ok(env.cli("status")).stdout
            assert "rejected, 1 error(s)" in shown and f"cloud/bad.yaml:{line}:" in shown, shown

            # the fix: applied whole
            third = commit(repo, {"cloud/bad.yaml": ""}, "third: fixed")
            git(repo, "rm", "-q", "cloud/bad.yaml")
            git(repo, "commit", "-q", "-m", "fourth: bad.yaml removed")
            fourth = git(repo, "rev-parse", "HEAD")
            wait_for(lambda: daemon_facts(env).get("appliedRevision") in (third, fourth)
                     and mtu_of(bridge) == 1400, 60, what=f"the fix applied\n{daemon.output()}")
            wait_for(lambda: daemon_facts(env).get("appliedRevision") == fourth, 60, what="the last commit in force")
            revisions = [r["revision"] for r in journal(env, "SELECT revision FROM applies WHERE command='daemon'")]
            assert second not in revisions
            write(good, cloud(t, cidr, mtu=1400, instance=False))
            rows = status_json(env)
            assert rows[f"Network/{t}/net"]["state"] == "ready"
            assert rows[f"Network/{t}/net"]["revision"] in (third, fourth)


# --- SIGTERM mid-apply -------------------------------------------------------------------


def test_c_sigterm_mid_apply_keeps_the_journal_whole_and_the_next_start_converges() -> None:
    with net_env(compute="libvirt") as env:
        t = env.tenant
        (cidr,) = free_subnets(1)
        folder = env.root / "cloud"
        folder.mkdir()
        env.last_manifest = folder
        text = cloud(t, cidr)
        for name in ("vm2", "vm3"):
            text += doc("Instance", t, name, {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1,
                                              "networks": [{"network": "net"}]})
        write(folder / "cloud.yaml", text)
        names = [env.domain_name(n) for n in ("vm", "vm2", "vm3")]

        daemon = DaemonProc(env, "--source", str(folder), "--parallelism", "1")
        try:
            # as soon as the first change has finished, while the others wait or run
            wait_for(lambda: daemon.check_alive() and journal(env, "SELECT 1 FROM changes LIMIT 1"), 120,
                     interval=0.05, what=f"the first change\n{daemon.output()}")
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(120) == 0, daemon.output()
        finally:
            daemon.stop()
        out = daemon.output()
        assert "Traceback" not in out, out
        applies = journal(env, "SELECT * FROM applies")
        assert applies and all(a["finished_at"] and a["outcome"] for a in applies), [dict(a) for a in applies]
        assert applies[-1]["outcome"] in ("stopped", "ok"), dict(applies[-1])
        changes = journal(env, "SELECT * FROM changes")
        assert all(c["outcome"] in ("applied", "skipped") for c in changes), [dict(c) for c in changes]
        stopped = [c for c in changes if c["outcome"] == "skipped"]
        assert all(c["error"] == "not started: stopping" for c in stopped), [dict(c) for c in stopped]
        assert stopped, "the stop came after the whole apply: nothing was cut short"

        with running_daemon(env, "--source", str(folder)) as again:
            wait_for(lambda: all(domstate(n) == "running" for n in names), BOOT_TIMEOUT,
                     what=f"every guest running after the restart\n{again.output()}")
            wait_for(lambda: {r["state"] for r in status_json(env).values()} == {"ready"}, 60,
                     what="every resource ready")
        plan = env.cli("plan", "--detailed-exitcode", str(folder))
        assert plan.returncode == 0 and "No changes" in plan.stdout, plan.stdout + plan.stderr
