#!/usr/bin/env bash
# Host tools of the storage driver, idempotently (as root): lvm2 (logical volumes),
# thin-provisioning-tools (thin_check, which lvm runs on thin pools) and qemu-utils
# (qemu-img, for qcow2 volumes). Says whether the kernel has device-mapper: without it
# lvm can change metadata (create, extend, tag, remove) but activate nothing.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "setup-storage: not root: skipping (the storage driver's LVM tests will skip)" >&2
  exit 0
fi
export PATH="$PATH:/usr/sbin:/sbin"
need=()
command -v lvm >/dev/null || need+=(lvm2)
command -v thin_check >/dev/null || need+=(thin-provisioning-tools)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# libdevmapper creates /dev/mapper/control whenever it is missing, driver or not: the
# kernel's list of misc drivers tells (a module not loaded yet: try loading it)
if ! grep -qw device-mapper /proc/misc 2>/dev/null; then
  modprobe dm_mod 2>/dev/null || true
fi
if grep -qw device-mapper /proc/misc 2>/dev/null; then
  dm="device-mapper: present"
else
  dm="device-mapper: missing: LVM volumes can be created but not activated (metadata only)"
fi
version=$(LVM_SUPPRESS_FD_WARNINGS=1 lvm version 2>/dev/null | awk '/LVM version/{print $3}')
echo "setup-storage: lvm ${version:-unknown}, $dm"
