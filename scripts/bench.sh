#!/usr/bin/env bash
# sealfs benchmark (not a test): plain directory vs gocryptfs vs sealfs, same disk.
#
#   scripts/bench.sh [--quick] [--no-deps] [--no-build] [--snapshots]
#
# --snapshots : only the sealfs snapshot/clone benchmark: time to snapshot and to clone
#           (same file system: hard links) a 1 GiB volume (BENCH_SIZE_MB) and a volume of
#           10,000 files (BENCH_SNAP_FILES), and the space a snapshot holds after 10% of
#           the 1 GiB volume's chunks were rewritten. Results in $BENCH_DIR/snapshots.md.
# --quick : 64 MiB sequential file, fio 5 s on 64 MiB, and (unless BENCH_TARBALL is set)
#           a synthetic tarball of ~5000 small files (0-20 KiB) in 200 directories.
#
# Environment:
#   BENCH_DIR          work dir, results in $BENCH_DIR/results.md  (default /var/tmp/sealfs-bench)
#   BENCH_SIZE_MB      sequential file size in MiB                 (default 1024, quick 64)
#   BENCH_TARBALL      tarball to extract (.tar/.tar.xz/.tar.gz/.tar.zst/.tar.bz2)
#                      (default /usr/src/linux-source-*.tar.xz, newest; quick: synthetic)
#   BENCH_FIO_SIZE     fio file size                                (default 256M, quick 64M)
#   BENCH_FIO_RUNTIME  fio seconds per job                          (default 20, quick 5)
#   BENCH_TARGETS      which columns to run                         (default "plain gocryptfs sealfs")
#   BENCH_STEP_TIMEOUT seconds before a single step is killed       (default 3600)
#   BENCH_MOUNT_TIMEOUT seconds allowed for a mount/umount          (default 60)
#   SEALFS_BIN         use this sealfs binary instead of building target/release/sealfs
#
# "Cold" steps drop the kernel page cache and, for FUSE targets, unmount + remount so the
# daemon's own caches are gone too.
set -euo pipefail

log()  { printf '[bench] %s\n' "$*" >&2; }
warn() { printf '[bench] WARNING: %s\n' "$*" >&2; }
die()  { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

QUICK=0 DO_DEPS=1 DO_BUILD=1 SNAP_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --quick)    QUICK=1 ;;
        --no-deps)  DO_DEPS=0 ;;
        --no-build) DO_BUILD=0 ;;
        --snapshots) SNAP_ONLY=1 ;;
        -h|--help)  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root (needed for drop_caches and package installs): sudo $0 $*"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEALFS="${SEALFS_BIN:-$ROOT/target/release/sealfs}"
SEALFS_OK=1   # cleared when cargo build fails, so a stale binary is never benchmarked

BENCH_DIR="${BENCH_DIR:-/var/tmp/sealfs-bench}"
if [ "$QUICK" -eq 1 ]; then
    SIZE_MB="${BENCH_SIZE_MB:-64}"
    FIO_SIZE="${BENCH_FIO_SIZE:-64M}"
    FIO_RUNTIME="${BENCH_FIO_RUNTIME:-5}"
else
    SIZE_MB="${BENCH_SIZE_MB:-1024}"
    FIO_SIZE="${BENCH_FIO_SIZE:-256M}"
    FIO_RUNTIME="${BENCH_FIO_RUNTIME:-20}"
fi
read -r -a TARGETS <<< "${BENCH_TARGETS:-plain gocryptfs sealfs}"
STEP_TIMEOUT="${BENCH_STEP_TIMEOUT:-3600}"
MOUNT_TIMEOUT="${BENCH_MOUNT_TIMEOUT:-60}"

for t in "${TARGETS[@]}"; do
    case "$t" in plain|gocryptfs|sealfs) ;; *) die "unknown target '$t' in BENCH_TARGETS" ;; esac
done

