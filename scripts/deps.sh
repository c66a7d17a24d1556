#!/usr/bin/env bash
# Install the Debian packages sealfs needs (idempotent; a second run is instant).
#
#   scripts/deps.sh           fuse3 (fusermount3, mount.fuse3), attr (getfattr/setfattr), pkg-config,
#                             xfsprogs (xfs_io), acl (setfacl/getfacl), libcap2-bin (setcap, capsh) and
#                             python3 (file handles through ctypes) for the POSIX tests,
#                             softhsm2 (a PKCS#11 token for key stores: libsofthsm2.so, softhsm2-util)
#                             and opensc (pkcs11-tool, used by tests/hsm.rs)
#   scripts/deps.sh --bench   additionally gocryptfs, fio, xz-utils and the newest linux-source-X.Y
#                             (whose tarball lands in /usr/src/linux-source-X.Y.tar.xz)
#
# Also makes sure /dev/fuse exists (modprobe fuse, then mknod fallback).
set -euo pipefail

log()  { printf '[deps] %s\n' "$*"; }
die()  { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

BENCH=0
for arg in "$@"; do
    case "$arg" in
        --bench) BENCH=1 ;;
        -h|--help)
            sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
            exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--bench])" ;;
    esac
done

is_root() { [ "$(id -u)" -eq 0 ]; }

# dpkg -s reports "install ok installed" only for a fully installed package.
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

PACKAGES=(fuse3 attr pkg-config xfsprogs acl libcap2-bin python3 softhsm2 opensc)
if [ "$BENCH" -eq 1 ]; then
    PACKAGES+=(gocryptfs fio xz-utils)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done

# linux-source: any installed linux-source-X.Y whose tarball is present is good enough.
need_linux_source=0
if [ "$BENCH" -eq 1 ]; then
    if ! compgen -G '/usr/src/linux-source-*.tar.xz' >/dev/null; then
        need_linux_source=1
    fi
fi

if [ "${#missing[@]}" -eq 0 ] && [ "$need_linux_source" -eq 0 ]; then
    log "all packages already installed: ${PACKAGES[*]}$([ "$BENCH" -eq 1 ] && echo ' linux-source')"
else
    want="${missing[*]}"
    [ "$need_linux_source" -eq 1 ] && want="${want:+$want }linux-source-<newest>"
    if ! is_root; then
        die "missing packages: $want -- run this script as root: sudo $0${*:+ $*}"
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install manually: $want"
    export DEBIAN_FRONTEND=noninteractive
    log "missing: $want"
    log "running apt-get update ..."
    apt-get update -qq || die "apt-get update failed"
    if [ "$need_linux_source" -eq 1 ]; then
        ls_pkg="$(apt-cache search --names-only '^linux-source-[0-9.]+$' \
                  | awk '{print $1}' | sort -V | tail -n 1)"
        [ -n "$ls_pkg" ] || die "apt offers no linux-source-X.Y package (apt-cache search --names-only '^linux-source-[0-9.]+\$')"
        log "chose $ls_pkg (newest linux-source offered by apt)"
        missing+=("$ls_pkg")
    fi
    log "apt-get install ${missing[*]} ..."
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null \
        || die "apt-get install ${missing[*]} failed"
    for p in "${missing[@]}"; do
        pkg_installed "$p" || die "package $p is still not installed after apt-get install"
    done
    log "installed: ${missing[*]}"
fi

if [ "$BENCH" -eq 1 ]; then
    tarball="$(compgen -G '/usr/src/linux-source-*.tar.xz' | sort -V | tail -n 1 || true)"
    [ -n "$tarball" ] || die "no /usr/src/linux-source-*.tar.xz after installing linux-source"
    log "kernel source tarball: $tarball"
fi

for tool in fusermount3 getfattr setfattr pkg-config xfs_io setfacl setcap capsh python3 softhsm2-util pkcs11-tool; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH even though its package is installed"
done

# --- /dev/fuse -------------------------------------------------------------
if [ ! -c /dev/fuse ]; then
    log "/dev/fuse is missing; trying to load the fuse module"
    if command -v modprobe >/dev/null; then
        if is_root; then modprobe fuse 2>/dev/null || true; else sudo -n modprobe fuse 2>/dev/null || true; fi
    fi
fi
if [ ! -c /dev/fuse ] && [ -e /dev/fuse ]; then
    die "/dev/fuse exists but is not a character device: $(ls -l /dev/fuse)"
fi
if [ ! -c /dev/fuse ]; then
    is_root || die "/dev/fuse does not exist; run as root (sudo $0) so it can be created with mknod"
    log "creating /dev/fuse with mknod c 10 229"
    mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
fi
[ -c /dev/fuse ] || die "/dev/fuse does not exist and could not be created (no fuse kernel module? in a container, start it with --device /dev/fuse --cap-add SYS_ADMIN)"
# Non-root mounts (through fusermount3) need /dev/fuse open to everyone, as
# the fuse3 package's udev rule makes it on a standard system; a container
# runtime may create it 0600.
if [ "$(stat -c '%a' /dev/fuse)" != "666" ]; then
    if is_root; then
        log "making /dev/fuse mode 0666 (as udev does) so that non-root users can mount"
        chmod 0666 /dev/fuse || log "WARNING: chmod 0666 /dev/fuse failed; non-root mounts will fail"
    else
        log "WARNING: /dev/fuse is mode $(stat -c '%a' /dev/fuse), not 0666; non-root mounts will fail (run this script as root)"
    fi
fi
if ! grep -qw fuse /proc/filesystems 2>/dev/null; then
    log "WARNING: 'fuse' is not listed in /proc/filesystems; mounting may fail"
fi
log "/dev/fuse OK ($(stat -c '%A' /dev/fuse) $((16#$(stat -c %t /dev/fuse))),$((16#$(stat -c %T /dev/fuse))))"
