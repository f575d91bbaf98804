//! Plan: the assignment each Pod of a policy should carry. With presence, the planner's graph over the
//! eligible agents (each link on the dialer's `peers` and the other end's `accepts`); without any presence
//! (a replica that leads for the first time during a rendezvous outage), the assignments the Pods already
//! carry, minus the Pods that are gone (docs/design.md §3.4 rule 2).
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::mem::take;
use std::sync::Arc;

use super::membership::{self, Agent, Membership};
use super::pods::PodState;
use crate::assignment::{self, Assignment, Name, Peer};
use crate::planner::{self, PlanError};

/// Pod → its target (an assignment, or `None` to remove ours), for the Pods that do not carry it yet.
pub type Targets = BTreeMap<Name, Option<Arc<Assignment>>>;

/// A plan in the form the controller publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOutcome {
    /// The targets of the Pods that do not carry theirs (taken by the decision: empty after).
    pub targets: Targets,
    /// Agents that already carry their target.
    pub settled: u32,
    pub links: u32,
    pub max_degree: u32,
    pub min_degree: u32,
    pub components: u32,
    /// A digest of every Pod's target, for `status.planHash`.
    pub hash: String,
}

/// One agent's target, borrowed from the plan: its peers (node id, URL) and accepts, sorted, under the
/// policy's cap; its standbys (node id, URL, the peer each stands for), best first, and standby accepts,
/// sorted.
struct Target<'a> {
    peers: Vec<(&'a Name, &'a Name)>,
    accepts: Vec<&'a Name>,
    cap: u32,
    standbys: Vec<(&'a Name, &'a Name, &'a Name, u8)>,
    standby_accepts: Vec<&'a Name>,
}

impl Target<'_> {
    /// Whether a Pod carrying `a` needs no write: the same links under the same cap and policy, and
    /// standbys, unless the target has some and `a` none. Standbys alone change two hops out around every
    /// join or leave (at 10,000 agents, about three times the writes of the links themselves), so they are
    /// refreshed with the Pod's links; a stale one fails to link and the agent tries its next.
    fn is(&self, a: &Assignment, policy: &str) -> bool {
        let no_standbys = |a: &Assignment| a.standbys.is_empty() && a.standby_accepts.is_empty();
        let standbys_new = no_standbys(a) && !(self.standbys.is_empty() && self.standby_accepts.is_empty());
        a.policy == policy
            && a.max_peers == Some(self.cap as usize)
            && a.peers.iter().map(|p| (&p.node_id, &p.url)).eq(self.peers.iter().copied())
            && a.accepts.iter().eq(self.accepts.iter().copied())
            && !standbys_new
    }

    fn to_assignment(&self, policy: &str) -> Assignment {
        let peers = self.peers.iter().map(|&(id, url)| Peer { node_id: id.clone(), url: url.clone() });
        let standbys = self.standbys.iter().map(|&(id, url, p, rank)| assignment::Standby {
            node_id: id.clone(),
            url: url.clone(),
            stands_for: p.clone(),
            rank,
        });
        Assignment::new(peers.collect(), self.accepts.iter().map(|&id| id.clone()), policy.to_owned())
            .with_max_peers(self.cap as usize)
            .with_standbys(standbys.collect(), self.standby_accepts.iter().map(|&id| id.clone()))
    }
}

impl planner::Node for Arc<Agent> {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }
}

/// The plan step's memory between reconciles, kept in the policy's view: the last plan's agents (sorted
/// by Pod), each with its links in the plan and what its Pod carried. An agent whose `Arc` (its verdict),
/// planned neighbours and Pod keys are the very ones of the last plan keeps its target, its digest and
/// whether it carries it, so a join or leave costs the planner's graph and the targets it changed, not a
/// string comparison per agent. Holding the `Arc`s keeps their addresses from being reused while they
/// are compared; a pass moves each that stays into the new memory rather than counting it again (the
/// counts sit on 20,000 cache lines at 10,000 agents). A plan made from an empty memory is the oracle
/// (`--check-incremental`).
#[derive(Default)]
pub struct Kept {
    /// The (cap, seed, policy) the targets were made for.
    made_for: Option<(u32, String, String)>,
    agents: Vec<KeptAgent>,
    /// Each agent's verdict and Pod keys, beside `agents`.
    held: Vec<Held>,
    /// Each kept agent's carried peers, and whom it dials and who dials it, as indices into `agents` (see
    /// [`Span`]): one allocation for the fleet.
    indices: Vec<u32>,
    /// How many targets the last plan built (see [`Kept::built`]).
    built: usize,
    /// The last plan's graph, over `agents`' indices.
    graph: Option<planner::Graph>,
    /// The pairs it avoided.
    unusable: planner::Unusable,
    /// Each agent's node id → its index in `agents`: kept, so that a pass hashes only the node ids of the
    /// agents that changed (building it afresh cost 1–1.5 ms at 10,000 agents).
    by_id: foldhash::HashMap<Name, u32>,
    /// What the planner sorted for it.
    memo: planner::Memo,
}

impl Kept {
    /// How many targets the last plan built: those that changed, and those Pods do not carry yet. A join
    /// into a settled fleet builds the joiner's and its new neighbours'.
    pub fn built(&self) -> usize {
        self.built
    }
}

/// One agent's verdict, and what its Pod carried as the policy's (`Observed::carried`) and exactly
/// (`Keys::exact`).
struct Held {
    agent: Arc<Agent>,
    carried: Option<Arc<Assignment>>,
    exact: Option<Arc<Assignment>>,
}