WORK="$BENCH_DIR/work"     # per-target state, recreated every run
CACHE="$BENCH_DIR/cache"   # decompressed / synthetic tarballs, kept between runs
RES="$BENCH_DIR/raw"       # one file per result cell
LOGS="$BENCH_DIR/logs"

# ----------------------------------------------------------------------------
# mount helpers
# ----------------------------------------------------------------------------
# Mount points (absolute) of everything currently mounted under $BENCH_DIR.
mounts_under_bench() {
    awk -v d="$BENCH_DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r
}

force_unmount() {  # best effort, never fails
    local mnt="$1"
    for _ in 1 2 3 4 5; do   # a just-killed process may still hold files open
        if [ -x "$SEALFS" ] && [ "$mnt" = "$WORK/sealfs/mnt" ]; then
            timeout -k 5 "$MOUNT_TIMEOUT" "$SEALFS" umount "$mnt" >/dev/null 2>&1 && return 0
        fi
        timeout -k 5 "$MOUNT_TIMEOUT" fusermount3 -u "$mnt" >/dev/null 2>&1 && return 0
        timeout -k 5 "$MOUNT_TIMEOUT" umount "$mnt" >/dev/null 2>&1 && return 0
        mountpoint -q "$mnt" || return 0
        sleep 1
    done
    warn "normal unmount of $mnt failed; detaching lazily"
    fusermount3 -u -z "$mnt" >/dev/null 2>&1 || umount -l "$mnt" >/dev/null 2>&1 || true
}

cleanup_mounts() {
    local m
    while read -r m; do
        [ -n "$m" ] || continue
        log "unmounting $m"
        force_unmount "$m"
    done < <(mounts_under_bench)
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    cleanup_mounts
    if [ -n "$(mounts_under_bench)" ]; then
        warn "still mounted: $(mounts_under_bench | tr '\n' ' ')"
    fi
    exit "$rc"
}
# The per-target suite runs as a background subshell that we `wait` for, so that a
# signal is handled at once: kill the suite's process tree, then unmount (EXIT trap).
SUITE_PID=""
kill_tree() {
    local p="$1" c
    if command -v pgrep >/dev/null; then
        for c in $(pgrep -P "$p" || true); do kill_tree "$c"; done
    fi
    kill -TERM "$p" 2>/dev/null || true
}
on_signal() {
    warn "interrupted, cleaning up"
    if [ -n "$SUITE_PID" ]; then
        kill_tree "$SUITE_PID"
        wait "$SUITE_PID" 2>/dev/null || true
    fi
    exit "$1"
}
trap on_exit EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# ----------------------------------------------------------------------------
# targets: setup / mount / unmount / dir
# ----------------------------------------------------------------------------
tdir() {  # directory the benchmark writes into
    case "$1" in
        plain) echo "$WORK/plain" ;;
        *)     echo "$WORK/$1/mnt" ;;
    esac
}

# (an array, not a function, so that it can run under `timeout`)
SEALFS_CMD=("$SEALFS" --keystore "$WORK/sealfs/keystore" --key-file "$WORK/sealfs/keystore.key")

mount_target() {
    local t="$1" mnt
    mnt="$(tdir "$t")"
    case "$t" in
        plain) return 0 ;;
        gocryptfs)
            timeout -k 5 "$MOUNT_TIMEOUT" gocryptfs -q -nosyslog -passfile "$WORK/gocryptfs/passfile" \
                "$WORK/gocryptfs/cipher" "$mnt" >>"$LOGS/gocryptfs.mount.log" 2>&1 \
                || { log "gocryptfs mount failed; see $LOGS/gocryptfs.mount.log"; return 1; } ;;
        sealfs)
            if ! timeout -k 5 "$MOUNT_TIMEOUT" "${SEALFS_CMD[@]}" mount "$WORK/sealfs/store" "$mnt" 2>>"$LOGS/sealfs.mount.log"; then
                # the previous daemon may still be releasing the store; retry once
                sleep 2
                timeout -k 5 "$MOUNT_TIMEOUT" "${SEALFS_CMD[@]}" mount "$WORK/sealfs/store" "$mnt" 2>>"$LOGS/sealfs.mount.log" \
                    || { log "sealfs mount failed (or did not come up within ${MOUNT_TIMEOUT}s); see $LOGS/sealfs.mount.log:"; tail -n 5 "$LOGS/sealfs.mount.log" >&2; return 1; }
            fi ;;
    esac
    mountpoint -q "$mnt" || { log "$t: mount command returned but $mnt is not a mount point"; return 1; }
}

