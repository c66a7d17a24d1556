#!/usr/bin/env bash
# A local single-node Garage (S3-compatible object store) on loopback, for sealfs's S3 tests and for trying s3:// stores.
#
#   scripts/s3-dev.sh install   install the `garage` binary (crates.io, `cargo install garage --locked`) when missing
#   scripts/s3-dev.sh start     install if missing, start Garage in its own state directory, create a bucket and a key,
#                               print shell export lines: eval "$(scripts/s3-dev.sh start)"
#   scripts/s3-dev.sh env       print the export lines of the running instance again
#   scripts/s3-dev.sh stop      stop it and remove its state
#
# State directory: $SEALFS_S3_DEV_DIR (default /tmp/sealfs-s3-dev). Ports: $SEALFS_S3_DEV_PORT (S3 API, default 3900)
# and the two after it (RPC, admin). Everything binds to 127.0.0.1 only.
# Status: written from the Garage 2.5 documentation; not yet run against a Garage (the first install was still
# compiling when this landed). No test calls it yet.
set -euo pipefail

log() { printf '[s3-dev] %s\n' "$*" >&2; }
die() { printf '[s3-dev] ERROR: %s\n' "$*" >&2; exit 1; }

STATE="${SEALFS_S3_DEV_DIR:-/tmp/sealfs-s3-dev}"
PORT="${SEALFS_S3_DEV_PORT:-3900}"
RPC_PORT=$((PORT + 1))
ADMIN_PORT=$((PORT + 2))
BUCKET="${SEALFS_TEST_BUCKET:-sealfs-test}"
CONF="$STATE/garage.toml"
GARAGE_VERSION="2.5.0"

# Installed once into cargo's bin directory, where later runs (and CI on the same machine) find it again.
find_garage() {
    if command -v garage >/dev/null 2>&1; then command -v garage; return 0; fi
    local c="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
    [ -x "$c" ] && { echo "$c"; return 0; }
    return 1
}

install_garage() {
    if find_garage >/dev/null; then return 0; fi
    command -v cargo >/dev/null 2>&1 || die "garage is missing and cargo is not installed to build it"
    log "installing garage $GARAGE_VERSION with cargo (takes ~10+ minutes on a 2-core machine)"
    cargo install garage --version "$GARAGE_VERSION" --locked >&2 || die "cargo install garage failed"
    find_garage >/dev/null || die "garage installed but not found in PATH nor in cargo's bin directory"
}

g() { "$GARAGE" -c "$CONF" "$@"; }

print_env() {
    [ -f "$STATE/credentials" ] || die "no running instance in $STATE (run: $0 start)"
    # shellcheck disable=SC1091
    . "$STATE/credentials"
    printf 'export AWS_ACCESS_KEY_ID=%q\n' "$KEY_ID"
    printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$SECRET"
    printf 'export AWS_REGION=garage\n'
    printf 'export AWS_ENDPOINT_URL=http://127.0.0.1:%s\n' "$PORT"
    printf 'export SEALFS_TEST_BUCKET=%q\n' "$BUCKET"
}

start() {
    install_garage
    GARAGE="$(find_garage)"
    if [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        print_env
        return 0
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE/meta" "$STATE/data"
    chmod 700 "$STATE"
    local secret
    secret="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    cat > "$CONF" <<EOF
metadata_dir = "$STATE/meta"
data_dir = "$STATE/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
EOF
    chmod 600 "$CONF"
    g server > "$STATE/garage.log" 2>&1 &
    echo $! > "$STATE/pid"
    local i node=""
    for i in $(seq 1 100); do
        node="$(g node id -q 2>/dev/null | cut -d@ -f1)" && [ -n "$node" ] && break
        kill -0 "$(cat "$STATE/pid")" 2>/dev/null || die "garage exited at start; see $STATE/garage.log"
        sleep 0.2
    done
    [ -n "$node" ] || die "garage did not answer within 20 s; see $STATE/garage.log"
    g layout assign -z dc1 -c 1G "$node" >&2
    g layout apply --version 1 >&2
    local out key_id key_secret
    out="$(g key create sealfs-test-key)"
    key_id="$(printf '%s\n' "$out" | awk -F': *' '/Key ID/ {print $2; exit}')"
    key_secret="$(printf '%s\n' "$out" | awk -F': *' '/Secret key/ {print $2; exit}')"
    [ -n "$key_id" ] && [ -n "$key_secret" ] || die "could not read the key from 'garage key create'"
    g bucket create "$BUCKET" >&2
    g bucket allow --read --write --owner "$BUCKET" --key sealfs-test-key >&2
    umask 077
    printf 'KEY_ID=%q\nSECRET=%q\n' "$key_id" "$key_secret" > "$STATE/credentials"
    log "garage on http://127.0.0.1:$PORT, bucket $BUCKET, state in $STATE"
    print_env
}

stop() {
    if [ -f "$STATE/pid" ]; then
        local pid
        pid="$(cat "$STATE/pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    fi
    rm -rf "$STATE"
}

case "${1:-}" in
    install) install_garage; find_garage ;;
    start) start ;;
    env) print_env ;;
    stop) stop ;;
    -h|--help|"") sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command: $1 (usage: $0 install|start|env|stop)" ;;
esac
