#!/usr/bin/env bash
# CPU time per committed message, by thread, for one durable-append run:
# a steadier measure of a change on this machine than acknowledged
# messages per second, which swing by ±20% from one run to the next
# (docs/benchmarks.md, round 12).
#
#   scripts/cpu-per-msg.sh [BIN]          # 1,000 groups, sync=full
#   NGROUPS=1 SENDERS=2 WINDOW=1024 scripts/cpu-per-msg.sh OLD_BIN
#   SYNC=normal scripts/cpu-per-msg.sh
#
# Starts BIN (default target/release/chat-node) on a fresh data directory
# at 127.0.0.1:${PORT:-18990}, runs `chat-load durable` for SECS (10) s,
# and over WIN (4) s from SKIP (4) s into the run reads every thread's
# utime + stime (/proc/PID/task/TID/stat), the commit writer's scheduler
# times (/proc/PID/task/TID/schedstat: on a CPU, runnable but waiting for
# one, neither) and `chat_messages_committed_total` from /metrics. Prints
# one line per thread name (µs of CPU per committed message), the node's
# sum, the load generator's (its whole process, over the same window: it
# shares the cores) and what the cores allow at the two together (the
# bound of a CPU-bound run, docs/benchmarks.md round 28), the writer's
# split and the machine's steal time over the window (a window
# with much of it measured a slower machine), the writer's nice value
# (decisions.md #33), then which machine this is
# (machine_summary, scripts/lib.sh). Build both binaries first
# (cargo build --release -p node -p tests); run two binaries'
# measurements interleaved, as scripts/ab.sh does, to compare them.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-config.sh
source scripts/bench-config.sh
BIN=$(realpath "${1:-target/release/chat-node}")
LOAD=${CHAT_LOAD:-target/release/chat-load}
NGROUPS=${NGROUPS:-1000}
SENDERS=${SENDERS:-16}
WINDOW=${WINDOW:-256}
SECS=${SECS:-10}
SKIP=${SKIP:-4}
WIN=${WIN:-4}
ADDR=127.0.0.1:${PORT:-18990}
if ((SKIP + WIN >= SECS)); then
    echo "SKIP + WIN must end before the run does (SECS=$SECS)" >&2
    exit 2
fi
for f in "$BIN" "$LOAD"; do
    [[ -x $f ]] || { echo "not built: $f" >&2; exit 2; }
done

