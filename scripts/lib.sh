# Shell functions the scripts share (sourced, never run): scripts/bench.sh
# and scripts/cpu-per-msg.sh (through scripts/bench-config.sh) and
# scripts/cluster.sh. Owns nothing but these helpers; each script keeps its
# own settings and traps.
#
#   wait_healthy ADDR PID LOG    # 0 once http://ADDR/healthz answers 2xx

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
