//! Result rows: what every scenario prints as a table line and writes as
//! JSON, and the combined table of several result files.

use serde::{Deserialize, Serialize};

/// One line of the results table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// Scenario name, e.g. `2. fan-out`.
    pub scenario: String,
    /// The parameters that matter (counts, rates).
    pub params: String,
    /// The headline number(s).
    pub result: String,
    /// `p50 / p99 / p99.9 / max` in ms, or `-`.
    pub latency_ms: String,
    /// CPU of the node over the measured interval (% of one core).
    pub node_cpu: String,
    /// CPU of the load generator (% of one core).
    pub loadgen_cpu: String,
    /// The target from the issue, or `-`.
    pub target: String,
    /// `met`, `MISSED (...)`, `-`, `TODO`.
    pub verdict: String,
    /// The hypervisor's steal time over the row's interval, % of all
    /// cores' time (`None`: not measured, or a file written before it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_steal: Option<f64>,
}

/// A result file: rows for the table plus free-form details.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultFile {
    /// Table rows.
    pub rows: Vec<Row>,
    /// Everything else measured (steps, metrics, errors).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// Formats a percentage of one core, `-` when unknown.
pub fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}%"))
}

/// Formats a rate with thousands separators: `123,456/s`.
pub fn rate(v: f64) -> String {
    format!("{}/s", thousands(v.round() as u64))
}

/// `1234567` → `1,234,567`.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

const HEADERS: [&str; 8] = [
    "scenario",
    "parameters",
    "result",
    "latency p50 / p99 / p99.9 / max (ms)",
    "node CPU",
    "load-gen CPU",
    "target",
    "verdict",
];

/// Steal time worth a note under the table, % of all cores' time.
pub const STEAL_NOTE_PERCENT: f64 = 1.0;

/// The rows as a Markdown table, and under it a note naming the rows
/// (numbered from 1 in table order) measured while the hypervisor took at
/// least [`STEAL_NOTE_PERCENT`] of the machine: those numbers come from a
/// machine that had less CPU to give than it seemed.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(&format!("| {} |\n", HEADERS.join(" | ")));
    out.push_str(&format!("|{}\n", "---|".repeat(HEADERS.len())));
    for r in rows {
        let cells = [
            &r.scenario,
            &r.params,
            &r.result,
            &r.latency_ms,
            &r.node_cpu,
            &r.loadgen_cpu,
            &r.target,
            &r.verdict,
        ];
        let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "/")).collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    let stolen: Vec<String> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let s = r.machine_steal.filter(|&s| s >= STEAL_NOTE_PERCENT)?;
            Some(format!("row {} {s:.1}%", i + 1))
        })
        .collect();
    if !stolen.is_empty() {
        out.push_str(&format!(
            "\nSteal time (CPU the hypervisor gave to other guests, % of all cores' time) \
             of {STEAL_NOTE_PERCENT}% or more: {}.\n",
            stolen.join(", ")
        ));
    }
    out
}

/// `met` or `MISSED (got X, target Y, Z% short)` for a higher-is-better value.
pub fn verdict_at_least(got: f64, target: f64) -> String {
    if got >= target {
        "met".into()
    } else {
        format!(
            "MISSED by {:.0}% ({:.3}x of target)",
            (1.0 - got / target) * 100.0,
            got / target
        )
    }
}

/// The same for a lower-is-better value.
pub fn verdict_at_most(got: f64, target: f64) -> String {
    if got <= target {
        "met".into()
    } else {
        format!("MISSED: {:.1}x the target", got / target)
    }
}

/// The verdict of a peak-throughput row: the throughput target (if any)
/// and the latency target judged separately, so a peak that meets one and
/// misses the other says so.
pub fn peak_verdict(
    deliveries: f64,
    target_deliveries: f64,
    p99_ms: f64,
    target_p99_ms: f64,
) -> String {
    let latency = if p99_ms <= target_p99_ms {
        format!("p99 < {target_p99_ms} ms: met")
    } else {
        format!("p99 MISSED: {:.1}x", p99_ms / target_p99_ms)
    };
    if target_deliveries > 0.0 {
        let throughput = match verdict_at_least(deliveries, target_deliveries).as_str() {
            "met" => "throughput met".to_string(),
            missed => format!("throughput {missed}"),
        };
        format!("{throughput}; {latency}")
    } else {
        latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_verdicts_judge_throughput_and_latency_apart() {
        assert_eq!(
            peak_verdict(726_951.0, 500_000.0, 632.0, 100.0),
            "throughput met; p99 MISSED: 6.3x"
        );
        assert_eq!(
            peak_verdict(250_000.0, 500_000.0, 50.0, 100.0),
            "throughput MISSED by 50% (0.500x of target); p99 < 100 ms: met"
        );
        assert_eq!(peak_verdict(790_060.0, 0.0, 74.5, 20.0), "p99 MISSED: 3.7x");
        assert_eq!(peak_verdict(1.0, 0.0, 10.0, 20.0), "p99 < 20 ms: met");
    }

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(rate(512_345.6), "512,346/s");
        assert_eq!(pct(Some(153.4)), "153%");
        assert_eq!(pct(None), "-");
        assert_eq!(verdict_at_least(600.0, 500.0), "met");
        assert!(verdict_at_least(250.0, 500.0).starts_with("MISSED by 50%"));
        assert_eq!(verdict_at_most(9.0, 10.0), "met");
        assert_eq!(verdict_at_most(15.0, 10.0), "MISSED: 1.5x the target");
    }

    #[test]
    fn table_and_json_round_trip() {
        let r = Row {
            scenario: "1. connections".into(),
            params: "N=10,000".into(),
            result: "a|b".into(),
            ..Row::default()
        };
        let t = table(std::slice::from_ref(&r));
        assert_eq!(t.lines().count(), 3);
        assert!(t.contains("| 1. connections | N=10,000 | a/b |"));
        // Steal under the threshold is not noted; above it, the row is named.
        let calm = Row {
            machine_steal: Some(0.4),
            ..r.clone()
        };
        assert_eq!(table(std::slice::from_ref(&calm)), t);
        let stolen = Row {
            scenario: "4. durable append".into(),
            params: "sync=full".into(),
            machine_steal: Some(12.34),
            ..Row::default()
        };
        let t2 = table(&[calm, stolen.clone()]);
        assert_eq!(t2.lines().count(), 6);
        assert!(t2.ends_with("of 1% or more: row 2 12.3%.\n"), "{t2}");
        let f = ResultFile {
            rows: vec![r.clone()],
            details: serde_json::json!({"x": 1}),
        };
        let back: ResultFile = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back.rows, vec![r]);
        // A file written before steal was measured still reads.
        let old = r#"{"rows":[{"scenario":"s","params":"p","result":"r","latency_ms":"-","node_cpu":"-","loadgen_cpu":"-","target":"-","verdict":"-"}]}"#;
        let old: ResultFile = serde_json::from_str(old).unwrap();
        assert_eq!(old.rows[0].machine_steal, None);
        let f = ResultFile {
            rows: vec![stolen],
            details: serde_json::Value::Null,
        };
        let back: ResultFile = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back.rows[0].machine_steal, Some(12.34));
    }
}
