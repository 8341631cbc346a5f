//! Placement: which live node owns an entity (a group, a user's presence).
//!
//! Rendezvous (highest random weight) hashing: the owner of `key` is the node
//! `n` maximising `hash(key, n)`. Every node computes it alone from the live
//! node set; when a node joins or leaves, only the keys it wins or held move.
//! Pure and deterministic across processes (FNV-1a with a splitmix64
//! finisher, not std's randomly keyed hasher).

/// The weight of `node` for `key`.
pub fn weight(key: &str, node: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in key.bytes().chain([0xff]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // splitmix64 finisher: spreads FNV's weak low bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `key` among `nodes` (`None` when there are none). Ties,
/// practically impossible, go to the smaller name.
pub fn owner<'a>(key: &str, nodes: &'a [String]) -> Option<&'a str> {
    nodes
        .iter()
        .max_by(|a, b| weight(key, a).cmp(&weight(key, b)).then_with(|| b.cmp(a)))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node{i}")).collect()
    }

    #[test]
    fn owners_are_spread_and_stable() {
        let three = nodes(3);
        let mut counts = [0usize; 3];
        for g in 0..3000 {
            let o = owner(&format!("g_{g}"), &three).expect("an owner");
            counts[three.iter().position(|n| n == o).expect("a member")] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
        assert_eq!(owner("g_1", &three), owner("g_1", &three));
        assert_eq!(owner("x", &[]), None);
    }

    #[test]
    fn a_joining_node_takes_only_what_it_wins() {
        let three = nodes(3);
        let four = nodes(4);
        let mut moved = 0;
        for g in 0..4000 {
            let key = format!("g_{g}");
            let before = owner(&key, &three).expect("owner");
            let after = owner(&key, &four).expect("owner");
            if before != after {
                assert_eq!(after, "node4", "keys move only to the new node");
                moved += 1;
            }
        }
        assert!(
            (700..1300).contains(&moved),
            "about a quarter moves: {moved}"
        );
    }

    #[test]
    fn order_of_the_node_list_does_not_matter() {
        let a = nodes(5);
        let mut b = a.clone();
        b.reverse();
        for g in 0..200 {
            let key = format!("k{g}");
            assert_eq!(owner(&key, &a), owner(&key, &b));
        }
    }
}