struct KeptAgent {
    /// The node ids it carries that were no agent's.
    strangers: Vec<String>,
    span: Span,
    /// Whether its Pod carries its target, and that target's share of the digest. The target itself is
    /// not kept: only the few Pods not yet carrying theirs need it again.
    settled: bool,
    hash: u64,
}

/// Where an agent's indices sit in [`Kept::indices`]: `carried` of them from `at`; `dials` then
/// `accepts` from `links_at`, each run sorted; and, once its Pod is settled, the agents its standbys and
/// standby accepts name, `named` of them from `named_at`.
#[derive(Clone, Copy, Default)]
struct Span {
    at: usize,
    carried: u32,
    links_at: usize,
    dials: u32,
    accepts: u32,
    named_at: usize,
    named: u32,
}

impl Span {
    fn carried(self, indices: &[u32]) -> &[u32] {
        &indices[self.at..self.at + self.carried as usize]
    }

    fn links(self, indices: &[u32]) -> &[u32] {
        &indices[self.links_at..self.links_at + (self.dials + self.accepts) as usize]
    }

    fn named(self, indices: &[u32]) -> &[u32] {
        &indices[self.named_at..self.named_at + self.named as usize]
    }
}

/// Plans `m`'s agents but those `held` with at most `cap` links each, seeded by `seed`, without the
/// `unusable` pairs. `carried` holds what each Pod carries as this policy's (Pods carrying it that are no
/// longer agents get `None`), `pods` what each carries exactly: only the targets that differ from it are
/// built. `kept` is the last plan's memory (see [`Kept`]); it is brought up to date.
pub fn targets(
    m: &Membership,
    held: &BTreeSet<Name>,
    (cap, seed, policy): (u32, &str, &str),
    (carried, pods): (&BTreeMap<Name, Arc<Assignment>>, &BTreeMap<Name, PodState>),
    unusable: &planner::Unusable,
    kept: &mut Kept,
) -> Result<PlanOutcome, PlanError> {
    let made_for = Some((cap, seed.to_owned(), policy.to_owned()));
    let mut old = if kept.made_for == made_for { std::mem::take(kept) } else { Kept::default() };
    let old_graph = old.graph.take();
    // Sorted by Pod name, as the map is.
    let (names, agents): (Vec<&Name>, Vec<&Arc<Agent>>) =
        m.agents.iter().filter(|(pod, _)| !held.contains(*pod)).unzip();
    let (by_id, mut memo, held) = (take(&mut old.by_id), take(&mut old.memo), take(&mut old.held));
    let mut pass = Pass::new(&old, &held, &agents, by_id);
    let (now, gone) = pod_keys(&names, carried, pods);
    let (mut fresh, previous) = pass.previous(now, held);
    // The planner's inputs are the agents (their node ids and domains) and what their Pods carry: when
    // every one is the very one planned last time, so is the graph.
    let unchanged = old.agents.len() == agents.len()
        && pass.old_of.iter().all(Option::is_some)
        && pass.same.iter().all(|s| s.carried)
        && old.unusable == *unusable;
    let g = match old_graph.filter(|_| unchanged) {
        Some(g) => g,
        None => planner::graph_kept(&agents, cap, seed, previous, pass.indexed(unusable), (&mut memo, &pass.old_of))?,
    };
    let mut out = PlanOutcome {
        targets: Targets::new(),
        settled: 0,
        links: g.edge_count() as u32,
        max_degree: (0..g.len() as u32).map(|u| g.degree(u)).max().unwrap_or(0) as u32,
        min_degree: (0..g.len() as u32).map(|u| g.degree(u)).min().unwrap_or(0) as u32,
        components: g.components() as u32,
        hash: String::new(),
    };
    let mut digest = 0u64;
    let kept_links: Vec<bool> = (0..agents.len()).map(|j| pass.links(&mut fresh, j, &g)).collect();
    let avoid: HashSet<(u32, u32)> = pass.indexed(unusable).into_iter().map(|(a, b)| (a.min(b), a.max(b))).collect();
    let same_unusable = old.unusable == *unusable;
    for (j, agent) in agents.iter().enumerate() {
        // Standbys come from the neighbours' neighbours, and avoid unusable pairs: a target is kept only if
        // those are too.
        let near = same_unusable && kept_links[j] && g.neighbors(j as u32).iter().all(|&p| kept_links[p as usize]);
        let (target, hash) = pass.target(&mut fresh, j, (&g, &avoid), near, (cap, policy));
        match target {
            None => out.settled += 1,
            Some(t) => drop(out.targets.insert(agent.pod.clone(), Some(t))),
        }
        digest = digest.wrapping_add(hash);
    }
    for pod in gone {
        digest = digest.wrapping_add(pod_hash(pod, None, policy));
        out.targets.insert(pod.clone(), None);
    }
    out.hash = format!("{digest:016x}");
    *kept = Kept { made_for, graph: Some(g), unusable: unusable.clone(), by_id: pass.by_id, memo, ..fresh };
    Ok(out)
}

/// One plan's pass against the kept one: the agents matched by identity, and node ids looked up.
struct Pass<'a> {
    old: &'a Kept,
    agents: &'a [&'a Arc<Agent>],
    /// New agent → kept index, and kept → new, for the agents matched.
    old_of: Vec<Option<u32>>,
    new_of: Vec<Option<u32>>,
    /// Node id → new agent index.
    by_id: foldhash::HashMap<Name, u32>,
    /// The node ids of the kept agents not matched, by kept index.
    departed: Vec<(u32, Name)>,
    /// Whether each new agent's Pod keys are its kept ones (filled by [`Pass::previous`]).
    same: Vec<Same>,
}

