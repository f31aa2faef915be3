"""One dnsmasq per subnet: its files, its command line, and its supervision.

Each runs inside the network's DHCP namespace on the subnet's leg (``d-X``), like
Neutron's DHCP agent: DHCP with a fixed reservation per instance NIC (the hosts file),
and DNS for the instance names under ``TENANT.internal`` (an extra hosts file, so names
of NICs with a fixed address resolve without a lease). Files live in
``STATE_DIR/dhcp/BRIDGE/CIDR/``: ``hosts``, ``opts``, ``names``, ``leases``, ``pid``,
``dnsmasq.log``.

dnsmasq drops to user nobody after it starts and reads the hosts, options and names
files again on SIGHUP, so those are world-readable (they hold MACs, addresses and host
names, nothing secret) and their folders traversable. A change of only those files is a
SIGHUP; any other change (range, lease time, interface, flags) is a restart, found by
comparing the running process's command line with the wanted one. A process counts as
ours only when /proc shows dnsmasq with our hosts file; a zombie counts as dead.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Callable, Sequence

from reconciler.procs import is_alive
from reconciler.drivers.netlink import _host, _names
from reconciler.drivers.netlink._nft import Port
from reconciler.errors import DriverError, PermanentError, TransientError
from reconciler.fileio import write_atomic

STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class SubnetDhcp:
    """Everything about one subnet's dnsmasq."""

    program: str
    namespace: str
    interface: str  # the leg inside the namespace
    cidr: IPv4Network
    server: IPv4Address
    start: IPv4Address
    end: IPv4Address
    gateway: IPv4Address
    dns_servers: tuple[str, ...]
    mtu: int
    lease_seconds: int
    tenant: str
    #: the network's first subnet serves clients without a reservation; the others only known ones
    first: bool
    directory: Path

    @property
    def hosts(self) -> Path:
        return self.directory / "hosts"

    @property
    def opts(self) -> Path:
        return self.directory / "opts"

    @property
    def names(self) -> Path:
        return self.directory / "names"

    @property
    def leases(self) -> Path:
        return self.directory / "leases"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"

    @property
    def log(self) -> Path:
        return self.directory / "dnsmasq.log"

    @property
    def domain(self) -> str:
        return f"{self.tenant}.internal"

    def argv(self) -> list[str]:
        """The command line (without `ip netns exec`): compared with the running one."""
        args = [
            self.program,
            "--conf-file=/dev/null",
            f"--pid-file={self.pid_file}",
            f"--dhcp-leasefile={self.leases}",
            f"--dhcp-hostsfile={self.hosts}",
            f"--dhcp-optsfile={self.opts}",
            f"--addn-hosts={self.names}",
            f"--interface={_names.check_ifname(self.interface)}",
            "--bind-interfaces",
            "--except-interface=lo",
            f"--listen-address={self.server}",
            f"--dhcp-range={self.start},{self.end},{self.cidr.netmask},{self.lease_seconds}s",
            "--dhcp-authoritative",
            "--no-ping",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            f"--domain={self.domain}",
            f"--local=/{self.domain}/",
            f"--log-facility={self.log}",
        ]
        if not self.first:
            args.append("--dhcp-ignore=tag:!known")
        return args

    # --- file contents ------------------------------------------------------------------

    def hosts_text(self, ports: Sequence[Port]) -> str:
        """`MAC,IP,NAME` for each port with an address in this subnet. The first subnet
        also names the ports without an address (served from its range) and ignores
        those reserved in another subnet, so they get one offer, not two."""
        lines = []
        named: set[str] = set()
        for port in ports:
            if port.ip is not None and IPv4Address(port.ip) in self.cidr:
                name = _unique(port.hostname, named)
                lines.append(",".join(x for x in (port.mac, port.ip, name) if x))
            elif self.first and port.ip is None:
                name = _unique(port.hostname, named)
                lines.append(",".join(x for x in (port.mac, name) if x))
            elif self.first:
                lines.append(f"{port.mac},ignore")
        return "".join(line + "\n" for line in lines)

    def opts_text(self) -> str:
        dns = ",".join(self.dns_servers) if self.dns_servers else str(self.server)
        return (f"option:router,{self.gateway}\n"
                f"option:dns-server,{dns}\n"
                f"option:mtu,{self.mtu}\n")

    def names_text(self, ports: Sequence[Port]) -> str:
        """Hosts-file lines for DNS: every port of the network with an address."""
        lines = []
        named: set[str] = set()
        for port in ports:
            name = _unique(port.hostname, named)
            if port.ip is not None and name:
                lines.append(f"{port.ip} {name}.{self.domain} {name}\n")
        return "".join(lines)

    def files(self, ports: Sequence[Port]) -> dict[Path, str]:
        return {self.hosts: self.hosts_text(ports), self.opts: self.opts_text(),
                self.names: self.names_text(ports)}


