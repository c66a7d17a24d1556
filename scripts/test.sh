#!/usr/bin/env bash
# Run the sealfs test suite: installs system deps (scripts/deps.sh), then `cargo test "$@"`.
#   scripts/test.sh                 # everything
#   scripts/test.sh some_test_name  # extra args are passed to cargo test
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== sealfs tests =="
bash scripts/deps.sh

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
cargo test "$@"
