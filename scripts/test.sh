#!/usr/bin/env bash
# What CI runs: build the node binary, run every test of the workspace (unit
# tests and the end-to-end tests in tests/, which start real chat-node
# processes on 127.0.0.1), then check that the FoundationDB engine compiles.
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

step "tests (unit + end-to-end)"
# shellcheck disable=SC2086 # CARGO_TEST_ARGS is split on purpose
run cargo test "${LOCKED[@]}" --workspace --no-fail-fast ${CARGO_TEST_ARGS:-} || failed+=("cargo test")

step "FoundationDB engine compiles (storage and node, feature fdb)"
run cargo check "${LOCKED[@]}" -p storage --features fdb --tests || failed+=("cargo check -p storage --features fdb")
run cargo check "${LOCKED[@]}" -p node --features fdb || failed+=("cargo check -p node --features fdb")

if [ "${#failed[@]}" -ne 0 ]; then
    step "FAILED: ${failed[*]}"
    exit 1
fi
step "all done"
