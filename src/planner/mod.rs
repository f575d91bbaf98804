//! The pure mesh planner (docs/design.md §4) and the seed's scheme it replaces. No I/O, no Kubernetes types.
//!
//! * [`plan`]: H-graph rings on a keyed hash (see [`rings`]), the graph every agent gets its peers from.
//! * [`baseline`]: the seed agents' own choice, "dial the first k alive peers in list order", kept so every
//!   comparison can be printed side by side.
//! * [`analysis`]: degree, components, diameter, failure and churn measurements over either.
use std::collections::{BTreeMap, BTreeSet};

use foldhash::HashMapExt;

pub mod analysis;
pub mod baseline;
mod graph;
mod rings;
pub mod standby;

pub use graph::Graph;
pub use rings::Memo;

/// The largest cap the planner takes: beyond it an agent's sync fan-out stops being "a few supplementary
/// links", and its annotations would outgrow what a Pod should carry.
pub const MAX_CAP: u32 = 64;

/// One agent as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub node_id: String,
    /// Its failure domain (the `topologyKey` label's value); `None` when unknown or not spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// Node id → the node ids it dials, sorted. The published form of a plan, and what a replanning takes as
/// the previous plan so that surviving edges keep their dialer.
pub type Dials = BTreeMap<String, Vec<String>>;

/// Pairs of node ids the plan must not link (the agents found they cannot open the link), each with the
/// smaller id first (see [`unusable_pair`]).
pub type Unusable = BTreeSet<(String, String)>;

/// The pair of `a` and `b` as [`Unusable`] holds it: the smaller id first.
pub fn unusable_pair(a: &str, b: &str) -> (String, String) {
    if a < b { (a.to_owned(), b.to_owned()) } else { (b.to_owned(), a.to_owned()) }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("cap {0} is out of range 0..={MAX_CAP}")]
    CapOutOfRange(u32),
    #[error("node id {0:?} appears more than once")]
    DuplicateNodeId(String),
    #[error("node id at position {0} is empty")]
    EmptyNodeId(usize),
}

/// What a replanning keeps of the previous plan: who dialed whom, and whom it knew. A [`Dials`] is one;
/// the controller reads it straight from what the Pods carry, without building one.
pub trait Previous {
    /// Every (dialer, peer) link of the previous plan.
    fn links(&self) -> impl Iterator<Item = (&str, &str)>;
    /// Whether the previous plan had `node_id` as a member.
    fn knew(&self, node_id: &str) -> bool;
}

impl Previous for Dials {
    fn links(&self) -> impl Iterator<Item = (&str, &str)> {
        self.iter().flat_map(|(a, peers)| peers.iter().map(move |b| (a.as_str(), b.as_str())))
    }

    fn knew(&self, node_id: &str) -> bool {
        self.contains_key(node_id)
    }
}

/// A planned mesh: the members in input order and the oriented graph over their indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    members: Vec<Member>,
    graph: Graph,
}

impl Plan {
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Total links (dialed plus accepted) of member `i`.
    pub fn links(&self, i: usize) -> usize {
        self.graph.degree(i as u32)
    }

    /// Node ids member `i` dials, sorted.
    pub fn dial_ids(&self, i: usize) -> Vec<&str> {
        let mut ids: Vec<&str> =
            self.graph.dialed(i as u32).map(|v| self.members[v as usize].node_id.as_str()).collect();
        ids.sort_unstable();
        ids
    }

    pub fn dials(&self) -> Dials {
        (0..self.members.len())
            .map(|i| (self.members[i].node_id.clone(), self.dial_ids(i).into_iter().map(str::to_owned).collect()))
            .collect()
    }

    /// Dial lists by member index, the common form [`analysis`] measures.
    pub fn dial_lists(&self) -> Vec<Vec<u32>> {
        (0..self.members.len() as u32).map(|u| self.graph.dialed(u).collect()).collect()
    }
}

