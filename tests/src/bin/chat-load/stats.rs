//! Measurement: latency histograms, process CPU and memory, node metrics.
//!
//! Latency is carried in the message text itself: a load message's text is
//! `L<step>:<unix-nanos>:<padding>` (see [`tag`]), written by the sender just
//! before the frame goes out. Every receiver parses it and records
//! `now - sent` in microseconds into an HDR histogram of that step. All
//! processes of a run are on one machine, so the clocks agree.
//!
//! Histograms are sharded (each connection records into shard
//! `conn % SHARDS`) so the reader tasks of a multi-threaded runtime rarely
//! contend on a lock; a step's result merges the shards.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Shards of the latency recorder.
pub const SHARDS: usize = 16;
/// Largest latency recorded, in microseconds (larger values saturate).
pub const MAX_LATENCY_US: u64 = 120_000_000;
/// Most load steps one run may have.
pub const MAX_STEPS: usize = 16;

/// Wall clock now, Unix nanoseconds.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The text of a load message sent in `step` at `sent_nanos`, padded with
/// `x` to at least `len` bytes.
pub fn tag(step: usize, sent_nanos: u64, len: usize) -> String {
    let mut s = format!("L{step}:{sent_nanos}:");
    while s.len() < len {
        s.push('x');
    }
    s
}

/// Parses a load message text back into `(step, sent_nanos)`; `None` for
/// any other text (system messages, foreign traffic).
pub fn parse_tag(text: &str) -> Option<(usize, u64)> {
    let rest = text.strip_prefix('L')?;
    let mut it = rest.splitn(3, ':');
    let step = it.next()?.parse().ok()?;
    let nanos = it.next()?.parse().ok()?;
    it.next()?;
    Some((step, nanos))
}

/// Latency in whole microseconds from `sent` to `received` (nanos); a
/// receipt stamped before its send (clock step) counts as 0.
pub fn latency_us(sent_nanos: u64, received_nanos: u64) -> u64 {
    received_nanos.saturating_sub(sent_nanos) / 1_000
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl Summary {
    /// The summary of `h` (all zeros when empty).
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    /// `p50/p99/p99.9/max` in milliseconds, for the table.
    pub fn ms_cell(&self) -> String {
        if self.count == 0 {
            return "-".into();
        }
        format!(
            "{} / {} / {} / {}",
            fmt_ms(self.p50_us),
            fmt_ms(self.p99_us),
            fmt_ms(self.p999_us),
            fmt_ms(self.max_us)
        )
    }
}

/// Microseconds as milliseconds with sensible precision.
pub fn fmt_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Latency histograms of every step, sharded; plus connection-end counts.
pub struct Recorder {
    shards: Vec<Mutex<Vec<Histogram<u64>>>>,
    /// Message pushes whose text was not a load tag.
    pub untagged: AtomicU64,
    /// Load tags of a step beyond [`MAX_STEPS`].
    pub bad_step: AtomicU64,
    closes: Mutex<BTreeMap<String, u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Recorder {
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            untagged: AtomicU64::new(0),
            bad_step: AtomicU64::new(0),
            closes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a message push with `text` received by connection `conn`
    /// at `now_nanos`.
    pub fn on_text(&self, conn: usize, text: &str, now_nanos: u64) {
        match parse_tag(text) {
            Some((step, sent)) => self.record(conn, step, latency_us(sent, now_nanos)),
            None => {
                self.untagged.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records one latency sample of `step` for connection `conn`.
    pub fn record(&self, conn: usize, step: usize, us: u64) {
        if step >= MAX_STEPS {
            self.bad_step.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut shard = self.shards[conn % SHARDS].lock().expect("recorder lock");
        while shard.len() <= step {
            shard.push(new_hist());
        }
        shard[step].saturating_record(us.max(1));
    }

    /// Samples recorded so far for `step`.
    pub fn count(&self, step: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .expect("recorder lock")
                    .get(step)
                    .map_or(0, |h| h.len())
            })
            .sum()
    }

    /// The merged histogram of `step`.
    pub fn merged(&self, step: usize) -> Histogram<u64> {
        let mut all = new_hist();
        for s in &self.shards {
            if let Some(h) = s.lock().expect("recorder lock").get(step) {
                all.add(h).expect("same bounds");
            }
        }
        all
    }

    /// Counts how a connection ended (`"4008"`, `"1001"`, `"error"`, ...).
    pub fn closed(&self, how: String) {
        *self
            .closes
            .lock()
            .expect("recorder lock")
            .entry(how)
            .or_default() += 1;
    }

    /// Connection ends seen so far.
    pub fn closes(&self) -> BTreeMap<String, u64> {
        self.closes.lock().expect("recorder lock").clone()
    }
}

/// Clock ticks per second of `/proc/*/stat` (USER_HZ; 100 on Linux).
pub const CLK_TCK: f64 = 100.0;

/// utime + stime of a process, in clock ticks, from `/proc/<pid>/stat`
/// (`pid` `None`: this process).
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    parse_stat_ticks(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime from the text of a `/proc/<pid>/stat` file.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after the last ')'. Field 3 (state) is index 0 there, so
    // utime (field 14) is index 11 and stime (field 15) index 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU use of a process over an interval, as a percentage of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: Option<u32>,
    start_ticks: Option<u64>,
    start: std::time::Instant,
}

impl CpuMeter {
    /// Starts measuring `pid` (`None`: this process).
    pub fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            start_ticks: cpu_ticks(pid),
            start: std::time::Instant::now(),
        }
    }

    /// Percent of one core used since [`CpuMeter::start`] (200 = both
    /// cores of this machine busy).
    pub fn percent(&self) -> Option<f64> {
        let now = cpu_ticks(self.pid)?;
        let secs = self.start.elapsed().as_secs_f64();
        cpu_percent(self.start_ticks?, now, secs)
    }
}

/// CPU use of several node processes together (a cluster), as a percentage
/// of one core (the sum over the processes); `None` without pids.
#[derive(Debug, Clone)]
pub struct NodesCpu {
    meters: Vec<CpuMeter>,
}

impl NodesCpu {
    /// Starts measuring every pid in `pids`.
    pub fn start(pids: &[u32]) -> Self {
        NodesCpu {
            meters: pids.iter().map(|&p| CpuMeter::start(Some(p))).collect(),
        }
    }

    /// The sum of the processes' CPU since [`NodesCpu::start`].
    pub fn percent(&self) -> Option<f64> {
        if self.meters.is_empty() {
            return None;
        }
        self.meters.iter().map(|m| m.percent()).sum()
    }

    /// Each process' CPU since [`NodesCpu::start`].
    pub fn each(&self) -> Vec<Option<f64>> {
        self.meters.iter().map(|m| m.percent()).collect()
    }
}

/// The summed `VmRSS` of `pids`, KiB (`None` without pids or if one is gone).
pub fn rss_sum_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_kib(Some(p))).sum()
}

