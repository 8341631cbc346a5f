# The node config every benchmark run uses, and the wait for a node it
# started (sourced by scripts/bench.sh and scripts/cpu-per-msg.sh, so that
# their numbers compare and they start nodes alike): high rate limits, a
# large outbound queue, a short shutdown deadline.
#
#   bench_config NAME LISTEN DATA_DIR SYNC MAX_CONNECTIONS [STORAGE_LINES [MORE_TOML]] >FILE
#   wait_healthy ADDR PID LOG    # 0 once http://ADDR/healthz answers 2xx
#
# STORAGE_LINES go into [storage] (e.g. a shared `path`), MORE_TOML after
# everything (e.g. a [cluster] table).

bench_config() {
    local name=$1 listen=$2 data_dir=$3 sync=$4 max_connections=$5
    local storage_lines=${6:-} more=${7:-}
    cat <<EOF
[node]
name = "$name"
listen = "$listen"
data_dir = "$data_dir"

[auth]
jwt_secret = "bench-secret-0123456789abcdef"

[storage]
engine = "embedded"
sync = "$sync"
$storage_lines

[limits]
rate_per_sec = 1000000
rate_burst = 1000000
outbound_queue = 65536
max_in_flight = 4096
max_users_per_request = 1000
max_connections = $max_connections

[tuning]
shutdown_deadline_ms = 2000
$more
EOF
}

# wait_healthy ADDR PID LOG: polls http://ADDR/healthz every 0.1 s for up to
# 30 s. Returns 0 once it answers 2xx; 1 (with the tail of LOG on stderr) if
# process PID exits first or the 30 s run out.
wait_healthy() {
    local addr=$1 pid=$2 log=$3
    for _ in $(seq 1 300); do
        curl -sf "http://$addr/healthz" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || {
            tail -20 "$log" >&2
            return 1
        }
        sleep 0.1
    done
    echo "node at $addr did not become healthy in 30 s (log: $log)" >&2
    return 1
}
