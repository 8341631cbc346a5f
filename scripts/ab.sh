#!/usr/bin/env bash
# Interleaved A/B runs of two chat-node binaries, for measuring a change on
# this machine, whose speed changes by up to 2x from one hour to the next
# (docs/benchmarks.md): only runs of both binaries taken side by side in
# the same hour compare.
#
#   scripts/ab.sh OLD_BIN NEW_BIN            # ONLY=4 (durable appends), 3 rounds
#   ONLY="1 2" ROUNDS=4 scripts/ab.sh A B    # any scenarios of scripts/bench.sh
#   QUICK=1 scripts/ab.sh A B                # bench.sh's short counts (smoke test)
#
# Each round runs `scripts/bench.sh` (SKIP_BUILD=1, CALIBRATE=0, the given
# ONLY and QUICK) once with CHAT_NODE=A, then once with B; the order flips
# every round, so neither binary always runs first. The load generator is
# target/release/chat-load (or CHAT_LOAD) for both. At the end it prints
# every result row of both binaries, grouped by scenario, labelled
# "A #1", "B #1", ...; each run's full table, JSON and node logs stay in
# OUT/A-1, OUT/B-1, ... (default target/bench-results/ab-<timestamp>).
#
# Build the old binary in a worktree first, e.g.
#   git worktree add /tmp/old REV && (cd /tmp/old && cargo build --release -p node --bin chat-node)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

if (($# != 2)); then
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi
A=$(realpath "$1")
B=$(realpath "$2")
for bin in "$A" "$B"; do
    [[ -x $bin ]] || { echo "not an executable: $bin" >&2; exit 2; }
done
ROUNDS=${ROUNDS:-3}
ONLY=${ONLY:-4}
OUT=${OUT:-$ROOT/target/bench-results/ab-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
echo "== A: $A" >&2
echo "== B: $B" >&2
echo "== $ROUNDS rounds of ONLY=\"$ONLY\"${QUICK:+ QUICK=1}; results in $OUT" >&2

run() {
    local side=$1 round=$2 bin=$3
    local dir=$OUT/$side-$round
    echo "== round $round: $side" >&2
    if ! SKIP_BUILD=1 CALIBRATE=0 CHAT_NODE=$bin ONLY=$ONLY OUT=$dir \
        "$ROOT/scripts/bench.sh" >"$dir.log" 2>&1; then
        echo "   bench.sh failed for $side in round $round (see $dir.log)" >&2
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2 == 1)); then
        run A "$round" "$A"
        run B "$round" "$B"
    else
        run B "$round" "$B"
        run A "$round" "$A"
    fi
done

# Every result row (not the header or the separator), labelled, then
# grouped by its first two cells (scenario, parameters): a stable sort on
# those keeps the rounds in order within each group.
echo
echo "| run | scenario | parameters | result | latency p50 / p99 / p99.9 / max (ms) | node CPU | load-gen CPU | target | verdict |"
echo "|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for side in A B; do
        table=$OUT/$side-$round/table.md
        [[ -f $table ]] || continue
        grep '^| ' "$table" | grep -v '^| scenario |' | sed "s/^| /| $side #$round | /"
    done
done | awk -F'|' '{ print $3 "|" $4 "\t" $0 }' | sort -s -t$'\t' -k1,1 | cut -f2-
