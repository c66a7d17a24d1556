#!/usr/bin/env bash
# Remove exactly what scripts/install.sh installed, as listed in its
# manifest ($PREFIX/lib/sealfs/install-manifest, PREFIX default /usr/local):
# the binary, the mount helper, and the fuse3 package if install.sh was the
# one that installed it. Stores, keystores and logs are never touched.
#
#   scripts/uninstall.sh             remove everything listed
#   scripts/uninstall.sh --keep-packages   leave packages (fuse3) installed
set -euo pipefail

log() { printf '[uninstall] %s\n' "$*"; }
die() { printf '[uninstall] ERROR: %s\n' "$*" >&2; exit 1; }

KEEP_PKGS=0
for arg in "$@"; do
    case "$arg" in
        --keep-packages) KEEP_PKGS=1 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--keep-packages])" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"

PREFIX="${PREFIX:-/usr/local}"
MANIFEST="$PREFIX/lib/sealfs/install-manifest"
[ -f "$MANIFEST" ] || die "no install manifest at $MANIFEST: nothing installed by scripts/install.sh (or another PREFIX)"

if grep -q ' fuse.sealfs ' /proc/self/mounts; then
    log "WARNING: sealfs mounts are live; they keep running, but unmount them before reinstalling"
fi

mapfile -t entries < "$MANIFEST"
dirs=()
for e in "${entries[@]}"; do
    kind="${e%% *}"; path="${e#* }"
    case "$kind" in
        file)
            if [ -f "$path" ]; then rm -f "$path" && log "removed $path"; fi ;;
        symlink)
            if [ -L "$path" ]; then rm -f "$path" && log "removed $path"; fi ;;
        dir)
            dirs+=("$path") ;;
        package)
            if [ "$KEEP_PKGS" -eq 1 ]; then
                log "keeping package $path (--keep-packages)"
            elif dpkg-query -W -f='${Status}' "$path" 2>/dev/null | grep -q '^install ok installed$'; then
                DEBIAN_FRONTEND=noninteractive apt-get remove -y -q "$path" </dev/null >/dev/null \
                    && log "removed package $path" || log "WARNING: apt-get remove $path failed"
            fi ;;
        *) log "WARNING: unknown manifest entry: $e" ;;
    esac
done
rm -f "$MANIFEST"
for d in "${dirs[@]}"; do
    rmdir "$d" 2>/dev/null && log "removed $d" || true
done
log "done"