/// Whether an agent's Pod carries what it carried at the last plan: as the policy's, and exactly.
#[derive(Clone, Copy)]
struct Same {
    carried: bool,
    exact: bool,
}

impl<'a> Pass<'a> {
    /// Matches kept and new agents by identity (same Pod, same verdict `Arc`). Both lists are sorted by
    /// Pod, so this is one merge. `by_id` is the kept agents' table, brought up to date.
    fn new(
        old: &'a Kept,
        held: &[Held],
        agents: &'a [&'a Arc<Agent>],
        mut by_id: foldhash::HashMap<Name, u32>,
    ) -> Self {
        let (mut old_of, mut new_of) = (vec![None; agents.len()], vec![None; held.len()]);
        let (mut i, mut j) = (0, 0);
        while i < held.len() && j < agents.len() {
            if Arc::ptr_eq(&held[i].agent, agents[j]) {
                (old_of[j], new_of[i]) = (Some(i as u32), Some(j as u32));
                (i, j) = (i + 1, j + 1);
            } else if held[i].agent.pod < agents[j].pod {
                i += 1;
            } else {
                j += 1;
            }
        }
        // A matched agent keeps its node id: only the others are hashed. (Node ids are unique among the
        // agents; the planner refuses a plan where they are not.)
        by_id.retain(|_, v| new_of[*v as usize].map(|n| *v = n).is_some());
        for (j, a) in agents.iter().enumerate().filter(|&(j, _)| old_of[j].is_none()) {
            by_id.insert(a.node_id.clone(), j as u32);
        }
        let departed = held.iter().enumerate().filter(|&(i, _)| new_of[i].is_none());
        let departed = departed.map(|(i, h)| (i as u32, h.agent.node_id.clone())).collect();
        Self { old, agents, old_of, new_of, by_id, departed, same: Vec::new() }
    }

    fn id_of(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// Whether every standby and standby accept agent `j`'s Pod carries in `a` is another agent of this
    /// plan, each standby at the URL it names; if so, their indices are appended to `named`. One naming
    /// an agent that left or moved is rewritten; one that merely differs from the plan's pairing rides
    /// along (rewriting those too nearly tripled the Pod writes of a join: the rings around every changed
    /// link shift, and a standby can drift any distance from its peer).
    fn standbys_are_agents(&self, a: &Assignment, j: usize, named: &mut Vec<u32>) -> bool {
        let agent = |id: &str| self.id_of(id).filter(|&v| v as usize != j);
        let standbys = a.standbys.iter().map(|s| agent(&s.node_id).filter(|&v| self.agents[v as usize].url == s.url));
        let at = named.len();
        for v in standbys.chain(a.standby_accepts.iter().map(|id| agent(id))) {
            let Some(v) = v else {
                named.truncate(at);
                return false;
            };
            named.push(v);
        }
        true
    }

    /// [`Pass::standbys_are_agents`] for agent `j`'s Pod carrying `a`, its kept entry `settled_was` if that
    /// was settled on `a`: then `a` named only agents, and only one no longer matched (gone, held, or
    /// judged anew, as a moved agent is) can fail it, found from the kept indices without reading a name.
    /// Reading every settled Pod's standby names after a leave cost 5 ms at 10,000 agents.
    fn standbys_hold(&self, a: &Assignment, j: usize, settled_was: Option<&KeptAgent>, named: &mut Vec<u32>) -> bool {
        let at = named.len();
        if let Some(w) = settled_was {
            named.extend(w.span.named(&self.old.indices).iter().map_while(|&p| self.new_of[p as usize]));
            if named.len() - at == w.span.named as usize {
                return true;
            }
            named.truncate(at);
        }
        self.standbys_are_agents(a, j, named)
    }

    /// `unusable` in agent indices: pairs naming no agent are dropped.
    fn indexed(&self, unusable: &planner::Unusable) -> Vec<(u32, u32)> {
        unusable.iter().filter_map(|(a, b)| Some((self.id_of(a)?, self.id_of(b)?))).collect()
    }

    fn was(&self, j: usize) -> Option<&'a KeptAgent> {
        Some(&self.old.agents[self.old_of[j]? as usize])
    }

    /// The new memory with each agent's verdict and Pod keys (`held`: the kept ones, moved over where
    /// they stay) and its carried peers, and the previous plan they make for the planner: an agent
    /// carrying what was kept maps its kept indices; any other looks its peers up by node id.
    fn previous(&mut self, now: Vec<Now>, held: Vec<Held>) -> (Kept, planner::Indexed) {
        let n = self.agents.len();
        let mut fresh = Kept { agents: Vec::with_capacity(n), held: Vec::with_capacity(n), ..Kept::default() };
        let mut previous = planner::Indexed { links: Vec::new(), known: Vec::with_capacity(n) };
        let mut kept = held.into_iter().enumerate().peekable();
        for (j, now) in now.into_iter().enumerate() {
            // Matched agents come in the kept order: the unmatched kept ones in between are dropped.
            let was = self.old_of[j].and_then(|i| {
                while kept.next_if(|&(k, _)| k < i as usize).is_some() {}
                kept.next().map(|(_, h)| h)
            });
            let (h, same) = Held::keep(was, self.agents[j], now);
            self.same.push(same);
            let at = fresh.indices.len();
            let strangers = match self.was(j).filter(|_| same.carried) {
                Some(w) => {
                    let moved = |&p: &u32| self.new_of[p as usize].ok_or_else(|| self.departed_id(p));
                    let strangers = w.strangers.iter().map(|id| Err(id.as_str()));
                    self.resolve(
                        w.span.carried(&self.old.indices).iter().map(moved).chain(strangers),
                        &mut fresh.indices,
                    )
                }
                None => {
                    let ids = h.carried.iter().flat_map(|c| c.peers.iter().map(|p| Err(p.node_id.as_str())));
                    self.resolve(ids, &mut fresh.indices)
                }
            };
            previous.links.extend(fresh.indices[at..].iter().map(|&p| (j as u32, p)));
            previous.known.push(h.carried.is_some());
            let span = Span { at, carried: (fresh.indices.len() - at) as u32, ..Span::default() };
            fresh.agents.push(KeptAgent { strangers, span, settled: false, hash: 0 });
            fresh.held.push(h);
        }
        (fresh, previous)
    }

    /// The node id of kept agent `p`, which was not matched.
    fn departed_id(&self, p: u32) -> &str {
        let at = self.departed.binary_search_by_key(&p, |&(i, _)| i).expect("an unmatched kept agent");
        &self.departed[at].1
    }

    /// Appends carried peers to `indices` as agent indices, each given as one (`Ok`) or as a node id to
    /// look up (`Err`), sorted; returns the node ids that are no agent's, kept for a later plan.
    fn resolve<'s>(&self, carried: impl Iterator<Item = Result<u32, &'s str>>, indices: &mut Vec<u32>) -> Vec<String> {
        let (at, mut strangers) = (indices.len(), Vec::new());
        for p in carried {
            match p.or_else(|id| self.id_of(id).ok_or(id)) {
                Ok(p) => indices.push(p),
                Err(id) => strangers.push(id.to_owned()),
            }
        }
        indices[at..].sort_unstable();
        strangers
    }

    /// Records agent `j`'s links in `g` in `fresh`; returns whether they are the kept ones (the same
    /// agents, dialed the same way).
    fn links(&self, fresh: &mut Kept, j: usize, g: &planner::Graph) -> bool {
        let from = fresh.indices.len();
        fresh.indices.extend(g.dialed(j as u32));
        let dials = fresh.indices.len() - from;
        fresh.indices[from..].sort_unstable();
        fresh.indices.extend(g.accepted(j as u32));
        fresh.indices[from + dials..].sort_unstable();
        let links = &fresh.indices[from..];
        let kept = self.was(j).is_some_and(|w| {
            let (old, span) = (w.span.links(&self.old.indices), w.span);
            span.dials as usize == dials
                && old.len() == links.len()
                && old.iter().zip(links).all(|(&p, &q)| self.new_of[p as usize] == Some(q))
        });
        let span = &mut fresh.agents[j].span;
        *span = Span { links_at: from, dials: dials as u32, accepts: (links.len() - dials) as u32, ..*span };
        kept
    }

    /// Agent `j`'s target in `g` (`None` when its Pod carries it) and its share of the digest, kept when
    /// its Pod keys are the kept ones and `near` (its links and its neighbours' are); recorded in `fresh`.
    fn target(
        &self,
        fresh: &mut Kept,
        j: usize,
        (g, avoid): (&planner::Graph, &HashSet<(u32, u32)>),
        near: bool,
        (cap, policy): (u32, &str),
    ) -> (Option<Arc<Assignment>>, u64) {
        let Kept { agents, held, indices, built, .. } = fresh;
        let span = agents[j].span;
        let matched = self.was(j).filter(|_| self.same[j].exact);
        let settled_was = matched.filter(|w| w.settled);
        let was = matched.filter(|_| near);
        let exact = held[j].exact.as_deref();
        let named_at = indices.len();
        let holds = |indices: &mut Vec<u32>| exact.is_some_and(|e| self.standbys_hold(e, j, settled_was, indices));
        let (target, hash) = match was {
            // Still settled unless an agent its standbys name has gone or moved since.
            Some(w) if settled_was.is_some() && holds(indices) => (None, w.hash),
            _ => {
                let t = target(self.agents, (g, avoid), j as u32, (span.links(indices), span.dials as usize), cap);
                *built += 1;
                let hash = was.map_or_else(|| pod_hash(&self.agents[j].pod, Some(&t), policy), |w| w.hash);
                // Judged anew even when the target is the kept one: an agent its standbys name may have
                // come back.
                let settled = exact.is_some_and(|e| t.is(e, policy)) && holds(indices);
                ((!settled).then(|| Arc::new(t.to_assignment(policy))), hash)
            }
        };
        let named = (indices.len() - named_at) as u32;
        let kept = &mut agents[j];
        (kept.settled, kept.hash, kept.span) = (target.is_none(), hash, Span { named_at, named, ..span });
        (target, hash)
    }
}