unmount_target() {
    local t="$1" mnt
    mnt="$(tdir "$t")"
    [ "$t" = plain ] && return 0
    mountpoint -q "$mnt" || return 0
    case "$t" in
        sealfs) timeout -k 5 "$MOUNT_TIMEOUT" "$SEALFS" umount "$mnt" \
                    || timeout -k 5 "$MOUNT_TIMEOUT" fusermount3 -u "$mnt" \
                    || timeout -k 5 "$MOUNT_TIMEOUT" umount "$mnt" \
                    || { log "cannot unmount $mnt"; return 1; } ;;
        *)      timeout -k 5 "$MOUNT_TIMEOUT" fusermount3 -u "$mnt" \
                    || timeout -k 5 "$MOUNT_TIMEOUT" umount "$mnt" \
                    || { log "cannot unmount $mnt"; return 1; } ;;
    esac
    if mountpoint -q "$mnt"; then log "$mnt is still mounted after unmount"; return 1; fi
}

setup_target() {
    local t="$1"
    case "$t" in
        plain)
            mkdir -p "$WORK/plain" ;;
        gocryptfs)
            mkdir -p "$WORK/gocryptfs/cipher" "$WORK/gocryptfs/mnt" || return 1
            head -c 24 /dev/urandom | base64 > "$WORK/gocryptfs/passfile"
            chmod 600 "$WORK/gocryptfs/passfile"
            gocryptfs -init -q -passfile "$WORK/gocryptfs/passfile" "$WORK/gocryptfs/cipher" >/dev/null \
                || { log "gocryptfs -init failed"; return 1; } ;;
        sealfs)
            [ "$SEALFS_OK" -eq 1 ] || { log "sealfs: cargo build --release failed, not benchmarking a stale binary"; return 1; }
            [ -x "$SEALFS" ] || { log "sealfs binary $SEALFS not found (did cargo build --release succeed?)"; return 1; }
            mkdir -p "$WORK/sealfs/mnt" || return 1
            timeout -k 5 "$MOUNT_TIMEOUT" "${SEALFS_CMD[@]}" init --generate-key-file >>"$LOGS/sealfs.log" 2>&1 \
                || { log "sealfs init failed; see $LOGS/sealfs.log"; return 1; }
            timeout -k 5 "$MOUNT_TIMEOUT" "${SEALFS_CMD[@]}" key create --alias bench --description "sealfs benchmark" >>"$LOGS/sealfs.log" 2>&1 \
                || { log "sealfs key create failed; see $LOGS/sealfs.log"; return 1; }
            timeout -k 5 "$MOUNT_TIMEOUT" "${SEALFS_CMD[@]}" create "$WORK/sealfs/store" --kms-key alias/bench >>"$LOGS/sealfs.log" 2>&1 \
                || { log "sealfs create failed; see $LOGS/sealfs.log"; return 1; } ;;
    esac
    mount_target "$t"
}

# ----------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------
DROP_CACHES=1
drop_caches() {
    sync
    if [ "$DROP_CACHES" -eq 1 ]; then
        if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
            warn "cannot write /proc/sys/vm/drop_caches; 'cold' results are only remount-cold"
            DROP_CACHES=0
        fi
    fi
}

make_cold() {  # $1 = target
    if [ "$1" != plain ]; then
        unmount_target "$1"
        drop_caches
        mount_target "$1"
    else
        drop_caches
    fi
}

now() { date +%s.%N; }

