"""Netlink notifications of the host namespace, as `HostEvent`s for the daemon.

One thread owns one pyroute2 `IPRoute` socket bound to the link and IPv4 address
groups (pyroute2 0.9's sync API keeps its event loop and transport per thread, so the
socket is made, bound, read and closed in that thread). Only devices with one of our
names are reported (see `subject_of`); a VXLAN or VLAN device is reported as its
network's bridge (rv-H / rl-H -> rc-H), since the daemon maps subjects to resources by
the bridge. A device that joins or leaves one of our bridges (a tap, a DHCP or router
leg, a flat network's uplink) is also reported as a port change of that bridge.

Noise: the kernel repeats RTM_NEWLINK for unchanged links (a bridge on each change of
its ports, statistics); a link is reported only when it is new to us or one of name,
flags, operstate, master, MTU, MAC or alias changed since its last message. Bridge
port messages (family AF_BRIDGE) are not link changes and are skipped. (The kernel itself
says nothing when the alias of a link that is down changes.)

Losing messages: when the socket's buffer overflows (ENOBUFS) pyroute2 leaves the socket
failed for good, so the thread opens a new one and then reports
``HostEvent(subject="*", what="netlink overflow")`` (any other failure of the socket:
``"netlink reopened"``): the daemon resyncs everything. Both are reported after the new
socket is bound, so a resync started then misses nothing. Router and DHCP namespaces are
not watched (their devices inside are only reached through their host-side legs).
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any, Callable, NamedTuple

import structlog

from reconciler.drivers.netlink import _names
from reconciler.errors import PermanentError
from reconciler.models import Key
from reconciler.naming import tap_name
from reconciler.state import HostEvent

try:  # pyroute2 is pure Python; the driver says so clearly when it is missing
    from pyroute2 import IPRoute
    from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK
except ImportError:  # pragma: no cover - only on machines without the dependency
    IPRoute = None  # type: ignore[assignment,misc]
    RTMGRP_IPV4_IFADDR = RTMGRP_LINK = 0

log = structlog.get_logger("reconciler.drivers.netlink")

GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR
#: the subject that asks the daemon to resync everything
EVERYTHING = "*"
OVERFLOW = "netlink overflow"
REOPENED = "netlink reopened"
LINK_ADDED = "link added"
LINK_CHANGED = "link changed"
LINK_DELETED = "link deleted"
PORT_ADDED = "port added"
PORT_REMOVED = "port removed"
ADDRESS_ADDED = "address added"
ADDRESS_REMOVED = "address removed"
#: how long the thread waits before opening a new socket after a failure (not ENOBUFS)
RETRY_S = 1.0
#: how long `watch()` waits for the socket to be bound, and `close()` for the thread
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0


def _prefix(name: str) -> str:
    return name[:3]


# Our device name prefixes, taken from the functions that name the devices (so they
# cannot drift apart): bridge rc-, VXLAN rv-, VLAN rl-, DHCP leg rd-, router legs rr- and
# rg-, instance taps rt-.
_SAMPLE_NET = Key("Network", "t", "n")
_SAMPLE_ROUTER = Key("Router", "t", "r")
BRIDGE_PREFIX = _prefix(_names.bridge(_SAMPLE_NET))
_BRIDGE_PORTS = (  # devices named after their network's bridge: reported as the bridge
    _prefix(_names.vxlan_device(_names.bridge(_SAMPLE_NET))),
    _prefix(_names.vlan_device(_names.bridge(_SAMPLE_NET))),
)
OUR_PREFIXES = (
    BRIDGE_PREFIX,
    *_BRIDGE_PORTS,
    _prefix(_names.dhcp_legs(_names.bridge(_SAMPLE_NET), "10.0.0.0/24")[0]),
    _prefix(_names.router_leg(_SAMPLE_ROUTER, _SAMPLE_NET)[0]),
    _prefix(_names.gateway_leg(_SAMPLE_ROUTER, _SAMPLE_NET)[0]),
    _prefix(tap_name("t", "i", "n")),
)


def subject_of(ifname: str | None) -> str | None:
    """The subject to report for a device: its own name, its bridge's for a VXLAN or
    VLAN device; None when the device is not (named as) one of ours."""
    if not ifname or not ifname.startswith(OUR_PREFIXES):
        return None
    prefix = _prefix(ifname)
    if prefix in _BRIDGE_PORTS:
        return BRIDGE_PREFIX + ifname[len(prefix):]
    return ifname


class _Link(NamedTuple):
    """What of a link's RTM_NEWLINK counts as a change (not its statistics)."""

    name: str
    flags: int
    operstate: str | None
    master: int | None
    mtu: int | None
    address: str | None
    alias: str | None


