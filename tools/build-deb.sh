#!/usr/bin/env bash
# make deb: build xdpoib_<version>_all.deb from this repository into build/deb/ (or $1).
# The tree's files (tracked, and new ones git does not ignore) are copied into build/deb/xdpoib-<version>/
# and built there with dpkg-buildpackage, so the checkout stays clean. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's tools and Debian's python3 only: another python3 first on PATH (pyenv, a venv) has neither
# build nor the packages dh_python3 maps dependencies to.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV
out="$(mkdir -p "${1:-build/deb}" && cd "${1:-build/deb}" && pwd)"

die() { printf 'build-deb: error: %s\n' "$*" >&2; exit 1; }
command -v dpkg-buildpackage >/dev/null || die "dpkg-buildpackage missing: run make setup (deps/apt.txt)"
dpkg-checkbuilddeps 2>/dev/null || die "$(dpkg-checkbuilddeps 2>&1 | sed 's/^dpkg-checkbuilddeps: error: //'); run make setup"

version=$(python3 -c 'import re, sys; print(re.search(r"__version__ = \"(.+?)\"", open("xdpoib/__init__.py").read())[1])')
changelog=$(dpkg-parsechangelog -S Version)
[ "$version" = "$changelog" ] || die "xdpoib/__init__.py says $version, debian/changelog $changelog: add a changelog entry (dch -v $version)"

src="$out/xdpoib-$version"
rm -rf "$src" "$out"/xdpoib_"$version"_*
mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$src"
t0=$(date +%s)
(cd "$src" && dpkg-buildpackage -b -us -uc) >"$out/build.log" 2>&1 \
    || { tail -n 40 "$out/build.log" >&2; die "dpkg-buildpackage failed (log: $out/build.log)"; }
rm -rf "$src"
deb="$out/xdpoib_${version}_all.deb"
[ -s "$deb" ] || die "no $deb after the build (log: $out/build.log)"
printf 'build-deb: built in %s s (log: %s)\n' "$(( $(date +%s) - t0 ))" "$out/build.log" >&2
echo "$deb"