# timed TARGET TEST 'shell command'   -> records elapsed seconds in $RES/TARGET.TEST
timed() {
    local t="$1" test="$2" cmd="$3" t0 t1 secs
    echo ERR > "$RES/$t.$test"
    log "$t: $test: $cmd"
    t0="$(now)"
    if ! timeout -k 10 "$STEP_TIMEOUT" bash -c "set -euo pipefail; $cmd" >>"$LOGS/$t.log" 2>&1; then
        log "$t: $test FAILED (see $LOGS/$t.log):"
        tail -n 5 "$LOGS/$t.log" >&2
        return 1
    fi
    t1="$(now)"
    secs="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
    echo "$secs" > "$RES/$t.$test"
    log "$t: $test: ${secs}s"
}

fio_iops() {  # $1 = json file, $2 = read|write
    local f="$1" dir="$2"
    if command -v python3 >/dev/null; then
        python3 - "$f" "$dir" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
text = text[text.index('{'):]          # fio sometimes prints notes before the JSON
print("%.0f" % json.loads(text)["jobs"][0][sys.argv[2]]["iops"])
PY
    else
        # jq/python-free fallback: the first "iops" in a job is read's, the second write's
        local n=1; [ "$dir" = write ] && n=2
        grep -o '"iops" *: *[0-9.]*' "$f" | sed -n "${n}p" | grep -o '[0-9.]*$' | awk '{ printf "%.0f\n", $1 }'
    fi
}

