#!/bin/bash
# Build the Soft-RoCE guest image into OUT (a fresh directory). Called by softroce.py, which
# keys the cache directory on a hash of this file, guest/init and the pins below; change any
# of them and the next run builds a new image.
#
#   OUT/rootfs/            minbase bookworm: python3, python3-pyverbs, rdma-core, the project's
#                          pure-Python deps; lib/modules/$KVER holds a module subset (depmod'ed)
#   OUT/vmlinuz            from $KPKG (never installed: dpkg-deb -x, no initramfs-tools)
#   OUT/initrd.cpio.gz     busybox-static + the virtio/9p modules + guest/init
#   OUT/manifest.txt       what went in (kernel package version, package versions)
#
# Needs root (debootstrap, chroot), debootstrap, busybox-static, cpio, kmod, network to the
# Debian mirror. The guest image never gets a network device; see guest/init.
set -euo pipefail

OUT=${1:?usage: build.sh OUT}
HERE=$(cd "$(dirname "$0")" && pwd)
: "${KPKG:=linux-image-6.1.0-57-amd64}"     # pinned ABI: Debian renames it on ABI bumps
: "${KVER:=6.1.0-57-amd64}"                 # the modules directory inside it
: "${SUITE:=bookworm}"
: "${DEBIAN_MIRROR:=http://deb.debian.org/debian}"
: "${DEBIAN_SECURITY_MIRROR:=http://deb.debian.org/debian-security}"   # point kernels live here
# python3-cffi-backend: python3-zstandard needs it through a virtual package debootstrap cannot resolve
PKGS=kmod,iproute2,rdma-core,ibverbs-utils,ibverbs-providers,python3,python3-pyverbs,python3-msgpack,python3-xxhash,python3-lmdb,python3-zstandard,python3-cffi-backend,python3-pytest,python3-hypothesis,python3-prometheus-client
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

t0=$(date +%s)
mkdir -p "$OUT"
R="$OUT/rootfs"
echo "[softroce build] debootstrap $SUITE ($PKGS)" >&2
debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$R" "$DEBIAN_MIRROR" >"$OUT/debootstrap.log" 2>&1 \
    || { tail -30 "$OUT/debootstrap.log" >&2; exit 1; }
echo "[softroce build] rootfs in $(( $(date +%s) - t0 )) s" >&2

# The kernel package: fetched through the new rootfs's own apt (works on any build host).
printf 'deb %s %s main\ndeb %s %s main\ndeb %s %s-security main\n' "$DEBIAN_MIRROR" "$SUITE" \
    "$DEBIAN_MIRROR" "$SUITE-updates" "$DEBIAN_SECURITY_MIRROR" "$SUITE" > "$R/etc/apt/sources.list"
mount --bind /dev "$R/dev"; mount -t proc proc "$R/proc"
cleanup() { umount "$R/proc" 2>/dev/null || true; umount "$R/dev" 2>/dev/null || true; }
trap cleanup EXIT
chroot "$R" apt-get -qq update >&2
chroot "$R" sh -c "cd /tmp && apt-get -qq download $KPKG" >&2 || {
  echo "[softroce build] $KPKG is not in the archive any more (Debian drops old kernel ABIs):" \
       "bump KPKG/KVER in tools/softroce/softroce.py to the current linux-image-6.1.0-*-amd64" >&2
  exit 1; }
KDEB=$(ls "$R"/tmp/${KPKG}_*.deb)
K="$OUT/kernel"
dpkg-deb -x "$KDEB" "$K"
cp "$K/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
{
  echo "kernel: $(basename "$KDEB")"
  chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' | grep -E \
    '^(python3|python3-pyverbs|rdma-core|ibverbs-providers|python3-(msgpack|xxhash|lmdb|zstandard|pytest|hypothesis|prometheus-client)) '
} > "$OUT/manifest.txt"
rm -f "$KDEB"
chroot "$R" apt-get clean
rm -rf "$R"/var/lib/apt/lists/*
cleanup; trap - EXIT

# Module subset: the dependency closure of what the guest loads, plus the crypto and lib
# modules (rdma_rxe needs the crc32 shash, a module here).
M="$K/lib/modules/$KVER"
depmod -b "$K" "$KVER"
closure() {   # prints module paths (relative to $M) in load order
  modprobe -d "$K" -S "$KVER" --show-depends "$@" | awk '$1=="insmod"{print $2}' \
    | sed "s|^$M/||"
}
DST="$R/lib/modules/$KVER"
mkdir -p "$DST"
cp "$M"/modules.order "$M"/modules.builtin* "$DST"/
{
  for m in rdma_rxe rdma_ucm ib_uverbs dummy veth; do closure $m; done
  (cd "$M" && find kernel/crypto kernel/arch/x86/crypto kernel/lib -name '*.ko*')
} | sort -u | while read -r f; do
  mkdir -p "$DST/$(dirname "$f")"; cp "$M/$f" "$DST/$f"
done
depmod -b "$R" "$KVER"

# initramfs: busybox + the modules that mount the 9p root, in load order.
I="$OUT/initrd"
mkdir -p "$I"/{bin,dev,proc,sys,newroot,modules}
cp /bin/busybox "$I/bin/busybox"
for a in sh mount umount insmod switch_root mkdir sleep cat echo; do ln -s busybox "$I/bin/$a"; done
: > "$I/modules/order"
for f in $( (closure virtio_pci; closure 9pnet_virtio; closure 9p) | awk '!seen[$0]++'); do
  b=$(basename "$f")
  case "$b" in
    *.ko.xz) xz -dc "$M/$f" > "$I/modules/${b%.xz}"; b=${b%.xz} ;;
    *.ko.zst) zstd -qdc "$M/$f" > "$I/modules/${b%.zst}"; b=${b%.zst} ;;
    *) cp "$M/$f" "$I/modules/$b" ;;
  esac
  echo "$b" >> "$I/modules/order"
done
cp "$HERE/guest/init" "$I/init"; chmod +x "$I/init"
(cd "$I" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/initrd.cpio.gz"
rm -rf "$I" "$K"

# Mount points for the read-only root (guest/init mounts tmpfs and the source share there).
mkdir -p "$R/src" "$R/out"
echo "[softroce build] done in $(( $(date +%s) - t0 )) s, $(du -sm "$OUT" | cut -f1) MB" >&2
