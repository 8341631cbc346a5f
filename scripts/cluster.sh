#!/usr/bin/env bash
# Starts and stops a local 3-node cluster in the background.
#
#   scripts/cluster.sh up       build (release) and start node1..node3
#   scripts/cluster.sh status   pids, health, and `chat-node admin status`
#   scripts/cluster.sh down     SIGTERM every node (graceful), then wait
#
# Configs: cluster-config/local-3node/node{1,2,3}.toml (HTTP 8081-8083,
# cluster 9101-9103, one shared store under run/local-3node/).
# Pids and logs: run/local-3node/nodeN.{pid,log}. Set PROFILE=debug to use a
# debug build, BIN to use a given binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

RUN=run/local-3node
CONF=cluster-config/local-3node
PROFILE=${PROFILE:-release}
NODES=(node1 node2 node3)

bin() {
    if [ -n "${BIN:-}" ]; then
        echo "$BIN"
    else
        echo "target/$PROFILE/chat-node"
    fi
}

build() {
    if [ -z "${BIN:-}" ]; then
        if [ "$PROFILE" = release ]; then
            cargo build --release -p node --bin chat-node
        else
            cargo build -p node --bin chat-node
        fi
    fi
}

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

up() {
    build
    mkdir -p "$RUN"
    for n in "${NODES[@]}"; do
        if alive "$n"; then
            echo "$n already running (pid $(cat "$RUN/$n.pid"))"
            continue
        fi
        nohup "$(bin)" run --config "$CONF/$n.toml" >"$RUN/$n.log" 2>&1 &
        echo $! >"$RUN/$n.pid"
        echo "$n started (pid $!, log $RUN/$n.log)"
    done
    # A node that exits at start-up (a bad config, a port in use) fails
    # `up` here, with its log's tail, instead of showing up as stopped.
    local failed=0 i=1
    for n in "${NODES[@]}"; do
        wait_healthy "127.0.0.1:808$i" "$(cat "$RUN/$n.pid")" "$RUN/$n.log" || failed=1
        i=$((i + 1))
    done
    status
    return "$failed"
}

status() {
    for n in "${NODES[@]}"; do
        if alive "$n"; then
            echo "$n: running (pid $(cat "$RUN/$n.pid"))"
        else
            echo "$n: stopped"
        fi
    done
    "$(bin)" admin --config "$CONF/node1.toml" --node 127.0.0.1:8081 status 2>/dev/null ||
        "$(bin)" admin --config "$CONF/node2.toml" --node 127.0.0.1:8082 status 2>/dev/null ||
        echo "(no node answers on its admin endpoint)"
}

down() {
    for n in "${NODES[@]}"; do
        if alive "$n"; then
            kill -TERM "$(cat "$RUN/$n.pid")"
        fi
    done
    for n in "${NODES[@]}"; do
        for _ in $(seq 1 150); do
            alive "$n" || break
            sleep 0.1
        done
        if alive "$n"; then
            echo "$n did not stop in 15 s; killing"
            kill -KILL "$(cat "$RUN/$n.pid")" || true
        fi
        rm -f "$RUN/$n.pid"
        echo "$n: stopped"
    done
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|status|down" >&2
    exit 2
    ;;
esac
