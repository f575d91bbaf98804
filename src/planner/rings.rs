//! The construction behind [`super::plan`]: an H-graph (Law & Siu 2003) made exact and domain-aware.
//!
//! 1. **Orders.** Member `i` gets `h(i) = xxh3(node id, seed)`; ring `c` orders members by `mix(h(i), c)`.
//!    Ring 0, the *backbone*, orders by (domain, key), so each domain is one contiguous arc. Being keyed
//!    hashes, the orders are consistent-hash rings: a join or leave splices one position per ring.
//! 2. **Shape.** N ≤ k+1: the complete graph. N < [`DENSE_LIMIT`]·k: the circulant C_N(1..⌊k/2⌋) on the
//!    backbone order (random rings would collide too often to repair). Otherwise ⌊k/2⌋ Hamiltonian cycles,
//!    ring `c` linking each member to its successor. Odd k adds a matching that keeps the previous plan's
//!    pairs, pairs members still without a cross-domain link across domains (largest domains first), and
//!    the rest along the auxiliary order; with N odd, one member stays at k−1.
//! 3. **Repair.** An edge two rings share (or a matching pair already linked) leaves both ends one short.
//!    A *switch* restores them: remove an edge x–y found near u in the auxiliary order, add u–x and v–y.
//!    Degrees of x and y are unchanged, so every degree ends exactly at its target. A pair the agents
//!    reported unusable is never linked: wherever a ring or the matching would link it, its ends owe a
//!    link each, paid the same way; no switch adds one either.
//! 4. **Domains.** A member whose links all stay inside its domain trades one such link u–v against a
//!    cross-domain edge x–y (x outside u's domain): u–x is cross-domain, and no member loses its last
//!    cross-domain link (v may end without one only if it had none, and then goes next), so one pass fixes
//!    everyone fixable. First, though, the previous plan's switches
//!    are made again where a join or leave did not touch them (even for a member that no longer needs one,
//!    see `keep_switches`), so a join or leave adds or removes only the switches it touches; replanning a
//!    plan makes every switch it has again, and nothing else: it reproduces the plan.
//! 5. **Orientation.** Ring edges are dialed forward, then edges of the previous plan take back their old
//!    dialer, then reversing short directed paths balances every member to ⌊deg/2⌋ or ⌈deg/2⌉ dials.
//!
//! Backbone edges are never switched away: the backbone is a Hamiltonian cycle, so the plan is connected
//! for k ≥ 2, and since each domain is one arc of it, losing a whole domain leaves a path through the rest.
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{Graph, Indexed as Previous, Node};

/// Below `DENSE_LIMIT × k` members the circulant replaces random rings.
pub const DENSE_LIMIT: usize = 4;

const NO_MATE: u32 = u32::MAX;

/// Ring index of the auxiliary order used by the odd-k matching and by repair searches.
const AUX: u64 = 0xA0A0;

/// The graph over `members`, whose keyed hashes (see [`Memo`]) are `hash`, without the pairs in `unusable`
/// (each `(a, b)` with `a < b`, sorted). `hints` are the last plan's orders in these members' indices
/// (see [`Memo`]); the orders this plan sorted are left in their place.
pub fn build<M: Node>(
    members: &[M],
    hash: &[u64],
    k: usize,
    previous: &Previous,
    unusable: Vec<(u32, u32)>,
    hints: &mut Vec<(u64, Vec<u32>)>,
) -> Graph {
    let n = members.len();
    let g = Graph::new(n, k);
    if k == 0 || n < 2 {
        return g;
    }
    let mut ctx = Ctx::new(members, hash, std::mem::take(hints));
    let build = build_with(&mut ctx, g, k, previous, unusable);
    *hints = ctx.sorted;
    build
}