/// The first difference between two plans, for `--check-incremental`.
pub fn difference(kept: &PlanOutcome, fresh: &PlanOutcome) -> Option<String> {
    let (a, b) = (&kept.targets, &fresh.targets);
    if let Some(pod) = a.keys().chain(b.keys()).find(|p| a.get(*p) != b.get(*p)) {
        return Some(format!("Pod {pod}: kept {:?}, from scratch {:?}", a.get(pod), b.get(pod)));
    }
    let summary = |p: &PlanOutcome| (p.settled, p.links, p.max_degree, p.min_degree, p.components, p.hash.clone());
    let (a, b) = (summary(kept), summary(fresh));
    (a != b).then(|| format!("(settled, links, degrees, components, digest): kept {a:?}, from scratch {b:?}"))
}

impl Held {
    /// Agent `agent`'s entry, from its kept one (`was`, if matched) and what its Pod carries `now`; and
    /// whether the Pod keys are the kept ones. A key in the same allocation as the kept one, the common
    /// case, is moved over and answers without being read; the cache parses a Pod's keys again on every
    /// event, so equal keys also come in a new allocation.
    fn keep(was: Option<Held>, agent: &Arc<Agent>, now: Now) -> (Held, Same) {
        let Some(was) = was else {
            let h = Held { agent: Arc::clone(agent), carried: now.carried.cloned(), exact: now.exact.cloned() };
            return (h, Same { carried: false, exact: false });
        };
        let key = |kept: Option<Arc<Assignment>>, now: Option<&Arc<Assignment>>| match (kept, now) {
            (Some(k), Some(n)) if Arc::ptr_eq(&k, n) => (Some(k), true),
            (Some(k), Some(n)) => (Some(Arc::clone(n)), *k == **n),
            (k, n) => (n.cloned(), k.is_none() && n.is_none()),
        };
        let ((carried, c), (exact, e)) = (key(was.carried, now.carried), key(was.exact, now.exact));
        (Held { agent: was.agent, carried, exact }, Same { carried: c, exact: e })
    }
}

