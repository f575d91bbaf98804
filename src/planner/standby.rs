//! Standby peers: who stands in for a lost neighbour while the operator cannot replan.
//!
//! When an agent P is lost, each of its neighbours has lost one link and has one free slot. Linking P's
//! neighbours two by two gives each its degree back, and keeps P's neighbourhood connected without P.
//! The candidates follow P's *ring*, its neighbours sorted by node id: each neighbour's standbys for P are
//! the two next to it on the ring. A join or leave that changes P's ring changes only the standbys next
//! to the change: the ring is not re-paired, so the writes a plan change costs stay local. Each pair gets
//! rank 1 or 2 from a hash of the pair and P; agents try rank 1 first, so most pairs form before the
//! rest compete for their slots. On a ring of four, as at k = 4, any order of dials that links as many
//! pairs as the slots allow pairs everyone. Invariants (tested below):
//! - **symmetric**: if `x` has `y` standing in for `p` at rank `r`, then `y` has `x` for `p` at rank `r`,
//!   and exactly one of them dials: the one with the smaller node id;
//! - **standbys only**: `p` is a neighbour of both, `x` and `y` are distinct and not linked in the plan,
//!   and their pair is usable (the agents have not reported it unreachable);
//! - **short**: at most two per neighbour, so at most `2·k`;
//! - **local**: adding a member to P's ring changes the standbys for P of its two ring neighbours only.
//!
//! An agent's standbys depend on its neighbours' neighbours, so a link that changes changes the standbys of
//! the agents within two hops of its ends. Pure: no Kubernetes, no I/O.
use super::Graph;

/// One standby of an agent: `peer` stands in for its neighbour `stands_for`; `dials` says which end dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standby {
    pub peer: u32,
    pub stands_for: u32,
    pub rank: u8,
    pub dials: bool,
}

/// `x`'s standbys in `g`, rank 1 then rank 2, each rank in its neighbours' node-id order and, around one
/// neighbour, the next on its ring before the previous. `id` gives a member's node id; `usable` says
/// whether a pair may be linked.
pub fn standbys<'a>(g: &Graph, x: u32, id: impl Fn(u32) -> &'a str, usable: impl Fn(u32, u32) -> bool) -> Vec<Standby> {
    let mut around: Vec<u32> = g.neighbors(x).to_vec();
    around.sort_unstable_by_key(|&p| id(p));
    let mut out = Vec::new();
    for &p in &around {
        let mut ring: Vec<u32> = g.neighbors(p).to_vec();
        ring.sort_unstable_by_key(|&q| id(q));
        let (Some(at), len) = (ring.iter().position(|&q| q == x), ring.len()) else { continue };
        let (next, previous) = (ring[(at + 1) % len], ring[(at + len - 1) % len]);
        let sides = if next == previous { vec![next] } else { vec![next, previous] };
        for y in sides.into_iter().filter(|&y| y != x && !g.has_edge(x, y) && usable(x, y)) {
            out.push(Standby { peer: y, stands_for: p, rank: rank(id(x), id(y), id(p)), dials: id(x) < id(y) });
        }
    }
    out.sort_by_key(|s| s.rank);
    out
}

/// A pair's rank around `p`, the same from either end: 1 or 2, from a hash of the three node ids.
fn rank(x: &str, y: &str, p: &str) -> u8 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [a, b, p] {
        h.update(part.as_bytes());
        h.update(&[0xff]);
    }
    1 + (h.digest() & 1) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{:08x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32)).collect()
    }

    #[test]
    fn a_lost_agents_neighbours_stand_in_for_it_along_its_ring() {
        // A hub 0 with leaves a, b, c, d: lose the hub, and each leaf's standbys are the leaves next to it
        // on the hub's ring a–b–c–d–a.
        let mut g = Graph::new(5, 4);
        for leaf in 1..5 {
            g.add_edge(0, leaf, true);
        }
        let names = ["h", "a", "b", "c", "d"];
        let id = |v: u32| names[v as usize];
        let of = |g: &Graph, x| {
            let mut peers: Vec<_> = standbys(g, x, id, |_, _| true).iter().map(|s| (id(s.peer), s.dials)).collect();
            peers.sort();
            peers
        };
        assert_eq!(of(&g, 1), [("b", true), ("d", true)]);
        assert_eq!(of(&g, 2), [("a", false), ("c", true)]);
        assert!(of(&g, 0).is_empty(), "the hub's neighbours have no other neighbour");
        g.add_edge(1, 2, true);
        assert_eq!(of(&g, 1), [("d", true)], "a pair linked in the plan needs no standby");
        let unusable = |u: u32, v: u32| u.min(v) != 3 || u.max(v) != 4;
        let around = |x| standbys(&g, x, id, unusable).iter().map(|s| id(s.peer)).collect::<Vec<_>>();
        assert_eq!(around(3), ["b"], "nor a pair the agents cannot link");
    }

    #[test]
    fn a_join_changes_the_standbys_next_to_it_only() {
        // Leaves 1..=8 around hub 0; leaf 9 joins the hub's ring: only the leaves beside it change.
        let names: Vec<String> = ids(10);
        let id = |v: u32| names[v as usize].as_str();
        let mut g = Graph::new(10, 9);
        for leaf in 1..9 {
            g.add_edge(0, leaf, true);
        }
        let before: Vec<_> = (1..9).map(|x| standbys(&g, x, id, |_, _| true)).collect();
        g.add_edge(0, 9, true);
        let changed = (1..9).filter(|&x| standbys(&g, x, id, |_, _| true) != before[x as usize - 1]).count();
        assert_eq!(changed, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn standbys_are_symmetric_short_and_never_planned(n in 2usize..40, k in 1usize..9, seed in any::<u64>()) {
            let names = ids(n);
            let id = |v: u32| names[v as usize].as_str();
            let mut g = Graph::new(n, k);
            let mut s = seed;
            for _ in 0..n * k {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let (u, v) = (((s >> 33) % n as u64) as u32, ((s >> 13) % n as u64) as u32);
                if u != v && !g.has_edge(u, v) && g.degree(u) < k && g.degree(v) < k {
                    g.add_edge(u, v, true);
                }
            }
            for x in 0..n as u32 {
                let mine = standbys(&g, x, id, |_, _| true);
                prop_assert!(mine.len() <= 2 * g.degree(x));
                prop_assert!(mine.windows(2).all(|w| w[0].rank <= w[1].rank), "best first");
                for s in &mine {
                    prop_assert!(s.peer != x && !g.has_edge(x, s.peer));
                    prop_assert!(g.has_edge(x, s.stands_for) && g.has_edge(s.peer, s.stands_for));
                    prop_assert_eq!(s.dials, id(x) < id(s.peer));
                    let theirs = standbys(&g, s.peer, id, |_, _| true);
                    let back = theirs.iter().find(|t| t.peer == x && t.stands_for == s.stands_for);
                    prop_assert!(back.is_some_and(|t| t.dials != s.dials && t.rank == s.rank), "{} has {:?} but not back", x, s);
                }
            }
        }
    }
}