fn build_with<M: Node>(ctx: &mut Ctx<M>, g: Graph, k: usize, previous: &Previous, unusable: Vec<(u32, u32)>) -> Graph {
    let n = ctx.members.len();
    let backbone = ctx.order(0, true);
    let pos0 = positions(&backbone);
    let aux = ctx.order(AUX, false);
    let pos_aux = positions(&aux);
    let mut b = Builder {
        g,
        n,
        k,
        pos0,
        aux,
        pos_aux,
        dom: ctx.dom.clone(),
        domains: ctx.domains,
        deficits: Vec::new(),
        rings: Vec::new(),
        mate: Vec::new(),
        unusable,
    };

    if n <= k + 1 {
        b.complete(&backbone);
    } else if n < DENSE_LIMIT * k {
        b.circulant(&backbone);
        b.repair_deficits();
    } else {
        if k >= 2 {
            b.ring(&backbone);
        }
        for c in 1..k / 2 {
            let order = ctx.order(c as u64, false);
            b.ring(&order);
        }
        b.repair_deficits();
        if k % 2 == 1 {
            b.matching(previous);
            b.repair_deficits();
        }
    }
    // A plan that is exactly the previous one needs no new switch: a member left without a cross-domain
    // link is one no switch could serve when the plan was made, and a replan must reproduce the plan.
    if b.domains > 1 && !b.keep_switches(previous) {
        b.spread_domains(&backbone);
    }
    for &(u, v) in &previous.links {
        if b.g.has_edge(u, v) {
            b.g.set_dialer(u, v);
        }
    }
    b.balance(&backbone);
    b.g
}

/// Per-member hashes and domain ranks: everything the orders are computed from; the last plan's orders
/// as hints, and the orders this plan sorted.
struct Ctx<'a, M> {
    members: &'a [M],
    hash: &'a [u64],
    dom: Vec<u32>,
    domains: u32,
    hints: Vec<(u64, Vec<u32>)>,
    sorted: Vec<(u64, Vec<u32>)>,
}

/// What one plan sorted, kept so that the next plan over mostly the same members sorts little: each
/// member's keyed hash, and each order (ring key → members). Sorting 10,000 keys costs about as much as
/// the rest of a ring; a plan that keeps most members lists them in their old order, already sorted,
/// and a stable sort only merges the new ones in. Orders come out the same with or without the memo: it
/// only hints what is probably sorted. Hashes are copied, so a member kept must have its old node id.
#[derive(Clone, Default)]
pub struct Memo {
    pub(super) seed: String,
    pub(super) hash: Vec<u64>,
    /// Members by hash, then node id (see `super::ranks`), and by each ring's key.
    pub(super) ranked: Vec<u32>,
    pub(super) orders: Vec<(u64, Vec<u32>)>,
}

impl Memo {
    /// This plan's memo, for `members` keyed with `seed`, where `was[j]` is member `j`'s index in the
    /// last plan if it was in it with the same node id: each member's hash (a kept one's copied), and as
    /// hints the last plan's orders, in these members' indices.
    pub fn take<M: Node>(&mut self, members: &[M], seed: &str, was: &[Option<u32>]) -> Memo {
        let Memo { seed: kept_seed, hash: old, ranked, orders } = std::mem::take(self);
        let (old, ranked, orders) = if kept_seed == seed { (old, ranked, orders) } else { Default::default() };
        let mut now = vec![u32::MAX; old.len()];
        for (j, w) in was.iter().enumerate().take(members.len()) {
            if let Some(w) = w.filter(|&w| (w as usize) < old.len()) {
                now[w as usize] = j as u32;
            }
        }
        let key = xxh3_64_with_seed(seed.as_bytes(), 0x6d65_7368);
        let hash = members.iter().enumerate().map(|(j, m)| {
            let kept = was.get(j).copied().flatten().and_then(|w| old.get(w as usize));
            kept.copied().unwrap_or_else(|| xxh3_64_with_seed(m.node_id().as_bytes(), key))
        });
        let map = |order: Vec<u32>| order.into_iter().map(|o| now[o as usize]).filter(|&j| j != u32::MAX).collect();
        let orders = orders.into_iter().map(|(c, order)| (c, map(order))).collect();
        Memo { seed: seed.to_owned(), hash: hash.collect(), ranked: map(ranked), orders }
    }
}

