#!/usr/bin/env bash
# Runs every benchmark scenario of docs/benchmarks.md against a fresh
# single node on this machine and prints one table.
#
#   scripts/bench.sh              # build release binaries, run everything
#   QUICK=1 scripts/bench.sh      # smaller counts, shorter steps (smoke test)
#   ONLY="1 4" scripts/bench.sh   # just scenarios 1 and 4
#
# Environment:
#   SKIP_BUILD=1          use the binaries already built (or CHAT_NODE/CHAT_LOAD)
#   CHAT_NODE, CHAT_LOAD  binaries to use (default target/release/...)
#   PORT                  node port (default 18080); 127.0.0.1 only
#   OUT                   where result JSON, node logs and table.md go
#                         (default target/bench-results/<timestamp>)
#
# Each scenario gets a fresh node (new data dir, the bench config below:
# high rate limits, large outbound queue), every run is bounded in count and
# time, and every process started here is stopped on exit (trap).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release -p node --bin chat-node -p tests --bin chat-load
fi
NODE=${CHAT_NODE:-$ROOT/target/release/chat-node}
LOAD=${CHAT_LOAD:-$ROOT/target/release/chat-load}
PORT=${PORT:-18080}
ADDR=127.0.0.1:$PORT
QUICK=${QUICK:-}
ONLY=${ONLY:-1 2 3 4 5}
OUT=${OUT:-$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/chat-bench.XXXXXX)

NODE_PID=
LOAD_PID=
cleanup() {
    local p
    for p in $LOAD_PID $NODE_PID; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do
        local alive=
        for p in $LOAD_PID $NODE_PID; do
            kill -0 "$p" 2>/dev/null && alive=1
        done
        [[ -z $alive ]] && break
        sleep 0.1
    done
    for p in $LOAD_PID $NODE_PID; do
        kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }

# start_node NAME SYNC: a fresh node on $ADDR with its own data dir.
start_node() {
    local name=$1 sync=$2
    local cfg=$TMP/$name.toml
    cat >"$cfg" <<EOF
[node]
name = "bench"
listen = "$ADDR"
data_dir = "$TMP/$name-data"

[auth]
jwt_secret = "bench-secret-0123456789abcdef"

[storage]
engine = "embedded"
sync = "$sync"

[limits]
rate_per_sec = 1000000
rate_burst = 1000000
outbound_queue = 65536
max_in_flight = 4096
max_users_per_request = 1000
max_connections = 19500

[tuning]
shutdown_deadline_ms = 2000
EOF
    CFG=$cfg
    RUST_LOG=${RUST_LOG:-warn} "$NODE" run --config "$cfg" --listen "$ADDR" \
        --data-dir "$TMP/$name-data" 2>"$OUT/node-$name.log" &
    NODE_PID=$!
    for _ in $(seq 1 300); do
        if curl -sf "http://$ADDR/healthz" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$NODE_PID" 2>/dev/null || { tail -20 "$OUT/node-$name.log" >&2; return 1; }
        sleep 0.1
    done
    echo "node did not become healthy in 30 s" >&2
    return 1
}

stop_node() {
    [[ -z $NODE_PID ]] && return 0
    kill -TERM "$NODE_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$NODE_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$NODE_PID" 2>/dev/null || true
    wait "$NODE_PID" 2>/dev/null || true
    NODE_PID=
}

# load NAME ARGS...: run chat-load against the current node, bounded by
# `timeout`, writing $OUT/NAME.json.
load() {
    local name=$1
    shift
    local limit=${LIMIT:-240}
    log "$name: chat-load $*"
    timeout --kill-after=10 "$limit" "$LOAD" --addr "$ADDR" --config "$CFG" \
        --node-pid "$NODE_PID" --json "$OUT/$name.json" "$@" &
    LOAD_PID=$!
    if ! wait "$LOAD_PID"; then
        echo "   $name failed (see above); continuing" >&2
    fi
    LOAD_PID=
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

FILES=()
add() { [[ -f $OUT/$1.json ]] && FILES+=("$OUT/$1.json"); return 0; }

T0=$(date +%s)
log "results in $OUT; open-file limit: soft $(ulimit -Sn), hard $(ulimit -Hn); $(nproc) cores"

if want 1; then
    if [[ -n $QUICK ]]; then
        start_node conn1 full
        load conn-2k connections --count 2000 --hold-secs 2
        stop_node
        add conn-2k
    else
        start_node conn10k full
        load conn-10k connections --count 10000 --hold-secs 5
        stop_node
        add conn-10k
        # 19k: one process cannot hold 19k sockets plus its own files
        # (hard limit 20,000), so two load-generator processes.
        start_node conn19k full
        load conn-19k connections --count 19000 --procs 2 --hold-secs 5
        stop_node
        add conn-19k
    fi
fi

if want 2; then
    if [[ -n $QUICK ]]; then
        start_node fan1k full
        load fanout-1k fanout --members 1000 --senders 4 --rates 100,400 \
            --step-secs 2 --p99-ms 20
        stop_node
        add fanout-1k
    else
        start_node fan1k full
        load fanout-1k fanout --members 1000 --senders 4 \
            --rates 20,100,200,400,600,800 --step-secs 5 --p99-ms 20
        stop_node
        add fanout-1k
        start_node fan10k full
        load fanout-10k fanout --members 10000 --senders 4 \
            --rates 2,10,20,40,60,80 --step-secs 5 --p99-ms 100 \
            --target-deliveries 500000
        stop_node
        add fanout-10k
    fi
fi

if want 3; then
    if [[ -n $QUICK ]]; then
        start_node groups full
        load groups groups --users 2000 --rates 200,400 --step-secs 2
    else
        # 18,000 users instead of 20,000: the node and the load generator
        # each need one fd per connection (hard limit 20,000 per process).
        start_node groups full
        LIMIT=300 load groups groups --users 18000 \
            --rates 500,1000,2000,4000,8000 --step-secs 5
    fi
    stop_node
    add groups
fi

if want 4; then
    secs=10
    [[ -n $QUICK ]] && secs=3
    for sync in full normal; do
        start_node "dur1-$sync" "$sync"
        load "durable-1-$sync" durable --groups 1 --senders 2 --window 1024 \
            --secs "$secs" --label "sync=$sync"
        stop_node
        add "durable-1-$sync"
        start_node "dur1000-$sync" "$sync"
        load "durable-1000-$sync" durable --groups 1000 --senders 16 --window 256 \
            --secs "$secs" --label "sync=$sync"
        stop_node
        add "durable-1000-$sync"
    done
fi

TODO=()
if want 5; then
    TODO=(--todo "5. cluster|3 nodes on one machine|not measured: the cluster is not built yet")
fi

log "done in $(($(date +%s) - T0)) s"
echo
"$LOAD" report "${FILES[@]}" "${TODO[@]}" | tee "$OUT/table.md"
