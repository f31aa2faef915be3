"""`make demo`'s proof that the example cloud runs: every guest got its address by DHCP
and answers a ping over its tenant network; what each guest has attached.

Checked with the host's own tools, not through reconciler's drivers: `reconciler status
--json` only says which bridge and DHCP namespace a network has; the addresses come from
dnsmasq's reservation and lease files, the answers from `ip netns exec NS ping`, the
disks from `virsh domblklist`.

    python scripts/demo_check.py HOST_CONFIG [--timeout 180]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECONCILER = REPO / ".venv" / "bin" / "reconciler"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def status(config: Path) -> list[dict]:
    env = {**os.environ, "RECONCILER_HOST_CONFIG": str(config)}
    result = subprocess.run([str(RECONCILER), "status", "--json"], capture_output=True, text=True, env=env,
                            timeout=300, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        sys.exit(f"reconciler status failed:\n{result.stderr}")
    return json.loads(result.stdout)


def ports(state_dir: Path, bridge: str) -> list[tuple[str, str, str, Path]]:
    """(mac, ip, name, leases file) of every reservation of a network's DHCP."""
    found = []
    for hosts in sorted((state_dir / "netlink" / "dhcp" / bridge).glob("*/hosts")):
        for line in hosts.read_text().splitlines():
            parts = line.strip().split(",")
            if len(parts) >= 3:
                found.append((parts[0], parts[1], parts[2], hosts.with_name("leases")))
    return found


def leased(leases: Path, mac: str) -> bool:
    try:
        return any(line.split()[1:2] == [mac] for line in leases.read_text().splitlines())
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host_config", type=Path)
    parser.add_argument("--timeout", type=float, default=180.0, help="Seconds to wait for every guest.")
    args = parser.parse_args()
    state_dir = Path(yaml.safe_load(args.host_config.read_text())["stateDir"])
    rows = status(args.host_config)
    networks = {(r["tenant"], r["name"]): r["host"] for r in rows if r["kind"] == "Network"}
    instances = {(r["tenant"], r["name"]): r["host"] for r in rows if r["kind"] == "Instance"}
    checks = []
    for (tenant, net), host in sorted(networks.items()):
        if "namespace" not in host:
            continue  # no DHCP on it (the provider network)
        for mac, ip, name, leases in ports(state_dir, host["bridge"]):
            if (tenant, name) in instances:
                checks.append({"guest": f"{tenant}/{name}", "network": f"{tenant}/{net}", "ip": ip, "mac": mac,
                               "ns": host["namespace"], "leases": leases, "lease": False, "answer": None})
    if not checks:
        print("no guests with DHCP found: nothing to check")
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        for c in checks:
            c["lease"] = c["lease"] or leased(c["leases"], c["mac"])
            if c["lease"] and c["answer"] is None:
                ping = run("ip", "netns", "exec", c["ns"], "ping", "-c1", "-W1", c["ip"])
                if ping.returncode == 0:
                    rtt = next((p.split("=")[1] for p in ping.stdout.split() if p.startswith("time=")), "?")
                    c["answer"] = f"{rtt} ms"
        if all(c["answer"] for c in checks):
            break
        time.sleep(1)
    print(f"{'GUEST':<16} {'NETWORK':<18} {'ADDRESS':<14} {'DHCP LEASE':<11} {'PING':<10} DISKS")
    for c in checks:
        tenant, name = c["guest"].split("/")
        disks = run("virsh", "-q", "-c", "qemu:///system", "domblklist", instances[(tenant, name)]["domain"])
        targets = [line.split()[0] for line in disks.stdout.splitlines() if line.split()]
        print(f"{c['guest']:<16} {c['network']:<18} {c['ip']:<14} {'yes' if c['lease'] else 'NO':<11} "
              f"{c['answer'] or 'NO ANSWER':<10} {', '.join(targets)}")
    failed = [c["guest"] for c in checks if not c["answer"]]
    if failed:
        print(f"\nNot answering after {args.timeout:.0f} s: {', '.join(failed)} "
              f"(their consoles: {state_dir}/libvirt/instances/<domain>/console.log)")
        return 1
    print(f"\nEvery guest ({len({c['guest'] for c in checks})}) got its addresses by DHCP and answers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