# fio_run TARGET TEST randwrite|randread
fio_run() {
    local t="$1" test="$2" rw="$3" dir out iops
    dir="$(tdir "$t")"
    out="$LOGS/$t.$test.json"
    echo ERR > "$RES/$t.$test"
    log "$t: $test: fio $rw bs=4k size=$FIO_SIZE runtime=${FIO_RUNTIME}s"
    if ! timeout -k 10 "$STEP_TIMEOUT" fio --name="$rw" --filename="$dir/fio.dat" --size="$FIO_SIZE" \
            --bs=4k --rw="$rw" --ioengine=psync --runtime="$FIO_RUNTIME" --time_based \
            --direct=0 --end_fsync=1 --output-format=json --output="$out" >>"$LOGS/$t.log" 2>&1; then
        log "$t: $test FAILED (see $LOGS/$t.log, $out)"
        return 1
    fi
    iops="$(fio_iops "$out" "${rw#rand}")" || iops=""
    [ -n "$iops" ] || { log "$t: could not parse IOPS from $out"; return 1; }
    echo "$iops" > "$RES/$t.$test"
    log "$t: $test: $iops IOPS"
}

# ----------------------------------------------------------------------------
# the benchmark suite for one target (runs in a subshell with set -e)
# ----------------------------------------------------------------------------
run_suite() {
    local t="$1" d q
    d="$(tdir "$t")"
    q="$(printf '%q' "$d")"

    timed "$t" seqwrite "dd if=/dev/zero of=$q/big bs=1M count=$SIZE_MB conv=fsync status=none"
    local size
    size="$(stat -c %s "$d/big")"
    [ "$size" -eq $((SIZE_MB * 1048576)) ] || { log "$t: big is $size bytes, expected $((SIZE_MB * 1048576))"; echo ERR > "$RES/$t.seqwrite"; return 1; }

    make_cold "$t"
    timed "$t" seqread "dd if=$q/big of=/dev/null bs=1M status=none"
    rm -f "$d/big"

    mkdir -p "$d/src"
    cat "$TAR" > /dev/null   # the tarball itself comes from the page cache for every target
    sync
    timed "$t" untar "tar -xf $(printf '%q' "$TAR") -C $q/src"

    make_cold "$t"
    timed "$t" lsR "ls -lR $q/src > /dev/null"

    make_cold "$t"
    timed "$t" readall "find $q/src -type f -print0 | xargs -0 cat > /dev/null"

    local nfiles
    nfiles="$(find "$d/src" -type f | wc -l)"
    if [ "$nfiles" -ne "$TAR_FILES" ]; then
        warn "$t: $nfiles regular files after extraction, tarball has $TAR_FILES"
    fi

    timed "$t" rm "rm -rf $q/src"

    fio_run "$t" fiowrite randwrite
    make_cold "$t"
    fio_run "$t" fioread randread
    rm -f "$d/fio.dat"
}

# ----------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------
cd "$ROOT"
if [ "$SNAP_ONLY" -eq 1 ]; then
    TARGETS=(sealfs)
elif [ "$DO_DEPS" -eq 1 ]; then
    bash scripts/deps.sh --bench
fi
if [ "$SNAP_ONLY" -eq 0 ]; then
    for tool in fio gocryptfs fusermount3 tar xz; do
        command -v "$tool" >/dev/null || die "$tool not found; run scripts/deps.sh --bench"
    done
fi

if [[ " ${TARGETS[*]} " == *" sealfs "* ]] && [ "$DO_BUILD" -eq 1 ] && [ -z "${SEALFS_BIN:-}" ]; then
    log "cargo build --release"
    if ! cargo build --release; then
        warn "cargo build --release failed: the sealfs column will be skipped"
        SEALFS_OK=0
    fi
fi

mkdir -p "$BENCH_DIR"
cleanup_mounts                      # leftovers of an earlier, interrupted run
if [ -n "$(mounts_under_bench)" ]; then
    die "cannot unmount leftovers under $BENCH_DIR: $(mounts_under_bench | tr '\n' ' ')"
fi
rm -rf "$WORK" "$RES" "$LOGS"
mkdir -p "$WORK" "$CACHE" "$RES" "$LOGS"

# --- snapshots and clones (--snapshots) ------------------------------------------
ms_since() {  # $1 = start from `date +%s%N` -> milliseconds, one decimal
    awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'
}
# snap_timings LABEL : snapshot (CLI and mkdir) and clone timings of the mounted store
snap_timings() {
    local label="$1" mnt="$WORK/sealfs/mnt" store="$WORK/sealfs/store" t
    t=$(date +%s%N); "${SEALFS_CMD[@]}" snapshot create "$mnt" s0 >>"$LOGS/sealfs.log"
    echo "| $label | sealfs snapshot create, right after writing (includes committing what was not yet committed) | $(ms_since "$t") ms |" >> "$SNAP_MD"
    "${SEALFS_CMD[@]}" snapshot delete "$mnt" s0 >>"$LOGS/sealfs.log"
    sync "$mnt"   # fsync of the root directory: a commit
    t=$(date +%s%N); "${SEALFS_CMD[@]}" snapshot create "$mnt" s1 >>"$LOGS/sealfs.log"
    echo "| $label | sealfs snapshot create (CLI, by mountpoint) | $(ms_since "$t") ms |" >> "$SNAP_MD"
    t=$(date +%s%N); mkdir "$mnt/.snapshots/s2"
    echo "| $label | mkdir .snapshots/NAME | $(ms_since "$t") ms |" >> "$SNAP_MD"
    t=$(date +%s%N); "${SEALFS_CMD[@]}" clone "$store@s1" "$WORK/sealfs/clone" >>"$LOGS/sealfs.log"
    echo "| $label | sealfs clone STORE@s1 (same file system) | $(ms_since "$t") ms |" >> "$SNAP_MD"
    t=$(date +%s%N); "${SEALFS_CMD[@]}" clone --reencrypt "$store@s1" "$WORK/sealfs/clone-re" >>"$LOGS/sealfs.log"
    echo "| $label | sealfs clone --reencrypt STORE@s1 | $(ms_since "$t") ms |" >> "$SNAP_MD"
    rm -rf "$WORK/sealfs/clone" "$WORK/sealfs/clone-re"
}
run_snapshot_bench() {
    local mnt="$WORK/sealfs/mnt" store="$WORK/sealfs/store" nfiles chunks n before after held rewritten
    nfiles="${BENCH_SNAP_FILES:-10000}"
    SNAP_MD="$BENCH_DIR/snapshots.md"
    {
        echo "# sealfs snapshot and clone benchmark"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host: $(uname -n), kernel: $(uname -r), $(nproc) CPUs"
        echo "- disk: $(df -h --output=source,fstype,size "$BENCH_DIR" | tail -n 1 | tr -s ' ')"
        echo "- sealfs: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "no commit yet")"
        echo "- times are wall clock of the whole command (process start, keystore, work)"
        echo
        echo "| volume | operation | result |"
        echo "|---|---|---:|"
    } > "$SNAP_MD"
    setup_target sealfs || die "sealfs setup failed"
    log "snapshots: writing ${SIZE_MB} MiB"
    dd if=/dev/urandom of="$mnt/big" bs=1M count="$SIZE_MB" status=none
    snap_timings "${SIZE_MB} MiB, 1 file"
    # rewrite 10% of the chunks (128 KiB each) at random places, then commit
    chunks=$(( SIZE_MB * 8 )); n=$(( chunks / 10 ))
    before=$(du -sb "$store/chunks" | cut -f1)
    log "snapshots: rewriting $n of $chunks chunks"
    for i in $(shuf -i 0-$(( chunks - 1 )) -n "$n"); do
        dd if=/dev/urandom of="$mnt/big" bs=128K count=1 seek="$i" conv=notrunc status=none
    done
    sync "$mnt/big"   # fsync: a commit
    "${SEALFS_CMD[@]}" snapshot delete "$mnt" s2 >>"$LOGS/sealfs.log"
    after=$(du -sb "$store/chunks" | cut -f1)
    held=$("${SEALFS_CMD[@]}" snapshot list --json "$mnt" | awk -F: '/exclusive_bytes/ { gsub(/[ ,]/, "", $2); print $2; exit }')
    rewritten=$(( n * 131072 ))
    echo "| ${SIZE_MB} MiB, 1 file | data rewritten after the snapshot | $rewritten bytes ($n chunks) |" >> "$SNAP_MD"
    echo "| ${SIZE_MB} MiB, 1 file | space only the snapshot holds (snapshot list) | $held bytes ($(awk -v a="$held" -v b="$rewritten" 'BEGIN { printf "%.1f", 100 * (a - b) / b }')% over) |" >> "$SNAP_MD"
    echo "| ${SIZE_MB} MiB, 1 file | growth of chunks/ on disk (du) | $(( after - before )) bytes |" >> "$SNAP_MD"
    unmount_target sealfs
    rm -rf "$store"
    timeout -k 5 "$MOUNT_TIMEOUT" "${SEALFS_CMD[@]}" create "$store" --kms-key alias/bench >>"$LOGS/sealfs.log" 2>&1
    mount_target sealfs
    log "snapshots: writing $nfiles files"
    local d i size pad
    pad="$(head -c 16384 /dev/zero | tr '\0' x)"
    RANDOM=7
    for ((i = 0; i < nfiles; i++)); do
        d="$mnt/d$(( i % 100 ))"
        [ -d "$d" ] || mkdir "$d"
        size=$(( RANDOM % 16384 + 1 ))
        printf '%s' "${pad:0:$size}" > "$d/f$i"
    done
    snap_timings "$nfiles files"
    unmount_target sealfs
    cat "$SNAP_MD"
    log "results written to $SNAP_MD"
}
if [ "$SNAP_ONLY" -eq 1 ]; then
    run_snapshot_bench
    exit 0
fi

# --- the tarball (decompressed once, outside any timing) -----------------------
make_synthetic_tar() {  # ~5000 files of 0-20 KiB in 200 dirs, deterministic sizes
    local out="$1" tmp="$CACHE/synthetic.tmp" i j size
    log "building synthetic tarball $out (5000 files, 200 dirs)"
    rm -rf "$tmp"; mkdir -p "$tmp/synthetic"
    RANDOM=4242
    head -c $((21 * 1024 * 1024)) /dev/urandom > "$tmp/pool"
    for ((i = 0; i < 200; i++)); do
        mkdir -p "$tmp/synthetic/dir$i"
        for ((j = 0; j < 25; j++)); do
            size=$(( (RANDOM * 32768 + RANDOM) % (20 * 1024 + 1) ))
            # random contents: a slice of the pool at a random offset
            dd if="$tmp/pool" of="$tmp/synthetic/dir$i/file$j.dat" iflag=skip_bytes,count_bytes \
               skip=$(( (RANDOM % 1000) * 1024 )) count="$size" status=none
        done
    done
    tar -cf "$out.tmp" -C "$tmp" synthetic
    mv "$out.tmp" "$out"
    rm -rf "$tmp"
}

if [ -n "${BENCH_TARBALL:-}" ]; then
    SRC_TARBALL="$BENCH_TARBALL"
    [ -f "$SRC_TARBALL" ] || die "BENCH_TARBALL=$SRC_TARBALL does not exist"
elif [ "$QUICK" -eq 1 ]; then
    SRC_TARBALL=""
else
    SRC_TARBALL="$(compgen -G '/usr/src/linux-source-*.tar.xz' | sort -V | tail -n 1 || true)"
    [ -n "$SRC_TARBALL" ] || die "no /usr/src/linux-source-*.tar.xz; run scripts/deps.sh --bench or set BENCH_TARBALL"
fi

if [ -z "$SRC_TARBALL" ]; then
    TAR="$CACHE/synthetic.tar"
    [ -f "$TAR" ] || make_synthetic_tar "$TAR"
else
    base="$(basename "$SRC_TARBALL")"
    case "$base" in
        *.tar)             TAR="$SRC_TARBALL"; decomp="" ;;
        *.tar.xz|*.txz)    decomp="xz -dc -T0" ;;
        *.tar.gz|*.tgz)    decomp="gzip -dc" ;;
        *.tar.bz2|*.tbz2)  decomp="bzip2 -dc" ;;
        *.tar.zst|*.tzst)  decomp="zstd -dc" ;;
        *) die "don't know how to decompress $SRC_TARBALL" ;;
    esac
    if [ -n "$decomp" ]; then
        TAR="$CACHE/${base%.*}"; [[ "$TAR" == *.tar ]] || TAR="$TAR.tar"
        if [ ! -f "$TAR" ] || [ "$SRC_TARBALL" -nt "$TAR" ]; then
            log "decompressing $SRC_TARBALL -> $TAR (once, not timed)"
            $decomp "$SRC_TARBALL" > "$TAR.tmp"
            mv "$TAR.tmp" "$TAR"
        fi
    fi