TMP=$(mktemp -d)
NODE_PID=
LOAD_PID=
cleanup() {
    for p in $LOAD_PID $NODE_PID; do
        kill -TERM "$p" 2>/dev/null || true
    done
    sleep 0.5
    for p in $LOAD_PID $NODE_PID; do
        kill -KILL "$p" 2>/dev/null || true
    done
    [[ -n ${KEEP:-} ]] && echo "kept $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT

bench_config cpu-per-msg "$ADDR" "$TMP/data" "${SYNC:-full}" 19500 >"$TMP/node.toml"

RUST_LOG=warn "$BIN" run --config "$TMP/node.toml" 2>"$TMP/node.log" &
NODE_PID=$!
wait_healthy "$ADDR" "$NODE_PID" "$TMP/node.log" || exit 1

timeout --kill-after=10 $((SECS + 60)) "$LOAD" --addr "$ADDR" --config "$TMP/node.toml" \
    --node-pid "$NODE_PID" durable --groups "$NGROUPS" --senders "$SENDERS" \
    --window "$WINDOW" --secs "$SECS" >"$TMP/load.txt" 2>&1 &
LOAD_PID=$!
# The load generator itself, under `timeout`: its CPU is counted too, as
# it shares the cores with the node (left out where there is no pgrep).
GEN_PID=
if command -v pgrep >/dev/null; then
    for _ in $(seq 1 20); do
        GEN_PID=$(pgrep -P "$LOAD_PID" -x chat-load || true)
        [[ -n $GEN_PID ]] && break
        sleep 0.05
    done
fi

# snapshot NAME: per thread "comm utime+stime" (clock ticks), the writer's
# schedstat, the committed counter and the time.
snapshot() {
    local out=$TMP/$1 t comm ticks
    for t in /proc/"$NODE_PID"/task/*; do
        comm=$(<"$t/comm") || continue
        ticks=$(cpu_ticks "$t/stat") || continue
        echo "cpu ${comm// /_} $ticks"
        if [[ $comm == store-write-0 ]]; then
            echo "sched $(<"$t/schedstat")"
        fi
    done >"$out"
    if [[ -n $GEN_PID ]] && ticks=$(cpu_ticks "/proc/$GEN_PID/stat"); then
        echo "gen $ticks"
    fi >>"$out"
    curl -sf "http://$ADDR/metrics" |
        awk '/^chat_messages_committed_total/ { n += $NF } END { print "committed", n + 0 }' >>"$out"
    echo "time $(date +%s%N)" >>"$out"
    # The machine: user nice system idle iowait irq softirq steal (ticks).
    awk '$1 == "cpu" { print "machine", $2, $3, $4, $5, $6, $7, $8, $9 + 0; exit }' \
        /proc/stat >>"$out"
}

sleep "$SKIP"
snapshot before
sleep "$WIN"
snapshot after
writer_nice=$(thread_nice "$NODE_PID" store-write)
wait "$LOAD_PID" || echo "chat-load failed (see its output below)" >&2
LOAD_PID=
grep '^| 4\.' "$TMP/load.txt" || tail -5 "$TMP/load.txt"

awk -v hz="$(getconf CLK_TCK)" -v cores="$(nproc)" '
    FNR == 1 { side++ }
    $1 == "cpu" { cpu[side, $2] += $3; names[$2] = 1 }
    $1 == "sched" { for (i = 2; i <= 4; i++) sched[side, i] = $i }
    $1 == "gen" { gen[side] = $2; gens++ }
    $1 == "committed" { committed[side] = $2 }
    $1 == "time" { t[side] = $2 }
    $1 == "machine" { for (i = 2; i <= 9; i++) m[side, i] = $i }
    END {
        n = committed[2] - committed[1]
        wall = (t[2] - t[1]) / 1e9
        if (n <= 0) { print "no message committed in the window"; exit 1 }
        printf "window %.1f s: %d messages committed (%.1fk/s)\n", wall, n, n / wall / 1e3
        node = 0
        for (name in names) {
            us = (cpu[2, name] - cpu[1, name]) / hz * 1e6 / n
            node += us
            if (us >= 0.05) printf "  %-16s %6.1f us of CPU per message\n", name, us
        }
        printf "  %-16s %6.1f us (all the node'"'"'s threads)\n", "node", node
        if (gens == 2) {
            g = (gen[2] - gen[1]) / hz * 1e6 / n
            printf "  %-16s %6.1f us (the load generator, on the same cores)\n", "chat-load", g
            # What the cores allow at this cost, were they all busy with it.
            printf "  %-16s %6.1f us: %d cores give at most %.1fk/s at this cost\n", "together", node + g, cores, cores / ((node + g) / 1e6) / 1e3
        }
        on = (sched[2, 2] - sched[1, 2]) / 1e9 / wall * 100
        wait = (sched[2, 3] - sched[1, 3]) / 1e9 / wall * 100
        printf "writer: on a CPU %.0f%%, waiting for a CPU %.0f%%, blocked or idle %.0f%%\n", on, wait, 100 - on - wait
        total = 0
        for (i = 2; i <= 9; i++) total += m[2, i] - m[1, i]
        if (total > 0)
            printf "machine: steal %.1f%% of all cores (CPU the hypervisor gave to other guests)\n", (m[2, 9] - m[1, 9]) / total * 100
    }' "$TMP/before" "$TMP/after"
# Where the node may not raise it, the writer runs at 0 (decisions.md #33).
echo "writer: nice $writer_nice"
machine_summary
