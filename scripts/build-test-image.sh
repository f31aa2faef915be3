#!/usr/bin/env bash
# Build the test guest image (Debian cloud kernel + busybox initramfs from guest/, on a
# syslinux-booted FAT16 disk) as qcow2. Idempotent: skipped while the image is newer than
# guest/* and this script. Usage: build-test-image.sh [IMAGE]
# (default $RECONCILER_TEST_IMAGE, else /var/lib/reconciler/images/tiny.qcow2).
# No mounting, no loop devices, no root needed once the packages are installed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$ROOT/scripts/$(basename "${BASH_SOURCE[0]}")
GUEST=$ROOT/guest
IMAGE=$(realpath -m "${1:-${RECONCILER_TEST_IMAGE:-/var/lib/reconciler/images/tiny.qcow2}}")
CACHE=${RECONCILER_CACHE_DIR:-/var/cache/reconciler}/guest-debs

if [ -f "$IMAGE" ] && [ -z "$(find "$GUEST" "$SELF" -newer "$IMAGE" -print -quit)" ]; then
  echo "build-test-image: $IMAGE is up to date"
  exit 0
fi

# Tools (package: command or file that proves it is installed).
declare -A NEED=([fdisk]=sfdisk [dosfstools]=mkfs.vfat [mtools]=mcopy [syslinux]=syslinux
                 [syslinux-common]=/usr/lib/syslinux/mbr/mbr.bin [qemu-utils]=qemu-img)
missing=()
for p in "${!NEED[@]}"; do
  t=${NEED[$p]}
  if [[ $t == /* ]]; then [ -e "$t" ] || missing+=("$p")
  else command -v "$t" >/dev/null || missing+=("$p"); fi
done
apt_updated=
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt_updated=1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The exact kernel package behind the metapackage (a glob would fetch every kernel).
kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}'
}
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ] && [ -z "$apt_updated" ]; then   # fresh machine: no package lists yet
  apt-get update -qq; KPKG=$(kernel_pkg)
fi
[ -n "$KPKG" ] || { echo "build-test-image: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }

# Download into the cache once (kept for re-runs; other kernel versions are dropped).
mkdir -p "$CACHE"
cd "$CACHE"
find . -maxdepth 1 -name 'linux-image-*.deb' ! -name "${KPKG}_*.deb" -delete
for p in "$KPKG" busybox-static; do
  # Sandbox user root: _apt cannot write into this root-owned cache directory.
  compgen -G "${p}_*.deb" >/dev/null && continue
  apt-get download -qq -o APT::Sandbox::User=root "$p" ||
    { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root "$p"; }  # stale lists
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/reconciler-image.XXXXXX")
TMP_IMAGE=$IMAGE.tmp.$$
trap 'rm -rf "$WORK" "$TMP_IMAGE"' EXIT
dpkg -x "$(compgen -G "${KPKG}_*.deb" | head -n1)" "$WORK/kernel"
dpkg -x "$(compgen -G 'busybox-static_*.deb' | head -n1)" "$WORK/busybox"
KVER=${KPKG#linux-image-}
MODDIR=$WORK/kernel/lib/modules/$KVER

# --- initramfs: busybox, /init, config files and the modules listed in guest/modules
R=$WORK/root
mkdir -p "$R"/{bin,sbin,etc/acpi/PWRF,lib/modules,www/cgi-bin,proc,sys,dev,run,tmp}
cp "$WORK/busybox/bin/busybox" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
install -m 0755 "$GUEST/init" "$R/init"
install -m 0755 "$GUEST/udhcpc.script" "$R/etc/udhcpc.script"
install -m 0755 "$GUEST/info.cgi" "$R/www/cgi-bin/info"
install -m 0755 "$GUEST/acpi/PWRF-00000080" "$R/etc/acpi/PWRF/00000080"
install -m 0644 "$GUEST/inittab" "$R/etc/inittab"
grep -v '^#' "$GUEST/modules" >"$R/etc/modules"
while read -r m; do
  [ -n "$m" ] || continue
  if grep -q "/$m\.ko$" "$MODDIR/modules.builtin"; then continue; fi   # built in: nothing to load
  f=$(find "$MODDIR/kernel" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || { echo "build-test-image: module $m not in $KPKG" >&2; exit 1; }
  case "$f" in   # busybox insmod wants plain .ko
    *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
    *) cp "$f" "$R/lib/modules/$m.ko" ;;
  esac
done <"$R/etc/modules"
# No cpio on the host: busybox's own cpio writes the newc archive.
(cd "$R" && find . | LC_ALL=C sort | "$WORK/busybox/bin/busybox" cpio -o -H newc 2>/dev/null) |
  gzip -1 >"$WORK/initrd.img"

# --- 32 MiB raw disk: MBR with syslinux's boot code, one bootable FAT16 partition at 1 MiB
RAW=$WORK/disk.raw
truncate -s 32M "$RAW"
echo 'start=2048, type=6, bootable' | sfdisk -q "$RAW"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none
mkfs.vfat -F 16 -n TINYBOOT --offset=2048 "$RAW" $((31 * 1024)) >/dev/null   # size in KiB
export MTOOLS_SKIP_CHECK=1
mcopy -i "$RAW@@1048576" "$WORK/kernel/boot/vmlinuz-$KVER" ::vmlinuz
mcopy -i "$RAW@@1048576" "$WORK/initrd.img" ::initrd.img
mcopy -i "$RAW@@1048576" "$GUEST/syslinux.cfg" ::syslinux.cfg
syslinux --install --offset 1048576 "$RAW"

mkdir -p "$(dirname "$IMAGE")"
qemu-img convert -q -O qcow2 "$RAW" "$TMP_IMAGE"
chmod 0644 "$TMP_IMAGE"
mv -f "$TMP_IMAGE" "$IMAGE"   # atomic: readers see the old image or the new one
echo "build-test-image: $IMAGE ($KPKG, initrd $(du -k "$WORK/initrd.img" | cut -f1) KiB," \
     "image $(du -k "$IMAGE" | cut -f1) KiB)"
