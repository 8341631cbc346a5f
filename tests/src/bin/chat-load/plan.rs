//! Scenario bookkeeping: user names, group sizes, user→group assignment,
//! request chunking, send order. Pure functions, deterministic for a seed.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The user id of load user `i` with `prefix` (ids are `[A-Za-z0-9._@-]`).
pub fn user_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

/// The node (index into the node list) that connection `index` goes to:
/// round-robin, so consecutive users — the members of one planned group,
/// the senders of a fan-out — land on different nodes of a cluster.
pub fn node_of(index: usize, nodes: usize) -> usize {
    index % nodes.max(1)
}

/// One group of the "many groups" scenario: a contiguous range of users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// First user index.
    pub first: usize,
    /// Members (users `first..first + size`).
    pub size: usize,
}

impl GroupPlan {
    /// The member user indexes.
    pub fn members(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.size
    }
}

/// A group size in `min..=max` with mean about `min + (max - min) / 3`:
/// `min + floor((max - min + 1) * u^2)` for `u` uniform in [0, 1) — many
/// small groups, a tail of large ones (5..=50 gives a mean of ~20).
pub fn draw_size(rng: &mut impl Rng, min: usize, max: usize) -> usize {
    let u: f64 = rng.random();
    let span = (max - min + 1) as f64;
    (min + (span * u * u) as usize).min(max)
}

/// Splits `users` users into groups of `min..=max` members (every user in
/// exactly one group, in order). The last group takes the remainder; a
/// remainder smaller than `min` is spread over the previous groups (up to
/// `max` each) or, if that cannot hold it, forms a group of its own.
pub fn plan_groups(users: usize, min: usize, max: usize, seed: u64) -> Vec<GroupPlan> {
    assert!(min >= 2 && min <= max, "need 2 <= min <= max");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sizes = Vec::new();
    let mut left = users;
    while left > 0 {
        let s = draw_size(&mut rng, min, max);
        if left < min {
            // Spread the short remainder over earlier groups.
            for size in sizes.iter_mut().rev() {
                while left > 0 && *size < max {
                    *size += 1;
                    left -= 1;
                }
                if left == 0 {
                    break;
                }
            }
            if left > 0 {
                sizes.push(left);
                left = 0;
            }
        } else {
            let s = s.min(left);
            // Do not leave a remainder below `min` if avoidable.
            let s = if left - s > 0 && left - s < min && left <= max {
                left
            } else {
                s
            };
            sizes.push(s);
            left -= s;
        }
    }
    let mut first = 0;
    sizes
        .into_iter()
        .map(|size| {
            let g = GroupPlan { first, size };
            first += size;
            g
        })
        .collect()
}

/// For every user index, the index of its group in `groups`.
pub fn group_of_user(groups: &[GroupPlan], users: usize) -> Vec<usize> {
    let mut of = vec![usize::MAX; users];
    for (gi, g) in groups.iter().enumerate() {
        for u in g.members() {
            of[u] = gi;
        }
    }
    of
}

/// Splits `items` into request-sized chunks of at most `chunk`.
pub fn chunks<T: Clone>(items: &[T], chunk: usize) -> Vec<Vec<T>> {
    items.chunks(chunk.max(1)).map(|c| c.to_vec()).collect()
}

/// The members of a big group as requests: the first chunk (at most
/// `per_request` users besides the creator) goes into `createGroup`, the
/// rest into `addMembers` requests of at most `per_request` users.
pub fn big_group_requests(
    members: &[String],
    per_request: usize,
) -> (Vec<String>, Vec<Vec<String>>) {
    let first = members.len().min(per_request);
    (
        members[..first].to_vec(),
        chunks(&members[first..], per_request),
    )
}

/// A deterministic shuffled order of `0..n` (so consecutive sends of a
/// driver go to different groups).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut StdRng::seed_from_u64(seed));
    v
}

