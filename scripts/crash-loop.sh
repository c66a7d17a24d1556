#!/bin/sh
# Soak test: run the crash loop of tests/faults.rs (mount, writers that
# rewrite files and fsync, SIGKILL of the daemon at a random moment,
# remount, check every file block by block, fsck) N times (default 100).
# Needs root and /dev/fuse, like the integration tests. Replay a failure
# with the seed it prints: SEALFS_TEST_SEED=<seed> scripts/crash-loop.sh N
set -eu
n="${1:-100}"
cd "$(dirname "$0")/.."
SEALFS_CRASH_CYCLES="$n" exec cargo test --test faults crash_loop -- --nocapture
