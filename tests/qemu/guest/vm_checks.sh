#!/bin/sh
# Runs inside the qemu guest booted as a plain VM (kernel command line xdpoib.mode=vm, set by
# tests/qemu/test_vm.py through tools/qemu/boot.sh): nothing of xdpoib runs here, the guest is an
# ordinary Debian VM on virtio-net with qemu's default TAP settings (vnet headers, so its checksum and
# segmentation offloads are on). Each NIC is exercised in turn, the others down: its offloads are on,
# ISC dhclient gets a lease from dnsmasq on the remote xdpoib host, the remote answers ping by IPv4 and
# by IPv6 (the address from the remote's router advertisements), and a few MB cross over TCP each way
# (tests/qemu/guest/vm_tcp.py; the host compares the SHA-256 of what was sent and what arrived).
#
# Arguments (xdpoib.args on the kernel command line, comma-separated):
#   remote4=IP remote6=IP bytes=N up=PORT down=PORT nic=WAY@MAC (one per NIC, in the order to run them)
#   hold=1 (optional): after the summary the guest stays up (no power-off) until the host stops it
#   (tests/qemu/test_libvirt.py: `virsh destroy` is what must release the guest's VIF)
# Output, one line each: XDPOIB-RESULT vm::WAY::CHECK PASS|FAIL detail, XDPOIB-MEASURE NAME VALUE,
# XDPOIB-SUMMARY passed=N failed=N skipped=0 total=N exit=N last.
passed=0
failed=0
here=$(dirname "$0")

result() {          # NAME PASS|FAIL DETAIL...
    name=$1 verdict=$2
    shift 2
    printf '\nXDPOIB-RESULT vm::%s %s %s\n' "$name" "$verdict" "$(echo "$*" | tr '\n' ' ' | cut -c1-300)"
    if [ "$verdict" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

measure() {         # NAME VALUE
    printf '\nXDPOIB-MEASURE %s %s\n' "$1" "$2"
}

summary() {
    printf '\nXDPOIB-SUMMARY passed=%s failed=%s skipped=0 total=%s exit=%s\n' \
        "$passed" "$failed" "$((passed + failed))" "$([ "$failed" = 0 ] && echo 0 || echo 1)"
}

now() { date +%s.%N; }
since() { echo "$(now) $1" | awk '{printf "%.1f", $1 - $2}'; }

ifname_of() {       # MAC -> the NIC's name (waits for it to appear)
    i=0
    while [ $i -lt 50 ]; do
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { basename "$d"; return 0; }
        done
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}

exercise() {        # WAY MAC
    way=$1
    dev=$(ifname_of "$2") || { result "$way::nic" FAIL "no NIC with MAC $2"; return; }
    start=$(now)
    ip link set "$dev" up

    # qemu offers these only when its TAP has vnet headers (virtio-net's CSUM and HOST_TSO features)
    k=$(ethtool -k "$dev")
    csum=$(echo "$k" | sed -n 's/^tx-checksumming: \([a-z]*\).*/\1/p')
    tso=$(echo "$k" | sed -n 's/^tcp-segmentation-offload: \([a-z]*\).*/\1/p')
    if [ "$csum" = on ] && [ "$tso" = on ]; then
        result "$way::guest_offloads_on" PASS "$dev tx-checksumming=$csum tso=$tso"
    else
        result "$way::guest_offloads_on" FAIL "$dev tx-checksumming=$csum tso=$tso"
    fi

    t=$(now)
    if dhclient -1 -v -pf "/run/dhclient.$dev.pid" -lf "/run/dhclient.$dev.leases" "$dev" \
            >"/tmp/dhclient.$dev.log" 2>&1; then
        addr=$(ip -4 -o addr show dev "$dev" | awk '{print $4}' | cut -d/ -f1 | head -n1)
        result "$way::dhcp_lease" PASS "address=$addr seconds=$(since "$t")"
        measure "vm_${way}_dhcp_seconds" "$(since "$t")"
    else
        result "$way::dhcp_lease" FAIL "dhclient: $(tail -n 4 "/tmp/dhclient.$dev.log")"
    fi

    if out=$(ping -c 3 -i 0.5 -w 30 "$remote4" 2>&1); then
        result "$way::ping_ipv4" PASS "$(echo "$out" | grep -E 'received|rtt')"
    else
        result "$way::ping_ipv4" FAIL "$(echo "$out" | tail -n 3)"
    fi

    # SLAAC from the remote's router advertisements (dnsmasq --enable-ra)
    i=0
    while [ $i -lt 150 ]; do
        a6=$(ip -6 -o addr show dev "$dev" scope global | grep -v tentative | awk '{print $4}' | head -n1)
        [ -n "$a6" ] && break
        sleep 0.2
        i=$((i + 1))
    done
    if [ -z "$a6" ]; then
        result "$way::ping_ipv6" FAIL "no global IPv6 address from a router advertisement within 30 s"
    elif out=$(ping -6 -c 3 -i 0.5 -w 30 "$remote6" 2>&1); then
        result "$way::ping_ipv6" PASS "address=${a6%/*} $(echo "$out" | grep -E 'received|rtt')"
    else
        result "$way::ping_ipv6" FAIL "address=${a6%/*} $(echo "$out" | tail -n 3)"
    fi

    for dir in up down; do
        eval port=\$$dir
        if out=$(python3 "$here/vm_tcp.py" "$dir" "$remote4" "$port" "$bytes" 2>&1); then
            result "$way::tcp_$dir" PASS "$out"
            measure "vm_${way}_tcp_${dir}_mbit_per_s" "$(echo "$out" | sed -n 's/.*mbit_per_s=\([0-9.]*\).*/\1/p')"
        else
            result "$way::tcp_$dir" FAIL "$out"
        fi
    done

    # leave the network as it was: the next NIC is on the same subnet
    dhclient -x -pf "/run/dhclient.$dev.pid" "$dev" >/dev/null 2>&1
    ip addr flush dev "$dev"
    ip link set "$dev" down
    measure "vm_${way}_seconds" "$(since "$start")"
}

echo "XDPOIB-GUEST up (vm): kernel $(uname -r), $(nproc) cpu"
ip link set lo up
for m in virtio_pci virtio_net; do
    modprobe "$m" || { result setup FAIL "modprobe $m"; summary; exit 1; }
done
remote4="" remote6="" bytes="" up="" down="" nics="" hold=""
for a in $(sed -n 's/.*xdpoib\.args=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' '); do
    case "$a" in
        remote4=*) remote4=${a#*=} ;;
        remote6=*) remote6=${a#*=} ;;
        bytes=*) bytes=${a#*=} ;;
        up=*) up=${a#*=} ;;
        down=*) down=${a#*=} ;;
        nic=*) nics="$nics ${a#*=}" ;;
        hold=*) hold=${a#*=} ;;
        *) result setup FAIL "unknown argument $a"; summary; exit 1 ;;
    esac
done
if [ -z "$remote4" ] || [ -z "$remote6" ] || [ -z "$bytes" ] || [ -z "$up" ] || [ -z "$down" ] || [ -z "$nics" ]; then
    result setup FAIL "arguments missing: need remote4, remote6, bytes, up, down and nic (got: $(sed -n "s/.*xdpoib\.args=\([^ ]*\).*/\1/p" /proc/cmdline))"
    summary
    exit 1
fi
for nic in $nics; do
    exercise "${nic%%@*}" "${nic#*@}"
done
summary
if [ "$hold" = 1 ]; then
    echo "XDPOIB-GUEST holding: the host stops this guest"
    while :; do sleep 3600; done
fi