/// Deals `items` round-robin into `parts` lists.
pub fn deal<T>(items: impl IntoIterator<Item = T>, parts: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..parts.max(1)).map(|_| Vec::new()).collect();
    let n = out.len();
    for (i, it) in items.into_iter().enumerate() {
        out[i % n].push(it);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stay_in_range_with_mean_about_20() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 100_000;
        let mut sum = 0;
        for _ in 0..n {
            let s = draw_size(&mut rng, 5, 50);
            assert!((5..=50).contains(&s));
            sum += s;
        }
        let mean = sum as f64 / n as f64;
        assert!((mean - 20.0).abs() < 0.5, "mean {mean}");
    }

    #[test]
    fn every_user_in_exactly_one_group() {
        for users in [1usize, 4, 5, 6, 49, 50, 51, 97, 1_000, 18_000, 20_000] {
            let groups = plan_groups(users, 5, 50, 42);
            let total: usize = groups.iter().map(|g| g.size).sum();
            assert_eq!(total, users, "users {users}");
            let of = group_of_user(&groups, users);
            assert!(of.iter().all(|&g| g != usize::MAX));
            // Contiguous and in order.
            let mut next = 0;
            for g in &groups {
                assert_eq!(g.first, next);
                next += g.size;
                assert!(g.size <= 50, "size {} of {users}", g.size);
                if users >= 5 {
                    assert!(g.size >= 5, "size {} of {users}", g.size);
                }
            }
        }
    }

    #[test]
    fn many_groups_mean_and_count() {
        let groups = plan_groups(20_000, 5, 50, 1);
        let mean = 20_000.0 / groups.len() as f64;
        assert!((18.0..=22.0).contains(&mean), "mean {mean}");
        // Deterministic for a seed.
        assert_eq!(groups, plan_groups(20_000, 5, 50, 1));
        assert_ne!(groups, plan_groups(20_000, 5, 50, 2));
    }

    #[test]
    fn big_group_in_request_sized_chunks() {
        let members: Vec<String> = (1..10_000).map(|i| user_id("f", i)).collect();
        let (create, adds) = big_group_requests(&members, 1_000);
        assert_eq!(create.len(), 1_000);
        assert_eq!(adds.len(), 9);
        assert!(adds.iter().all(|c| c.len() <= 1_000));
        let all: Vec<String> = create
            .into_iter()
            .chain(adds.into_iter().flatten())
            .collect();
        assert_eq!(all, members);
        let (create, adds) = big_group_requests(&members[..10], 1_000);
        assert_eq!(create.len(), 10);
        assert!(adds.is_empty());
    }

    /// How many of `indexes` go to each of `nodes` nodes.
    fn per_node(indexes: impl IntoIterator<Item = usize>, nodes: usize) -> Vec<usize> {
        let mut n = vec![0; nodes.max(1)];
        for i in indexes {
            n[node_of(i, nodes)] += 1;
        }
        n
    }

    #[test]
    fn connections_spread_round_robin_over_nodes() {
        assert_eq!(node_of(7, 1), 0);
        assert_eq!(node_of(7, 0), 0);
        assert_eq!(node_of(7, 3), 1);
        // Balanced: 100,000 connections over 5 nodes, 20,000 each; also
        // when split over child processes by contiguous ranges.
        assert_eq!(per_node(0..100_000, 5), vec![20_000; 5]);
        let procs = 7;
        let mut total = vec![0; 5];
        for p in 0..procs {
            let (s, e) = (100_000 * p / procs, 100_000 * (p + 1) / procs);
            for (t, c) in total.iter_mut().zip(per_node(s..e, 5)) {
                *t += c;
            }
        }
        assert_eq!(total, vec![20_000; 5]);
        assert_eq!(per_node(0..10, 3), vec![4, 3, 3]);
        // Fan-out: the first `senders` connections send; 4 senders over 3
        // nodes use every node.
        assert_eq!(per_node(0..4, 3), vec![2, 1, 1]);
        // Many groups: every group of at least 3 members has members on
        // all 3 nodes, and a smaller one on as many nodes as members.
        for g in plan_groups(18_000, 5, 50, 1) {
            let nodes = per_node(g.members(), 3);
            assert!(nodes.iter().all(|&n| n > 0), "group {g:?}: {nodes:?}");
            let (lo, hi) = (nodes.iter().min().unwrap(), nodes.iter().max().unwrap());
            assert!(hi - lo <= 1, "group {g:?}: {nodes:?}");
        }
        let small = GroupPlan { first: 4, size: 2 };
        assert_eq!(per_node(small.members(), 3), vec![0, 1, 1]);
    }

    #[test]
    fn shuffle_and_deal() {
        let s = shuffled(1_000, 3);
        let mut sorted = s.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1_000).collect::<Vec<_>>());
        assert_ne!(s, sorted);
        let d = deal(0..10, 3);
        assert_eq!(d, vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        assert_eq!(deal(0..2, 0), vec![vec![0, 1]]);
        assert_eq!(user_id("u", 7), "u7");
    }
}
