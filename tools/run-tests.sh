#!/usr/bin/env bash
# make test: run every test tier in order, print each tier's duration, fail if any tier failed.
# Usage: tools/run-tests.sh [TIER...]   (default: lint unit bpf integration soak qemu)
# The soak tier runs SOAK_SECONDS (default 120, CI's setting; `make soak SOAK_SECONDS=600` for the full run).
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(lint unit bpf integration soak qemu)
declare -A took result
failed=0
for t in "${tiers[@]}"; do
    echo "=== tier: $t"
    start=$(date +%s)
    if [ "$t" = lint ]; then
        .venv/bin/ruff check . ; rc=$?
    elif [ "$t" = soak ]; then
        SOAK_SECONDS="${SOAK_SECONDS:-120}" $py -m pytest tests/soak -m soak -s ; rc=$?
    else
        [ -d "tests/$t" ] || { echo "no such tier: $t" >&2; exit 2; }
        $py -m pytest "tests/$t" -m "not bench and not soak" ; rc=$?
        # 5 = nothing collected: a tier that has no tests yet is not a failure of the others
        if [ $rc -eq 5 ]; then echo "tier $t: no tests collected"; rc=0; fi
    fi
    took[$t]=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then result[$t]=passed; else result[$t]="FAILED (exit $rc)"; failed=1; fi
done
echo "=== tier durations"
for t in "${tiers[@]}"; do printf '  %-12s %5ss  %s\n' "$t" "${took[$t]}" "${result[$t]}"; done
exit $failed
