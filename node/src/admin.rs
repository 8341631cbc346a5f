//! `chat-node admin`: the operator's commands, spoken to a node's admin
//! endpoints over HTTP with an operator token minted from the config.
//!
//! - `status`: every node's state and how many group actors it runs.
//! - `drain NODE`: NODE hands its groups over, sends its clients away with
//!   `goaway` + close 1001, and exits; the command waits until it is gone.
//! - `post-system GROUP TEXT`: posts an announcement into a group through
//!   whichever node is asked (the internal-service API, from the outside).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::http::Status;

/// The admin subcommands.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Show the live nodes and the groups each one runs.
    Status,
    /// Drain NODE: hand its groups over, send its clients elsewhere, stop it.
    Drain {
        /// The node's name.
        node: String,
        /// How long to wait for it to leave, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Post a system announcement into a group.
    PostSystem {
        /// The group id.
        group: String,
        /// The text.
        text: String,
    },
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn url(addr: &str, path: &str) -> String {
    if addr.starts_with("http://") {
        format!("{addr}{path}")
    } else {
        format!("http://{addr}{path}")
    }
}

fn status_of(agent: &ureq::Agent, addr: &str, token: &str) -> anyhow::Result<Status> {
    let mut resp = agent
        .get(url(addr, "/admin/status"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .with_context(|| format!("asking {addr}"))?;
    let code = resp.status();
    let body = resp.body_mut().read_to_string()?;
    if !code.is_success() {
        bail!("{addr} answered {code}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// Runs one admin command against the node at `addr`.
pub fn run(addr: &str, token: &str, command: AdminCommand) -> anyhow::Result<()> {
    let agent = agent();
    match command {
        AdminCommand::Status => {
            let here = status_of(&agent, addr, token)?;
            println!(
                "{:<16} {:<22} {:<22} {:>5} {:>9} {:>8} {:>9}",
                "NODE", "HTTP", "CLUSTER", "LIVE", "DRAINING", "GROUPS", "SESSIONS"
            );
            for n in &here.nodes {
                let detail = if n.http_addr.is_empty() {
                    None
                } else {
                    status_of(&agent, &n.http_addr, token).ok()
                };
                let (groups, sessions) = detail
                    .map(|d| (d.groups.to_string(), d.sessions.to_string()))
                    .unwrap_or_else(|| ("?".into(), "?".into()));
                println!(
                    "{:<16} {:<22} {:<22} {:>5} {:>9} {:>8} {:>9}",
                    n.name, n.http_addr, n.cluster_addr, n.live, n.draining, groups, sessions
                );
            }
            Ok(())
        }
        AdminCommand::Drain { node, wait } => {
            let here = status_of(&agent, addr, token)?;
            let Some(target) = here.nodes.iter().find(|n| n.name == node) else {
                bail!("{addr} does not know a node named {node}");
            };
            let target_addr = if target.http_addr.is_empty() {
                addr.to_string()
            } else {
                target.http_addr.clone()
            };
            let resp = agent
                .post(url(&target_addr, "/admin/drain"))
                .header("Authorization", format!("Bearer {token}"))
                .send_empty()
                .with_context(|| format!("asking {node} at {target_addr} to drain"))?;
            if !resp.status().is_success() {
                bail!("{node} refused to drain: {}", resp.status());
            }
            println!("{node}: draining");
            let deadline = Instant::now() + Duration::from_secs(wait);
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
                if status_of(&agent, &target_addr, token).is_err() {
                    println!("{node}: drained and stopped");
                    return Ok(());
                }
            }
            bail!("{node} still running after {wait} s")
        }
        AdminCommand::PostSystem { group, text } => {
            let mut resp = agent
                .post(url(addr, &format!("/admin/system?group={group}")))
                .header("Authorization", format!("Bearer {token}"))
                .send(text.as_bytes())
                .with_context(|| format!("posting through {addr}"))?;
            let code = resp.status();
            let body = resp.body_mut().read_to_string()?;
            if !code.is_success() {
                bail!("{code}: {body}");
            }
            println!("{body}");
            Ok(())
        }
    }
}
