#!/usr/bin/env bash
# Boot the qemu test guest once: the cached image plus the current project appended as a second cpio
# (tools/qemu/initrd.sh writes that initrd; XDPOIB_GUEST_SITE is read there).
#
# Usage: tools/qemu/boot.sh IMAGE_DIR SERIAL_LOG [TIMEOUT_SECONDS] [GUEST_ARGS...]
# The guest's /init runs tests/qemu/guest/run.sh from the project copy (/xdpoib) and powers off;
# GUEST_ARGS reach it through the kernel command line (xdpoib.args=...). Everything the guest prints
# on its serial console lands in SERIAL_LOG. qemu is killed by PID after TIMEOUT_SECONDS (default 600).
# XDPOIB_GUEST_MODE: put on the kernel command line as xdpoib.mode=... (`vm`: the guest runs
# tests/qemu/guest/vm_checks.sh instead of the Soft-RoCE runner, see guest-init.sh).
# XDPOIB_QEMU_NICS: "TAP=MAC ...": one virtio-net NIC per existing host TAP, with qemu's default TAP
# settings (`-netdev tap,ifname=TAP,script=no,downscript=no`: vnet headers on when the kernel has them,
# the guest's checksum and segmentation offloads on); without it the guest has no NIC (-nic none).
# Exit status: qemu's own, or 124 when the timeout killed it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:?usage: boot.sh IMAGE_DIR SERIAL_LOG [TIMEOUT] [ARGS...]}"
log="${2:?usage: boot.sh IMAGE_DIR SERIAL_LOG [TIMEOUT] [ARGS...]}"
limit="${3:-600}"
shift $(( $# < 3 ? $# : 3 ))
guest_args="$*"

command -v qemu-system-x86_64 >/dev/null || { echo "boot: qemu-system-x86_64 is not installed" >&2; exit 2; }
[ -s "$image/vmlinuz" ] && [ -s "$image/rootfs.cpio" ] || { echo "boot: no image in $image" >&2; exit 2; }
nics=()
n=0
for nic in ${XDPOIB_QEMU_NICS:-}; do
    tap="${nic%%=*}" mac="${nic#*=}"
    [ -n "$tap" ] && [ "$mac" != "$nic" ] && [ -e "/sys/class/net/$tap/tun_flags" ] \
        || { echo "boot: bad NIC '$nic' (XDPOIB_QEMU_NICS: TAP=MAC, TAP an existing TAP)" >&2; exit 2; }
    nics+=(-netdev "tap,id=nic$n,ifname=$tap,script=no,downscript=no" -device "virtio-net-pci,netdev=nic$n,mac=$mac")
    n=$((n + 1))
done

tmp=$(mktemp -d)
qemu_pid=""
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill -KILL "$qemu_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# The cached rootfs plus the project as /xdpoib (initrd.sh).
bash "$here/initrd.sh" "$image" "$tmp/initrd"

: >"$log"
append="console=ttyS0 panic=-1 quiet loglevel=4 xdpoib.args=${guest_args// /,}"
[ -z "${XDPOIB_GUEST_MODE:-}" ] || append="$append xdpoib.mode=$XDPOIB_GUEST_MODE"
# -cpu max: the guest needs PCLMULQDQ for crc32-pclmul (rdma_rxe's ICRC); TCG only (no KVM here).
qemu-system-x86_64 -accel tcg -cpu max -m 3072 -smp 1 -nic none "${nics[@]}" -nographic -no-reboot \
    -monitor none -serial "file:$log" \
    -kernel "$image/vmlinuz" -initrd "$tmp/initrd" -append "$append" </dev/null >"$tmp/qemu.out" 2>&1 &
qemu_pid=$!
deadline=$(( $(date +%s) + limit ))
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        kill -KILL "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
        echo "boot: TIMEOUT: guest still running after ${limit}s, killed qemu (pid $qemu_pid)" >&2
        qemu_pid=""
        exit 124
    fi
    sleep 1
done
rc=0
wait "$qemu_pid" || rc=$?
qemu_pid=""
if [ "$rc" -ne 0 ]; then
    echo "boot: qemu exited with status $rc:" >&2
    cat "$tmp/qemu.out" >&2
fi
exit "$rc"
