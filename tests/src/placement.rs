//! A copy of the server's placement rule (rendezvous hashing,
//! `actors/src/placement.rs`), so a test can pick groups that *will* move
//! when a given node joins or leaves, before that node exists.
//!
//! Tests never trust it alone: every prediction they rely on is checked
//! against the server's own answer (`GET /admin/owner`) once the nodes are
//! up, and a mismatch fails with a message pointing here. Keep it in step
//! with the server.

/// The weight of `node` for `key` (FNV-1a over `key ++ 0xff ++ node`, then
/// the splitmix64 finisher).
pub fn weight(key: &str, node: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in key.bytes().chain([0xff]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `key` among `nodes` (`None` when there are none); ties go
/// to the smaller name.
pub fn owner<'a>(key: &str, nodes: &[&'a str]) -> Option<&'a str> {
    nodes
        .iter()
        .copied()
        .max_by(|a, b| weight(key, a).cmp(&weight(key, b)).then_with(|| b.cmp(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_deterministic_and_spread() {
        let nodes = ["node1", "node2", "node3"];
        let mut counts = [0usize; 3];
        for g in 0..300 {
            let o = owner(&format!("g_{g}"), &nodes).expect("an owner");
            assert_eq!(Some(o), owner(&format!("g_{g}"), &nodes));
            counts[nodes.iter().position(|n| *n == o).expect("member")] += 1;
        }
        assert!(counts.iter().all(|c| *c > 50), "{counts:?}");
        assert_eq!(owner("x", &[]), None);
    }
}
