"""The drivers' watchers (`Watching`) against the real kernel and libvirtd: a change made
with `ip` or `virsh` reaches `notify` as a `HostEvent`, only for names of ours, and
nothing after `close()`.

Every host object here has a random test name that the watchers take for ours (`rc-t`
+ 9 hex digits: never a real name, whose hashes have no `t`) or for not ours (`tst...`),
so tests running in parallel neither collide nor see each other's objects in the
assertions (which only look at their own names). Everything is removed in `finally`.
"""

from __future__ import annotations

import random
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import URI, run, virsh
from hostcheck import require_host, require_network
from reconciler.drivers.base import Watching
from reconciler.drivers.libvirt import LibvirtDriver, LibvirtSettings
from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings
from reconciler.drivers.netlink._watch import NetlinkWatch
from reconciler.state import HostEvent

#: a bounded wait for an event; no assertion on how fast it comes
WAIT_S = 5.0
#: how long a watch that was closed is given to (wrongly) report something
QUIET_S = 0.5
LIBVIRTD_SOCKET = "/var/run/libvirt/libvirt-sock"


def ours() -> str:
    """A test name both watchers take for ours: `rc-t` + 9 hex digits (13 characters)."""
    return "rc-t" + secrets.token_hex(5)[:9]


class Collector:
    """A `notify` that keeps every event; tests wait for the one they expect."""

    def __init__(self) -> None:
        self.events: list[HostEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: HostEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def mark(self) -> int:
        """Where the events of what a test does next start."""
        with self._changed:
            return len(self.events)

    def since(self, mark: int) -> list[HostEvent]:
        with self._changed:
            return list(self.events[mark:])

    def about(self, subject: str) -> list[str]:
        with self._changed:
            return [e.what for e in self.events if e.subject == subject]

    def wait(self, subject: str, what: str, after: int = 0, timeout: float = WAIT_S) -> HostEvent:
        """The first event (subject, what) from index `after` on, waiting up to `timeout`."""

        def found() -> HostEvent | None:
            return next((e for e in self.events[after:] if (e.subject, e.what) == (subject, what)),
                        None)

        with self._changed:
            event = self._changed.wait_for(found, timeout)
        assert event is not None, (
            f"no event ({subject!r}, {what!r}) within {timeout:.0f} s; got "
            f"{[(e.subject, e.what) for e in self.since(after)]}")
        return event


@contextmanager
def links(*names: str) -> Iterator[None]:
    """Delete these interfaces (those that exist) afterwards."""
    try:
        yield
    finally:
        for name in names:
            if Path("/sys/class/net", name).exists():
                run("ip", "link", "del", "dev", name, check=False)


@contextmanager
def closing(watch) -> Iterator[None]:
    try:
        yield
    finally:
        watch.close()


# --- netlink --------------------------------------------------------------------------


@pytest.fixture
def netlink_driver(tmp_path: Path) -> NetlinkDriver:
    require_network()
    return NetlinkDriver(NetlinkSettings(state_dir=tmp_path / "netlink", home="0badf00d"))


def test_netlink_reports_our_links_only_and_stops_when_closed(
        netlink_driver: NetlinkDriver) -> None:
    assert isinstance(netlink_driver, Watching)
    bridge = ours()
    h = bridge[3:]
    vxlan, tap, peer, other, late = "rv-" + h, "rt-" + h, "tsp" + h, "tst" + h, ours()
    seen = Collector()
    with links(vxlan, tap, bridge, other, late):
        watch = netlink_driver.watch(seen)
        with closing(watch):
            # not ours first: once the bridge's event came, the other's would have come
            run("ip", "link", "add", "name", other, "type", "bridge")
            start = seen.mark()
            run("ip", "link", "add", "name", bridge, "type", "bridge")
            seen.wait(bridge, "link added", start)
            assert seen.about(other) == []
            assert all(e.driver == "netlink" for e in seen.events)

            at = seen.mark()
            run("ip", "link", "set", "dev", bridge, "up")
            seen.wait(bridge, "link changed", at)

            at = seen.mark()
            run("ip", "addr", "add", "10.249.254.1/24", "dev", bridge)
            seen.wait(bridge, "address added", at)
            run("ip", "addr", "del", "10.249.254.1/24", "dev", bridge)
            seen.wait(bridge, "address removed", at)

            # the VXLAN device rv-H is reported as its network's bridge rc-H
            at = seen.mark()
            run("ip", "link", "add", "name", vxlan, "type", "vxlan",
                "id", str(random.randint(1_000_000, 16_000_000)), "dstport", "4789")
            seen.wait(bridge, "link added", at)
            run("ip", "link", "del", "dev", vxlan)
            seen.wait(bridge, "link deleted", at)
            assert Path("/sys/class/net", bridge).exists()  # it was the VXLAN device's event
            assert seen.about(vxlan) == []

            # a port joining and leaving one of our bridges is also the bridge's event
            at = seen.mark()
            run("ip", "link", "add", "name", tap, "type", "veth", "peer", "name", peer)
            seen.wait(tap, "link added", at)
            run("ip", "link", "set", "dev", tap, "master", bridge)
            seen.wait(bridge, "port added", at)
            run("ip", "link", "del", "dev", tap)
            seen.wait(tap, "link deleted", at)
            seen.wait(bridge, "port removed", at)

            at = seen.mark()
            run("ip", "link", "del", "dev", bridge)
            seen.wait(bridge, "link deleted", at)
            assert seen.about(other) == [] and seen.about(peer) == []
        closed = seen.mark()
        watch.close()  # idempotent
        run("ip", "link", "add", "name", late, "type", "bridge")
        time.sleep(QUIET_S)
        assert seen.since(closed) == []


def test_nftables_changes_to_our_table_are_reported_once_per_burst(tmp_path: Path) -> None:
    """A rule of ours deleted by hand (or a `flush ruleset`) is reported; other tables
    are not; a burst of changes is one event; nothing after close()."""
    require_network()
    from reconciler.drivers.netlink._nftwatch import NftWatch

    home = secrets.token_hex(4)
    ours_table, other = f"reconciler_{home}", f"rctestother{home}"
    got = Collector()
    watch = NftWatch("netlink", ours_table, got).start()
    try:
        with closing(watch):
            time.sleep(0.3)  # nft monitor subscribes once started: give the child a moment
            mark = got.mark()
            run("nft", "add", "table", "inet", other)
            run("nft", "add", "chain", "inet", other, "c")
            time.sleep(0.5)
            assert got.since(mark) == []  # not our table
            run("nft", "add", "table", "inet", ours_table)
            for i in range(5):
                run("nft", "add", "chain", "inet", ours_table, f"c{i}")
            got.wait("*", "nftables changed", after=mark)
            time.sleep(0.5)  # a burst is one event
            assert [e.what for e in got.since(mark)] == ["nftables changed"]
            mark = got.mark()
            run("nft", "delete", "chain", "inet", ours_table, "c3")
            got.wait("*", "nftables changed", after=mark)
        mark = got.mark()
        run("nft", "add", "chain", "inet", ours_table, "after")
        time.sleep(0.5)
        assert got.since(mark) == []
    finally:
        for table in (ours_table, other):
            run("nft", "delete", "table", "inet", table, check=False)


def test_netlink_overflow_is_reported_and_the_watch_goes_on(netlink_driver: NetlinkDriver) -> None:
    """A reader stuck in `notify` while the kernel sends more than its socket holds: the
    messages are lost (ENOBUFS); the watch resubscribes and asks for a resync ("*")."""
    first, second = ours(), ours()
    gate = threading.Event()
    seen = Collector()

    def slow(event: HostEvent) -> None:
        seen(event)
        if event.subject == first:
            gate.wait(WAIT_S)  # the reader is stuck here while the burst below comes

    with links(first, second):
        watch = NetlinkWatch(netlink_driver.name, slow, rcvbuf=65536).start()
        with closing(watch):
            run("ip", "link", "add", "name", first, "type", "bridge")
            seen.wait(first, "link added")
            # the kernel tells alias changes of links that are up only
            run("ip", "link", "set", "dev", first, "up")
            burst = "".join(f"link set dev {first} alias burst{i}\n" for i in range(1000))
            subprocess.run(["ip", "-batch", "-"], input=burst, text=True, check=True,
                           capture_output=True, timeout=60)
            at = seen.mark()
            gate.set()
            seen.wait("*", "netlink overflow", at)
            after = seen.mark()
            run("ip", "link", "add", "name", second, "type", "bridge")
            seen.wait(second, "link added", after)


# --- libvirt --------------------------------------------------------------------------


def domain_xml(name: str) -> str:
    """A domain that needs nothing: no disk, no NIC, firmware only (runs under TCG)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><memballoon model='none'/></devices>
</domain>
"""


@contextmanager
def domains(*names: str) -> Iterator[None]:
    """Destroy and undefine these domains (those that exist) afterwards."""
    try:
        yield
    finally:
        for name in names:
            if virsh("dominfo", name, check=False).returncode == 0:
                virsh("destroy", name, check=False)
                virsh("undefine", name, check=False)


def define(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.xml"
    path.write_text(domain_xml(name))
    virsh("define", str(path))


def test_libvirt_reports_our_domains_only_and_stops_when_closed(tmp_path: Path) -> None:
    require_host()
    driver = LibvirtDriver(LibvirtSettings(uri=URI))
    assert isinstance(driver, Watching)
    name, other, late = ours(), "tstwatch-" + secrets.token_hex(4), ours()
    seen = Collector()
    with domains(name, other, late):
        watch = driver.watch(seen)
        with closing(watch):
            define(tmp_path, other)  # not ours first (events come in order)
            define(tmp_path, name)
            seen.wait(name, "domain defined")
            assert seen.about(other) == []

            at = seen.mark()
            virsh("start", name)
            seen.wait(name, "domain started", at)

            at = seen.mark()
            virsh("destroy", name)
            seen.wait(name, "domain stopped", at)

            at = seen.mark()
            virsh("undefine", name)
            seen.wait(name, "domain undefined", at)
            assert seen.about(other) == []
            assert all(e.driver == "libvirt" for e in seen.events)
        closed = seen.mark()
        watch.close()  # idempotent
        define(tmp_path, late)
        time.sleep(QUIET_S)
        assert seen.since(closed) == []


class UnixProxy:
    """A unix socket in front of libvirtd's, so a test can make "libvirtd" go away and
    come back without touching the real one: `cut()` drops every connection through it
    and refuses new ones, `restore()` accepts again."""

    def __init__(self, path: Path, target: str = LIBVIRTD_SOCKET):
        self.path = path
        self.target = target
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def restore(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)
        listener.bind(str(self.path))
        listener.listen(16)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, []
        if listener is not None:
            _shut(listener)  # wakes the accept() of its thread
            listener.close()
        self.path.unlink(missing_ok=True)
        for sock in sockets:
            _shut(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shut(src)
        _shut(dst)
        src.close()
        dst.close()


def test_libvirt_watch_reconnects_and_asks_for_a_resync(tmp_path: Path) -> None:
    """libvirtd is not up when the watch starts, then comes; later it goes away (every
    connection dropped, new ones refused for a while) and comes back: each time the watch
    connects by itself, reports ("*", "libvirt reconnected") and reports events again."""
    require_host()
    proxy = UnixProxy(tmp_path / "libvirt.sock")
    driver = LibvirtDriver(LibvirtSettings(uri=f"qemu+unix:///system?socket={proxy.path}"))
    name = ours()
    seen = Collector()
    with domains(name):
        try:
            watch = driver.watch(seen)  # cannot connect: it keeps trying
            with closing(watch):
                proxy.restore()
                seen.wait("*", "libvirt reconnected", timeout=WAIT_S + 2 * 2.0)
                define(tmp_path, name)
                seen.wait(name, "domain defined")  # events come through the proxy

                at = seen.mark()
                proxy.cut()
                time.sleep(1.0)  # the first attempt to reconnect fails
                assert seen.since(at) == []
                proxy.restore()
                seen.wait("*", "libvirt reconnected", at, timeout=WAIT_S + 2 * 2.0)

                at = seen.mark()
                virsh("undefine", name)
                seen.wait(name, "domain undefined", at)
        finally:
            proxy.cut()
