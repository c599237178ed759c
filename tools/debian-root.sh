#!/usr/bin/env bash
# A bare Debian 12 (bookworm) root, cached as a tarball: what `tests/integration/test_package.py` installs
# the .deb into. debootstrap --variant=minbase plus what every Debian host has that the test drives
# (man-db for `man`, systemd for `systemd-analyze verify`); nothing of xdpoib's own dependencies, so apt
# must bring each of them from the package's Depends. dpkg runs with force-unsafe-io in it.
#
# Usage: tools/debian-root.sh [CACHE_DIR]        (default: .cache/debian-root in the repo)
# Prints the tarball's path on the last line of stdout. The cache key hashes this script; older
# tarballs are pruned. Exit status: 0 ok; 3 = the Debian mirror is unreachable; other = build failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cache="${1:-$repo/.cache/debian-root}"
PACKAGES="man-db systemd"

# The Debian mirror: whatever apt on this machine uses (XDPOIB_DEBIAN_MIRROR overrides), as tools/qemu does.
mirror="${XDPOIB_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
                 2>/dev/null | grep -v '^\s*#' \
             | grep -oE '(https?|file)://[^ ]*/debian/?' | grep -v security | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

key=$( { cat "$0"; echo "$PACKAGES $mirror"; } | sha256sum | cut -c1-16)
out="$cache/bookworm-$key.tar"
if [ -s "$out" ]; then
    echo "debian-root: cached $out" >&2
    echo "$out"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debian-root: debootstrap is not installed" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "debian-root: must run as root (debootstrap)" >&2; exit 2; }
if [[ "$mirror" == http* ]] && ! python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)' \
        "$mirror/dists/bookworm/Release" 2>/dev/null; then
    echo "debian-root: INFRA: Debian mirror $mirror is unreachable" >&2
    exit 3
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
if ! debootstrap --variant=minbase --include="${PACKAGES// /,}" bookworm "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    if grep -qiE 'Failed getting release|Could not resolve|unable to fetch|Connection (refused|timed)' \
            "$work/debootstrap.log"; then
        echo "debian-root: INFRA: debootstrap cannot reach the Debian mirror $mirror" >&2
        exit 3
    fi
    echo "debian-root: debootstrap failed (log above)" >&2
    exit 1
fi
rm -rf "$work"/root/var/cache/apt/archives/*.deb
# No fsync per unpacked file (as image builders do in a chroot): what the test installs is thrown away.
echo force-unsafe-io >"$work/root/etc/dpkg/dpkg.cfg.d/xdpoib-test-unsafe-io"
tar -C "$work/root" --numeric-owner -cf "$work/root.tar" .
mv "$work/root.tar" "$out"
find "$cache" -maxdepth 1 -name 'bookworm-*.tar' ! -path "$out" -delete
echo "debian-root: built $out in $(( $(date +%s) - t0 )) s ($(du -m "$out" | cut -f1) MiB)" >&2
echo "$out"