/// What the planner reads of a member: its node id and failure domain. [`Member`] is one; the controller's
/// agents are another, so a pass over 10,000 of them copies no string.
pub trait Node {
    fn node_id(&self) -> &str;
    /// Its failure domain (the `topologyKey` label's value); `None` when unknown or not spread.
    fn domain(&self) -> Option<&str>;
}

impl<N: Node + ?Sized> Node for &N {
    fn node_id(&self) -> &str {
        (**self).node_id()
    }

    fn domain(&self) -> Option<&str> {
        (**self).domain()
    }
}

impl Node for Member {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }
}

/// A previous plan in member indices: its links (dialer, peer), sorted by their ends' ranks once
/// [`graph`] has them, and which members it had.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Indexed {
    pub links: Vec<(u32, u32)>,
    pub known: Vec<bool>,
}

/// Plans the mesh for `members` with at most `cap` links each, keyed by `seed` (the policy's UID, so two
/// policies get unrelated graphs and every replica the same one). Edges present in `previous` keep their
/// dialer, and the odd-k matching keeps its pairs, so a replan after a join or leave changes O(k) links.
///
/// Invariants (each a property test): every degree ≤ cap; N ≤ cap+1 gives the complete graph; otherwise
/// every degree is cap, except one agent at cap−1 when N·cap is odd; cap ≥ 2 is connected; each agent dials
/// ⌊deg/2⌋ or ⌈deg/2⌉; with ≥ 2 domains no agent's links all stay in its domain (cap ≥ 3); losing one whole
/// domain disconnects no survivor (cap ≥ 2); the output depends only on the inputs, not their order.
pub fn plan<P: Previous + ?Sized>(members: &[Member], cap: u32, seed: &str, previous: &P) -> Result<Plan, PlanError> {
    plan_around(members, cap, seed, previous, &Unusable::new())
}

/// [`plan`] without the `unusable` pairs. Each is traded like a link two rings share: its ends get a
/// link each to the ends of a link nearby, so they keep their degree where such a trade exists. The
/// invariants hold but for the ends of an unusable pair left one short, and connectivity with cap 2 (one
/// ring, nothing to trade with) or with unusable links that cut every ring.
pub fn plan_around<P: Previous + ?Sized>(
    members: &[Member],
    cap: u32,
    seed: &str,
    previous: &P,
    unusable: &Unusable,
) -> Result<Plan, PlanError> {
    let mut seen = foldhash::HashMap::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        seen.insert(m.node_id.as_str(), i as u32);
    }
    let links = previous.links().filter_map(|(a, b)| Some((*seen.get(a)?, *seen.get(b)?))).collect();
    let known = members.iter().map(|m| previous.knew(&m.node_id)).collect();
    let pairs = unusable.iter().filter_map(|(a, b)| Some((*seen.get(a.as_str())?, *seen.get(b.as_str())?)));
    let graph = graph(members, cap, seed, Indexed { links, known }, pairs.collect())?;
    Ok(Plan { members: members.to_vec(), graph })
}

/// [`plan_around`]'s graph over member indices, for a caller that has the previous plan and the unusable
/// pairs in those indices. Links naming no member are ignored, and members `known` does not cover are new.
pub fn graph<M: Node>(
    members: &[M],
    cap: u32,
    seed: &str,
    previous: Indexed,
    unusable: Vec<(u32, u32)>,
) -> Result<Graph, PlanError> {
    graph_kept(members, cap, seed, previous, unusable, (&mut Memo::default(), &[]))
}

