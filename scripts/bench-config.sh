# The node config every benchmark run uses (sourced by scripts/bench.sh and
# scripts/cpu-per-msg.sh, so that their numbers compare and they start
# nodes alike): high rate limits, a large outbound queue, a short shutdown
# deadline. Sources scripts/lib.sh for wait_healthy.
#
#   bench_config NAME LISTEN DATA_DIR SYNC MAX_CONNECTIONS [STORAGE_LINES [MORE_TOML]] >FILE
#
# STORAGE_LINES go into [storage] (e.g. a shared `path`), MORE_TOML after
# everything (e.g. a [cluster] table).

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

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
