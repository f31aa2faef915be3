#!/usr/bin/env bash
# Install libvirt/QEMU and the guest-image tools, and make sure virtlogd and libvirtd run
# (with or without systemd). Idempotent; run as root.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "setup-libvirt: must run as root" >&2; exit 1; }

PACKAGES=(libvirt-daemon-system qemu-system-x86 qemu-utils libvirt-dev pkg-config
          syslinux syslinux-common mtools dosfstools fdisk)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-libvirt: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# True when pid file $1 names a live process called $2 (zombies count as dead: killed
# processes linger as zombies here; the name check guards against a reused PID).
alive() {
  local pid state
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/stat" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
  [ "$state" != Z ] && [ "$state" != X ]
}

if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  systemctl start virtlogd.socket virtlogd libvirtd
else
  mkdir -p /run/libvirt
  for d in virtlogd libvirtd; do
    if ! alive "/run/$d.pid" "$d"; then
      rm -f "/run/$d.pid"
      "$d" -d   # daemonizes and writes /run/$d.pid
    fi
  done
fi

# /dev/kvm: libvirt's QEMU runs as libvirt-qemu (group kvm). Give group kvm rw access,
# which is what udev would do on a normal system; there is no udev here.
if [ -c /dev/kvm ]; then
  getent group kvm >/dev/null && chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

deadline=$((SECONDS + 30))
until virsh -c qemu:///system version >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    echo "setup-libvirt: libvirtd did not answer 'virsh -c qemu:///system version' within 30 s" >&2
    virsh -c qemu:///system version >&2 || true
    exit 1
  fi
  sleep 0.5
done

echo "setup-libvirt: ready ($(libvirtd --version | awk '{print "libvirt " $NF}')," \
     "$(qemu-system-x86_64 --version | awk 'NR==1{print "QEMU " $4}')," \
     "kvm: $([ -c /dev/kvm ] && echo present || echo absent))"
