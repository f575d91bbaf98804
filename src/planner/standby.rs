//! Standby peers: who stands in for a lost neighbour while the operator cannot replan.
//!
//! When an agent P is lost, each of its neighbours has lost one link and has one free slot. Pairing
//! P's neighbours two by two gives each its degree back, and keeps P's neighbourhood connected without
//! P. The pairs follow P's *ring*: its neighbours sorted by node id. Rank 1 pairs positions 0–1, 2–3, …;
//! rank 2 pairs 1–2, 3–4, … (and, on an even ring, the last with 0), for when the first partner is gone
//! too or has no slot. Invariants (tested below):
//! - **symmetric**: if `x` has `y` standing in for `p` at rank `r`, then `y` has `x` for `p` at rank `r`,
//!   and exactly one of them dials: the one with the smaller node id;
//! - **standbys only**: `p` is a neighbour of both, `x` and `y` are distinct and not linked in the plan,
//!   and their pair is usable (the agents have not reported it unreachable);
//! - **short**: at most two per neighbour, so at most `2·k`.
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

/// `x`'s standbys in `g`, rank 1 then rank 2, each rank in its neighbours' node-id order. `id` gives a
/// member's node id; `usable` says whether a pair may be linked.
pub fn standbys<'a>(g: &Graph, x: u32, id: impl Fn(u32) -> &'a str, usable: impl Fn(u32, u32) -> bool) -> Vec<Standby> {
    let mut around: Vec<u32> = g.neighbors(x).to_vec();
    around.sort_unstable_by_key(|&p| id(p));
    let mut out = Vec::new();
    for rank in [1, 2] {
        for &p in &around {
            let mut ring: Vec<u32> = g.neighbors(p).to_vec();
            ring.sort_unstable_by_key(|&q| id(q));
            let Some(at) = ring.iter().position(|&q| q == x) else { continue };
            let Some(y) = partner(at, ring.len(), rank).map(|i| ring[i]) else { continue };
            if g.has_edge(x, y) || !usable(x, y) {
                continue;
            }
            out.push(Standby { peer: y, stands_for: p, rank, dials: id(x) < id(y) });
        }
    }
    out
}

/// The ring position paired with `at` among `len` at `rank`. Rank 2 is rank 1 shifted by one place, so
/// an even ring closes with (last, 0); a ring of two has its one pair at rank 1 only.
fn partner(at: usize, len: usize, rank: u8) -> Option<usize> {
    let shift = usize::from(rank == 2);
    let mate = ((at + len - shift) % len) ^ 1;
    (mate < len && !(rank == 2 && len == 2)).then(|| (mate + shift) % len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{:08x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32)).collect()
    }

    #[test]
    fn partners_pair_the_ring_two_ways() {
        let of = |len, rank| (0..len).map(|at| partner(at, len, rank)).collect::<Vec<_>>();
        assert_eq!(of(4, 1), [Some(1), Some(0), Some(3), Some(2)]);
        assert_eq!(of(4, 2), [Some(3), Some(2), Some(1), Some(0)]);
        assert_eq!(of(5, 1), [Some(1), Some(0), Some(3), Some(2), None]);
        assert_eq!(of(5, 2), [None, Some(2), Some(1), Some(4), Some(3)]);
        assert_eq!(of(2, 2), [None, None]);
        assert_eq!(of(1, 1), [None]);
    }

    #[test]
    fn a_lost_agents_neighbours_pair_up() {
        // A star of 4 leaves around the hub 0 and a ring among the leaves' other ends: lose 0, and its
        // leaves pair at rank 1 as 1–2 and 3–4 (in node-id order), at rank 2 as 2–3 and 4–1.
        let mut g = Graph::new(5, 4);
        for leaf in 1..5 {
            g.add_edge(0, leaf, true);
        }
        let names = ["h", "a", "b", "c", "d"];
        let id = |v: u32| names[v as usize];
        let of = |g: &Graph, x| {
            standbys(g, x, id, |_, _| true).iter().map(|s| (id(s.peer), id(s.stands_for), s.dials)).collect::<Vec<_>>()
        };
        assert_eq!(of(&g, 1), [("b", "h", true), ("d", "h", true)]);
        assert_eq!(of(&g, 2), [("a", "h", false), ("c", "h", true)]);
        assert!(of(&g, 0).is_empty(), "the hub's neighbours have no other neighbour");
        g.add_edge(1, 2, true);
        assert_eq!(of(&g, 1), [("d", "h", true)], "a pair linked in the plan needs no standby");
        let unusable = |u: u32, v: u32| u.min(v) != 3 || u.max(v) != 4;
        let around = |x| standbys(&g, x, id, unusable).iter().map(|s| id(s.peer)).collect::<Vec<_>>();
        assert_eq!(around(3), ["b"], "nor a pair the agents cannot link");
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
