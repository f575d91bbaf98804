//! The broadcast tree over an agent's mesh links (Plumtree: Leitão, Pereira and Rodrigues, SRDS 2007).
//! Flooding sends each update over every link, about N·(k−1) copies for N agents of degree k; the tree
//! sends its payload over the links of a spanning tree and only its id over the others. Pure: the
//! document's relay feeds it what arrives and carries out what it returns.
//!
//! Each end keeps each mesh link **eager** (it sends new updates whole) or **lazy** (it sends their ids,
//! batched in an `ihave`). Every link starts eager. An update that arrives a second time over a link makes
//! that link lazy at both ends (`prune`), so the eager links thin out to a tree that serves every writer;
//! an id announced but not received within [`GRAFT_AFTER`] is asked for (`graft`), which makes the link
//! eager at both ends again: the tree repairs itself where a branch broke. With several writers at once,
//! each update's duplicates arrive on other links, and pruning on all of them would leave an agent no link
//! that sends it updates whole; so a link that brought an update first within [`KEEP_FIRST`] is not
//! pruned by this end, and a prune from its peer is answered with a graft (the peer then keeps it for
//! [`KEEP_FIRST`] too). A link that closes after bringing updates first has the agent graft the links it
//! had pruned, so a dead neighbour costs one local flood, not a wait; duplicates prune it again.
//!
//! The rendezvous link is not in the tree. An update first received from the rendezvous is announced on
//! every link that speaks the tree, and pushed over the tree only when the mesh brings its first copy, as
//! if that copy had just arrived: the tree takes shape as if the rendezvous were not there, and an agent
//! the rendezvous missed asks a neighbour for it. What a mesh link's SyncStep2 brought is announced and
//! shapes nothing: it answered this agent alone. A peer that never said it speaks the tree (an agent from
//! before it) gets every update whole, as before, and is never pruned.
//!
//! Invariants (property-tested below, over simulated fleets with links that fail):
//! - **delivery**: every update reaches every agent its origin is connected to by mesh links, whatever
//!   links are eager or lazy, whichever order messages cross links in, and whatever links close;
//! - **bounded**: what a peer can make an agent hold is bounded: [`MAX_MISSING`] announced ids (at most
//!   [`MAX_MISSING_PER_LINK`] started by one link, each waiting on at most [`MAX_ANNOUNCERS`] links), and
//!   the last [`RECENT_COUNT`] updates' payloads (at most [`RECENT_BYTES`]), kept to answer grafts;
//! - **once**: after the eager links have thinned out (a settled tree), an update crosses each agent's
//!   links whole at most once in each direction of a tree link: at most N−1 copies for N agents.
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Identifies one attached link for the lifetime of the process.
pub type LinkId = u64;
/// An update's id ([`update_id`]).
pub type UpdateId = u64;

/// How long after an update is first announced it is asked for, if it has not arrived over an eager link
/// (the default of `Broadcast::Tree`'s `graft_after`). A graft that does not bring it within twice this
/// long has the next announcer asked.
pub const GRAFT_AFTER: Duration = Duration::from_millis(150);
/// A link that brought an update first this recently is not pruned: with several writers at once, each
/// update's duplicates arrive on other links, and pruning on all of them would leave an agent no link
/// that sends it updates whole.
pub const KEEP_FIRST: Duration = Duration::from_millis(500);
/// Ids in one `ihave` or `graft` frame.
pub const MAX_IDS: usize = 256;
/// Announced ids waiting for their update, in all.
pub const MAX_MISSING: usize = 4096;
/// Announced ids waiting for their update that one link started.
pub const MAX_MISSING_PER_LINK: usize = 1024;
/// Links remembered as having announced one id.
pub const MAX_ANNOUNCERS: usize = 4;
/// How many times, and how far apart, an update no graft brought is asked for by SyncStep1. Longer than
/// the relay's gap between two SyncStep1 answers on one link (`doc::STEP1_INTERVAL`), so a second ask is
/// never dropped for coming too soon.
pub const MAX_ASKS: u32 = 3;
pub const ASK_AGAIN_AFTER: Duration = Duration::from_millis(3500);
/// Recent updates kept to answer grafts, by count and by bytes.
pub const RECENT_COUNT: usize = 1024;
pub const RECENT_BYTES: usize = 4 << 20;
/// The longest text frame that can be a tree message (a full `ihave`).
const MAX_TEXT: usize = 64 + MAX_IDS * 19;

/// How updates cross the mesh links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broadcast {
    /// The tree: each update whole over tree links, its id over the others, asked for when it has not
    /// arrived `graft_after` after its id.
    Tree { graft_after: Duration },
    /// Every update whole over every link (the behaviour before the tree, kept to compare).
    Flood,
}

impl Default for Broadcast {
    fn default() -> Self {
        Broadcast::Tree { graft_after: GRAFT_AFTER }
    }
}

