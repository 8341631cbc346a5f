#!/usr/bin/env bash
# What CI runs: build the node binary, run every test of the workspace (unit
# tests and the end-to-end tests in tests/, which start real chat-node
# processes on 127.0.0.1), build the crates' docs, then check that the
# FoundationDB engine compiles. The test output is kept in
# $CARGO_TARGET_DIR/test-output.log, and a failed run ends with a digest of
# each failed test's error.
#
# Owns: the order of those steps and the environment they run in. Works on a
# fresh clone of a 2-core machine: system packages come from
# scripts/install-deps.sh; Cargo.lock is honoured (--locked) when present.
#
# Knobs: CARGO_TEST_ARGS (extra args for `cargo test`, e.g. "-- --nocapture"),
# CARGO_TARGET_DIR (as usual for cargo).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

step() {
    echo
    echo "==> $*"
}

run() {
    echo "+ $*"
    "$@"
}

if [ -x scripts/install-deps.sh ]; then
    step "system packages (scripts/install-deps.sh)"
    run scripts/install-deps.sh
elif [ -f scripts/install-deps.sh ]; then
    step "system packages (scripts/install-deps.sh)"
    run bash scripts/install-deps.sh
fi

LOCKED=()
if [ -f Cargo.lock ]; then
    LOCKED=(--locked)
fi

step "toolchain"
run cargo --version
run rustc --version

step "build the node binary"
run cargo build "${LOCKED[@]}" -p node --bin chat-node

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in
/*) ;;
*) TARGET_DIR=$ROOT/$TARGET_DIR ;;
esac
export CHAT_NODE_BIN="$TARGET_DIR/debug/chat-node"
if [ ! -x "$CHAT_NODE_BIN" ]; then
    echo "test.sh: $CHAT_NODE_BIN was not built" >&2
    exit 1
fi
echo "CHAT_NODE_BIN=$CHAT_NODE_BIN"

# The steps below all run even when one fails, so one CI run reports every
# failure; the script fails at the end if any did.
failed=()
tests_failed=0

step "tests (unit + end-to-end)"
# The output is kept too, for the digest of failures at the end: a failed
# end-to-end test prints its nodes' log tails before its own error, and a
# CI excerpt of the whole run can lose that error between the two.
TEST_LOG="$TARGET_DIR/test-output.log"
mkdir -p "$TARGET_DIR"
# shellcheck disable=SC2086 # CARGO_TEST_ARGS is split on purpose
run cargo test "${LOCKED[@]}" --workspace --no-fail-fast ${CARGO_TEST_ARGS:-} 2>&1 |
    tee "$TEST_LOG" || { failed+=("cargo test"); tests_failed=1; }

step "the crates' docs build without warnings (broken or private links)"
RUSTDOCFLAGS="-D warnings" run cargo doc "${LOCKED[@]}" --no-deps -p proto -p storage -p actors -p node -p tests ||
    failed+=("cargo doc")

step "FoundationDB engine compiles (storage and node, feature fdb)"
run cargo check "${LOCKED[@]}" -p storage --features fdb --tests || failed+=("cargo check -p storage --features fdb")
run cargo check "${LOCKED[@]}" -p node --features fdb || failed+=("cargo check -p node --features fdb")

# Each failed test's name with the first lines of its error or panic, at
# most 60 lines in all (the backtraces and log tails are in the output above).
failure_digest() {
    awk '
        /^---- .* stdout ----$/ { test = $2; next }
        /^Error: / || /^thread .* panicked at / { print "[" test "]"; left = 10 }
        left > 0 {
            if (/^Stack backtrace:/ || /^   0: / || /^note: run with/) { left = 0; next }
            print; left--
        }
    ' "$1" | head -n 60
}

if [ "${#failed[@]}" -ne 0 ]; then
    if [ "$tests_failed" -eq 1 ] && [ -f "$TEST_LOG" ]; then
        step "failed tests, first lines of each error (whole output: $TEST_LOG)"
        grep -E '^test .* FAILED$' "$TEST_LOG" | head -n 20 || true
        failure_digest "$TEST_LOG"
    fi
    step "FAILED: ${failed[*]}"
    exit 1
fi
step "all done"
