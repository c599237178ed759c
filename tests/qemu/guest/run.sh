#!/bin/sh
# Runs inside the qemu guest (started by /init): load the Soft-RoCE modules, create two rxe devices on
# a veth pair, run the guest tests, and print one XDPOIB-RESULT line per test and one XDPOIB-SUMMARY.
# pytest arguments (default: tests/qemu/guest) come from the kernel command line: xdpoib.args=a,b,c
fail_setup() {
    echo "XDPOIB-RESULT guest-setup FAIL $*"
    echo "XDPOIB-SUMMARY passed=0 failed=1 skipped=0 total=1"
    exit 1
}
echo "XDPOIB-GUEST up: kernel $(uname -r), $(nproc) cpu"
modprobe crc32_generic || fail_setup "modprobe crc32_generic"
modprobe crc32-pclmul || echo "XDPOIB-GUEST note: crc32-pclmul unavailable"
for m in rdma_rxe ib_uverbs veth; do modprobe "$m" || fail_setup "modprobe $m"; done
ip link set lo up
ip link add veth0 type veth peer name veth1 || fail_setup "ip link add veth"
for d in veth0 veth1; do
    ip link set "$d" mtu 4200 up || fail_setup "ip link set $d up"
done
rdma link add rxe0 type rxe netdev veth0 || fail_setup "rdma link add rxe0"
rdma link add rxe1 type rxe netdev veth1 || fail_setup "rdma link add rxe1"
# The link-local GIDs appear once IPv6 DAD is done on the veths.
i=0
while [ $i -lt 50 ]; do
    ip -6 addr show dev veth1 | grep -q 'scope link' && ! ip -6 addr show | grep -q tentative && break
    sleep 0.2; i=$((i + 1))
done
rdma link show
# The product itself: bpffs for its pins, the `xdpoib` command over the project copy (/xdpoib, with
# the dependencies boot.sh put in /xdpoib/site).
mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf || fail_setup "mount bpffs"
printf '#!/bin/sh\nexec python3 -m xdpoib "$@"\n' >/usr/local/bin/xdpoib && chmod 0755 /usr/local/bin/xdpoib
args=$(sed -n 's/.*xdpoib\.args=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
cd /xdpoib || fail_setup "no /xdpoib"
export PYTHONPATH=/xdpoib:/xdpoib/site:/xdpoib/tests      # bytecode is cached: the guest starts many processes
python3 -c 'import bcc, pyroute2, pyverbs' || fail_setup "bcc, pyroute2 or pyverbs does not import"
# shellcheck disable=SC2086
python3 -m pytest -p no:cacheprovider -q -rN ${args:-tests/qemu/guest}