impl Broadcast {
    /// `tree` (with the default timing) or `flood`.
    pub fn parse(s: &str) -> Result<Broadcast, String> {
        match s {
            "tree" => Ok(Broadcast::default()),
            "flood" => Ok(Broadcast::Flood),
            other => Err(format!("broadcast {other:?}: expected tree or flood")),
        }
    }
}

/// Where an update first came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This agent's own edit.
    Local,
    /// The rendezvous link.
    Hub,
    /// A mesh link's SyncStep2: an answer to this agent alone, which says nothing about the tree.
    Answer(LinkId),
    /// A mesh link's update.
    Mesh(LinkId),
}

/// A tree message: a text frame on a mesh link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// This end speaks the tree (sent first on every mesh link).
    Hello,
    /// These updates are here; ask for any that does not arrive.
    IHave(Vec<UpdateId>),
    /// Send these updates, and send new ones whole from now on.
    Graft(Vec<UpdateId>),
    /// Send only ids from now on.
    Prune,
}

#[derive(Serialize, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ids: Vec<String>,
}

impl Control {
    pub fn to_text(&self) -> String {
        let (kind, ids) = match self {
            Control::Hello => ("tree", &[][..]),
            Control::IHave(ids) => ("ihave", &ids[..]),
            Control::Graft(ids) => ("graft", &ids[..]),
            Control::Prune => ("prune", &[][..]),
        };
        let ids = ids.iter().map(|id| format!("{id:016x}")).collect();
        serde_json::to_string(&Frame { kind: kind.into(), ids }).expect("a tree frame serializes")
    }

    /// The tree message in a text frame; `Ok(None)` for any other text (a heartbeat). A frame that names a
    /// tree type but is malformed or over the bounds is an error: the link is closed.
    pub fn parse(text: &str) -> Result<Option<Control>, String> {
        #[derive(Deserialize)]
        struct Kind {
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        let Ok(Kind { kind: Some(kind) }) = serde_json::from_str::<Kind>(text) else { return Ok(None) };
        if !matches!(kind.as_str(), "tree" | "ihave" | "graft" | "prune") {
            return Ok(None);
        }
        if text.len() > MAX_TEXT {
            return Err(format!("a {kind} frame of {} bytes, over {MAX_TEXT}", text.len()));
        }
        let frame: Frame = serde_json::from_str(text).map_err(|e| format!("a malformed {kind} frame: {e}"))?;
        if frame.ids.len() > MAX_IDS {
            return Err(format!("a {kind} frame of {} ids, over {MAX_IDS}", frame.ids.len()));
        }
        let id = |s: &String| {
            let hex = s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
            hex.then(|| u64::from_str_radix(s, 16).ok()).flatten().ok_or_else(|| format!("{kind}: id {s:?}"))
        };
        let ids = frame.ids.iter().map(id).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(match kind.as_str() {
            "tree" => Control::Hello,
            "ihave" => Control::IHave(ids),
            "graft" => Control::Graft(ids),
            _ => Control::Prune,
        }))
    }
}

/// What the relay does for the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the new update whole on this link.
    Push(LinkId),
    /// Send a tree message.
    Send(LinkId, Control),
    /// Send a kept update whole (a graft asked for it).
    Resend(LinkId, Bytes),
    /// Ask the link for whatever this document lacks (a SyncStep1): an update no graft brought, or ids
    /// the bounds left out.
    Ask(LinkId),
}

#[derive(Debug)]
struct Link {
    /// The peer said it speaks the tree; until then it gets every update whole.
    speaks: bool,
    /// This end sends the peer new updates whole.
    eager: bool,
    /// The peer sends this end only ids (a prune either way), until this end grafts it.
    pruned: bool,
    /// When the peer last brought an update first over the mesh: the link is this end's way to some
    /// writer, which vetoes prunes for [`KEEP_FIRST`].
    first_at: Option<Instant>,
    /// Not pruned by this end before then: the peer just grafted it (after a veto, or a closed link).
    keep_until: Option<Instant>,
    /// When this end last pruned it.
    pruned_at: Option<Instant>,
    /// Ids to announce at the next flush.
    announce: Vec<UpdateId>,
    /// Missing ids this link's announcement started.
    started: usize,
    /// Kept updates resent on this link: each at most once.
    resent: HashSet<UpdateId>,
    /// When to ask the link for the whole difference, because the bounds left out ids it announced.
    overflow: Option<Instant>,
}

impl Link {
    /// Whether the peer brought an update first lately ([`KEEP_FIRST`]).
    fn brought_first(&self, now: Instant) -> bool {
        self.first_at.is_some_and(|at| now < at + KEEP_FIRST)
    }

    /// Whether this end must not prune it now.
    fn kept(&self, now: Instant) -> bool {
        self.brought_first(now) || self.keep_until.is_some_and(|until| now < until)
    }

    fn new() -> Link {
        Link {
            speaks: false,
            eager: true,
            pruned: false,
            first_at: None,
            keep_until: None,
            pruned_at: None,
            announce: Vec::new(),
            started: 0,
            resent: HashSet::new(),
            overflow: None,
        }
    }
}

