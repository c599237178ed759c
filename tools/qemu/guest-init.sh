#!/bin/sh
# /init of the qemu test guest (PID 1 in the initramfs). It mounts the basics, runs the tier's guest
# runner from the project copy appended at boot (/xdpoib), then powers the guest off.
# The runner: tests/qemu/guest/run.sh (Soft-RoCE, the default), or tests/qemu/guest/vm_checks.sh when
# the kernel command line says xdpoib.mode=vm (a plain VM on virtio-net, tests/qemu/test_vm.py).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
case " $(cat /proc/cmdline) " in
    *" xdpoib.mode=vm "*) runner=/xdpoib/tests/qemu/guest/vm_checks.sh ;;
    *) runner=/xdpoib/tests/qemu/guest/run.sh ;;
esac
if [ -x "$runner" ]; then
    "$runner" </dev/console >/dev/console 2>&1
    echo "XDPOIB-GUEST runner exited with status $?" >/dev/console
else
    echo "XDPOIB-GUEST no runner at $runner (project cpio missing?)" >/dev/console
fi
echo o >/proc/sysrq-trigger
sleep 30
