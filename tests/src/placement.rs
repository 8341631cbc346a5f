//! The server's placement rule (rendezvous hashing, `actors::placement`),
//! so a test can pick groups that *will* move when a given node joins or
//! leaves, before that node exists.
//!
//! Tests never trust it alone: every prediction they rely on is checked
//! against the server's own answer (`GET /admin/owner`) once the nodes are
//! up.

/// The owner of `key` among `nodes` (`None` when there are none).
pub fn owner<'a>(key: &str, nodes: &[&'a str]) -> Option<&'a str> {
    let owned: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    let winner = actors::placement::owner(key, &owned)?;
    nodes.iter().copied().find(|n| *n == winner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_one_of_the_nodes() {
        let nodes = ["node1", "node2", "node3"];
        for g in 0..100 {
            let o = owner(&format!("g_{g}"), &nodes).expect("an owner");
            assert!(nodes.contains(&o));
        }
        assert_eq!(owner("x", &[]), None);
    }
}