#[derive(Debug)]
struct Missing {
    /// Links that announced it and have not been grafted yet, in order.
    announcers: VecDeque<LinkId>,
    /// Links grafted for it, in order: asked by SyncStep1, in turn, when no graft brought it.
    tried: Vec<LinkId>,
    asks: u32,
    due: Instant,
    started_by: LinkId,
}

/// One agent's tree: the state of each mesh link, the ids it waits for, the payloads it can resend.
#[derive(Debug)]
pub struct Tree {
    graft_after: Duration,
    links: HashMap<LinkId, Link>,
    missing: HashMap<UpdateId, Missing>,
    timers: BTreeSet<(Instant, UpdateId)>,
    recent: HashMap<UpdateId, Bytes>,
    order: VecDeque<UpdateId>,
    recent_bytes: usize,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new(GRAFT_AFTER)
    }
}

impl Tree {
    pub fn new(graft_after: Duration) -> Tree {
        Tree {
            graft_after,
            links: HashMap::new(),
            missing: HashMap::new(),
            timers: BTreeSet::new(),
            recent: HashMap::new(),
            order: VecDeque::new(),
            recent_bytes: 0,
        }
    }

    /// A new mesh link: eager, and sent every update whole until its peer says it speaks the tree.
    pub fn attach(&mut self, link: LinkId) {
        self.links.insert(link, Link::new());
    }

