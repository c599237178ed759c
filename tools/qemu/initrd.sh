#!/usr/bin/env bash
# Write the qemu test guest's initrd: the cached image's rootfs plus the current project appended as a
# second cpio (/xdpoib: package, BPF sources, tests, pytest config). boot.sh boots it with qemu;
# tests/qemu/test_libvirt.py hands it to libvirt (<os><initrd>).
#
# Usage: tools/qemu/initrd.sh IMAGE_DIR OUT
# XDPOIB_GUEST_SITE: Python package directories to copy into /xdpoib/site (on the guest's PYTHONPATH):
# the project's pure-Python dependencies that bookworm packages too old (pyroute2 >= 0.8 for
# IPRoute(netns=...)); tests/qemu/test_soft_roce.py passes the ones its own interpreter imports.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
image="${1:?usage: initrd.sh IMAGE_DIR OUT}"
out="${2:?usage: initrd.sh IMAGE_DIR OUT}"
[ -s "$image/rootfs.cpio" ] || { echo "initrd: no image in $image" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stage/xdpoib"
(cd "$repo" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - xdpoib bpf tests pyproject.toml) \
    | tar -xf - -C "$tmp/stage/xdpoib"
mkdir -p "$tmp/stage/xdpoib/site"
for pkg in ${XDPOIB_GUEST_SITE:-}; do
    [ -d "$pkg" ] || { echo "initrd: no package directory $pkg (XDPOIB_GUEST_SITE)" >&2; exit 2; }
    cp -r "$pkg" "$tmp/stage/xdpoib/site/"
done
find "$tmp/stage/xdpoib/site" -name __pycache__ -prune -exec rm -rf {} +
(cd "$tmp/stage" && find . -print0 | cpio --null -o -H newc --quiet) >"$tmp/project.cpio"
cat "$image/rootfs.cpio" "$tmp/project.cpio" >"$out"
