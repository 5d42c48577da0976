#!/bin/sh
# examples/c/build.sh [OUTDIR [NAME...]]: builds the C examples (all, or the NAMEs given) as
# static executables against nvaio's static library, the way any C program links nvaio. Run
# `cargo build --release -p nvaio` first: it makes
# target/x86_64-unknown-linux-gnu/release/libnvaio.a. OUTDIR defaults to examples/c/build.
# CC, CFLAGS and CARGO_TARGET_DIR are honoured.
#
# The link line: the library, then the system libraries Rust's standard library needs, as
# `cargo rustc -p nvaio --release --lib -- --print native-static-libs` lists them (gcc -static
# adds -lc, -lgcc and -lgcc_eh itself):
#   gcc -static -O2 -I aio/include prog.c \
#       target/x86_64-unknown-linux-gnu/release/libnvaio.a -lutil -lrt -lpthread -lm -ldl
# The linker's warnings that getpwuid_r and getaddrinfo "require at runtime the shared libraries"
# concern code of Rust's standard library that nvaio never calls.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$here/build}"
[ $# -gt 0 ] && shift
lib="${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-gnu/release/libnvaio.a"
cc="${CC:-gcc}"

if [ ! -f "$lib" ]; then
	echo "build.sh: $lib is missing: run 'cargo build --release -p nvaio' first" >&2
	exit 1
fi
if [ $# -eq 0 ]; then
	for src in "$here"/*.c; do
		set -- "$@" "$(basename "$src" .c)"
	done
fi
mkdir -p "$out"
for name in "$@"; do
	# shellcheck disable=SC2086 # CFLAGS is a list of words
	"$cc" -static -O2 -g -Wall -Wextra ${CFLAGS:-} -I "$root/aio/include" -o "$out/$name" \
		"$here/$name.c" "$lib" -lutil -lrt -lpthread -lm -ldl -Wl,--gc-sections
done