def _unique(name: str, seen: set[str]) -> str:
    """A host name once per file (two tenants' instances may share a name on an external
    network); the later ones go without a name, and so does a name DNS cannot carry."""
    name = _names.dns_label(name)
    if not name or name in seen:
        return ""
    seen.add(name)
    return name


# --- files ----------------------------------------------------------------------------


def make_dirs(path: Path) -> None:
    """Create with 0755: dnsmasq, running as nobody, reads its files again on SIGHUP."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)


def unreachable_parent(path: Path) -> Path | None:
    """The first folder above `path` that user nobody cannot traverse, if any."""
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & 0o001:
            return parent
    return None


def write_files(files: dict[Path, str]) -> bool:
    """Write what differs (atomically, world-readable); whether anything changed."""
    changed = False
    for path, text in files.items():
        try:
            if path.read_text() == text:
                continue
        except OSError:
            pass
        write_atomic(path, text, 0o644)
        changed = True
    return changed


def files_differ(files: dict[Path, str]) -> list[Path]:
    out = []
    for path, text in files.items():
        try:
            if path.read_text() != text:
                out.append(path)
        except OSError:
            out.append(path)
    return out


# --- processes ------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cmdline(pid: int, proc: Path = Path("/proc")) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True, slots=True)
class Running:
    pid: int
    argv: tuple[str, ...]


def running(config: SubnetDhcp, proc: Path = Path("/proc")) -> Running | None:
    """The live dnsmasq of this subnet, if its pid file names one that is ours."""
    pid = read_pid(config.pid_file)
    if pid is None or not is_alive(pid, proc):
        return None
    argv = cmdline(pid, proc)
    if not argv or os.path.basename(argv[0]) != os.path.basename(config.program):
        return None
    if f"--dhcp-hostsfile={config.hosts}" not in argv:
        return None
    return Running(pid, tuple(argv))


def up_to_date(config: SubnetDhcp, process: Running) -> bool:
    """Whether the running process has the wanted command line (else: restart)."""
    return list(process.argv[1:]) == config.argv()[1:]


def start(config: SubnetDhcp) -> None:
    """Start dnsmasq in the namespace; it daemonizes once it has bound its sockets, and
    its exit status says whether that worked."""
    result = _host.run(_host.in_namespace(config.namespace, config.argv()),
                       f"starting dnsmasq for {config.cidr}")
    if result.returncode != 0:
        message = _host.first_lines(result.stderr or result.stdout)
        if "in use" in message:
            raise TransientError(f"dnsmasq for {config.cidr} could not start: {message}")
        raise PermanentError(f"dnsmasq for {config.cidr} could not start: {message}")


def reload(pid: int) -> None:
    """SIGHUP: dnsmasq reads its hosts, options and names files again."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        pass


def stop(pid: int, sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
         timeout_s: float = STOP_TIMEOUT_S, proc: Path = Path("/proc")) -> None:
    """SIGTERM, wait until it is dead (or a zombie), SIGKILL if it takes too long."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = clock() + timeout_s
        while clock() < deadline:
            if not is_alive(pid, proc):
                return
            sleep(0.02)
    if is_alive(pid, proc):
        raise TransientError(f"dnsmasq (pid {pid}) does not stop")


def version(program: str) -> str:
    """`dnsmasq --version`'s first line, or why there is none."""
    try:
        result = _host.run([program, "--version"], "asking dnsmasq its version", timeout=5)
    except DriverError as exc:
        return str(exc)
    first = (result.stdout or "").splitlines()
    return first[0].split("Copyright")[0].strip() if first else "unknown version"