/// [`graph`] with the last plan's [`Memo`], brought up to date: `was[j]` is member `j`'s index in the
/// last plan if it was in it with the same node id.
pub fn graph_kept<M: Node>(
    members: &[M],
    cap: u32,
    seed: &str,
    mut previous: Indexed,
    mut unusable: Vec<(u32, u32)>,
    (memo, was): (&mut Memo, &[Option<u32>]),
) -> Result<Graph, PlanError> {
    if cap > MAX_CAP {
        return Err(PlanError::CapOutOfRange(cap));
    }
    let Memo { seed, hash, ranked, mut orders } = memo.take(members, seed, was);
    let (rank, ranked) = ranks(members, &hash, &ranked).ok_or_else(|| first_bad_id(members))?;
    let n = members.len() as u32;
    previous.links.retain(|&(a, b)| a != b && a < n && b < n);
    previous.known.resize(members.len(), false);
    // A link both ends claim to dial keeps the dialer of the later claim: "later" must not depend on the
    // order `previous` lists its links in (a hash map's, say), or on the order of `members`. Links sort by
    // their ends' ranks.
    sort_by_ranks(&mut previous.links, &rank);
    for pair in &mut unusable {
        *pair = (pair.0.min(pair.1), pair.0.max(pair.1));
    }
    unusable.retain(|&(a, b)| a != b && b < n);
    unusable.sort_unstable();
    unusable.dedup();
    let g = rings::build(members, &hash, cap as usize, &previous, unusable, &mut orders);
    *memo = Memo { seed, hash, ranked, orders };
    Ok(g)
}

/// Each member's position in the order of its keyed hash (`hash`), then node id, and the members in that
/// order (`hint`: probably it, see [`rings::sort_keyed`]); `None` when a node id is empty or appears
/// twice.
fn ranks<M: Node>(members: &[M], hash: &[u64], hint: &[u32]) -> Option<(Vec<u32>, Vec<u32>)> {
    if members.iter().any(|m| m.node_id().is_empty()) {
        return None;
    }
    let keyed = rings::sort_keyed(members, |i| hash[i as usize], hint);
    let id = |i: u32| members[i as usize].node_id();
    if keyed.windows(2).any(|w| w[0].0 == w[1].0 && id(w[0].1) == id(w[1].1)) {
        return None;
    }
    let mut rank = vec![0; members.len()];
    for (r, &(_, i)) in keyed.iter().enumerate() {
        rank[i as usize] = r as u32;
    }
    Some((rank, keyed.into_iter().map(|(_, i)| i).collect()))
}

/// `links` sorted by their ends' ranks (`rank` is a permutation of `0..rank.len()`, and every end is
/// below that): counted into place by the first end's, then each member's few links sorted by the
/// other's. A comparison sort that looks both ranks up at each step took a third of a replan at 10,000
/// members.
fn sort_by_ranks(links: &mut Vec<(u32, u32)>, rank: &[u32]) {
    let mut end = vec![0usize; rank.len() + 1];
    for &(a, _) in links.iter() {
        end[rank[a as usize] as usize + 1] += 1;
    }
    for r in 1..end.len() {
        end[r] += end[r - 1];
    }
    let mut sorted = vec![(0, 0); links.len()];
    for &(a, b) in links.iter() {
        let at = &mut end[rank[a as usize] as usize];
        sorted[*at] = (a, b);
        *at += 1;
    }
    // Each slot now holds where its run ends, which is where the next one starts.
    let mut start = 0;
    for &stop in &end[..rank.len()] {
        sorted[start..stop].sort_unstable_by_key(|&(_, b)| rank[b as usize]);
        start = stop;
    }
    *links = sorted;
}

/// The first member, in input order, whose node id is empty or was seen before (given there is one).
fn first_bad_id<M: Node>(members: &[M]) -> PlanError {
    let mut seen = std::collections::HashSet::new();
    for (i, m) in members.iter().enumerate() {
        if m.node_id().is_empty() {
            return PlanError::EmptyNodeId(i);
        }
        if !seen.insert(m.node_id()) {
            return PlanError::DuplicateNodeId(m.node_id().to_owned());
        }
    }
    unreachable!("ranks refuses only an empty or repeated node id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn links_sort_by_ranks_as_a_comparison_sort_would(
            order in Just((0..40u32).collect::<Vec<_>>()).prop_shuffle(),
            links in prop::collection::vec((0..40u32, 0..40u32), 0..200),
        ) {
            let mut counted = links.clone();
            sort_by_ranks(&mut counted, &order);
            let mut compared = links;
            compared.sort_by_key(|&(a, b)| (order[a as usize], order[b as usize]));
            prop_assert_eq!(counted, compared);
        }
    }
}