/// The members sorted by `key`, members of equal keys (a 64-bit collision) by node id, so the order never
/// depends on input order. `hint` lists members in an order that is probably sorted (the last plan's):
/// they go first, the rest after, and a stable sort merges the two runs. Sorting the keys alone is what
/// keeps this fast.
pub fn sort_keyed<K: Ord + Copy, M: Node>(members: &[M], key: impl Fn(u32) -> K, hint: &[u32]) -> Vec<(K, u32)> {
    let mut listed = vec![false; members.len()];
    let mut keyed = Vec::with_capacity(members.len());
    for &i in hint {
        if !std::mem::replace(&mut listed[i as usize], true) {
            keyed.push((key(i), i));
        }
    }
    keyed.extend((0..members.len() as u32).filter(|&i| !listed[i as usize]).map(|i| (key(i), i)));
    keyed.sort();
    let id = |i: u32| members[i as usize].node_id();
    for run in keyed.chunk_by_mut(|a, b| a.0 == b.0).filter(|run| run.len() > 1) {
        run.sort_unstable_by(|a, b| id(a.1).cmp(id(b.1)));
    }
    keyed
}

impl<'a, M: Node> Ctx<'a, M> {
    fn new(members: &'a [M], hash: &'a [u64], hints: Vec<(u64, Vec<u32>)>) -> Self {
        let names: std::collections::BTreeSet<Option<&str>> = members.iter().map(|m| m.domain()).collect();
        let names: Vec<Option<&str>> = names.into_iter().collect();
        let dom = members.iter().map(|m| names.binary_search(&m.domain()).unwrap() as u32).collect();
        Self { members, hash, dom, domains: names.len() as u32, hints, sorted: Vec::new() }
    }

    /// Members sorted by ring `c`'s key (within domain arcs when `by_domain`); ties, which need a 64-bit
    /// collision, fall back to the node id so the order never depends on input order.
    fn order(&mut self, c: u64, by_domain: bool) -> Vec<u32> {
        let hint = self.hints.iter().find(|(h, _)| *h == c).map_or(&[][..], |(_, order)| order);
        let key = |i: u32| (if by_domain { self.dom[i as usize] } else { 0 }, mix(self.hash[i as usize], c));
        let order: Vec<u32> = sort_keyed(self.members, key, hint).into_iter().map(|(_, i)| i).collect();
        self.sorted.push((c, order.clone()));
        order
    }
}

fn positions(order: &[u32]) -> Vec<u32> {
    let mut pos = vec![0u32; order.len()];
    for (p, &u) in order.iter().enumerate() {
        pos[u as usize] = p as u32;
    }
    pos
}

/// The root of `v`'s set in a union-find forest, halving the path on the way.
fn root(parent: &mut [u32], mut v: u32) -> u32 {
    while parent[v as usize] != v {
        parent[v as usize] = parent[parent[v as usize] as usize];
        v = parent[v as usize];
    }
    v
}