/// What one agent's Pod carries: as the policy's, and exactly.
struct Now<'a> {
    carried: Option<&'a Arc<Assignment>>,
    exact: Option<&'a Arc<Assignment>>,
}

/// Each agent's [`Now`] (given by the agents' Pod names, in order), read along the sorted maps rather than
/// looked up in them; and the Pods carrying the policy's assignment that are not agents in the plan. The
/// names are the Pod cache's, so each step compares two pointers and reads neither name nor agent.
fn pod_keys<'a>(
    agents: &[&Name],
    carried: &'a BTreeMap<Name, Arc<Assignment>>,
    pods: &'a BTreeMap<Name, PodState>,
) -> (Vec<Now<'a>>, Vec<&'a Name>) {
    let (mut carried, mut pods, mut gone) = (carried.iter().peekable(), pods.iter().peekable(), Vec::new());
    let now = agents
        .iter()
        .map(|&pod| {
            while let Some((p, _)) = carried.next_if(|(p, _)| *p < pod) {
                gone.push(p);
            }
            while pods.next_if(|(p, _)| *p < pod).is_some() {}
            Now {
                carried: carried.next_if(|(p, _)| *p == pod).map(|(_, c)| c),
                exact: pods.next_if(|(p, _)| *p == pod).and_then(|(_, s)| s.keys.exact()),
            }
        })
        .collect();
    gone.extend(carried.map(|(p, _)| p));
    (now, gone)
}

/// Agent `x`'s target in `g`: the first `dials` of `links` are whom it dials, the rest who dial it. Its
/// standbys avoid the pairs in `avoid` (each smaller index first).
fn target<'a>(
    agents: &[&'a Arc<Agent>],
    (g, avoid): (&planner::Graph, &HashSet<(u32, u32)>),
    x: u32,
    (links, dials): (&[u32], usize),
    cap: u32,
) -> Target<'a> {
    let agent = |v: &u32| agents[*v as usize];
    let mut peers: Vec<(&Name, &Name)> = links[..dials].iter().map(agent).map(|a| (&a.node_id, &a.url)).collect();
    let mut accepts: Vec<&Name> = links[dials..].iter().map(agent).map(|a| &a.node_id).collect();
    peers.sort_unstable();
    accepts.sort_unstable();
    let (mut standbys, mut standby_accepts) = (Vec::new(), Vec::new());
    let usable = |a: u32, b: u32| !avoid.contains(&(a.min(b), a.max(b)));
    for s in planner::standby::standbys(g, x, |v| &agents[v as usize].node_id, usable) {
        let (peer, stands_for) = (agent(&s.peer), agent(&s.stands_for));
        match s.dials {
            true => standbys.push((&peer.node_id, &peer.url, &stands_for.node_id, s.rank)),
            false => standby_accepts.push(&peer.node_id),
        }
    }
    standby_accepts.sort_unstable();
    standby_accepts.dedup();
    Target { peers, accepts, cap, standbys, standby_accepts }
}