fi
TAR_FILES="$(tar -tvf "$TAR" | grep -c '^-' || true)"
TAR_MB="$(( $(stat -c %s "$TAR") / 1048576 ))"
log "tarball: $TAR ($TAR_MB MiB, $TAR_FILES regular files)"

# ----------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------
drop_caches   # once here, so a "cannot drop caches" warning is shown (and reported) once
FAILED=()
for t in "${TARGETS[@]}"; do
    log "======== $t ========"
    set +e
    (
        set -e
        trap - INT TERM EXIT
        setup_target "$t" || { log "$t: setup failed"; exit 1; }
        run_suite "$t"
        unmount_target "$t"
    ) &
    SUITE_PID=$!
    wait "$SUITE_PID"
    rc=$?
    SUITE_PID=""
    set -e
    if [ "$rc" -ne 0 ]; then
        warn "$t: benchmark aborted (exit $rc); its remaining cells are left empty. Log: $LOGS/$t.log"
        FAILED+=("$t")
        if [ "$t" != plain ] && mountpoint -q "$(tdir "$t")"; then force_unmount "$(tdir "$t")"; fi
    fi
    # free the disk space before the next target
    if mountpoint -q "$(tdir "$t")"; then unmount_target "$t" || force_unmount "$(tdir "$t")"; fi
    rm -rf "${WORK:?}/$t"