/// A keyed 64-bit finalizer (SplitMix64) giving each ring an independent order from one stored hash.
fn mix(h: u64, c: u64) -> u64 {
    let mut z = h ^ c.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Builder {
    g: Graph,
    n: usize,
    k: usize,
    pos0: Vec<u32>,
    aux: Vec<u32>,
    pos_aux: Vec<u32>,
    dom: Vec<u32>,
    domains: u32,
    /// Pairs left one link short each by a collapsed duplicate.
    deficits: Vec<(u32, u32)>,
    /// The odd-k matching partner of each member (`NO_MATE` for the spare); empty before the matching.
    mate: Vec<u32>,
    /// Each ring's order and every member's position in it.
    rings: Vec<(Vec<u32>, Vec<u32>)>,
    /// Pairs never linked, `(a, b)` with `a < b`, sorted.
    unusable: Vec<(u32, u32)>,
}

impl Builder {
    fn complete(&mut self, order: &[u32]) {
        let n = order.len();
        // Round-robin tournament: each member dials the next ⌊(n−1)/2⌋; for even n the opposite pair is
        // dialed by its first half.
        for i in 0..n {
            // An unusable pair has no other member to trade with: both ends stay one link short.
            for j in 1..=(n - 1) / 2 {
                self.link(order[i], order[(i + j) % n]);
            }
            if n.is_multiple_of(2) && i < n / 2 {
                self.link(order[i], order[i + n / 2]);
            }
        }
    }

    fn circulant(&mut self, order: &[u32]) {
        let n = order.len();
        for j in 1..=self.k / 2 {
            for i in 0..n {
                self.link_or_owe(order[i], order[(i + j) % n]);
            }
        }
        if self.k % 2 == 1 {
            // Chords across the circle: distance ⌊n/2⌋ exceeds every circulant jump because n > k.
            // For odd n the last member stays unpaired.
            let half = n / 2;
            for i in 0..half {
                self.link_or_owe(order[i], order[i + half]);
            }
        }
    }

    fn ring(&mut self, order: &[u32]) {
        let n = order.len();
        self.rings.push((order.to_vec(), positions(order)));
        for i in 0..n {
            self.link_or_owe(order[i], order[(i + 1) % n]);
        }
    }

    /// One more link for every member but (n odd) one: first the previous plan's pairs that are still
    /// free; then members with no cross-domain link yet, each paired across domains (the domain rule for
    /// odd k hinges on this link: with k = 3 and two domains the backbone leaves every arc-interior member
    /// needing it); then the rest along the auxiliary order, preferring a partner from another domain.
    fn matching(&mut self, previous: &Previous) {
        let n = self.n;
        // A previous link whose ends now sit two apart on a ring, around a member that just joined, was
        // that ring's link: it is not a matching pair to keep.
        let split_by_join = |a: u32, b: u32| {
            self.rings.iter().any(|(order, pos)| {
                let (pa, pb) = (pos[a as usize] as usize, pos[b as usize] as usize);
                let mid = if (pa + 2) % n == pb {
                    order[(pa + 1) % n]
                } else if (pb + 2) % n == pa {
                    order[(pb + 1) % n]
                } else {
                    return false;
                };
                !previous.known[mid as usize]
            })
        };
        // Each pair in auxiliary order (not member order, which must not matter).
        let by_aux =
            |(a, b): (u32, u32)| if self.pos_aux[a as usize] <= self.pos_aux[b as usize] { (a, b) } else { (b, a) };
        let mut kept: Vec<(u32, u32)> =
            previous.links.iter().filter(|&&(a, b)| !split_by_join(a, b)).map(|&e| by_aux(e)).collect();
        kept.sort_unstable_by_key(|&(a, b)| (self.pos_aux[a as usize], self.pos_aux[b as usize]));
        kept.dedup();
        self.mate = vec![NO_MATE; n];
        for (a, b) in kept {
            let free = self.mate[a as usize] == NO_MATE && self.mate[b as usize] == NO_MATE;
            if free && !self.g.has_edge(a, b) && self.usable(a, b) {
                self.pair(a, b);
            }
        }
        let mut open: Vec<u32> = self.aux.iter().copied().filter(|&u| self.mate[u as usize] == NO_MATE).collect();
        // (With k = 1 nobody keeps a cross-domain link without its partner: the rule exempts it.)
        if self.k >= 3 && open.len() % 2 == 1 && self.domains > 1 && !open.iter().any(|&u| self.has_cross_link(u)) {
            // Every open member needs its matching link to cross domains, and one of them would be left
            // without (after a join, say, with every previous pair kept): it takes a partner from a pair
            // whose other member can be the one left at k−1.
            if let Some(i) = (0..open.len()).find(|&i| self.take_partner(open[i]).is_some()) {
                open.remove(i);
            }
        }
        if open.len() % 2 == 1 {
            // The one member left at k−1 links: one that already has a cross-domain link, so the domain
            // rule holds for it without a link to spare; failing that, one from the largest domain, whose
            // members are the likeliest to run out of partners across.
            let spare = open.iter().position(|&u| self.has_cross_link(u)).unwrap_or_else(|| {
                let mut count = std::collections::HashMap::<u32, usize>::new();
                open.iter().for_each(|&u| *count.entry(self.dom[u as usize]).or_default() += 1);
                let largest =
                    (0..self.domains).max_by_key(|d| (count.get(d).copied().unwrap_or(0), std::cmp::Reverse(*d)));
                open.iter()
                    .rposition(|&u| Some(self.dom[u as usize]) == largest)
                    .expect("a member of the largest domain")
            });
            open.remove(spare);
        }
        if self.domains > 1 {
            self.pair_needy_across_domains(&open);
            open.retain(|&u| self.mate[u as usize] == NO_MATE);
        }
        const WINDOW: usize = 8;
        let mut paired = vec![false; open.len()];
        for i in 0..open.len() {
            if paired[i] {
                continue;
            }
            let u = open[i];
            let mut candidates = (i + 1..open.len()).filter(|&j| !paired[j]);
            let first = candidates.clone().next().expect("an even number of open members");
            let j = candidates
                .by_ref()
                .take(WINDOW)
                .find(|&j| {
                    let v = open[j];
                    self.dom[v as usize] != self.dom[u as usize] && !self.g.has_edge(u, v) && self.usable(u, v)
                })
                .unwrap_or(first);
            paired[i] = true;
            paired[j] = true;
            self.pair(u, open[j]);
        }
    }

    /// Pairs the `open` members that have no cross-domain link with partners from other domains: needy
    /// with needy while two domains still have some (always the two with most left, so no domain is
    /// stranded when none holds a majority), then the remaining needy with open members of other domains
    /// that need nothing. A needy member is adjacent to no other domain, so none of these pairs is a
    /// duplicate link.
    fn pair_needy_across_domains(&mut self, open: &[u32]) {
        let mut needy: std::collections::BTreeMap<u32, std::collections::VecDeque<u32>> = Default::default();
        for &u in open.iter().filter(|&&u| !self.has_cross_link(u)) {
            needy.entry(self.dom[u as usize]).or_default().push_back(u);
        }
        let mut heap: std::collections::BinaryHeap<(usize, std::cmp::Reverse<u32>)> =
            needy.iter().map(|(&d, q)| (q.len(), std::cmp::Reverse(d))).collect();
        while heap.len() >= 2 {
            let (_, std::cmp::Reverse(a)) = heap.pop().expect("two domains");
            let (_, std::cmp::Reverse(b)) = heap.pop().expect("two domains");
            let (u, v) = (needy.get_mut(&a).and_then(|q| q.pop_front()), needy.get_mut(&b).and_then(|q| q.pop_front()));
            let (u, v) = (u.expect("non-empty bucket"), v.expect("non-empty bucket"));
            // An unusable pair stays open: the pairing along the auxiliary order finds each a partner.
            if self.usable(u, v) {
                self.pair(u, v);
            }
            for d in [a, b] {
                let left = needy[&d].len();
                if left > 0 {
                    heap.push((left, std::cmp::Reverse(d)));
                }
            }
        }
        let Some((_, std::cmp::Reverse(d))) = heap.pop() else {
            return;
        };
        let helpers = open
            .iter()
            .copied()
            .filter(|&v| self.mate[v as usize] == NO_MATE && self.dom[v as usize] != d)
            .collect::<Vec<_>>();
        let stranded = needy.remove(&d).unwrap_or_default();
        for (u, v) in stranded.into_iter().zip(helpers) {
            if self.usable(u, v) {
                self.pair(u, v);
            }
        }
    }

    /// Pairs `u` with the nearest member x of another domain (in auxiliary order) whose partner y keeps a
    /// cross-domain link without x; y is left unpaired. Returns y.
    fn take_partner(&mut self, u: u32) -> Option<u32> {
        let du = self.dom[u as usize];
        let (x, y) = self.walk_from(u).find_map(|x| {
            let y = self.mate[x as usize];
            let keeps_cross =
                |y: u32| self.g.neighbors(y).iter().any(|&z| z != x && self.dom[z as usize] != self.dom[y as usize]);
            let free = !self.g.has_edge(u, x) && self.usable(u, x);
            (self.dom[x as usize] != du && y != NO_MATE && y != u && free && keeps_cross(y)).then_some((x, y))
        })?;
        self.g.remove_edge(x, y);
        (self.mate[x as usize], self.mate[y as usize]) = (NO_MATE, NO_MATE);
        self.pair(u, x);
        Some(y)
    }

    /// Makes `u` and `v` matching partners, linked and dialed by the one earlier in the auxiliary order.
    /// A pair already linked, or unusable, owes a link each instead: the repair that pays it gives each
    /// its partner (see [`Self::repair_deficits`]).
    fn pair(&mut self, u: u32, v: u32) {
        if self.g.has_edge(u, v) || !self.usable(u, v) {
            self.deficits.push((u, v));
        } else {
            (self.mate[u as usize], self.mate[v as usize]) = (v, u);
            self.g.add_edge(u, v, self.pos_aux[u as usize] < self.pos_aux[v as usize]);
        }
    }

    /// Links `u` and `v` unless the pair is unusable.
    fn link(&mut self, u: u32, v: u32) {
        if self.usable(u, v) {
            self.g.add_edge(u, v, true);
        }
    }

    /// Links `u` and `v`, or, when they are linked already or unusable, leaves both owing a link.
    fn link_or_owe(&mut self, u: u32, v: u32) {
        if self.g.has_edge(u, v) || !self.usable(u, v) {
            self.deficits.push((u, v));
        } else {
            self.g.add_edge(u, v, true);
        }
    }

    fn usable(&self, u: u32, v: u32) -> bool {
        self.unusable.binary_search(&(u.min(v), u.max(v))).is_err()
    }

    /// Whether `w` has a cross-domain link (or needs none) after trading its link to `lost` for one to `gained`.
    fn cross_after(&self, w: u32, lost: u32, gained: u32) -> bool {
        let dw = self.dom[w as usize];
        self.domains < 2
            || self.dom[gained as usize] != dw
            || self.g.neighbors(w).iter().any(|&z| z != lost && self.dom[z as usize] != dw)
    }

    fn has_cross_link(&self, u: u32) -> bool {
        self.domains < 2 || self.g.neighbors(u).iter().any(|&v| self.dom[v as usize] != self.dom[u as usize])
    }

    fn is_backbone(&self, u: u32, v: u32) -> bool {
        if self.k < 2 {
            return false;
        }
        let (a, b) = (self.pos0[u as usize] as usize, self.pos0[v as usize] as usize);
        (a + 1) % self.n == b || (b + 1) % self.n == a
    }

    /// Members in auxiliary order starting just after `u`: the local neighbourhood every search walks, so a
    /// join or leave moves the result of only the searches that pass it.
    fn walk_from(&self, u: u32) -> impl Iterator<Item = u32> + '_ {
        let start = self.pos_aux[u as usize] as usize + 1;
        (0..self.n).map(move |i| self.aux[(start + i) % self.n])
    }

    /// Which links a switch may take away. Backbone links never go (they carry connectivity and zone-loss
    /// tolerance). Once the odd-k matching exists only matching links go, so every member keeps exactly
    /// one matching partner and the next replan can recognise and keep the pairs.
    fn removable(&self, x: u32, y: u32) -> bool {
        if self.mate.is_empty() { !self.is_backbone(x, y) } else { self.mate[x as usize] == y }
    }

    /// Makes again the previous plan's switches that a join or leave did not touch: first each one still
    /// possible on its own (removable links u–v and x–y the plan lacks, u–x and v–y it has and the graph
    /// lacks), then whatever of them those 4-cycles did not account for (see [`Self::keep_balanced`]).
    /// Only with random rings and no matching (odd k keeps its own pairs instead). Returns whether the
    /// graph is now exactly the previous plan.
    fn keep_switches(&mut self, previous: &Previous) -> bool {
        if self.rings.is_empty() || !self.mate.is_empty() || previous.links.is_empty() {
            return false;
        }
        let mut had: Vec<Vec<u32>> = vec![Vec::new(); self.n];
        for &(a, b) in &previous.links {
            had[a as usize].push(b);
            had[b as usize].push(a);
        }
        for h in &mut had {
            h.sort_unstable_by_key(|&v| self.pos0[v as usize]);
            h.dedup();
        }
        self.keep_four_cycles(&had);
        self.keep_balanced(&had);
        let links: usize = had.iter().map(Vec::len).sum::<usize>() / 2;
        links == self.g.edge_count()
            && (0..self.n as u32).all(|a| had[a as usize].iter().all(|&b| self.g.has_edge(a, b)))
    }

    /// The 4-cycle pass of [`Self::keep_switches`]. Its work is bounded (a previous plan unrelated to this
    /// one, from another seed, would make it search every link against every other); what it leaves is
    /// still made again by [`Self::keep_balanced`].
    fn keep_four_cycles(&mut self, had: &[Vec<u32>]) {
        let had_edge = |a: u32, b: u32| had[a as usize].contains(&b);
        let mut budget = 16 * self.n * self.k;
        let order = self.rings[0].0.clone();
        for &u in &order {
            for v in self.g.neighbors(u).to_vec() {
                if had_edge(u, v) || !self.g.has_edge(u, v) || !self.removable(u, v) {
                    continue;
                }
                let found = had[u as usize].iter().copied().find_map(|x| {
                    budget = budget.saturating_sub(self.k);
                    if x == v || self.g.has_edge(u, x) || !self.usable(u, x) {
                        return None;
                    }
                    let y = self.g.neighbors(x).iter().copied().find(|&y| {
                        y != u
                            && y != v
                            && had_edge(v, y)
                            && self.usable(v, y)
                            && !had_edge(x, y)
                            && !self.g.has_edge(v, y)
                            && self.removable(x, y)
                    })?;
                    Some((x, y))
                });
                if let Some(xy) = found {
                    self.switch((u, v), xy, true);
                }
                if budget == 0 {
                    return;
                }
            }
        }
    }

    /// The rest of the previous plan's switches, where 4-cycles did not make them out (two switches can
    /// share members, or take a link a switch made): the links of the graph it lacks (never backbone ones)
    /// and the links it has that the graph lacks form components in which every member lost as many links
    /// as it gained. A component whose members all
    /// still balance is made again whole, with no degree change; one a join or leave touched is left to
    /// [`Self::spread_domains`]. For a replan of the plan itself every component balances, so it is
    /// reproduced whatever the 4-cycles took. Both lists go in backbone order, so the result does not
    /// depend on the members' order.
    fn keep_balanced(&mut self, had: &[Vec<u32>]) {
        let key = |(a, b): (u32, u32)| {
            let (pa, pb) = (self.pos0[a as usize], self.pos0[b as usize]);
            (pa.min(pb), pa.max(pb))
        };
        let had_edge = |(a, b): (u32, u32)| had[a as usize].contains(&b);
        let mut lost: Vec<(u32, u32)> = self.g.edges().filter(|&e| !had_edge(e) && self.removable(e.0, e.1)).collect();
        let mut gained: Vec<(u32, u32)> = (0..self.n as u32)
            .flat_map(|a| had[a as usize].iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a < b && !self.g.has_edge(a, b) && self.usable(a, b))
            .collect();
        lost.sort_unstable_by_key(|&e| key(e));
        gained.sort_unstable_by_key(|&e| key(e));
        let mut parent: Vec<u32> = (0..self.n as u32).collect();
        let mut balance = vec![0i32; self.n];
        for (edges, sign) in [(&lost, 1), (&gained, -1)] {
            for &(a, b) in edges {
                let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
                parent[ra as usize] = rb;
                balance[a as usize] += sign;
                balance[b as usize] += sign;
            }
        }
        let mut whole = vec![true; self.n];
        for v in 0..self.n as u32 {
            if balance[v as usize] != 0 {
                whole[root(&mut parent, v) as usize] = false;
            }
        }
        let mut kept = |e: &(u32, u32)| whole[root(&mut parent, e.0) as usize];
        for e in lost.iter().filter(|e| kept(e)) {
            self.g.remove_edge(e.0, e.1);
        }
        for e in gained.iter().filter(|e| kept(e)) {
            self.g.add_edge(e.0, e.1, true);
        }
    }

    /// Replaces links u–v (when `drop_uv`) and x–y with u–x and v–y: no degree changes.
    fn switch(&mut self, (u, v): (u32, u32), (x, y): (u32, u32), drop_uv: bool) {
        if drop_uv {
            self.g.remove_edge(u, v);
        }
        self.g.remove_edge(x, y);
        self.g.add_edge(u, x, true);
        self.g.add_edge(y, v, true);
        if !self.mate.is_empty() {
            (self.mate[u as usize], self.mate[x as usize]) = (x, u);
            (self.mate[v as usize], self.mate[y as usize]) = (y, v);
        }
    }

    fn repair_deficits(&mut self) {
        for (u, v) in std::mem::take(&mut self.deficits) {
            let found = self.walk_from(u).find_map(|x| {
                if x == u || x == v || self.g.has_edge(u, x) || !self.usable(u, x) {
                    return None;
                }
                self.g
                    .neighbors(x)
                    .iter()
                    .copied()
                    .find(|&y| y != u && y != v && !self.g.has_edge(v, y) && self.usable(v, y) && self.removable(x, y))
                    .map(|y| (x, y))
            });
            if let Some(xy) = found {
                self.switch((u, v), xy, false);
            }
        }
    }

    /// Gives every member whose links all stay in its domain one cross-domain link, by a switch
    /// u–v, x–y → u–x, v–y with x–y found near u in the auxiliary order. It reads nothing of the previous
    /// plan (whose switches [`Self::keep_switches`] already made again), and does not run when the graph is
    /// that plan already: replanning a plan must reproduce it exactly, or every poll would rewire the mesh.
    fn spread_domains(&mut self, backbone: &[u32]) {
        for &first in backbone {
            // A switch may leave v without a cross-domain link only when v had none (see `cross_switch`):
            // u gains one and nobody loses one, so each step fixes a member and the chain ends. v goes
            // next, at once, because the backbone walk may already have passed it.
            let mut next = Some(first);
            while let Some(u) = next.take() {
                let Some((v, xy)) = self.cross_switch(u) else {
                    break;
                };
                self.switch((u, v), xy, true);
                next = (!self.has_cross_link(v)).then_some(v);
            }
        }
    }

    /// For a member `u` with no cross-domain link: its removable link u–v and a link x–y to trade it for.
    fn cross_switch(&self, u: u32) -> Option<(u32, (u32, u32))> {
        let du = self.dom[u as usize];
        if self.g.degree(u) == 0 || self.has_cross_link(u) {
            return None;
        }
        let v = self.g.neighbors(u).iter().copied().find(|&v| self.removable(u, v))?;
        // Only the odd-k matching pairs two members that both need a cross-domain link; elsewhere such a
        // trade would ripple through the rings' neighbours at every join.
        let v_needy = !self.mate.is_empty() && !self.has_cross_link(v);
        let found = self.walk_from(u).find_map(|x| {
            if self.dom[x as usize] == du || self.g.has_edge(u, x) || !self.usable(u, x) {
                return None;
            }
            let y = self.g.neighbors(x).iter().copied().find(|&y| {
                y != v
                    && !self.g.has_edge(v, y)
                    && self.usable(v, y)
                    && self.removable(x, y)
                    && (v_needy || self.cross_after(v, u, y))
                    && self.cross_after(y, x, v)
            })?;
            Some((x, y))
        });
        found.map(|xy| (v, xy))
    }

    /// Reverses directed paths from over-dialing to under-dialing members until each dials ⌊d/2⌋ or ⌈d/2⌉.
    /// A path reversal changes the dial count of its two ends only.
    fn balance(&mut self, backbone: &[u32]) {
        let mut seen = vec![u32::MAX; self.n];
        let mut parent = vec![0u32; self.n];
        let mut epoch = 0u32;
        for s in backbone.iter().copied() {
            while self.g.out_degree(s) > self.g.degree(s).div_ceil(2) {
                epoch += 1;
                let Some(t) = self.search(s, true, epoch, &mut seen, &mut parent) else {
                    break;
                };
                self.reverse_path(s, t, true, &parent);
            }
            while self.g.out_degree(s) < self.g.degree(s) / 2 {
                epoch += 1;
                let Some(t) = self.search(s, false, epoch, &mut seen, &mut parent) else {
                    break;
                };
                self.reverse_path(s, t, false, &parent);
            }
        }
    }

    /// Breadth-first from `s` along dialed edges (`forward`) to a member that can dial one more, or along
    /// accepted edges to one that can dial one fewer.
    fn search(&self, s: u32, forward: bool, epoch: u32, seen: &mut [u32], parent: &mut [u32]) -> Option<u32> {
        let mut queue = std::collections::VecDeque::from([s]);
        seen[s as usize] = epoch;
        while let Some(u) = queue.pop_front() {
            for &v in self.g.neighbors(u) {
                let along = self.g.dialer_is(u, v) == Some(forward);
                if !along || seen[v as usize] == epoch {
                    continue;
                }
                seen[v as usize] = epoch;
                parent[v as usize] = u;
                let (out, deg) = (self.g.out_degree(v), self.g.degree(v));
                if (forward && out < deg.div_ceil(2)) || (!forward && out > deg / 2) {
                    return Some(v);
                }
                queue.push_back(v);
            }
        }
        None
    }

    fn reverse_path(&mut self, s: u32, t: u32, forward: bool, parent: &[u32]) {
        let mut v = t;
        while v != s {
            let u = parent[v as usize];
            // Forward paths run s → … → t along dials; flip each so the later member dials.
            if forward {
                self.g.set_dialer(v, u);
            } else {
                self.g.set_dialer(u, v);
            }
            v = u;
        }
    }
}