/// The whole machine's CPU time since boot, in clock ticks summed over
/// all cores, from the first (`cpu`) line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq (guest time is inside user).
    pub busy: u64,
    /// Idle while some task waited for the disk.
    pub iowait: u64,
    /// Time the hypervisor ran something else while this guest wanted a CPU.
    pub steal: u64,
    /// busy + idle + iowait + steal.
    pub total: u64,
}

/// The `cpu` line of a `/proc/stat` text (`None` if missing or malformed).
pub fn parse_machine_ticks(text: &str) -> Option<MachineTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>())
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let (user, nice, system, idle) = (*f.first()?, *f.get(1)?, *f.get(2)?, *f.get(3)?);
    let (iowait, irq, softirq) = (*f.get(4)?, *f.get(5)?, *f.get(6)?);
    let steal = f.get(7).copied().unwrap_or(0);
    let busy = user + nice + system + irq + softirq;
    Some(MachineTicks {
        busy,
        iowait,
        steal,
        total: busy + idle + iowait + steal,
    })
}

/// How the machine's CPUs spent an interval, in % of all cores' time
/// (100 = every core): what else was going on while a step ran. Steal
/// time is the one number here that the node and the load generator
/// cannot cause: a run with much of it measured a slower machine.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MachineUsage {
    /// Busy, any process (the node, the load generator, anything else).
    pub busy_percent: f64,
    /// Idle with a task waiting for the disk.
    pub iowait_percent: f64,
    /// Taken by the hypervisor for other guests.
    pub steal_percent: f64,
}

impl MachineUsage {
    /// The usage between two readings (`None` if no time passed).
    pub fn between(a: MachineTicks, b: MachineTicks) -> Option<MachineUsage> {
        let total = b.total.checked_sub(a.total).filter(|&t| t > 0)? as f64;
        let pct = |x: u64, y: u64| y.saturating_sub(x) as f64 / total * 100.0;
        Some(MachineUsage {
            busy_percent: pct(a.busy, b.busy),
            iowait_percent: pct(a.iowait, b.iowait),
            steal_percent: pct(a.steal, b.steal),
        })
    }
}

/// The machine's CPU use from [`MachineMeter::start`] to now.
pub struct MachineMeter {
    start: Option<MachineTicks>,
}

impl MachineMeter {
    /// Reads `/proc/stat` now.
    pub fn start() -> Self {
        MachineMeter {
            start: machine_ticks(),
        }
    }

