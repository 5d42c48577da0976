#!/bin/sh
# aio/build-shared.sh [--no-build]: makes libnvaio.so, the shared library of nvaio's C ABI, next
# to libnvaio.a in target/x86_64-unknown-linux-gnu/release/.
#
# Why not a `cdylib` crate type: .cargo/config.toml builds everything with
# `-C target-feature=+crt-static` (static executables for the busybox guest), and with that
# rustc drops cdylib ("dropping unsupported crate type"), and `cargo rustc --crate-type cdylib`
# refuses outright. A second build without crt-static would compile every dependency again.
# Instead the static library, which the same build already produced, is linked into a shared
# object as a whole: its code is position-independent (x86-64 Linux default), and a version
# script exports only the C ABI (io_* and nvaio_*), hiding Rust's and the dependencies' symbols.
# This takes a fraction of a second.
#
# Link a program against it with: gcc prog.c -I aio/include -L DIR -lnvaio
set -eu

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${CARGO_TARGET_DIR:-$root/target}/x86_64-unknown-linux-gnu/release"
cc="${CC:-gcc}"

if [ "${1:-}" != "--no-build" ]; then
	(cd "$root" && cargo build --release -p nvaio)
fi
[ -f "$dir/libnvaio.a" ] || { echo "build-shared.sh: no $dir/libnvaio.a" >&2; exit 1; }

map="$(mktemp)"
trap 'rm -f "$map"' EXIT
cat >"$map" <<'MAP'
{
	global:
		io_setup; io_destroy; io_submit; io_cancel; io_getevents;
		io_queue_init; io_queue_release;
		nvaio_*;
	local: *;
};
MAP
# The system libraries are those `--print native-static-libs` names for the static library.
"$cc" -shared -o "$dir/libnvaio.so.tmp" -Wl,-soname,libnvaio.so \
	-Wl,--whole-archive "$dir/libnvaio.a" -Wl,--no-whole-archive \
	-Wl,--version-script="$map" -Wl,--gc-sections -Wl,--no-undefined -Wl,-z,relro,-z,now \
	-lutil -lrt -lpthread -lm -ldl -lc
mv "$dir/libnvaio.so.tmp" "$dir/libnvaio.so"

# The C ABI must be what the library exports.
missing=""
for sym in io_setup io_destroy io_submit io_cancel io_getevents io_queue_init io_queue_release \
	nvaio_open nvaio_close nvaio_last_error; do
	nm -D --defined-only "$dir/libnvaio.so" | grep -q " T $sym\$" || missing="$missing $sym"
done
if [ -n "$missing" ]; then
	echo "build-shared.sh: libnvaio.so does not export:$missing" >&2
	exit 1
fi
echo "$dir/libnvaio.so"
