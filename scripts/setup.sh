#!/usr/bin/env bash
# Install what reconciler needs, idempotently: Debian packages, then a virtualenv.
# As root it also installs and starts the host services the real drivers need
# (libvirtd/virtlogd; nftables, dnsmasq; lvm2, qemu-utils; an OpenStack Swift
# all-in-one on 127.0.0.1:8080 with memcached) and builds the test guest image.
set -euo pipefail
PYTHON=${1:-python3.11}
VENV=${2:-.venv}

need_apt=()
command -v git >/dev/null || need_apt+=(git)
if ! command -v "$PYTHON" >/dev/null; then
  PYTHON=python3
fi
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "setup: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi
HERE=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" = 0 ]; then
  # libvirt-python builds against libvirt-dev: the host packages come before pip
  bash "$HERE/setup-libvirt.sh"
  bash "$HERE/setup-network.sh"
  bash "$HERE/setup-storage.sh"
  bash "$HERE/setup-swift.sh"
else
  echo "setup: not root: skipping libvirtd and the test guest (the real-driver tests will skip)" >&2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! pkg-config --exists libvirt 2>/dev/null; then
  echo "setup: libvirt-dev and pkg-config are needed to build libvirt-python (run as root)" >&2
  exit 1
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
if [ "$(id -u)" = 0 ]; then
  bash "$HERE/build-test-image.sh"
fi
echo "setup: ready ($("$VENV/bin/python" --version), virtualenv $VENV)"