    /// A mesh link closed. If it ever brought an update first, the links this end pruned are grafted: the
    /// next update floods around the gap, and its duplicates prune the links back to a tree. Waits that
    /// only it could end are dropped.
    pub fn detach(&mut self, link: LinkId) -> Vec<Action> {
        let Some(gone) = self.links.remove(&link) else { return Vec::new() };
        let links = &self.links;
        let mut orphans = Vec::new();
        for (id, m) in &mut self.missing {
            m.announcers.retain(|a| *a != link);
            if m.announcers.is_empty() && !m.tried.iter().any(|t| links.contains_key(t)) {
                orphans.push(*id);
            }
        }
        orphans.into_iter().for_each(|id| self.arrived(id));
        if gone.first_at.is_none() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&id, l) in self.links.iter_mut().filter(|(_, l)| l.speaks && l.pruned) {
            (l.pruned, l.eager) = (false, true);
            out.push(Action::Send(id, Control::Graft(Vec::new())));
        }
        out
    }

    /// A new update, first received from `origin`: the links to push it to now; its id is queued for the
    /// others (see [`Tree::flush`]). One from beside the tree (the rendezvous, an answer) is announced on
    /// every link that speaks the tree and pushed over it only once the mesh brings a copy ([`Tree::again`]):
    /// the tree takes shape as if the rendezvous were not there.
    pub fn received(&mut self, id: UpdateId, origin: Origin, payload: &Bytes, now: Instant) -> Vec<Action> {
        self.arrived(id);
        self.remember(id, payload);
        if let Origin::Mesh(from) = origin
            && let Some(l) = self.links.get_mut(&from)
        {
            l.first_at = Some(now);
        }
        let beside = matches!(origin, Origin::Hub | Origin::Answer(_));
        let source = match origin {
            Origin::Mesh(l) | Origin::Answer(l) => Some(l),
            Origin::Local | Origin::Hub => None,
        };
        self.pass_on(id, source, |link| !link.speaks || (link.eager && !beside), true)
    }

    /// Pushes update `id` to the links but `source` that `push` picks, and (if `announce`) queues its id
    /// for the other links that speak the tree.
    fn pass_on(
        &mut self,
        id: UpdateId,
        source: Option<LinkId>,
        push: impl Fn(&Link) -> bool,
        announce: bool,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        for (&l, link) in self.links.iter_mut().filter(|(l, _)| Some(**l) != source) {
            if push(link) {
                out.push(Action::Push(l));
            } else if link.speaks && announce {
                link.announce.push(id);
                if link.announce.len() == MAX_IDS {
                    out.push(Action::Send(l, Control::IHave(std::mem::take(&mut link.announce))));
                }
            }
        }
        out
    }

    /// Update `id`, already here, arrived again whole over mesh link `link`. The first copy the mesh
    /// brings of one that came from beside the tree (`first_over_mesh`) is passed on over the tree now, as
    /// if it had just arrived. A later copy asks its sender for ids only, unless this end must keep the
    /// link ([`Link::kept`]). A sender still pushing after a prune missed it (a graft crossed it): it is
    /// told again, at most once per [`KEEP_FIRST`].
    pub fn again(&mut self, id: UpdateId, link: LinkId, first_over_mesh: bool, now: Instant) -> Vec<Action> {
        let Some(l) = self.links.get_mut(&link) else { return Vec::new() };
        if first_over_mesh {
            l.first_at = Some(now);
            // Already announced on every link that speaks the tree, and sent whole to the others.
            return self.pass_on(id, Some(link), |link| link.speaks && link.eager, false);
        }
        let told = l.pruned && !l.eager && l.pruned_at.is_some_and(|at| now < at + KEEP_FIRST);
        if !l.speaks || l.kept(now) || told {
            return Vec::new();
        }
        (l.pruned, l.eager, l.pruned_at) = (true, false, Some(now));
        vec![Action::Send(link, Control::Prune)]
    }

    /// A tree message from `link`'s peer. `seen` says whether an update is already here.
    pub fn heard(
        &mut self,
        link: LinkId,
        control: Control,
        now: Instant,
        seen: impl Fn(UpdateId) -> bool,
    ) -> Vec<Action> {
        let Some(l) = self.links.get_mut(&link) else { return Vec::new() };
        l.speaks = true;
        match control {
            Control::Hello => Vec::new(),
            Control::Prune if l.brought_first(now) => {
                // The link is this agent's way to some writers: it stays eager, both ways.
                (l.pruned, l.eager) = (false, true);
                vec![Action::Send(link, Control::Graft(Vec::new()))]
            }
            Control::Prune => {
                (l.pruned, l.eager) = (true, false);
                Vec::new()
            }
            Control::Graft(ids) => {
                (l.pruned, l.eager) = (false, true);
                if ids.is_empty() {
                    l.keep_until = Some(now + KEEP_FIRST);
                }
                let recent = &self.recent;
                let fresh = ids.into_iter().filter(|id| recent.contains_key(id) && l.resent.insert(*id));
                fresh.map(|id| Action::Resend(link, recent[&id].clone())).collect()
            }
            Control::IHave(ids) => {
                for id in ids.into_iter().filter(|id| !seen(*id)) {
                    self.announced(link, id, now);
                }
                Vec::new()
            }
        }
    }

    fn announced(&mut self, link: LinkId, id: UpdateId, now: Instant) {
        if let Some(m) = self.missing.get_mut(&id) {
            let known = m.announcers.contains(&link) || m.tried.contains(&link);
            if m.announcers.len() < MAX_ANNOUNCERS && !known {
                m.announcers.push_back(link);
            }
            return;
        }
        let Some(l) = self.links.get_mut(&link) else { return };
        if self.missing.len() >= MAX_MISSING || l.started >= MAX_MISSING_PER_LINK {
            // Left out, not lost: the link is asked for the whole difference once the grafts had time.
            l.overflow.get_or_insert(now + 2 * self.graft_after);
            return;
        }
        l.started += 1;
        let due = now + self.graft_after;
        let m = Missing { announcers: VecDeque::from([link]), tried: Vec::new(), asks: 0, due, started_by: link };
        self.missing.insert(id, m);
        self.timers.insert((due, id));
    }

    /// What is due by `now`: each missing update is grafted from its next announcer (which then sends
    /// updates whole); one that no announcer brought is asked for by SyncStep1 of the links grafted, in
    /// turn, [`MAX_ASKS`] times [`ASK_AGAIN_AFTER`] apart; a link whose ids the bounds left out is asked
    /// once.
    pub fn due(&mut self, now: Instant, seen: impl Fn(UpdateId) -> bool) -> Vec<Action> {
        let mut grafts: HashMap<LinkId, Vec<UpdateId>> = HashMap::new();
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.timers.first().filter(|(at, _)| *at <= now) {
            self.timers.remove(&(at, id));
            let Some(m) = self.missing.get_mut(&id) else { continue };
            let links = &self.links;
            let open: Vec<LinkId> = m.tried.iter().copied().filter(|t| links.contains_key(t)).collect();
            let (next, wait) = match m.announcers.pop_front() {
                _ if seen(id) => (None, None),
                Some(link) => {
                    m.tried.push(link);
                    grafts.entry(link).or_default().push(id);
                    (Some(()), Some(2 * self.graft_after))
                }
                None if m.asks < MAX_ASKS && !open.is_empty() => {
                    out.push(Action::Ask(open[m.asks as usize % open.len()]));
                    m.asks += 1;
                    (Some(()), Some(ASK_AGAIN_AFTER))
                }
                None => (None, None),
            };
            match next.zip(wait) {
                Some(((), wait)) => {
                    m.due = now + wait;
                    self.timers.insert((m.due, id));
                }
                None => self.arrived(id),
            }
        }
        for (link, ids) in grafts {
            if let Some(l) = self.links.get_mut(&link) {
                (l.pruned, l.eager) = (false, true);
            }
            out.extend(ids.chunks(MAX_IDS).map(|c| Action::Send(link, Control::Graft(c.to_vec()))));
        }
        for (&id, l) in &mut self.links {
            if l.overflow.is_some_and(|at| at <= now) {
                l.overflow = None;
                out.push(Action::Ask(id));
            }
        }
        out
    }

    /// When [`Tree::due`] next has work.
    pub fn next_due(&self) -> Option<Instant> {
        let overflow = self.links.values().filter_map(|l| l.overflow);
        self.timers.first().map(|(at, _)| *at).into_iter().chain(overflow).min()
    }

    /// The announcements queued since the last flush, one `ihave` per link.
    pub fn flush(&mut self) -> Vec<Action> {
        let pending = self.links.iter_mut().filter(|(_, l)| !l.announce.is_empty());
        pending.map(|(&id, l)| Action::Send(id, Control::IHave(std::mem::take(&mut l.announce)))).collect()
    }

    /// An update is here: stop waiting for it.
    fn arrived(&mut self, id: UpdateId) {
        let Some(m) = self.missing.remove(&id) else { return };
        self.timers.remove(&(m.due, id));
        if let Some(l) = self.links.get_mut(&m.started_by) {
            l.started -= 1;
        }
    }

    /// Keeps a payload to answer grafts. One over a quarter of the store is not kept: it would push out
    /// everything else (a graft for it finds nothing, and a SyncStep1 brings it).
    fn remember(&mut self, id: UpdateId, payload: &Bytes) {
        if payload.len() > RECENT_BYTES / 4 || self.recent.insert(id, payload.clone()).is_some() {
            return;
        }
        self.order.push_back(id);
        self.recent_bytes += payload.len();
        while self.order.len() > RECENT_COUNT || self.recent_bytes > RECENT_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            self.recent_bytes -= self.recent.remove(&old).map_or(0, |p| p.len());
            for l in self.links.values_mut() {
                l.resent.remove(&old);
            }
        }
    }
}

