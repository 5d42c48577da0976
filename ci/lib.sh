# shellcheck shell=bash
# Helpers shared by the CI scripts (ci/qemu-run, ci/demo, ci/test). Source it, don't run it.
#
# Everything here must work on a fresh Debian 12 machine that has nothing but a Rust toolchain:
# each helper installs or downloads what it needs, and returns quickly when that is already done,
# so that a second run costs a few hundred milliseconds.

# Paths. Everything is derived from this file's own location, so the scripts work from any cwd.
CI_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CI_DIR/.." && pwd)"
CI_CACHE="$REPO_ROOT/ci/cache" # downloads kept between runs (gitignored)
CI_WORK="$REPO_ROOT/ci/work"   # scratch space of individual runs (gitignored)
# The Rust target triple is pinned in .cargo/config.toml (static executables), so cargo puts the
# binaries under target/<triple>/, not target/release/.
RUST_TARGET="x86_64-unknown-linux-gnu"
RELEASE_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$RUST_TARGET/release"

# Packages every CI script needs on the host. qemu + busybox + cpio build and boot the guest; gcc
# and the static AIO/io_uring libraries are for C test programs that run in the guest; binutils
# gives `strip` for slimming the initramfs.
CI_PACKAGES=(qemu-system-x86 busybox-static cpio gzip gcc binutils libaio-dev liburing-dev)

# A non-interactive apt on a CI machine; root is expected there, sudo is a convenience elsewhere.
export DEBIAN_FRONTEND=noninteractive

ci_log() { printf '[%s] %s\n' "${CI_LOG_PREFIX:-ci}" "$*" >&2; }
ci_die() {
  ci_log "error: $*"
  exit 1
}

ci_as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    ci_die "need root (or sudo) to run: $*"
  fi
}

# `apt-get update` at most once per process tree: the flag is exported so that child scripts
# (ci/test -> ci/qemu-run) don't repeat it.
ci_apt_update() {
  if [[ -z ${NVAIO_CI_APT_UPDATED:-} ]]; then
    ci_log "apt-get update"
    ci_as_root apt-get update -qq >&2 || ci_die "apt-get update failed"
    export NVAIO_CI_APT_UPDATED=1
  fi
}

# ensure_packages PKG...: install the Debian packages that are not installed yet. One dpkg-query
# answers for all of them, so the common case (everything present) costs no apt call.
ensure_packages() {
  local missing=() pkg status
  for pkg in "$@"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  ci_apt_update
  ci_log "apt-get install ${missing[*]}"
  ci_as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    ci_die "apt-get install ${missing[*]} failed"
}

ensure_ci_packages() { ensure_packages "${CI_PACKAGES[@]}"; }

# Cargo is installed by rustup under ~/.cargo/bin, which a non-login shell may not have on PATH.
ensure_cargo() {
  if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null || ci_die "cargo not found (is the Rust toolchain installed?)"
}

# build_release: the one build everything uses. The static target and flags come from
# .cargo/config.toml, so these binaries run on the host and in the busybox guest alike, and
# `cargo test --release` afterwards reuses the compiled dependencies. Libraries are built too (no
# --bins): the nvaio crate's staticlib, libnvaio.a, is what ci/c-tests links the C examples with.
build_release() {
  ensure_cargo
  ci_log "cargo build --release --workspace"
  (cd "$REPO_ROOT" && cargo build --release --workspace) || return 1
  [[ -f $RELEASE_DIR/libnvaio.a ]] || {
    ci_log "error: the build did not produce $RELEASE_DIR/libnvaio.a"
    return 1
  }
}

# The executables of the last release build: regular executable files directly in the release
# folder whose name has no dot (skips *.d, *.rlib, *.so; deps/, build/, examples/ are folders).
release_binaries() {
  [[ -d $RELEASE_DIR ]] || return 0
  find "$RELEASE_DIR" -maxdepth 1 -type f -perm -u+x ! -name '*.*' | sort
}

# The name of the Debian guest kernel package, e.g. linux-image-6.1.0-57-cloud-amd64-unsigned.
# The ABI number moves with Debian's updates, so it is read from the metapackage's dependency at
# run time. Prints nothing when apt has no package lists yet.
ci_kernel_package() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)\(-unsigned\)\?$/\1-unsigned/p' |
    head -n 1
}

# ensure_guest_kernel: download (not install) the guest kernel package once and unpack it under
# ci/cache/kernel/PACKAGE/. Exports:
#   GUEST_KERNEL   path of vmlinuz
#   GUEST_KVER     kernel release, e.g. 6.1.0-57-cloud-amd64
#   GUEST_MODULES  its modules folder (lib/modules/GUEST_KVER)
ensure_guest_kernel() {
  local pkg dir tmp deb
  pkg="$(ci_kernel_package)"
  if [[ -z $pkg ]]; then
    # No package lists (fresh machine) or stale ones: refresh once and ask again.
    ci_apt_update
    pkg="$(ci_kernel_package)"
  fi
  if [[ -z $pkg ]]; then
    # Offline or apt broken: any kernel unpacked earlier still does the job.
    dir="$(find "$CI_CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' \
      2>/dev/null | sort -V | tail -n 1)"
    [[ -n $dir ]] || ci_die "cannot resolve the guest kernel package (apt-cache depends linux-image-cloud-amd64)"
    ci_log "warning: apt cannot name the kernel package; using cached $(basename "$dir")"
  else
    dir="$CI_CACHE/kernel/$pkg"
  fi

  if [[ ! -f $dir/.complete ]]; then
    ci_log "downloading guest kernel $pkg"
    mkdir -p "$CI_CACHE/kernel"
    tmp="$(mktemp -d "$CI_CACHE/kernel/.dl.XXXXXX")"
    # apt's download sandbox user (_apt) cannot write into root's folders: run it as root.
    if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2); then
      # The lists may name a version the mirror no longer has: refresh and retry once.
      ci_apt_update
      (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) ||
        { rm -rf "$tmp"; ci_die "apt-get download $pkg failed"; }
    fi
    deb="$(ls "$tmp"/*.deb)"
    mkdir -p "$tmp/x"
    dpkg-deb -x "$deb" "$tmp/x" || { rm -rf "$tmp"; ci_die "dpkg-deb -x $deb failed"; }
    touch "$tmp/x/.complete"
    # The rename is atomic, so the folder never exists half-unpacked; if a concurrent run got
    # there first, its copy is as good as ours.
    if ! mv -T "$tmp/x" "$dir" 2>/dev/null && [[ ! -f $dir/.complete ]]; then
      rm -rf "$tmp"
      ci_die "cannot move the unpacked kernel to $dir"
    fi
    rm -rf "$tmp"
    # Older kernels are dead weight once a newer one is unpacked.
    find "$CI_CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' \
      ! -path "$dir" -exec rm -rf {} +
  fi

  GUEST_KERNEL="$(ls "$dir"/boot/vmlinuz-* 2>/dev/null | head -n 1)"
  [[ -n $GUEST_KERNEL ]] || ci_die "no vmlinuz in $dir/boot"
  GUEST_KVER="${GUEST_KERNEL##*/vmlinuz-}"
  GUEST_MODULES="$dir/lib/modules/$GUEST_KVER"
  [[ -d $GUEST_MODULES ]] || ci_die "no modules folder $GUEST_MODULES"
  export GUEST_KERNEL GUEST_KVER GUEST_MODULES
}

# Quote a string for a POSIX shell (busybox ash reads the generated guest config).
shell_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