def _link(msg: Any, previous: _Link | None) -> _Link:
    name = msg.get_attr("IFLA_IFNAME") or (previous.name if previous else "")
    return _Link(name, int(msg.get("flags", 0) or 0), msg.get_attr("IFLA_OPERSTATE"),
                 msg.get_attr("IFLA_MASTER") or None, msg.get_attr("IFLA_MTU"),
                 msg.get_attr("IFLA_ADDRESS"), msg.get_attr("IFLA_IFALIAS"))


def _close_quietly(ipr: Any) -> None:
    """Close an IPRoute, also one whose socket failed: pyroute2 0.9 re-raises the
    socket's error (e.g. ENOBUFS) from close() and then leaks the socket and its event
    loop, unless the error is cleared first."""
    try:
        ipr.close()
        return
    except Exception:  # noqa: BLE001 - a failed socket re-raises its error here
        pass
    try:
        error_event = getattr(ipr.asyncore, "_error_event", None)
        if error_event is not None:
            error_event.clear()
        ipr.close()
    except Exception as exc:  # noqa: BLE001 - best effort: the thread must go on
        log.debug("netlink watch: closing a failed socket", error=repr(exc))


def start_watch(driver: str, notify: Callable[[HostEvent], None]) -> "NetlinkWatch":
    """A started `NetlinkWatch` reporting as `driver` to `notify`."""
    if IPRoute is None:
        raise PermanentError("pyroute2 is not installed: run `make setup`")
    return NetlinkWatch(driver, notify).start()