    /// The usage since [`MachineMeter::start`] (`None` off Linux).
    pub fn usage(&self) -> Option<MachineUsage> {
        MachineUsage::between(self.start?, machine_ticks()?)
    }
}

fn machine_ticks() -> Option<MachineTicks> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Percent of one core from two tick readings `secs` apart.
pub fn cpu_percent(before: u64, after: u64, secs: f64) -> Option<f64> {
    if secs <= 0.0 {
        return None;
    }
    Some(after.saturating_sub(before) as f64 / CLK_TCK / secs * 100.0)
}

/// `GET path` over plain HTTP/1.0 on a loopback address; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(64 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// The sum over all label sets of the Prometheus sample `name` (exact
/// metric name, e.g. `chat_messages_committed_total`), `None` if absent.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labels) = rest.strip_prefix('{') {
            labels.split_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None // a longer name with this prefix
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// How much the sample `name` grew between two scrapes. `None` when the
/// later scrape lacks it; an earlier scrape without it counts as zero (the
/// node started in between).
pub fn delta_between(before: &str, after: &str, name: &str) -> Option<f64> {
    Some(metric(after, name)? - metric(before, name).unwrap_or(0.0))
}

/// The mean of the samples a summary or histogram `name` took between two
/// scrapes: Δ`name_sum` ÷ Δ`name_count` (see [`delta_between`]). `None`
/// also when no sample was taken in between.
pub fn mean_between(before: &str, after: &str, name: &str) -> Option<f64> {
    let delta = |part: &str| delta_between(before, after, &format!("{name}_{part}"));
    let (sum, count) = (delta("sum")?, delta("count")?);
    (count > 0.0).then(|| sum / count)
}

