#!/usr/bin/env bash
# bench/build.sh: build bench/kernel_bench.c as a static executable (it runs in the busybox guest
# of ci/qemu-run, which has no C library). Installs gcc and liburing-dev (Debian ships liburing.a
# in it) when they are missing.
#
# Usage: bench/build.sh [OUT]     OUT defaults to target/bench/kernel_bench
# Prints the path of the executable on stdout; everything else goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${1:-$repo/target/bench/kernel_bench}"

have_pkg() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]; }
missing=()
for p in gcc liburing-dev; do have_pkg "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "bench/build.sh: installing ${missing[*]}" >&2
  sudo_=()
  [[ $(id -u) -eq 0 ]] || sudo_=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_[@]}" apt-get update -qq >&2
  "${sudo_[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$(dirname "$out")"
# Rebuild only when the source is newer than the executable (or this script changed).
if [[ ! -x $out || $here/kernel_bench.c -nt $out || ${BASH_SOURCE[0]} -nt $out ]]; then
  gcc -static -O2 -g -Wall -Wextra -o "$out.tmp" "$here/kernel_bench.c" -luring
  mv -f "$out.tmp" "$out"
fi
echo "$out"
