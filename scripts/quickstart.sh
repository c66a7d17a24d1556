#!/usr/bin/env bash
# sealfs quickstart: install deps, build and install sealfs (as root:
# scripts/install.sh puts it in /usr/local/bin with the mount(8) helper), and
# mount a demo encrypted store.
#
#   scripts/quickstart.sh
#
# Demo layout (override the directory with SEALFS_DEMO_DIR, default ./demo):
#   demo/keystore      the key store (KMS-style keys), unlocked by ...
#   demo/keystore.key  ... this random 32-byte key file (mode 0600)
#   demo/store         the encrypted backing store (ciphertext only)
#   demo/mnt           where the decrypted view is mounted (left mounted at the end)
# Safe to re-run: existing keystore/key/store are reused, an existing mount is kept.
set -euo pipefail

log() { printf '\n==> %s\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

ORIG_PWD="$PWD"
DEMO="${SEALFS_DEMO_DIR:-$PWD/demo}"
mkdir -p "$DEMO"
DEMO="$(cd "$DEMO" && pwd)"            # absolute, so it survives the cd below

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log "Installing system dependencies (scripts/deps.sh)"
bash scripts/deps.sh

if [ "$(id -u)" -eq 0 ]; then
    log "Installing sealfs (scripts/install.sh: the binary and the mount(8) helper)"
    bash scripts/install.sh
    SEALFS="${PREFIX:-/usr/local}/bin/sealfs"
else
    log "Building sealfs (cargo build --release; not root, so nothing is installed system-wide)"
    cargo build --release
    SEALFS="$ROOT/target/release/sealfs"
fi
[ -x "$SEALFS" ] || die "build finished but $SEALFS is missing"

# All sealfs commands below use this keystore and key file.
export SEALFS_KEYSTORE="$DEMO/keystore"
export SEALFS_KEY_FILE="$DEMO/keystore.key"
unset SEALFS_PASSPHRASE_FILE
STORE="$DEMO/store"
MNT="$DEMO/mnt"

log "Keystore $SEALFS_KEYSTORE (key file $SEALFS_KEY_FILE)"
if [ -e "$SEALFS_KEYSTORE" ]; then
    echo "keystore already exists, reusing it"
    [ -f "$SEALFS_KEY_FILE" ] || die "keystore exists but its key file $SEALFS_KEY_FILE is missing; remove $DEMO to start over"
else
    "$SEALFS" init --generate-key-file
fi

log "Key alias/demo"
if "$SEALFS" key describe alias/demo >/dev/null 2>&1; then
    echo "key alias/demo already exists"
else
    "$SEALFS" key create --alias demo --description "sealfs quickstart demo key"
fi
"$SEALFS" key describe alias/demo

log "Store $STORE"
if [ -e "$STORE" ]; then
    echo "store already exists, reusing it"
else
    "$SEALFS" create "$STORE" --kms-key alias/demo
fi

log "Mounting $STORE at $MNT"
# A FUSE mount whose daemon died shows up in /proc/self/mounts but cannot be stat'ed
# ("Transport endpoint is not connected"); clear it so we can mount again.
if grep -qsF " $MNT fuse" /proc/self/mounts && ! ls -A "$MNT" >/dev/null 2>&1; then
    echo "found a stale mount at $MNT, detaching it"
    fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT"
fi
mkdir -p "$MNT"
if mountpoint -q "$MNT"; then
    echo "already mounted"
else
    timeout 120 "$SEALFS" mount "$STORE" "$MNT" \
        || die "sealfs mount failed (exit $?). Try it in the foreground to see why: $SEALFS --keystore $SEALFS_KEYSTORE --key-file $SEALFS_KEY_FILE mount $STORE $MNT -f"
    mountpoint -q "$MNT" || die "sealfs mount returned but $MNT is not a mount point"
fi

log "Writing a file through the mount"
MARKER="sealfs-quickstart-plaintext-$$-$RANDOM"
printf 'Hello from sealfs! %s\nwritten %s\n' "$MARKER" "$(date)" > "$MNT/hello.txt"
sync "$MNT/hello.txt"
cat "$MNT/hello.txt"

log "ls -la $MNT"
ls -la "$MNT"

log "df -h $MNT"
df -h "$MNT"

log "sealfs info $STORE"
"$SEALFS" info "$STORE"

log "The backing store holds only ciphertext"
echo "$(find "$STORE" -type f | wc -l) files in $STORE, for example:"
find "$STORE" -type f -printf '%10s  %p\n' | awk 'NR <= 10'   # (awk, not head: no SIGPIPE)
if grep -rqF "$MARKER" "$STORE"; then
    die "the plaintext of hello.txt was found in $STORE -- it is NOT encrypted!"
fi
if grep -rqF "hello.txt" "$STORE"; then
    echo "note: the file name 'hello.txt' appears in the store (names are not hidden)"
fi
echo "OK: grep -r for the text of hello.txt finds nothing in $STORE"

RS="$SEALFS"
case "$RS" in "$ORIG_PWD"/*) RS="${RS#"$ORIG_PWD"/}" ;; esac   # relative to where you ran this
cat <<MSG

==> Done. Your encrypted filesystem is mounted at:
      $MNT
    Anything you put there is stored encrypted in $STORE.

    Use it like any directory:
      cp somefile $MNT/
      ls -la $MNT

    Other commands (the keystore/key file come from these variables):
      export SEALFS_KEYSTORE=$SEALFS_KEYSTORE SEALFS_KEY_FILE=$SEALFS_KEY_FILE
      $RS key list
      $RS info $STORE

    Unmount:
      $RS umount $MNT
    Mount again later:
      $RS --keystore $SEALFS_KEYSTORE --key-file $SEALFS_KEY_FILE mount $STORE $MNT

    Keep $SEALFS_KEY_FILE safe: without it the keystore, and so the store, cannot be opened.
MSG
