"""Whether this machine can run the tests that need the real host (root, libvirtd, the
test guest), and one way to act on the answer.

`make test` sets RECONCILER_REQUIRE_HOST=1 when it runs as root (as CI does): there a
missing libvirtd or test image fails these tests instead of skipping them, so a broken
setup can never pass as green. Elsewhere (not root) they skip and say why.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

URI = "qemu:///system"
TEST_IMAGE = Path(os.environ.get("RECONCILER_TEST_IMAGE", "/var/lib/reconciler/images/tiny.qcow2"))
REQUIRE_VAR = "RECONCILER_REQUIRE_HOST"


@functools.cache
def host_unready() -> tuple[str, ...]:
    """Why the real-host tests cannot run here (empty: they can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (bridges, libvirt system domains)")
    if shutil.which("virsh") is None:
        reasons.append("virsh missing: run scripts/setup-libvirt.sh")
    elif subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                        timeout=20, check=False).returncode != 0:
        reasons.append(f"libvirtd does not answer at {URI}: run scripts/setup-libvirt.sh")
    if not TEST_IMAGE.exists():
        reasons.append(f"{TEST_IMAGE} missing: run scripts/build-test-image.sh")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        reasons.append("libvirt-python is not installed: run make setup")
    return tuple(reasons)


#: what the netlink driver runs (scripts/setup-network.sh installs them)
NETWORK_TOOLS = ("ip", "nft", "dnsmasq", "busybox", "ping")


@functools.cache
def network_unready() -> tuple[str, ...]:
    """Why the netlink driver's real-kernel tests cannot run here (empty: they can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (bridges, namespaces, nftables)")
    reasons += [f"{tool} missing: run scripts/setup-network.sh" for tool in NETWORK_TOOLS
                if shutil.which(tool) is None]
    if not Path("/proc/sys/net/bridge").exists():
        reasons.append("br_netfilter is not loaded: run scripts/setup-network.sh")
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        reasons.append("pyroute2 is not installed: run make setup")
    return tuple(reasons)


def require(reasons: tuple[str, ...]) -> None:
    """Skip with `reasons` (or fail, under RECONCILER_REQUIRE_HOST=1); nothing when empty."""
    if not reasons:
        return
    message = "; ".join(reasons)
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"the real host is required here ({REQUIRE_VAR}=1) but: {message}", pytrace=False)
    pytest.skip(message)


def require_host() -> None:
    """Skip (or, with RECONCILER_REQUIRE_HOST=1, fail) when the real host is not ready."""
    require(host_unready())


def require_network() -> None:
    """Like `require_host()`, for the netlink driver alone (no libvirt needed)."""
    require(network_unready())