/// With no presence: each Pod in `staying` keeps what it carries, without the peers that are gone, under
/// `cap`; every other Pod carrying ours gets `None`, and so does one whose keys name no policy (nobody
/// planned them) or that carries more than `cap` links. A peer is gone when its node id is that of a Pod that does not stay
/// (its node-id annotation), or when its URL names an IP that no Pod of `live_ips` has.
pub fn adopt(
    carried: &BTreeMap<Name, Arc<Assignment>>,
    pods: &BTreeMap<Name, PodState>,
    staying: &HashSet<&str>,
    live_ips: &HashSet<String>,
    cap: u32,
) -> Targets {
    let planned = |pod: &str, a: &Assignment| {
        staying.contains(pod) && a.links() <= cap as usize && pods.get(pod).is_some_and(|p| p.keys.policy().is_some())
    };
    let mut gone: BTreeSet<&str> = carried
        .iter()
        .filter(|(pod, a)| !planned(pod, a.as_ref()))
        .map(|(pod, _)| pod)
        .filter_map(|pod| pods.get(pod)?.node_id.as_deref())
        .collect();
    for a in carried.values() {
        gone.extend(
            a.peers
                .iter()
                .filter(|p| membership::address_host(&p.url).is_some_and(|ip| !live_ips.contains(&ip)))
                .map(|p| p.node_id.as_str()),
        );
    }
    carried
        .iter()
        .map(|(pod, a)| {
            let target = planned(pod, a.as_ref()).then(|| {
                let staying = |id: &str| !gone.contains(id);
                let peers = a.peers.iter().filter(|p| staying(&p.node_id)).cloned().collect();
                let accepts = a.accepts.iter().filter(|id| staying(id)).cloned();
                let standbys =
                    a.standbys.iter().filter(|s| staying(&s.node_id) && staying(&s.stands_for)).cloned().collect();
                let standby_accepts = a.standby_accepts.iter().filter(|id| staying(id)).cloned();
                let kept = Assignment::new(peers, accepts, a.policy.clone()).with_max_peers(cap as usize);
                Arc::new(kept.with_standbys(standbys, standby_accepts))
            });
            (pod.clone(), target)
        })
        .collect()
}

