#!/usr/bin/env bash
# Run the sealfs test suite: installs system deps (scripts/deps.sh), then `cargo test "$@"`.
#   scripts/test.sh                 # everything
#   scripts/test.sh some_test_name  # extra args are passed to cargo test
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== sealfs tests =="
bash scripts/deps.sh
# The mount(8) tests use the installed helper (/sbin/mount.fuse.sealfs):
# install this tree's build (scripts/uninstall.sh removes it again).
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/install.sh
else
    echo "not root: skipping scripts/install.sh; mount(8) helper tests need it"
fi

echo "kernel:    $(uname -r)"
if [ -c /dev/fuse ]; then
    echo "/dev/fuse: present ($(stat -c '%A' /dev/fuse))"
else
    echo "/dev/fuse: MISSING (FUSE mount tests will fail or be skipped)"
fi
echo "user:      $(id -un) (uid $(id -u))"
echo "cargo:     $(cargo --version)"
# Keep CI exactly as the caller set it (CI=true under .ci/run); do not invent it.
if [ -n "${CI+x}" ]; then
    export CI
    echo "CI:        ${CI}"
fi

echo "== cargo test${*:+ $*} =="
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries (cargo prints one per binary).
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
echo
echo "total: ${passed} passed, ${failed} failed"
exit "$rc"