/// The quantile lines of a Prometheus summary `name`: `(quantile, value)`.
pub fn summary_quantiles(text: &str, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}{{quantile=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (q, v) = rest.split_once("\"}")?;
            Some((q.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_round_trips_and_pads() {
        let t = tag(3, 1_700_000_000_123_456_789, 64);
        assert!(t.len() >= 64);
        assert_eq!(parse_tag(&t), Some((3, 1_700_000_000_123_456_789)));
        // Short length: no padding, still parses.
        assert_eq!(parse_tag(&tag(0, 5, 0)), Some((0, 5)));
        assert_eq!(parse_tag("hello"), None);
        assert_eq!(parse_tag("L1:2"), None);
        assert_eq!(parse_tag("Lx:2:"), None);
        assert_eq!(parse_tag(""), None);
    }

    #[test]
    fn latency_is_microseconds_and_never_negative() {
        assert_eq!(latency_us(1_000_000, 3_500_000), 2_500);
        assert_eq!(latency_us(5_000, 1_000), 0);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        // 1..=10_000 µs, one sample each.
        let r = Recorder::new();
        for v in 1..=10_000u64 {
            r.record(v as usize, 0, v);
        }
        let s = Summary::of(&r.merged(0));
        assert_eq!(s.count, 10_000);
        assert_eq!(r.count(0), 10_000);
        // 3 significant digits: within 0.1%.
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001;
        assert!(close(s.p50_us, 5_000), "p50 {}", s.p50_us);
        assert!(close(s.p99_us, 9_900), "p99 {}", s.p99_us);
        assert!(close(s.p999_us, 9_990), "p99.9 {}", s.p999_us);
        assert!(close(s.max_us, 10_000), "max {}", s.max_us);
        assert!((s.mean_us - 5_000.5).abs() < 10.0);
        // Other steps are empty.
        assert_eq!(r.count(1), 0);
        assert_eq!(Summary::of(&r.merged(1)), Summary::default());
    }

    #[test]
    fn tail_is_not_hidden_by_the_median() {
        let r = Recorder::new();
        // 500 samples: p99.9 is the 500th, the outlier; p99 the 495th.
        for i in 0..499 {
            r.record(i, 2, 1_000);
        }
        r.record(0, 2, 80_000);
        let s = Summary::of(&r.merged(2));
        assert_eq!(s.p50_us, 1_000);
        assert_eq!(s.p99_us, 1_000);
        assert!(s.max_us >= 79_900);
        assert!(s.p999_us >= 79_900, "p99.9 {}", s.p999_us);
        // HDR reports the top of the bucket (3 significant digits): 80.06 ms.
        assert_eq!(s.ms_cell(), "1.00 / 1.00 / 80.1 / 80.1");
    }

    #[test]
    fn on_text_sorts_by_step_and_counts_foreign_text() {
        let r = Recorder::new();
        r.on_text(1, &tag(1, 1_000_000, 32), 4_000_000);
        r.on_text(2, "created", 4_000_000);
        r.record(3, MAX_STEPS, 10);
        assert_eq!(r.count(1), 1);
        assert!(Summary::of(&r.merged(1)).p50_us.abs_diff(3_000) <= 3);
        assert_eq!(r.untagged.load(Ordering::Relaxed), 1);
        assert_eq!(r.bad_step.load(Ordering::Relaxed), 1);
        r.closed("4008".into());
        r.closed("4008".into());
        assert_eq!(r.closes().get("4008"), Some(&2));
    }

    #[test]
    fn huge_latency_saturates() {
        let r = Recorder::new();
        r.record(0, 0, u64::MAX);
        assert_eq!(r.count(0), 1);
        assert!(Summary::of(&r.merged(0)).max_us >= MAX_LATENCY_US / 2);
    }

    #[test]
    fn machine_ticks_and_usage() {
        let a = "cpu  1000 0 500 8000 100 0 100 300 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n";
        let b = "cpu  1400 0 600 8300 150 0 100 450 0 0\n";
        let ta = parse_machine_ticks(a).unwrap();
        assert_eq!(
            ta,
            MachineTicks {
                busy: 1600,
                iowait: 100,
                steal: 300,
                total: 10_000
            }
        );
        let u = MachineUsage::between(ta, parse_machine_ticks(b).unwrap()).unwrap();
        // 1,000 ticks passed: 500 busy, 300 idle, 50 iowait, 150 steal.
        assert!((u.busy_percent - 50.0).abs() < 1e-9);
        assert!((u.iowait_percent - 5.0).abs() < 1e-9);
        assert!((u.steal_percent - 15.0).abs() < 1e-9);
        // An old kernel's line without steal reads as none.
        assert_eq!(parse_machine_ticks("cpu 1 2 3 4 5 6 7\n").unwrap().steal, 0);
        // No time passed, a malformed or missing line: no answer.
        assert_eq!(MachineUsage::between(ta, ta), None);
        assert_eq!(parse_machine_ticks("cpu 1 x 3 4 5 6 7\n"), None);
        assert_eq!(parse_machine_ticks("cpu 1 2 3\n"), None);
        assert_eq!(parse_machine_ticks("intr 1\n"), None);
        assert!(
            MachineMeter::start()
                .usage()
                .is_none_or(|u| u.busy_percent <= 100.0)
        );
    }

    #[test]
    fn proc_stat_parsing() {
        let stat = "1234 (chat node) (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 3 0 100 1000 10 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert!(cpu_ticks(None).is_some());
        assert!(rss_kib(None).unwrap() > 0);
        assert_eq!(cpu_percent(100, 300, 2.0), Some(100.0));
        assert_eq!(cpu_percent(100, 300, 0.0), None);
    }

    #[test]
    fn prometheus_parsing() {
        let text = "# HELP chat_messages_committed_total Log entries committed.\n\
            # TYPE chat_messages_committed_total counter\n\
            chat_messages_committed_total 12345\n\
            chat_messages_committed_total_other 7\n\
            chat_errors_total{code=\"INVALID\"} 2\n\
            chat_errors_total{code=\"RATE_LIMITED\"} 3\n\
            chat_commit_batch_messages{quantile=\"0.5\"} 12\n\
            chat_commit_batch_messages{quantile=\"0.99\"} 480.5\n\
            chat_commit_batch_messages_sum 9000\n\
            chat_commit_batch_messages_count 300\n";
        assert_eq!(metric(text, "chat_messages_committed_total"), Some(12345.0));
        assert_eq!(metric(text, "chat_errors_total"), Some(5.0));
        assert_eq!(metric(text, "chat_commit_batch_messages_sum"), Some(9000.0));
        assert_eq!(
            metric(text, "chat_commit_batch_messages_count"),
            Some(300.0)
        );
        assert_eq!(metric(text, "chat_missing"), None);
        let later = "chat_commit_batch_messages_sum 9600\n\
            chat_commit_batch_messages_count 340\n";
        assert_eq!(
            delta_between(text, later, "chat_commit_batch_messages_count"),
            Some(40.0)
        );
        // (9600 - 9000) / (340 - 300): the window's samples only.
        assert_eq!(
            mean_between(text, later, "chat_commit_batch_messages"),
            Some(15.0)
        );
        // A node started in between: everything it has counts.
        assert_eq!(
            mean_between("", later, "chat_commit_batch_messages"),
            Some(9600.0 / 340.0)
        );
        assert_eq!(mean_between(text, text, "chat_commit_batch_messages"), None);
        assert_eq!(mean_between(text, later, "chat_missing"), None);
        assert_eq!(
            summary_quantiles(text, "chat_commit_batch_messages"),
            vec![("0.5".to_string(), 12.0), ("0.99".to_string(), 480.5)]
        );
    }
}
