#!/usr/bin/env bash
# make setup: idempotent, as root, on Debian 12. Installs deps/apt.txt, makes kernel headers visible
# to bcc, mounts bpffs, and builds .venv from Debian's python3 with the project installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt, /lib/modules, bpffs need it)"

pkgs=$(sed -e 's/#.*//' deps/apt.txt | tr -s ' \t' '\n' | sed '/^$/d' | sort -u)
missing=()
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${#missing[@]} apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/tmp/xdpoib-apt.log 2>&1 \
        || { tail -20 /tmp/xdpoib-apt.log >&2; die "apt-get install failed (log: /tmp/xdpoib-apt.log)"; }
else
    say "apt packages: all present"
fi

# Kernel headers for bcc (docs/design.md §6): keep what is there; else link Debian's newest linux-headers-*-amd64.
kdir="/lib/modules/$(uname -r)"
if [ -e "$kdir/build/include" ] || [ -e "$kdir/source/include" ]; then
    say "kernel headers: present under $kdir"
else
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$hdr" ] || die "no kernel headers under $kdir and no /usr/src/linux-headers-*-amd64"
    common=${hdr%-amd64}-common
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    ln -sfn "$common" "$kdir/source"
    say "kernel headers: linked $kdir/build -> $hdr and $kdir/source -> $common (running kernel has none)"
fi

if ! mountpoint -q /sys/fs/bpf; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf && say "bpffs: mounted at /sys/fs/bpf"
else
    say "bpffs: mounted"
fi

py=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.base_prefix != "/usr")'; then
    rm -rf .venv
    "$py" -m venv --system-site-packages .venv
    say "venv: created .venv from $py (--system-site-packages)"
fi
stamp=.venv/.xdpoib-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q -e '.[test]' >/tmp/xdpoib-pip.log 2>&1 \
        || { tail -20 /tmp/xdpoib-pip.log >&2; die "pip install failed (log: /tmp/xdpoib-pip.log)"; }
    touch "$stamp"
    say "venv: installed xdpoib editable with test extras"
else
    say "venv: up to date"
fi
.venv/bin/python -c 'import bcc, pyverbs' 2>/dev/null \
    && say "venv: bcc and pyverbs import" \
    || die "bcc or pyverbs does not import in .venv (python3-bpfcc, python3-pyverbs installed?)"