done

# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------
TESTS=(seqwrite seqread untar lsR readall rm fiowrite fioread)
label() {
    case "$1" in
        seqwrite) echo "seq write ${SIZE_MB} MiB + fsync [s]" ;;
        seqread)  echo "seq read ${SIZE_MB} MiB, cold [s]" ;;
        untar)    echo "tar -xf ($TAR_FILES files, $TAR_MB MiB) [s]" ;;
        lsR)      echo "ls -lR, cold [s]" ;;
        readall)  echo "read every file, cold [s]" ;;
        rm)       echo "rm -rf tree [s]" ;;
        fiowrite) echo "fio 4k randwrite ${FIO_SIZE} ${FIO_RUNTIME}s [IOPS]" ;;
        fioread)  echo "fio 4k randread, cold [IOPS]" ;;
    esac
}
cell() { [ -f "$RES/$1.$2" ] && cat "$RES/$1.$2" || echo "-"; }
ratio() {  # sealfs vs gocryptfs
    local test="$1" s g
    s="$(cell sealfs "$test")"; g="$(cell gocryptfs "$test")"
    if ! [[ "$s" =~ ^[0-9.]+$ && "$g" =~ ^[0-9.]+$ ]] || awk -v g="$g" 'BEGIN { exit !(g == 0) }'; then
        echo "-"; return
    fi
    case "$test" in
        fio*) awk -v s="$s" -v g="$g" 'BEGIN { r = s / g; printf "%.2f (%s)", r, (r >= 1 ? "better" : "worse") }' ;;
        *)    awk -v s="$s" -v g="$g" 'BEGIN { r = s / g; printf "%.2f (%s)", r, (r <= 1 ? "better" : "worse") }' ;;
    esac
}