/// An update's id: the first 8 bytes of the SHA-256 of its bytes, big-endian (relays keep updates
/// verbatim, so every agent computes the same).
pub fn update_id(bytes: &[u8]) -> UpdateId {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    #[test]
    fn an_update_id_is_the_start_of_its_sha256() {
        assert_eq!(format!("{:016x}", update_id(&[0, 0])), "96a296d224f285c6", "the vector in agent-integration.md");
    }

    #[test]
    fn frames_round_trip_and_hostile_ones_are_refused() {
        for c in [Control::Hello, Control::Prune, Control::IHave(vec![0, u64::MAX, 42]), Control::Graft(vec![7])] {
            assert_eq!(Control::parse(&c.to_text()), Ok(Some(c.clone())), "{}", c.to_text());
        }
        assert_eq!(Control::parse(r#"{"type":"heartbeat"}"#), Ok(None));
        assert_eq!(Control::parse("not json"), Ok(None));
        for bad in [
            r#"{"type":"ihave","ids":["xyz"]}"#,
            r#"{"type":"ihave","ids":["00000000000000000"]}"#,
            r#"{"type":"graft","ids":["+000000000000000"]}"#,
            r#"{"type":"graft","ids":[1]}"#,
            r#"{"type":"prune","ids":{}}"#,
        ] {
            assert!(Control::parse(bad).is_err(), "{bad} passed");
        }
        let many = Control::IHave((0..MAX_IDS as u64 + 1).collect()).to_text();
        assert!(Control::parse(&many).unwrap_err().contains("over"), "an ihave over the bound passed");
        let full = Control::IHave((0..MAX_IDS as u64).map(|i| u64::MAX - i).collect());
        assert_eq!(Control::parse(&full.to_text()), Ok(Some(full)), "a full frame fits the length bound");
    }

    proptest! {
        #[test]
        fn no_text_panics_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Control::parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn no_tree_frame_shape_panics_the_parser(kind in "(tree|ihave|graft|prune)", ids in proptest::collection::vec("[0-9a-fA-F+-]{0,18}", 0..300)) {
            let text = serde_json::json!({"type": kind, "ids": ids}).to_string();
            if let Ok(Some(Control::IHave(got) | Control::Graft(got))) = Control::parse(&text) {
                prop_assert_eq!(got.len(), ids.len());
            }
        }
    }

    #[test]
    fn what_a_peer_announces_is_bounded() {
        let (mut t, now) = (Tree::default(), Instant::now());
        t.attach(1);
        t.attach(2);
        for chunk in (0..(2 * MAX_MISSING) as u64).collect::<Vec<_>>().chunks(MAX_IDS) {
            t.heard(1, Control::IHave(chunk.to_vec()), now, |_| false);
        }
        assert_eq!(t.missing.len(), MAX_MISSING_PER_LINK, "one link starts at most its share");
        assert!(t.links[&1].overflow.is_some(), "what it left out is asked for later");
        t.heard(2, Control::IHave(vec![5, u64::MAX]), now, |_| false);
        assert_eq!(t.missing[&5].announcers.len(), 2, "a second announcer of a waiting id is remembered");
        assert_eq!(t.missing.len(), MAX_MISSING_PER_LINK + 1);
        let asked = t.due(now + GRAFT_AFTER, |_| false);
        let grafted: usize =
            asked.iter().map(|a| if let Action::Send(_, Control::Graft(ids)) = a { ids.len() } else { 0 }).sum();
        assert_eq!(grafted, MAX_MISSING_PER_LINK + 1, "each missing id asked once");
        assert!(!asked.contains(&Action::Ask(1)));
        assert!(t.due(now + 2 * GRAFT_AFTER, |_| false).contains(&Action::Ask(1)), "the overflow is asked for once");
        assert!(t.links[&1].overflow.is_none(), "once");
        for i in 0..(2 * RECENT_COUNT) as u64 {
            t.received(1 << 32 | i, Origin::Local, &Bytes::from(vec![0; 1024]), now);
        }
        assert_eq!(t.recent.len(), RECENT_COUNT);
        t.received(1 << 33, Origin::Local, &Bytes::from(vec![0; RECENT_BYTES]), now);
        assert_eq!(t.recent.len(), RECENT_COUNT, "a payload over a quarter of the store neither stays nor clears it");
        for i in 0..5 {
            t.received(1 << 34 | i, Origin::Local, &Bytes::from(vec![0; RECENT_BYTES / 4]), now);
        }
        assert!(t.recent_bytes <= RECENT_BYTES, "the byte bound holds");
        let kept = 1 << 34 | 4;
        let resent = t.heard(2, Control::Graft(vec![kept; 200]), now, |_| true);
        assert_eq!(resent.len(), 1, "a graft naming one update many times resends it once");
        assert!(t.heard(2, Control::Graft(vec![kept]), now, |_| true).is_empty(), "and never twice on one link");
    }

    /// A simulated fleet: one tree per agent, links as FIFO queues, time advanced by hand.
    #[derive(Debug)]
    enum Msg {
        Update(UpdateId),
        Tree(Control),
        /// A SyncStep1: answered with every update the asker lacks, unless this link had an answer lately.
        Ask(HashSet<UpdateId>),
        /// An update in a SyncStep2.
        Answer(UpdateId),
    }

    struct Fleet {
        trees: Vec<Tree>,
        have: Vec<HashMap<UpdateId, bool>>,
        /// (from, to) → messages in flight, in order.
        wires: BTreeMap<(usize, usize), VecDeque<Msg>>,
        /// (answerer, asker) → when it last answered a SyncStep1: once per `STEP1_INTERVAL`, as the relay.
        answered: HashMap<(usize, usize), Instant>,
        now: Instant,
        pushes: usize,
    }

    fn link(from: usize, to: usize) -> LinkId {
        (from * 1000 + to) as LinkId
    }

    fn peer(at: usize, l: LinkId) -> usize {
        let (a, b) = (l as usize / 1000, l as usize % 1000);
        if a == at { b } else { a }
    }

    fn payload(id: UpdateId) -> Bytes {
        Bytes::copy_from_slice(&id.to_le_bytes())
    }

    impl Fleet {
        fn new(n: usize, edges: &BTreeSet<(usize, usize)>) -> Fleet {
            let mut f = Fleet {
                trees: (0..n).map(|_| Tree::default()).collect(),
                have: vec![HashMap::new(); n],
                wires: BTreeMap::new(),
                answered: HashMap::new(),
                now: Instant::now(),
                pushes: 0,
            };
            for &(a, b) in edges {
                f.trees[a].attach(link(a, b));
                f.trees[b].attach(link(a, b));
                f.wires.insert((a, b), VecDeque::from([Msg::Tree(Control::Hello)]));
                f.wires.insert((b, a), VecDeque::from([Msg::Tree(Control::Hello)]));
                // Each end answered the other's opening SyncStep1 just now.
                f.answered.insert((a, b), f.now);
                f.answered.insert((b, a), f.now);
            }
            f
        }

        fn act(&mut self, at: usize, actions: Vec<Action>, id: Option<UpdateId>) {
            for a in actions {
                let (l, msg) = match a {
                    Action::Push(l) => (l, Msg::Update(id.expect("a push follows a new update"))),
                    Action::Resend(l, p) => (l, Msg::Update(u64::from_le_bytes(p[..].try_into().unwrap()))),
                    Action::Send(l, c) => (l, Msg::Tree(c)),
                    Action::Ask(l) => (l, Msg::Ask(self.have[at].keys().copied().collect())),
                };
                if matches!(msg, Msg::Update(_) | Msg::Answer(_)) {
                    self.pushes += 1;
                }
                if let Some(w) = self.wires.get_mut(&(at, peer(at, l))) {
                    w.push_back(msg);
                }
            }
        }

        /// An update arrives at `at`; `have` notes whether a copy came over the tree, as the relay's seen-cache.
        fn arrive(&mut self, at: usize, id: UpdateId, origin: Origin) {
            let over_tree = matches!(origin, Origin::Mesh(_) | Origin::Local);
            match self.have[at].get(&id) {
                None => {
                    self.have[at].insert(id, over_tree);
                    let actions = self.trees[at].received(id, origin, &payload(id), self.now);
                    self.act(at, actions, Some(id));
                }
                Some(&came_over_tree) => {
                    if let Origin::Mesh(l) = origin {
                        self.have[at].insert(id, true);
                        let actions = self.trees[at].again(id, l, !came_over_tree, self.now);
                        self.act(at, actions, Some(id));
                    }
                }
            }
        }

        fn deliver(&mut self, wire: (usize, usize)) {
            let Some(msg) = self.wires.get_mut(&wire).and_then(VecDeque::pop_front) else { return };
            let (from, at) = wire;
            let l = link(from.min(at), from.max(at));
            match msg {
                Msg::Update(id) => self.arrive(at, id, Origin::Mesh(l)),
                Msg::Tree(c) => {
                    let have = &self.have[at];
                    let actions = self.trees[at].heard(l, c, self.now, |id| have.contains_key(&id));
                    self.act(at, actions, None);
                }
                Msg::Ask(theirs) => {
                    let last = self.answered.get(&(at, from)).copied();
                    if last.is_none_or(|t| self.now >= t + crate::doc::STEP1_INTERVAL) {
                        self.answered.insert((at, from), self.now);
                        let missing: Vec<UpdateId> =
                            self.have[at].keys().filter(|id| !theirs.contains(id)).copied().collect();
                        let w = self.wires.get_mut(&(at, from)).unwrap();
                        w.extend(missing.into_iter().map(Msg::Answer));
                    }
                }
                Msg::Answer(id) => self.arrive(at, id, Origin::Answer(l)),
            }
            let flushed = self.trees[at].flush();
            self.act(at, flushed, None);
        }

        fn close(&mut self, a: usize, b: usize) {
            self.wires.remove(&(a, b));
            self.wires.remove(&(b, a));
            let actions = self.trees[a].detach(link(a, b));
            self.act(a, actions, None);
            let actions = self.trees[b].detach(link(a, b));
            self.act(b, actions, None);
        }

        /// Delivers what is in flight, picking wires with `pick`; then fires the timers, and again, until
        /// nothing is left to do.
        fn settle(&mut self, mut pick: impl FnMut(usize) -> usize) {
            loop {
                while let busy @ 1.. = self.wires.values().filter(|w| !w.is_empty()).count() {
                    let k = pick(busy);
                    let wire = *self.wires.iter().filter(|(_, w)| !w.is_empty()).nth(k % busy).unwrap().0;
                    self.deliver(wire);
                }
                let Some(next) = self.trees.iter().filter_map(Tree::next_due).min() else { return };
                self.now = self.now.max(next);
                for at in 0..self.trees.len() {
                    let have = &self.have[at];
                    let actions = self.trees[at].due(self.now, |id| have.contains_key(&id));
                    self.act(at, actions, None);
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// An agent's own edit.
        Edit(usize),
        /// The rendezvous delivers an update to the agents whose bit is set, then goes.
        Hub(u64),
        /// A link closes (skipped when that would split the fleet).
        Close(usize, usize),
        /// Messages cross wires for a while, in an order drawn from the seed.
        Cross(u64),
        /// Time passes: grafts whose time has come go out, with messages still in flight.
        Tick,
        /// An agent's kept payloads are pushed out (by many or big updates): its grafts find nothing.
        Forget(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0usize..64).prop_map(Step::Edit),
            1 => any::<u64>().prop_map(Step::Hub),
            1 => (0usize..64, 0usize..64).prop_map(|(a, b)| Step::Close(a, b)),
            3 => any::<u64>().prop_map(Step::Cross),
            1 => Just(Step::Tick),
            1 => (0usize..64).prop_map(Step::Forget),
        ]
    }

    /// Picks one of `busy` wires, from a seeded sequence: the order messages cross links in.
    fn picker(mut rng: u64) -> impl FnMut(usize) -> usize {
        move |busy| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) as usize % busy
        }
    }

    fn connected(n: usize, edges: &BTreeSet<(usize, usize)>) -> bool {
        let mut reached = vec![false; n];
        let mut stack = vec![0];
        reached[0] = true;
        while let Some(a) = stack.pop() {
            for &(x, y) in edges.iter().filter(|(x, y)| *x == a || *y == a) {
                let other = if x == a { y } else { x };
                if !std::mem::replace(&mut reached[other], true) {
                    stack.push(other);
                }
            }
        }
        reached.into_iter().all(|r| r)
    }

    fn ring_and_chords(n: usize, chords: &[(usize, usize)]) -> BTreeSet<(usize, usize)> {
        let mut edges: BTreeSet<(usize, usize)> = (0..n).map(|i| (i.min((i + 1) % n), i.max((i + 1) % n))).collect();
        edges.extend(
            chords.iter().map(|&(a, b)| (a % n, b % n)).filter(|(a, b)| a != b).map(|(a, b)| (a.min(b), a.max(b))),
        );
        edges
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn every_update_reaches_every_connected_agent(
            n in 3usize..12,
            chords in proptest::collection::vec((0usize..64, 0usize..64), 0..16),
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let mut edges = ring_and_chords(n, &chords);
            let mut fleet = Fleet::new(n, &edges);
            let mut updates = Vec::new();
            let mut pick = picker(0);
            for s in steps {
                match s {
                    Step::Edit(at) => {
                        let id = updates.len() as u64 + 1;
                        updates.push(id);
                        fleet.arrive(at % n, id, Origin::Local);
                        let flushed = fleet.trees[at % n].flush();
                        fleet.act(at % n, flushed, None);
                    }
                    Step::Hub(reached) => {
                        let id = updates.len() as u64 + 1;
                        updates.push(id);
                        for at in (0..n).filter(|at| reached >> at & 1 == 1) {
                            fleet.arrive(at, id, Origin::Hub);
                            let flushed = fleet.trees[at].flush();
                            fleet.act(at, flushed, None);
                        }
                    }
                    Step::Close(a, b) => {
                        let e = ((a % n).min(b % n), (a % n).max(b % n));
                        let mut after = edges.clone();
                        if after.remove(&e) && connected(n, &after) {
                            edges = after;
                            fleet.close(e.0, e.1);
                        }
                    }
                    Step::Cross(seed) => {
                        pick = picker(seed);
                        for _ in 0..(seed % 20) {
                            let busy: Vec<(usize, usize)> = fleet.wires.iter().filter(|(_, w)| !w.is_empty()).map(|(k, _)| *k).collect();
                            if busy.is_empty() { break; }
                            fleet.deliver(busy[pick(busy.len())]);
                        }
                    }
                    Step::Forget(at) => {
                        let t = &mut fleet.trees[at % n];
                        (t.recent, t.order, t.recent_bytes) = Default::default();
                    }
                    Step::Tick => {
                        fleet.now += GRAFT_AFTER;
                        for at in 0..n {
                            let have = &fleet.have[at];
                            let actions = fleet.trees[at].due(fleet.now, |id| have.contains_key(&id));
                            fleet.act(at, actions, None);
                        }
                    }
                }
            }
            fleet.settle(&mut pick);
            // Hub-only updates that reached nobody exist nowhere: nothing can deliver them.
            let exists: Vec<&u64> = updates.iter().filter(|id| fleet.have.iter().any(|h| h.contains_key(id))).collect();
            for (at, have) in fleet.have.iter().enumerate() {
                for id in &exists {
                    prop_assert!(have.contains_key(*id), "agent {} lacks update {} (links {:?})", at, id, edges);
                }
            }
            for t in &fleet.trees {
                prop_assert!(t.missing.is_empty() && t.timers.is_empty(), "a settled agent still waits: {:?}", t.missing);
            }
        }

        #[test]
        fn a_settled_tree_sends_each_update_once_per_agent(
            n in 3usize..16,
            chords in proptest::collection::vec((0usize..64, 0usize..64), 0..24),
            writers in proptest::collection::vec(0usize..64, 2..8),
            seed: u64,
        ) {
            let edges = ring_and_chords(n, &chords);
            let mut fleet = Fleet::new(n, &edges);
            let mut pick = picker(seed);
            fleet.settle(&mut pick);
            for (i, at) in writers.iter().enumerate() {
                let before = fleet.pushes;
                fleet.arrive(at % n, i as u64 + 1, Origin::Local);
                fleet.settle(&mut pick);
                prop_assert!(fleet.have.iter().all(|h| h.contains_key(&(i as u64 + 1))));
                if i > 0 {
                    prop_assert_eq!(fleet.pushes - before, n - 1, "update {} after the first flood", i + 1);
                }
            }
        }

        #[test]
        fn a_tree_shaped_while_the_rendezvous_is_up_carries_updates_once_it_is_gone(
            n in 3usize..16,
            chords in proptest::collection::vec((0usize..64, 0usize..64), 0..24),
            bursts in proptest::collection::vec(proptest::collection::vec(0usize..64, 1..6), 1..4),
            last in 0usize..64,
            seed: u64,
        ) {
            let edges = ring_and_chords(n, &chords);
            let mut fleet = Fleet::new(n, &edges);
            let mut pick = picker(seed);
            fleet.settle(&mut pick);
            let mut id = 0;
            // Writers at once, each update reaching every agent from the rendezvous before the mesh.
            for burst in &bursts {
                for w in burst {
                    id += 1;
                    fleet.arrive(w % n, id, Origin::Local);
                    for at in (0..n).filter(|at| *at != w % n) {
                        fleet.arrive(at, id, Origin::Hub);
                    }
                }
                fleet.settle(&mut pick);
                fleet.now += KEEP_FIRST * 2;
            }
            // The rendezvous is gone: an update crosses the mesh alone, over eager links only (no timer
            // fires while it does).
            id += 1;
            fleet.arrive(last % n, id, Origin::Local);
            while let busy @ 1.. = fleet.wires.values().filter(|w| !w.is_empty()).count() {
                let wire = *fleet.wires.iter().filter(|(_, w)| !w.is_empty()).nth(pick(busy)).unwrap().0;
                fleet.deliver(wire);
            }
            let lacking: Vec<usize> = (0..n).filter(|at| !fleet.have[*at].contains_key(&id)).collect();
            prop_assert!(lacking.is_empty(), "agents {:?} wait for a graft (links {:?})", lacking, edges);
        }
    }
}
