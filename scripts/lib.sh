# Shell functions the scripts share (sourced, never run): scripts/bench.sh
# and scripts/cpu-per-msg.sh (through scripts/bench-config.sh) and
# scripts/cluster.sh. Owns nothing but these helpers; each script keeps its
# own settings and traps.
#
#   wait_healthy ADDR PID LOG    # 0 once http://ADDR/healthz answers 2xx
#   machine_summary              # one line naming this machine and boot
#   thread_nice PID PREFIX       # nice value of PID's first PREFIX* thread
#   stat_fields STAT_FILE        # a /proc stat file's fields after the name
#   cpu_ticks STAT_FILE          # its utime + stime, in clock ticks

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

# machine_summary: prints one line naming the machine a result was measured
# on: the CPU as the guest sees it (model name, family/model/stepping, MHz,
# cache), the core count, the kernel and this boot's id. A run on another
# machine (or after a reboot, which may land on another host) then shows
# as such next to its calibration row, instead of reading as a faster or
# slower hour (docs/benchmarks.md, round 17).
machine_summary() {
    printf 'machine: %s (family %s model %s stepping %s, %s MHz, cache %s), %s cores; kernel %s; boot %s\n' \
        "$(cpuinfo_field 'model name')" "$(cpuinfo_field 'cpu family')" \
        "$(cpuinfo_field model)" "$(cpuinfo_field stepping)" \
        "$(cpuinfo_field 'cpu MHz')" "$(cpuinfo_field 'cache size')" \
        "$(nproc)" "$(uname -r)" "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)"
}

# cpuinfo_field NAME: the first value of NAME in /proc/cpuinfo (empty if none).
cpuinfo_field() {
    sed -n "s/^$1[[:space:]]*: //p; T; q" /proc/cpuinfo
}

# thread_nice PID PREFIX: prints the nice value of the first thread of
# process PID whose name starts with PREFIX (field 19 of its
# /proc/PID/task/TID/stat), or "-" if there is none. The node's commit
# writer (store-write-0) runs at `[storage] writer_nice` only where the
# node may raise its priority (docs/decisions.md #33), so a result says
# which it got.
thread_nice() {
    local pid=$1 prefix=$2 t comm stat
    local -a fields
    for t in /proc/"$pid"/task/*; do
        comm=$(cat "$t/comm" 2>/dev/null) || continue
        [[ $comm == "$prefix"* ]] || continue
        stat=$(stat_fields "$t/stat") || continue
        # The first of them is field 3 (state); nice is field 19.
        read -ra fields <<<"$stat"
        echo "${fields[16]}"
        return 0
    done
    echo "-"
}

# stat_fields STAT_FILE: prints the fields of a /proc/PID[/task/TID]/stat
# file after the parenthesised thread name, the state (field 3) first. The
# name may hold spaces and parentheses, so they start after the last ") ".
# Fails (prints nothing) if the file is gone, as a thread's may be.
stat_fields() {
    local stat
    stat=$(cat "$1" 2>/dev/null) || return 1
    echo "${stat##*) }"
}

# cpu_ticks STAT_FILE: prints utime + stime (clock ticks) from a
# /proc/PID[/task/TID]/stat file: fields 14 and 15, the 12th and 13th
# after the name (stat_fields). For a process they cover all its threads.
# Fails (prints nothing) if the file is gone.
cpu_ticks() {
    local stat
    local -a fields
    stat=$(stat_fields "$1") || return 1
    read -ra fields <<<"$stat"
    echo "$((fields[11] + fields[12]))"
}
