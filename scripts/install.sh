#!/usr/bin/env bash
# Install sealfs system-wide (as root): the fuse3 package when missing, the
# `sealfs` binary, and the mount(8) helper, so that `mount -t fuse.sealfs`
# and /etc/fstab lines with type fuse.sealfs work.
#
#   scripts/install.sh              build (cargo build --release) and install
#   scripts/install.sh --no-build   install the already built target/release/sealfs
#
# Installs:
#   $PREFIX/bin/sealfs                    (PREFIX defaults to /usr/local)
#   /sbin/mount.fuse.sealfs -> $PREFIX/bin/sealfs   (mount(8) looks only in /sbin)
#   $PREFIX/lib/sealfs/install-manifest   (what was installed, for uninstall.sh)
# scripts/uninstall.sh removes exactly what the manifest lists.
set -euo pipefail

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

BUILD=1
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--no-build])" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0): it writes to ${PREFIX:-/usr/local} and /sbin"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/usr/local}"
BIN="$PREFIX/bin/sealfs"
HELPER="/sbin/mount.fuse.sealfs"
MANIFEST_DIR="$PREFIX/lib/sealfs"
MANIFEST="$MANIFEST_DIR/install-manifest"

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

# Entries already recorded by an earlier install are kept, so a reinstall
# does not forget a package it installed the first time.
declare -a entries=()
if [ -f "$MANIFEST" ]; then
    mapfile -t entries < "$MANIFEST"
fi
record() {
    local e
    for e in "${entries[@]}"; do [ "$e" = "$1" ] && return 0; done
    entries+=("$1")
}

if ! pkg_installed fuse3; then
    command -v apt-get >/dev/null || die "fuse3 is missing and apt-get is not available; install fuse3 first"
    log "installing fuse3 (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fuse3 </dev/null \
        || die "apt-get install fuse3 failed"
    record "package fuse3"
fi

if [ "$BUILD" -eq 1 ]; then
    log "building (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet)
fi
SRC="$ROOT/target/release/sealfs"
[ -x "$SRC" ] || die "$SRC is missing; build it first (cargo build --release) or drop --no-build"

# Never overwrite a helper that is not ours.
if [ -e "$HELPER" ] || [ -L "$HELPER" ]; then
    if [ "$(readlink "$HELPER" || true)" != "$BIN" ]; then
        die "$HELPER exists and is not sealfs's helper; remove it first"
    fi
fi

install -d -m 0755 "$PREFIX/bin" "$MANIFEST_DIR"
install -m 0755 "$SRC" "$BIN.new"
mv -f "$BIN.new" "$BIN"          # atomic: a running daemon keeps its old inode
record "file $BIN"
ln -sfn "$BIN" "$HELPER"
record "symlink $HELPER"
record "dir $MANIFEST_DIR"
printf '%s\n' "${entries[@]}" > "$MANIFEST.new"
mv -f "$MANIFEST.new" "$MANIFEST"

log "installed $BIN ($("$BIN" --version))"
log "installed $HELPER -> $BIN"
log "mount with: mount -t fuse.sealfs -o key_file=KEYFILE STORE MOUNTPOINT"
