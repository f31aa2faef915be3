"""dnsmasq per subnet: command line, files, and process checks against a fake /proc
(and one real child process for stop): no root, no namespaces."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from reconciler import procs
from reconciler.drivers.netlink import _dnsmasq
from reconciler.drivers.netlink._nft import Port


def config(tmp_path: Path, first: bool = True, **changes: object) -> _dnsmasq.SubnetDhcp:
    values: dict[str, object] = dict(
        program="dnsmasq", namespace="rc-dhcp-0123456789", interface="d-aaaaaaaaaa",
        cidr=IPv4Network("10.0.0.0/24"), server=IPv4Address("10.0.0.9"), start=IPv4Address("10.0.0.10"),
        end=IPv4Address("10.0.0.254"), gateway=IPv4Address("10.0.0.1"), dns_servers=(), mtu=1450,
        lease_seconds=3600, tenant="acme", first=first, directory=tmp_path / "10.0.0.0_24")
    values.update(changes)
    return _dnsmasq.SubnetDhcp(**values)  # type: ignore[arg-type]


def port(name: str, ip: str | None, mac_byte: int) -> Port:
    return Port(owner=f"acme/{name}", hostname=name, mac=f"52:54:00:00:00:{mac_byte:02x}", ip=ip,
                tap=f"rt-{mac_byte:010d}", groups=())


PORTS = [port("web-1", "10.0.0.12", 1), port("web-2", None, 2), port("db", "10.0.1.5", 3)]


def test_command_line(tmp_path: Path) -> None:
    c = config(tmp_path)
    d = tmp_path / "10.0.0.0_24"
    assert c.argv() == [
        "dnsmasq", "--conf-file=/dev/null", f"--pid-file={d}/pid", f"--dhcp-leasefile={d}/leases",
        f"--dhcp-hostsfile={d}/hosts", f"--dhcp-optsfile={d}/opts", f"--addn-hosts={d}/names",
        "--interface=d-aaaaaaaaaa", "--bind-interfaces", "--except-interface=lo", "--listen-address=10.0.0.9",
        "--dhcp-range=10.0.0.10,10.0.0.254,255.255.255.0,3600s", "--dhcp-authoritative", "--no-ping",
        "--no-resolv", "--no-hosts", "--port=53", "--domain=acme.internal", "--local=/acme.internal/",
        f"--log-facility={d}/dnsmasq.log",
    ]
    assert "--keep-in-foreground" not in c.argv()  # it daemonizes once its sockets are bound
    assert config(tmp_path, first=False).argv()[-1] == "--dhcp-ignore=tag:!known"


def test_the_first_subnet_serves_and_names_every_port(tmp_path: Path) -> None:
    assert config(tmp_path).hosts_text(PORTS) == (
        "52:54:00:00:00:01,10.0.0.12,web-1\n"
        "52:54:00:00:00:02,web-2\n"  # no address: leased from the range, under its name
        "52:54:00:00:00:03,ignore\n"  # reserved in another subnet: one offer, not two
    )


def test_another_subnet_serves_its_reservations_only(tmp_path: Path) -> None:
    c = config(tmp_path, first=False, cidr=IPv4Network("10.0.1.0/24"), server=IPv4Address("10.0.1.9"))
    assert c.hosts_text(PORTS) == "52:54:00:00:00:03,10.0.1.5,db\n"


def test_a_host_name_appears_once(tmp_path: Path) -> None:
    twins = [port("web", "10.0.0.12", 1), Port("other/web", "web", "52:54:00:00:00:09", "10.0.0.13", "rt-9", ())]
    assert config(tmp_path).hosts_text(twins).splitlines() == ["52:54:00:00:00:01,10.0.0.12,web",
                                                               "52:54:00:00:00:09,10.0.0.13"]
    assert config(tmp_path).names_text(twins) == "10.0.0.12 web.acme.internal web\n"


def test_options_and_names(tmp_path: Path) -> None:
    assert config(tmp_path).opts_text() == "option:router,10.0.0.1\noption:dns-server,10.0.0.9\noption:mtu,1450\n"
    c = config(tmp_path, dns_servers=("1.1.1.1", "9.9.9.9"))
    assert "option:dns-server,1.1.1.1,9.9.9.9\n" in c.opts_text()
    assert config(tmp_path).names_text(PORTS) == ("10.0.0.12 web-1.acme.internal web-1\n"
                                                  "10.0.1.5 db.acme.internal db\n")


def test_files_are_written_when_they_differ_and_readable_by_dnsmasq(tmp_path: Path) -> None:
    c = config(tmp_path)
    _dnsmasq.make_dirs(c.directory)
    files = c.files(PORTS)
    assert _dnsmasq.files_differ(files) == [c.hosts, c.opts, c.names]
    assert _dnsmasq.write_files(files) is True
    assert _dnsmasq.write_files(files) is False  # unchanged: no SIGHUP needed
    assert _dnsmasq.files_differ(files) == []
    assert oct(c.hosts.stat().st_mode & 0o777) == "0o644" and oct(c.directory.stat().st_mode & 0o777) == "0o755"


def test_a_folder_nobody_cannot_traverse_is_found(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    locked.chmod(0o700)
    try:
        assert _dnsmasq.unreachable_parent(locked / "inner") == locked
    finally:
        locked.chmod(0o755)
    tmp_path.chmod(0o755)
    assert _dnsmasq.unreachable_parent(tmp_path / "not-yet") in (None, *tmp_path.parents)


# --- processes, on a fake /proc -------------------------------------------------------


def fake_proc(root: Path, pid: int, state: str, argv: list[str]) -> Path:
    folder = root / str(pid)
    folder.mkdir(parents=True)
    (folder / "stat").write_text(f"{pid} (dnsmasq) {state} 1 {pid} {pid} 0 -1\n")
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return root


def test_process_state_and_zombies(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", 42, "S", ["dnsmasq"])
    fake_proc(proc, 43, "Z", ["dnsmasq"])
    assert procs.process_state(42, proc) == "S" and procs.is_alive(42, proc)
    assert not procs.is_alive(43, proc)  # a zombie is dead
    assert not procs.is_alive(44, proc) and procs.process_state(44, proc) is None


def test_running_is_ours_only_with_our_hosts_file(tmp_path: Path) -> None:
    c = config(tmp_path)
    _dnsmasq.make_dirs(c.directory)
    proc = tmp_path / "proc"
    fake_proc(proc, 42, "S", c.argv())
    fake_proc(proc, 43, "S", ["/usr/sbin/dnsmasq", "--dhcp-hostsfile=/elsewhere/hosts"])
    fake_proc(proc, 44, "S", ["sleep", "100"])
    c.pid_file.write_text("42\n")
    found = _dnsmasq.running(c, proc)
    assert found is not None and found.pid == 42 and _dnsmasq.up_to_date(c, found)
    assert not _dnsmasq.up_to_date(config(tmp_path, lease_seconds=600), found)  # a restart, not a SIGHUP
    for pid in ("43", "44", "45", "junk"):
        c.pid_file.write_text(pid)
        assert _dnsmasq.running(c, proc) is None


def test_stop_waits_until_the_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _dnsmasq.stop(child.pid)
        assert not procs.is_alive(child.pid)  # a zombie until reaped: dead already
    finally:
        child.kill()
        child.wait()


def test_stop_of_a_process_that_is_gone_is_fine() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _dnsmasq.stop(child.pid)


@pytest.mark.parametrize("text,pid", [("123\n", 123), ("", None), ("x", None)])
def test_read_pid(tmp_path: Path, text: str, pid: int | None) -> None:
    (tmp_path / "pid").write_text(text)
    assert _dnsmasq.read_pid(tmp_path / "pid") == pid
    assert _dnsmasq.read_pid(tmp_path / "none") is None