COLS=(plain gocryptfs sealfs)
HDR_RATIO="sealfs/gocryptfs"
MD="$BENCH_DIR/results.md"
{
    echo "# sealfs benchmark"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host: $(uname -n), kernel: $(uname -r), $(nproc) CPUs"
    echo "- disk: $(df -h --output=source,fstype,size "$BENCH_DIR" | tail -n 1 | tr -s ' ')  (all targets under $BENCH_DIR)"
    echo "- gocryptfs: $(gocryptfs -version 2>/dev/null | head -n 1)"
    echo "- sealfs: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "no commit yet")"
    echo "- fio: $(fio --version)"
    echo "- mode: $([ "$QUICK" -eq 1 ] && echo quick || echo full); tarball: $TAR"
    echo "- cold = page cache dropped$([ "$DROP_CACHES" -eq 1 ] || echo ' (NOT possible here)') + FUSE remount"
    echo "- ratio = sealfs / gocryptfs: for times [s] lower is better, for IOPS higher is better"
    echo
    printf '| test | %s | %s | %s | %s |\n' "${COLS[@]}" "$HDR_RATIO"
    echo "|---|---:|---:|---:|---|"
    for test in "${TESTS[@]}"; do
        printf '| %s | %s | %s | %s | %s |\n' "$(label "$test")" \
            "$(cell plain "$test")" "$(cell gocryptfs "$test")" "$(cell sealfs "$test")" "$(ratio "$test")"
    done
} > "$MD"

echo
echo "sealfs/gocryptfs: times [s] -> <1 is better; IOPS -> >1 is better.  '-' = not run, ERR = failed"
printf '%-44s %10s %10s %10s   %s\n' test "${COLS[@]}" "$HDR_RATIO"
printf '%-44s %10s %10s %10s   %s\n' "$(printf '%.0s-' {1..44})" ---------- ---------- ---------- ----------------
for test in "${TESTS[@]}"; do
    printf '%-44s %10s %10s %10s   %s\n' "$(label "$test")" \
        "$(cell plain "$test")" "$(cell gocryptfs "$test")" "$(cell sealfs "$test")" "$(ratio "$test")"
done
echo
log "results written to $MD (raw logs in $LOGS)"

if [ "${#FAILED[@]}" -gt 0 ]; then
    die "failed targets: ${FAILED[*]}"
fi