class NetlinkWatch:
    """A running watcher of the host namespace's links and IPv4 addresses (see the
    module docstring); `close()` stops it."""

    def __init__(self, driver: str, notify: Callable[[HostEvent], None], *,
                 rcvbuf: int | None = None):
        self._driver = driver
        self._notify = notify
        #: the socket's receive buffer (None: pyroute2's 1 MiB); tests make it small
        self._rcvbuf = rcvbuf
        #: held while notifying and while closing: no notify after close() returned
        self._lock = threading.RLock()
        self._closed = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._ipr: Any = None
        #: link index -> its last state (from the initial dump and link messages)
        self._links: dict[int, _Link] = {}
        self._thread = threading.Thread(target=self._run, name="reconciler-netlink-watch",
                                        daemon=True)

    def start(self, timeout: float = START_TIMEOUT_S) -> "NetlinkWatch":
        """Start the thread and wait (up to `timeout`) until its socket is bound, so any
        change made after this returns is reported."""
        self._thread.start()
        if not self._ready.wait(timeout):
            log.warning("netlink watch: not subscribed yet; it keeps trying", timeout_s=timeout)
        return self

    def close(self) -> None:
        """Stop the thread (idempotent); no notify is called once this returned."""
        with self._lock:
            first = not self._closed
            self._closed = True
            ipr = self._ipr
        self._stop.set()
        on_thread = threading.current_thread() is self._thread
        if first and ipr is not None and not on_thread:
            try:  # from another thread: wakes the thread's get() (it returns nothing)
                ipr.close()
            except Exception as exc:  # noqa: BLE001 - the thread closes it again anyway
                log.debug("netlink watch: closing the socket", error=repr(exc))
        if not on_thread and self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("netlink watch: the thread did not stop in time",
                            timeout_s=STOP_TIMEOUT_S)

    # --- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        reason: str | None = None  # why the socket was (re)opened: reported once bound
        while not self._stop.is_set():
            ipr = None
            failed = True
            try:
                ipr = IPRoute() if self._rcvbuf is None else IPRoute(rcvbuf=self._rcvbuf)
                ipr.bind(groups=GROUPS)
                with self._lock:
                    if self._closed:
                        return
                    self._ipr = ipr
                self._prime()
                if reason is not None:
                    self._emit(EVERYTHING, reason)
                self._ready.set()
                self._pump(ipr)
                failed = False  # stopped
            except Exception as exc:  # noqa: BLE001 - never raise from the thread
                if self._stop.is_set():
                    return
                if isinstance(exc, OSError) and exc.errno == errno.ENOBUFS:
                    log.warning("netlink watch: socket buffer overflow, messages lost; "
                                "resubscribing")
                    reason = OVERFLOW
                else:
                    log.warning("netlink watch: socket failed; resubscribing", error=repr(exc),
                                exc_info=True)
                    reason = REOPENED
            finally:
                with self._lock:
                    self._ipr = None
                if ipr is not None:
                    _close_quietly(ipr)
            if failed and reason != OVERFLOW:
                self._stop.wait(RETRY_S)

    def _prime(self) -> None:
        """The links there are now, so a link's next message is compared with its state
        (not reported as new) and bridge ports know their bridge's name."""
        dump = IPRoute()
        try:
            links = {}
            for msg in dump.get_links():
                links[msg["index"]] = _link(msg, None)
        finally:
            _close_quietly(dump)
        self._links = links

    def _pump(self, ipr: Any) -> None:
        while not self._stop.is_set():
            messages = ipr.get()
            if not messages:
                if self._stop.is_set():
                    return
                raise ConnectionError("the netlink socket returned nothing (closed)")
            for msg in messages:
                try:
                    events = self._handle(msg)
                except Exception:  # noqa: BLE001 - one odd message must not stop the watch
                    log.warning("netlink watch: cannot read a message", exc_info=True)
                    continue
                for subject, what in events.items():
                    self._emit(subject, what)

    def _handle(self, msg: Any) -> dict[str, str]:
        """subject -> what for one message (one event per subject: the first wins)."""
        event = msg.get("event")
        out: dict[str, str] = {}
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            if msg.get("family", socket.AF_UNSPEC) != socket.AF_UNSPEC:
                return out  # AF_BRIDGE: a bridge port's state, not the link itself
            index = msg["index"]
            previous = self._links.get(index)
            if event == "RTM_DELLINK":
                self._links.pop(index, None)
                name = msg.get_attr("IFLA_IFNAME") or (previous.name if previous else None)
                self._add(out, subject_of(name), LINK_DELETED)
                master = previous.master if previous else msg.get_attr("IFLA_MASTER")
                self._add(out, self._bridge(master), PORT_REMOVED)
                return out
            current = _link(msg, previous)
            self._links[index] = current
            if previous == current:
                return out
            if previous is None:
                self._add(out, subject_of(current.name), LINK_ADDED)
            elif previous.name != current.name:  # renamed: the old name is gone
                self._add(out, subject_of(previous.name), LINK_DELETED)
                self._add(out, subject_of(current.name), LINK_ADDED)
            else:
                self._add(out, subject_of(current.name), LINK_CHANGED)
            old_master = previous.master if previous else None
            if old_master != current.master:
                self._add(out, self._bridge(old_master), PORT_REMOVED)
                self._add(out, self._bridge(current.master), PORT_ADDED)
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            known = self._links.get(msg.get("index"))
            label = msg.get_attr("IFA_LABEL")
            name = known.name if known else (label.split(":", 1)[0] if label else None)
            what = ADDRESS_ADDED if event == "RTM_NEWADDR" else ADDRESS_REMOVED
            self._add(out, subject_of(name), what)
        return out

    def _bridge(self, index: int | None) -> str | None:
        """The name of link `index` when it is one of our bridges."""
        link = self._links.get(index) if index else None
        if link is None or not link.name.startswith(BRIDGE_PREFIX):
            return None
        return link.name

    @staticmethod
    def _add(out: dict[str, str], subject: str | None, what: str) -> None:
        if subject is not None and subject not in out:
            out[subject] = what

    def _emit(self, subject: str, what: str) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._notify(HostEvent(driver=self._driver, subject=subject, what=what))
            except Exception:  # noqa: BLE001 - the daemon's bug must not stop the watch
                log.warning("netlink watch: notify failed", subject=subject, what=what,
                            exc_info=True)
