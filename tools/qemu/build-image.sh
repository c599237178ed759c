#!/usr/bin/env bash
# Build (once, cached) the qemu tier's guest: a Debian bookworm rootfs with the Debian kernel and its
# headers, rdma-core, pyverbs, bcc and the tools the product's end-to-end checks drive (iperf3, ping,
# ethtool), packed as an uncompressed initramfs. The same image boots as a plain VM on virtio-net
# (xdpoib.mode=vm, tests/qemu/test_vm.py), where it gets its address with ISC dhclient.
#
# Usage: tools/qemu/build-image.sh [CACHE_DIR]        (default: .cache/qemu in the repo)
# Prints the image directory (holding vmlinuz, rootfs.cpio, kver) on the last line of stdout.
# The cache key hashes this script, the package list and the guest init, so editing any of them
# rebuilds; the project itself is not in the image (boot.sh appends it as a second cpio at boot).
# Exit status: 0 ok; 3 = the Debian mirror is unreachable; other = build failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${1:-$repo/.cache/qemu}"

# Packages in the guest. The kernel (linux-image-amd64) is unpacked separately: only its image and the
# modules the tier needs are kept, and no initramfs generator runs.
# python3-bpfcc compiles the XDP datapath in the guest (for the guest's own kernel: its headers are
# unpacked below); iperf3, iputils-ping, ethtool and procps (sysctl) serve `xdpoib attach` end to end;
# isc-dhcp-client is the VM run's DHCP client (Debian's dhclient with its own dhclient-script);
# python3-numpy carries the fabric's columnar batches (xdpoib/fabric/base.py imports it).
PACKAGES="python3 python3-pyverbs python3-pytest python3-numpy rdma-core ibverbs-providers iproute2 kmod python3-bpfcc
iperf3 iputils-ping ethtool procps isc-dhcp-client"
PACKAGES=$(echo $PACKAGES)      # one line
KERNEL_PKG="linux-image-amd64"
# Modules the guest loads (their dependencies are kept too): the rxe run's, and virtio-net for the VM run.
MODULES="crc32_generic crc32-pclmul rdma_rxe ib_uverbs veth virtio_pci virtio_net"

# The Debian mirror: whatever apt on this machine uses (XDPOIB_DEBIAN_MIRROR overrides).
mirror="${XDPOIB_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
                 2>/dev/null | grep -v '^\s*#' \
             | grep -oE '(https?|file)://[^ ]*/debian/?' | grep -v security | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

key=$( { cat "$0" "$here/guest-init.sh"; echo "$PACKAGES $KERNEL_PKG $MODULES"; } | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -s "$out/rootfs.cpio" ] && [ -s "$out/vmlinuz" ]; then
    echo "cached image: $out" >&2
    echo "$out"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "build-image: debootstrap is not installed" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "build-image: must run as root (debootstrap)" >&2; exit 2; }

# Fail early, with its own message, when the mirror cannot be reached.
if [[ "$mirror" == http* ]] && ! python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)' \
        "$mirror/dists/bookworm/Release" 2>/dev/null; then
    echo "build-image: INFRA: Debian mirror $mirror is unreachable" >&2
    exit 3
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
root="$work/root"
t0=$(date +%s)

echo "build-image: debootstrap bookworm from $mirror" >&2
if ! debootstrap --variant=minbase --include="${PACKAGES// /,}" bookworm "$root" "$mirror" \
        >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    if grep -qiE 'Failed getting release|Could not resolve|unable to fetch|Connection (refused|timed)' \
            "$work/debootstrap.log"; then
        echo "build-image: INFRA: debootstrap cannot reach the Debian mirror $mirror" >&2
        exit 3
    fi
    echo "build-image: debootstrap failed (log above)" >&2
    exit 1
fi
t1=$(date +%s)

echo "build-image: fetching $KERNEL_PKG" >&2
mkdir -p "$work/debs"
chroot "$root" bash -c "cd /tmp && apt-get -q download \$(apt-cache depends $KERNEL_PKG \
    | awk '/Depends: linux-image-[0-9]/ {print \$2; exit}')" >&2
mv "$root"/tmp/linux-image-*.deb "$work/debs/"
dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

# The kernel's headers, for bcc: unpacked without their dependencies (bcc reads headers, it builds
# nothing with kbuild); other architectures' trees dropped. They provide /lib/modules/$kver/{build,source}.
echo "build-image: fetching the headers of $kver" >&2
chroot "$root" bash -c "cd /tmp && apt-get -q download linux-headers-$kver linux-headers-${kver%-amd64}-common" >&2
for deb in "$root"/tmp/linux-headers-*.deb; do   # keep /lib -> usr/lib (merged /usr) a symlink
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$root" --keep-directory-symlink
done
rm -f "$root"/tmp/linux-headers-*.deb
find "$root/usr/src/linux-headers-${kver%-amd64}-common/arch" -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} +
chroot "$root" test -e "/lib/modules/$kver/build/include" || { echo "build-image: no headers for $kver" >&2; exit 1; }

# Keep only the module closure the guest needs, then index it.
moddir="$root/lib/modules/$kver"
mkdir -p "$moddir"
cp "$work/kernel/lib/modules/$kver"/modules.* "$moddir/"
depmod -b "$work/kernel" "$kver"
for m in $MODULES; do
    modprobe -d "$work/kernel" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r path; do
    rel="${path#"$work/kernel"}"
    mkdir -p "$root$(dirname "$rel")"
    cp "$path" "$root$rel"
done
cp "$work/kernel/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$moddir/" 2>/dev/null || true
depmod -b "$root" "$kver"

# Trim what a test guest never reads.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian} "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
install -m 0755 "$here/guest-init.sh" "$root/init"
echo "$kver" >"$work/kver"

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) >"$work/rootfs.cpio"
t2=$(date +%s)
mkdir -p "$out"
mv "$work/vmlinuz" "$work/rootfs.cpio" "$work/kver" "$out/"
# Older images (other keys) are dead weight: keep only this one.
find "$cache" -mindepth 1 -maxdepth 1 -type d -regextype egrep -regex '.*/[0-9a-f]{16}' ! -path "$out" \
    -exec rm -rf {} +
echo "build-image: built $out in $((t2 - t0)) s (debootstrap $((t1 - t0)) s)," \
     "rootfs $(du -m "$out/rootfs.cpio" | cut -f1) MiB, kernel $kver" >&2
echo "$out"
