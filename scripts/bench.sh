#!/usr/bin/env bash
# Runs every benchmark scenario of docs/benchmarks.md against a fresh
# single node on this machine and prints one table.
#
#   scripts/bench.sh              # build release binaries, run everything
#   QUICK=1 scripts/bench.sh      # smaller counts, shorter steps (smoke test)
#   ONLY="1 4" scripts/bench.sh   # just scenarios 1 and 4
#   ONLY=5 scripts/bench.sh       # the cluster part only (3 local nodes)
#   BIG=1 ONLY=5 scripts/bench.sh # plus ~100k idle connections on 5 nodes
#   ONLY=5big scripts/bench.sh    # just the ~100k idle connections
#   ONLY=5hop scripts/bench.sh    # just the hop floor (2-member groups)
#
# Environment:
#   SKIP_BUILD=1          use the binaries already built (or CHAT_NODE/CHAT_LOAD)
#   CHAT_NODE, CHAT_LOAD  binaries to use (default target/release/...)
#   PORT                  node port (default 18080); 127.0.0.1 only
#   OUT                   where result JSON, node logs, each node's /metrics
#                         after each run, machine.txt (the CPU, kernel and
#                         boot, scripts/lib.sh, and the commit writer's nice
#                         value) and table.md go
#                         (default target/bench-results/<timestamp>)
#   CALIBRATE=0           skip the 3 s calibration run (see below)
#   CPORT                 first cluster node's HTTP port (default 18181; node i
#                         uses CPORT+i-1 and cluster port CPORT+1000+i-1)
#   BIG=1                 scenario 5 also runs BIG_N idle connections over a
#                         BIG_NODES-node cluster with BIG_PROCS load-generator
#                         processes (defaults 99,500 / 5 / 7; ~70 s). A node
#                         holds < 20,000 (its fd limit): 100,000 needs
#                         BIG_NODES=6 BIG_N=100000
#   SLOW_FSYNC_US=N       every fsync/fdatasync of the chat-node processes
#                         takes at least N µs (scripts/slow-fsync.c, built
#                         here with cc and preloaded into the nodes only):
#                         4000 models the disk's slow mode (~4 ms), so a
#                         run need not wait for the hour it comes in
#   C3_LOAD_THREADS=N     load-generator threads for fan-out over 3 nodes
#                         (default 3 x cores: see the comment at its use)
#
# Scenario 5 starts a local cluster of release chat-nodes (one config each
# with a [cluster] section, all sharing one SQLite file), waits until every
# node's /admin/status lists every node live, and runs scenarios 2 and 3 with
# the connections spread round-robin over the nodes (chat-load --addr A,B,C).
#
# Each scenario gets a fresh node (new data dir, the bench config below:
# high rate limits, large outbound queue), every run is bounded in count and
# time, and every process started here is stopped on exit (trap).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=scripts/bench-config.sh
source "$ROOT/scripts/bench-config.sh"

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
CLUSTER_PIDS=()
cleanup() {
    local p
    for p in $LOAD_PID $NODE_PID "${CLUSTER_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do
        local alive=
        for p in $LOAD_PID $NODE_PID "${CLUSTER_PIDS[@]}"; do
            kill -0 "$p" 2>/dev/null && alive=1
        done
        [[ -z $alive ]] && break
        sleep 0.1
    done
    for p in $LOAD_PID $NODE_PID "${CLUSTER_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The nodes' environment: the slow-fsync shim when SLOW_FSYNC_US is set.
NODE_ENV=()
if [[ -n ${SLOW_FSYNC_US:-} ]]; then
    cc -O2 -shared -fPIC -o "$TMP/slow-fsync.so" "$ROOT/scripts/slow-fsync.c" -ldl
    NODE_ENV=(LD_PRELOAD="$TMP/slow-fsync.so" SLOW_FSYNC_US="$SLOW_FSYNC_US")
fi

log() { echo "== $*" >&2; }

# start_node NAME SYNC: a fresh node on $ADDR with its own data dir.
start_node() {
    local name=$1 sync=$2
    local cfg=$TMP/$name.toml
    bench_config bench "$ADDR" "$TMP/$name-data" "$sync" 19500 >"$cfg"
    CFG=$cfg
    env "${NODE_ENV[@]}" RUST_LOG="${RUST_LOG:-warn}" "$NODE" run --config "$cfg" --listen "$ADDR" \
        --data-dir "$TMP/$name-data" 2>"$OUT/node-$name.log" &
    NODE_PID=$!
    wait_healthy "$ADDR" "$NODE_PID" "$OUT/node-$name.log"
    note_writer_nice "$NODE_PID"
}

# note_writer_nice PID: once per run, records (in machine.txt, so atop the
# table, and in the log) the nice value node PID's commit writer got: -10
# where the node may raise it, 0 where it may not (docs/decisions.md #33).
WRITER_NICE=
note_writer_nice() {
    [[ -n $WRITER_NICE ]] && return 0
    WRITER_NICE=$(thread_nice "$1" store-write)
    echo "node: commit writer at nice $WRITER_NICE" >>"$OUT/machine.txt"
    log "node: commit writer at nice $WRITER_NICE"
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

CPORT=${CPORT:-18181}
CLUSTER_ADDRS=
# start_cluster NAME N [MAX_CONNECTIONS]: N fresh nodes on 127.0.0.1
# (HTTP CPORT.., cluster CPORT+1000..), one config each, one shared store
# file; returns once every node's /admin/status lists all N nodes live.
start_cluster() {
    local name=$1 n=$2 maxc=${3:-19500} i j
    local dir=$TMP/$name
    mkdir -p "$dir"
    CLUSTER_PIDS=()
    CLUSTER_ADDRS=
    for i in $(seq 1 "$n"); do
        local http=127.0.0.1:$((CPORT + i - 1))
        local seeds=
        for j in $(seq 1 "$n"); do
            [[ $j == "$i" ]] && continue
            seeds+="${seeds:+, }\"127.0.0.1:$((CPORT + 1000 + j - 1))\""
        done
        bench_config "node$i" "$http" "$dir/node$i-data" full "$maxc" \
            "path = \"$dir/shared.db\"" "
[cluster]
listen = \"127.0.0.1:$((CPORT + 1000 + i - 1))\"
cookie = \"bench-cluster-cookie\"
seeds = [$seeds]
ping_interval_ms = 250
failure_timeout_ms = 3000" >"$dir/node$i.toml"
        env "${NODE_ENV[@]}" RUST_LOG="${RUST_LOG:-warn}" "$NODE" run --config "$dir/node$i.toml" \
            2>"$OUT/node-$name-$i.log" &
        CLUSTER_PIDS+=($!)
        CLUSTER_ADDRS+="${CLUSTER_ADDRS:+,}$http"
    done
    CFG=$dir/node1.toml
    local token
    token=$("$NODE" token bench-operator --admin --config "$CFG")
    local t0=$SECONDS
    while ((SECONDS - t0 < 60)); do
        local ready=1
        for i in $(seq 1 "$n"); do
            kill -0 "${CLUSTER_PIDS[$((i - 1))]}" 2>/dev/null || {
                tail -20 "$OUT/node-$name-$i.log" >&2
                return 1
            }
            local live
            live=$(curl -sf -H "Authorization: Bearer $token" \
                "http://127.0.0.1:$((CPORT + i - 1))/admin/status" 2>/dev/null |
                grep -o '"live": *true' | wc -l) || live=0
            ((live == n)) || ready=
        done
        if [[ -n $ready ]]; then
            log "$name: $n nodes live after $((SECONDS - t0)) s (pids ${CLUSTER_PIDS[*]})"
            note_writer_nice "${CLUSTER_PIDS[0]}"
            curl -sf -H "Authorization: Bearer $token" \
                "http://127.0.0.1:$CPORT/admin/status" >"$OUT/status-$name.json" || true
            return 0
        fi
        sleep 0.25
    done
    echo "cluster $name: not every node live after 60 s" >&2
    return 1
}

stop_cluster() {
    local p
    for p in "${CLUSTER_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 100); do
        local alive=
        for p in "${CLUSTER_PIDS[@]}"; do
            kill -0 "$p" 2>/dev/null && alive=1
        done
        [[ -z $alive ]] && break
        sleep 0.1
    done
    for p in "${CLUSTER_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    CLUSTER_PIDS=()
}

# load NAME ARGS...: run chat-load against the current node (or cluster,
# when CLUSTER_PIDS is set), bounded by `timeout`, writing $OUT/NAME.json
# and then node i's /metrics to $OUT/NAME.metrics-i.txt.
load() {
    local name=$1
    shift
    local limit=${LIMIT:-240}
    local addr=$ADDR pids=$NODE_PID
    if ((${#CLUSTER_PIDS[@]} > 0)); then
        addr=$CLUSTER_ADDRS
        pids=$(IFS=,; echo "${CLUSTER_PIDS[*]}")
    fi
    log "$name: chat-load --addr $addr $*"
    timeout --kill-after=10 "$limit" "$LOAD" --addr "$addr" --config "$CFG" \
        --node-pid "$pids" --json "$OUT/$name.json" "$@" &
    LOAD_PID=$!
    if ! wait "$LOAD_PID"; then
        echo "   $name failed (see above); continuing" >&2
    fi
    LOAD_PID=
    # Each node's counters and histograms (commit times, batch sizes,
    # errors) as the run left them, for reading a result that swings.
    local a i=1
    for a in ${addr//,/ }; do
        curl -sf "http://$a/metrics" >"$OUT/$name.metrics-$i.txt" 2>/dev/null ||
            rm -f "$OUT/$name.metrics-$i.txt"
        i=$((i + 1))
    done
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

# Fan-out steps (msg/s offered; each step x M deliveries/s). They double up
# to 3.2M deliveries/s offered, above what this machine has delivered
# (docs/benchmarks.md, round 17: before, the lists stopped at 800k/s
# offered, and every "peak" row was that cap, all delivered, not the
# node's ceiling). Stepping stops at the first step that does not keep up.
FAN1K_RATES=20,100,200,400,800,1600,3200
FAN10K_RATES=2,10,20,40,80,160,320

# Load-generator threads for fan-out over 3 nodes. The kernel shares the
# cores out per thread, and three nodes run ~9 busy threads (two runtime
# workers and the cluster link each) against the load generator's one per
# core. With 2 threads it got ~45% of a core at M=10,000 from 20 msg/s up,
# read its pushes late and set the rows' latency (docs/benchmarks.md, round
# 18); with one runtime worker per node core it gets ~75%, as on one node.
C3_LOAD_THREADS=${C3_LOAD_THREADS:-$((3 * $(nproc)))}

FILES=()
add() { [[ -f $OUT/$1.json ]] && FILES+=("$OUT/$1.json"); return 0; }

T0=$(date +%s)
# Which machine this is goes into the results: two tables compare only when
# their machines and their calibration rows do.
MACHINE=$(machine_summary)
echo "$MACHINE" >"$OUT/machine.txt"
log "$MACHINE"
log "results in $OUT; open-file limit: soft $(ulimit -Sn), hard $(ulimit -Hn)${SLOW_FSYNC_US:+; every node fsync takes >= $SLOW_FSYNC_US us}"

# Calibration: the speed of this machine changes by up to 2x from one hour
# to the next (docs/benchmarks.md, rounds 6 and 7), so every run first
# measures one fixed, short workload; its row ("calibration") says how
# fast the machine was when the table was made. Tables compare only when
# their calibration rows do. CALIBRATE=0 skips it.
if [[ ${CALIBRATE:-1} != 0 ]]; then
    start_node calibration full
    load calibration durable --groups 1 --senders 2 --window 1024 --secs 3 \
        --label "sync=full, calibration"
    stop_node
    add calibration
fi

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
            --rates "$FAN1K_RATES" --step-secs 5 --p99-ms 20
        stop_node
        add fanout-1k
        start_node fan10k full
        load fanout-10k fanout --members 10000 --senders 4 \
            --rates "$FAN10K_RATES" --step-secs 5 --p99-ms 100 \
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
    # The same 1,000 groups with four times as many sends in flight (16 a
    # group instead of 4), sync=full, without a target of its own: at a
    # fixed window a group batch holds about half its group's sends in
    # flight, so this row shows what a deeper queue buys in throughput and
    # costs in latency (docs/decisions.md #39). The target row is the one
    # above.
    start_node dur1000-deep full
    load durable-1000-deep durable --groups 1000 --senders 16 --window 1024 \
        --secs "$secs" --label "sync=full, deeper queue" --target 0
    stop_node
    add durable-1000-deep
fi

if want 5 || want 5hop; then
    # The hop at the floor: 300 groups of 2 members, the two members on
    # different nodes (round-robin), 50 and 200 msg/s; once on one node,
    # once on 3 nodes, back to back.
    hop_secs=5
    [[ -n $QUICK ]] && hop_secs=2
    start_node hop1 full
    load hop-1node groups --users 600 --min 2 --max 2 --rates 50,200 \
        --step-secs "$hop_secs" --prefix h
    stop_node
    add hop-1node
    start_cluster c3hop 3
    load hop-3node groups --users 600 --min 2 --max 2 --rates 50,200 \
        --step-secs "$hop_secs" --prefix h
    stop_cluster
    add hop-3node
fi
if want 5; then
    # Scenarios 2 and 3 over 3 nodes, members and senders spread
    # round-robin over the nodes (the same parameters as above, so the rows
    # compare with the single-node ones).
    if [[ -n $QUICK ]]; then
        start_cluster c3fan 3
        load cluster3-fanout-1k --threads "$C3_LOAD_THREADS" fanout \
            --members 1000 --senders 4 --rates 100,400 \
            --step-secs 2 --p99-ms 20
        stop_cluster
        add cluster3-fanout-1k
        start_cluster c3groups 3
        load cluster3-groups groups --users 2000 --rates 200,400 --step-secs 2
        stop_cluster
        add cluster3-groups
    else
        start_cluster c3fan1k 3
        load cluster3-fanout-1k --threads "$C3_LOAD_THREADS" fanout --members 1000 --senders 4 \
            --rates "$FAN1K_RATES" --step-secs 5 --p99-ms 20
        stop_cluster
        add cluster3-fanout-1k
        start_cluster c3fan10k 3
        load cluster3-fanout-10k --threads "$C3_LOAD_THREADS" fanout --members 10000 --senders 4 \
            --rates "$FAN10K_RATES" --step-secs 5 --p99-ms 100 \
            --target-deliveries 500000
        stop_cluster
        add cluster3-fanout-10k
        start_cluster c3groups 3
        LIMIT=300 load cluster3-groups groups --users 18000 \
            --rates 500,1000,2000,4000,8000 --step-secs 5
        stop_cluster
        add cluster3-groups
    fi
fi
if [[ -n ${BIG:-} ]] || want 5big; then
    # Idle connections over BIG_NODES nodes from BIG_PROCS load-generator
    # processes, sources 127.0.0.2-127.0.0.20. Every process (node or
    # load generator) has a hard limit of 20,000 fds, so a node holds at
    # most ~19,900 sessions: 5 nodes top out just under 100,000.
    big_nodes=${BIG_NODES:-5}
    big_n=${BIG_N:-99500}
    big_procs=${BIG_PROCS:-7}
    start_cluster "c${big_nodes}conn" "$big_nodes" 19950
    LIMIT=400 load "cluster${big_nodes}-conn" --sources 19 --parallel 128 \
        connections --count "$big_n" --procs "$big_procs" --hold-secs 10
    stop_cluster
    add "cluster${big_nodes}-conn"
fi

log "done in $(($(date +%s) - T0)) s"
echo
{
    cat "$OUT/machine.txt"
    echo
    "$LOAD" report "${FILES[@]}"
} | tee "$OUT/table.md"