/// One Pod's share of `status.planHash`: the digest is the sum of every Pod's, so a plan that changes a
/// few targets changes a few terms. Every field ends in a byte no field can hold (0xff is never UTF-8),
/// and each list in its length, so different targets hash differently.
fn pod_hash(pod: &str, target: Option<&Target>, policy: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut field = |bytes: &[u8]| {
        h.update(bytes);
        h.update(&[0xff]);
    };
    field(pod.as_bytes());
    match target {
        None => field(b"-"),
        Some(t) => {
            field(&t.peers.len().to_le_bytes());
            for (id, url) in &t.peers {
                field(id.as_bytes());
                field(url.as_bytes());
            }
            field(&t.accepts.len().to_le_bytes());
            for id in &t.accepts {
                field(id.as_bytes());
            }
            field(&t.standbys.len().to_le_bytes());
            for (id, url, stands_for, rank) in &t.standbys {
                field(id.as_bytes());
                field(url.as_bytes());
                field(stands_for.as_bytes());
                field(&[*rank]);
            }
            field(&t.standby_accepts.len().to_le_bytes());
            for id in &t.standby_accepts {
                field(id.as_bytes());
            }
            field(policy.as_bytes());
            field(&t.cap.to_le_bytes());
        }
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment;
    use crate::controller::membership::Agent;
    use crate::controller::pods::Keys;

    fn agent(i: usize) -> Agent {
        let (url, unreachable) = (format!("ws://10.0.0.{i}:1/"), Default::default());
        Agent {
            pod: format!("p{i}").into(),
            node_id: format!("n{i}").into(),
            url: url.into(),
            domain: None,
            unreachable,
        }
    }

    #[test]
    fn every_link_is_on_one_dialer_and_the_other_end_accepts_it() {
        let m = Membership {
            agents: (0..9).map(|i| (format!("p{i}").into(), Arc::new(agent(i)))).collect(),
            ..Default::default()
        };
        let carried = BTreeMap::from([("gone".into(), Arc::new(Assignment::default()))]);
        let (none, pods) = (planner::Unusable::new(), BTreeMap::new());
        let out = targets(&m, &BTreeSet::new(), (4, "seed", "p"), (&carried, &pods), &none, &mut Kept::default());
        let out = out.unwrap();
        assert_eq!(out.targets["gone"], None);
        let published: BTreeMap<String, Assignment> = m
            .agents
            .values()
            .map(|a| (a.node_id.to_string(), Assignment::clone(out.targets[&a.pod].as_deref().unwrap())))
            .collect();
        assert_eq!(crate::assignment::first_violation(&published, 4), None);
        for (id, a) in &published {
            assert_eq!(a.links(), 4);
            for p in &a.peers {
                assert!(published[p.node_id.as_str()].accepts.iter().any(|a| a == id), "{} accepts {id}", p.node_id);
            }
        }
    }

    #[test]
    fn a_join_into_a_settled_fleet_builds_only_the_targets_it_changes() {
        let mut world = World { cap: 4, ..Default::default() };
        for i in 0..40 {
            world.event((0, i, 1), &Targets::new());
        }
        let mut kept = Kept::default();
        let planned = world.plan(&mut kept).unwrap().0;
        world.event((4, 0, 0), &planned);
        assert_eq!(world.plan(&mut kept).unwrap().1[0], 40, "every agent carries its target");
        assert_eq!(kept.built(), 40, "each Pod's keys changed");
        // The cache parses keys again on every Pod event: equal keys in new allocations change nothing.
        for (pod, a) in world.carried.clone() {
            world.carry(&pod, Keys::Exact(Arc::new(Assignment::clone(&a))));
        }
        assert_eq!(world.plan(&mut kept).unwrap().1[0], 40);
        assert_eq!(kept.built(), 0, "re-parsed keys rebuild nothing");
        world.event((0, 40, 1), &Targets::new());
        let joined = world.plan(&mut kept).unwrap().0;
        // The agents whose links changed, and the neighbours of those (their standbys pair around them).
        assert!((1..=24).contains(&kept.built()), "built {} of 41 targets", kept.built());
        assert!(joined.len() <= kept.built(), "{} writes", joined.len());
        // Standbys ride along: a join writes only the Pods whose links change.
        for (pod, t) in &joined {
            let (t, now) = (t.as_deref().unwrap(), world.carried.get(pod));
            let links_change = now.is_none_or(|c| c.peers != t.peers || c.accepts != t.accepts);
            assert!(links_change, "{pod} written for its standbys alone: {now:?} -> {t:?}");
        }
    }

    /// Standbys ride along with link changes only, so joins leave some far from the peer they stand for.
    /// Still, when an agent leaves, is held or moves, every Pod naming it (at its old URL) is rewritten,
    /// and the kept plan agrees with one made from scratch.
    #[test]
    fn a_departure_rewrites_every_pod_naming_it_however_far() {
        let mut world = World { cap: 4, ..Default::default() };
        let settle = |world: &mut World| {
            for _ in 0..4 {
                let written = world.plan(&mut Kept::default()).unwrap().0;
                world.event((4, 0, 0), &written);
            }
        };
        for i in 0..24 {
            world.event((0, i, 1), &Targets::new());
        }
        settle(&mut world);
        for joiner in 24..30 {
            world.event((0, joiner, 1), &Targets::new());
            settle(&mut world);
        }
        for x in 0..30 {
            // A leave, a hold, and a move (the same node id at another URL).
            for departure in [(2, 0), (3, 0), (1, 2)] {
                let mut kept = Kept::default();
                world.plan(&mut kept).unwrap();
                let mut after = world.clone();
                after.event((departure.0, x, departure.1), &Targets::new());
                let (incremental, fresh) = (after.plan(&mut kept).unwrap(), after.plan(&mut Kept::default()).unwrap());
                assert_eq!(incremental, fresh, "agent {x} departed ({departure:?})");
                let (id, url) =
                    (format!("n{x:02}"), after.agents.get(format!("p{x:02}").as_str()).map(|a| a.url.clone()));
                for (pod, carried) in &after.carried {
                    let now = incremental.0.get(pod).map_or(Some(carried), Option::as_ref);
                    let stale = |a: &Assignment| {
                        let standbys = a.standbys.iter().any(|s| s.node_id == id && Some(&s.url) != url.as_ref());
                        standbys || (url.is_none() && a.standby_accepts.iter().any(|n| *n == id))
                    };
                    let names = now.is_some_and(|a| stale(a));
                    assert!(!names || *pod == format!("p{x:02}"), "{pod} still names {id} (departure {departure:?})");
                }
            }
        }
    }

    /// What a test compares of two plans: everything but the memory.
    fn seen(out: PlanOutcome) -> (Targets, [u32; 5], String) {
        (out.targets, [out.settled, out.links, out.max_degree, out.min_degree, out.components], out.hash)
    }

    /// A fleet of up to 24 agents the property test below changes one event at a time.
    #[derive(Clone, Default)]
    struct World {
        agents: BTreeMap<Name, Arc<Agent>>,
        held: BTreeSet<Name>,
        carried: BTreeMap<Name, Arc<Assignment>>,
        pods: BTreeMap<Name, PodState>,
        unusable: planner::Unusable,
        cap: u32,
    }

    impl World {
        /// The Pod carries `keys`, as a write or a user would leave them (read as the Pod cache would).
        fn carry(&mut self, pod: &str, keys: Keys) {
            match keys.lenient() {
                Some(a) => self.carried.insert(pod.into(), a),
                None => self.carried.remove(pod),
            };
            self.pods.insert(pod.into(), PodState { keys, ..Default::default() });
        }

        fn event(&mut self, (kind, i, j): (u8, usize, usize), last: &Targets) {
            let pod = Name::from(format!("p{i:02}"));
            match kind % 9 {
                0 | 1 => {
                    let url = format!("ws://10.0.0.{}:1/", i + 24 * (j % 2));
                    let domain = (j % 3 == 0).then(|| format!("zone-{}", j % 2));
                    let node_id = format!("n{:02}", if j % 7 == 0 { j % 24 } else { i });
                    self.agents.insert(
                        pod.clone(),
                        Arc::new(Agent {
                            pod,
                            node_id: node_id.into(),
                            url: url.into(),
                            domain,
                            unreachable: Default::default(),
                        }),
                    );
                }
                2 => drop(self.agents.remove(&pod)),
                3 => {
                    if !self.held.remove(&pod) {
                        self.held.insert(pod);
                    }
                }
                // Some of the last plan's writes land.
                4 | 5 => {
                    for (pod, target) in last.iter().filter(|(p, _)| p.len() % 2 == j % 2 || j % 3 == 0) {
                        self.carry(pod, target.clone().map_or(Keys::None, Keys::Exact));
                    }
                }
                // By hand: nothing, a well-formed assignment, or keys read only leniently (repeated,
                // unsorted, naming the Pod's own node id).
                6 => {
                    let peer = |v: usize| Peer {
                        node_id: format!("n{v:02}").into(),
                        url: format!("ws://10.0.0.{v}:1/").into(),
                    };
                    let keys = match j % 3 {
                        0 => Keys::None,
                        1 => Keys::Exact(Arc::new(Assignment::new(vec![peer(j)], [], "p".into()))),
                        _ => Keys::new(BTreeMap::from([
                            (assignment::POLICY.to_owned(), "p".to_owned()),
                            (
                                assignment::PEERS.to_owned(),
                                serde_json::to_string(&[peer(j), peer(i), peer(j)]).unwrap(),
                            ),
                        ])),
                    };
                    self.carry(&pod, keys);
                }
                7 => self.cap = (j % 6) as u32,
                // A pair reported unusable, or usable again.
                _ => {
                    let pair = (format!("n{:02}", i.min(j)), format!("n{:02}", i.max(j)));
                    if !self.unusable.remove(&pair) {
                        self.unusable.insert(pair);
                    }
                }
            }
        }

        fn plan(&self, kept: &mut Kept) -> Result<(Targets, [u32; 5], String), PlanError> {
            let m = Membership { agents: self.agents.clone(), ..Default::default() };
            let keys = (&self.carried, &self.pods);
            targets(&m, &self.held, (self.cap, "seed", "p"), keys, &self.unusable, kept).map(seen)
        }
    }

    /// Whether the kept memory's tables say what they stand for: the node-id table its agents' ids, and
    /// each settled Pod's run of named agents the agents its standbys name. A wrong one can hide until a
    /// later event reads it.
    fn tables_hold(kept: &Kept) -> Result<(), String> {
        let ids: foldhash::HashMap<Name, u32> =
            kept.held.iter().enumerate().map(|(j, h)| (h.agent.node_id.clone(), j as u32)).collect();
        if ids != kept.by_id {
            return Err(format!("node-id table {:?}, agents {ids:?}", kept.by_id));
        }
        for (j, (a, h)) in kept.agents.iter().zip(&kept.held).enumerate().filter(|(_, (a, _))| a.settled) {
            let e = h.exact.as_deref().ok_or(format!("agent {j} settled without keys"))?;
            let names = e.standbys.iter().map(|s| &s.node_id).chain(&e.standby_accepts);
            let mut want: Vec<Option<u32>> = names.map(|id| ids.get(id.as_str()).copied()).collect();
            let mut got: Vec<Option<u32>> = a.span.named(&kept.indices).iter().map(|&v| Some(v)).collect();
            want.sort();
            got.sort();
            if want != got {
                return Err(format!("agent {j} names {want:?}, its run holds {got:?}"));
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// The plan made with the last plan's memory equals the plan made without, after every event:
        /// joins, leaves, new verdicts (a moved URL, a node id another Pod had), holds, writes landing
        /// or failing, Pods rewritten by hand, a changed cap, pairs unusable and usable again.
        #[test]
        fn the_kept_plan_equals_one_made_from_scratch(
            events in proptest::collection::vec((0u8..9, 0usize..24, 0usize..24), 1..60),
        ) {
            let mut world = World { cap: 4, ..Default::default() };
            let (mut kept, mut last) = (Kept::default(), Targets::new());
            for e in events {
                world.event(e, &last);
                let fresh = world.plan(&mut Kept::default());
                let incremental = world.plan(&mut kept);
                proptest::prop_assert_eq!(&incremental, &fresh, "after {:?}", e);
                proptest::prop_assert_eq!(tables_hold(&kept), Ok(()), "after {:?}", e);
                last = fresh.map(|f| f.0).unwrap_or_default();
            }
        }
    }

    #[test]
    fn adopting_keeps_what_stays_and_drops_what_is_gone() {
        let a = |peers: &[(&str, &str)], accepts: &[&str]| {
            let peers = peers
                .iter()
                .map(|(id, ip)| Peer { node_id: id.to_string().into(), url: format!("ws://{ip}:1/").into() });
            Assignment::new(peers.collect(), accepts.iter().map(|&s| s.into()), "p".into()).with_max_peers(4)
        };
        let carried = BTreeMap::from([
            ("x".into(), Arc::new(a(&[("ny", "10.0.0.2"), ("nz", "10.0.0.3")], &["nw"]))),
            ("y".into(), Arc::new(a(&[], &["nx"]))),
            ("z".into(), Arc::new(a(&[], &["nx"]))),
        ]);
        let state = |id: &str| PodState {
            node_id: Some(id.into()),
            keys: crate::controller::pods::Keys::new(BTreeMap::from([(
                crate::assignment::POLICY.to_string(),
                "p".to_string(),
            )])),
            ..Default::default()
        };
        let pods = BTreeMap::from([("x".into(), state("nx")), ("y".into(), state("ny")), ("z".into(), state("nz"))]);
        let staying = HashSet::from(["x", "y"]);
        let live_ips = HashSet::from(["10.0.0.1".to_string(), "10.0.0.2".to_string(), "10.0.0.3".to_string()]);
        let t = adopt(&carried, &pods, &staying, &live_ips, 4);
        assert_eq!(t["x"].as_deref(), Some(&a(&[("ny", "10.0.0.2")], &["nw"])), "z is gone; nw may only be unknown");
        assert_eq!(t["y"].as_deref(), Some(&a(&[], &["nx"])));
        assert_eq!(t["z"], None);
        let fewer_ips = HashSet::from(["10.0.0.1".to_string()]);
        assert_eq!(
            adopt(&carried, &pods, &staying, &fewer_ips, 4)["x"].as_deref(),
            Some(&a(&[], &["nw"])),
            "deleted Pods' IPs"
        );
        assert_eq!(adopt(&carried, &pods, &staying, &live_ips, 2)["x"], None, "over the cap: nobody planned it");
        let lowered = adopt(&carried, &pods, &staying, &live_ips, 2);
        assert_eq!(
            lowered["y"].as_deref(),
            Some(&a(&[], &[]).with_max_peers(2)),
            "x released; y kept under the new cap"
        );
        let mut stray = pods.clone();
        stray.get_mut("y").unwrap().keys = Default::default();
        assert_eq!(adopt(&carried, &stray, &staying, &live_ips, 4)["y"], None, "stray keys are not adopted");
    }
}
