//! The link table: which links an agent holds, which it should dial next, and whether it admits an inbound
//! one. Pure; the mesh task feeds it events and carries out what it returns.
//!
//! The cap is the lower of the agent's own (`--max-peers`) and the one its assignment carries, so lowering
//! a policy's `maxPeers` lowers it at every agent that reads the new assignment.
//!
//! Standby links stand in for planned peers the mesh task reports *lost* (no link for a while under this
//! plan). They use only the slots planned peers leave: the standby *room* is the cap less the planned peers
//! that are not lost (each holds its link, or keeps a slot for it). A dialed standby covers one lost peer
//! and goes when that peer is no longer lost; a new plan starts with none lost.
//!
//! Invariants, in planned mode (property-tested below, after every event, whatever the order):
//! - **cap**: held links ≤ the cap; a socket opens (a dial starts, an inbound link is admitted) only while
//!   sockets (links held, links being closed, dials in flight) are under the cap. So sockets ≤ the cap,
//!   except just after the cap was lowered, when the links being closed still count until they are gone;
//! - **only planned**: every held link is with a peer the current assignment names (dialed or accepted),
//!   or a standby: a dialed one covering a lost peer, an accepted one from `standby_accept`;
//! - **standby room**: a standby socket opens only while standby sockets are under the standby room, and
//!   held standby links never exceed it;
//! - **one link per peer** (held, being closed or being dialed), and one dialed standby per lost peer.
//!
//! Sockets still in their handshake are not counted: they hold no link until admitted (at most 64 at once).
//!
//! In seed mode the table reproduces the seed's `MeshManager`: at most `cap` *dialed* links, picked in
//! presence order; inbound links accepted from anyone, uncounted. That is the baseline, not a rule.
use std::collections::{BTreeMap, BTreeSet};

use crate::assignment::Assignment;
use crate::handshake::Refusal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    Dialed,
    Accepted,
}

/// A standby peer: dial `id` at `url` while the planned peer `stands_for` is lost, at `rank` (1 or 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standby {
    pub id: String,
    pub url: String,
    pub stands_for: String,
    pub rank: u8,
}

/// What the agent wants to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The operator's plan: dial these (node id → URL), accept those, nothing else, and hold no more than
    /// `cap` (when the assignment carries one); standbys (best first) and standby accepts in free slots.
    Planned {
        dial: BTreeMap<String, String>,
        accept: BTreeSet<String>,
        cap: Option<usize>,
        standby: Vec<Standby>,
        standby_accept: BTreeSet<String>,
    },
    /// The seed's scheme: the alive peers of the presence list, in its order (node id, URL).
    Seed { alive: Vec<(String, String)> },
}

impl Wanted {
    /// No assignment: no links.
    pub fn nothing() -> Self {
        Self::planned(BTreeMap::new(), BTreeSet::new(), None)
    }

    /// A plan without standbys.
    pub fn planned(dial: BTreeMap<String, String>, accept: BTreeSet<String>, cap: Option<usize>) -> Self {
        Wanted::Planned { dial, accept, cap, standby: Vec::new(), standby_accept: BTreeSet::new() }
    }

    pub fn from_assignment(a: Option<&Assignment>) -> Self {
        match a {
            None => Self::nothing(),
            Some(a) => Wanted::Planned {
                dial: a.peers.iter().map(|p| (p.node_id.to_string(), p.url.to_string())).collect(),
                accept: a.accepts.iter().map(|id| id.to_string()).collect(),
                cap: a.max_peers,
                standby: a
                    .standbys
                    .iter()
                    .map(|s| Standby {
                        id: s.node_id.to_string(),
                        url: s.url.to_string(),
                        stands_for: s.stands_for.to_string(),
                        rank: s.rank,
                    })
                    .collect(),
                standby_accept: a.standby_accepts.iter().map(|id| id.to_string()).collect(),
            },
        }
    }

    /// Whether `id` is a planned peer (seed mode plans none).
    fn plans(&self, id: &str) -> bool {
        matches!(self, Wanted::Planned { dial, accept, .. } if dial.contains_key(id) || accept.contains(id))
    }

    /// The planned peers, in planned mode.
    pub fn planned_ids(&self) -> BTreeSet<&str> {
        match self {
            Wanted::Planned { dial, accept, .. } => dial.keys().chain(accept).map(String::as_str).collect(),
            Wanted::Seed { .. } => BTreeSet::new(),
        }
    }
}

/// What to do with the socket a finished dial opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Keep it: the link is wanted.
    Keep,
    /// It opened but is no longer wanted (`Unplanned`), or the cap was lowered meanwhile and the other
    /// sockets fill it (`AtCap`): close it, saying why (it holds its slot until [`Table::closed`]).
    Close(Refusal),
    /// It failed: nothing to do.
    Failed,
}

/// The slots an agent's sockets occupy. A link being closed and a dial in flight hold their slot until
/// their socket is gone (so "close before dial" holds for sockets, not only for bookkeeping).
#[derive(Debug)]
pub struct Table {
    me: String,
    /// The agent's own cap; the wish may lower it.
    own: usize,
    wanted: Wanted,
    held: BTreeSet<(String, Direction)>,
    closing: BTreeSet<(String, Direction)>,
    dialing: BTreeSet<String>,
    /// Planned peers the mesh task reports lost, each with the worst rank of standby it may use now.
    lost: BTreeMap<String, u8>,
    /// Dialed standbys (in flight or held) → the lost peer each covers.
    covers: BTreeMap<String, String>,
}

impl Table {
    pub fn new(me: String, own: usize) -> Self {
        let (held, closing, dialing, lost, covers) = Default::default();
        Self { me, own, wanted: Wanted::nothing(), held, closing, dialing, lost, covers }
    }

    /// The cap now: the agent's own, or the wish's when that is lower.
    pub fn cap(&self) -> usize {
        match self.wanted {
            Wanted::Planned { cap: Some(c), .. } => c.min(self.own),
            _ => self.own,
        }
    }

    /// Adopts a new wish, with no peer lost. Returns the held links to close now; they hold their slots until
    /// closed, and nothing new is dialed into them before. A dial in flight that is no longer wanted is
    /// closed when it ends ([`Table::dial_finished`]). Under a lowered cap, held links past it are closed too
    /// (an assignment the strict reader accepts never names more links than its cap, so only a wish built
    /// otherwise meets this).
    pub fn want(&mut self, wanted: Wanted) -> Vec<(String, Direction)> {
        self.wanted = wanted;
        self.lost.clear();
        self.covers.clear();
        self.trim()
    }

    /// The planned peers now lost (the mesh task's judgement), each with the worst rank of standby it may
    /// use: rank 2 waits until the rank-1 pairs, dialed from either end, have had their chance. Returns the
    /// held links to close: standbys covering a peer no longer lost, and those over a standby room that shrank.
    pub fn set_lost(&mut self, lost: BTreeMap<String, u8>) -> Vec<(String, Direction)> {
        let planned = self.wanted.planned_ids();
        self.lost = lost.into_iter().filter(|(id, _)| planned.contains(id.as_str())).collect();
        let lost = &self.lost;
        self.covers.retain(|_, p| lost.contains_key(p));
        self.trim()
    }

    /// Moves what the wish no longer keeps, and what is over the cap or the standby room, to closing.
    fn trim(&mut self) -> Vec<(String, Direction)> {
        let mut gone: Vec<(String, Direction)> =
            self.held.iter().filter(|(id, d)| !self.keeps(id, *d)).cloned().collect();
        let kept: Vec<(String, Direction)> = self.held.iter().filter(|(id, d)| self.keeps(id, *d)).cloned().collect();
        let over = kept.len().saturating_sub(self.cap());
        let standbys = kept.iter().filter(|(id, _)| !self.wanted.plans(id)).count();
        let over_room = standbys.saturating_sub(self.standby_room());
        // Past the cap, standbys go first (last in order), then planned links; past the room, standbys.
        let mut order: Vec<&(String, Direction)> = kept.iter().filter(|(id, _)| !self.wanted.plans(id)).rev().collect();
        order.extend(kept.iter().filter(|(id, _)| self.wanted.plans(id)).rev());
        gone.extend(order.into_iter().take(over.max(over_room)).cloned());
        for link in &gone {
            self.held.remove(link);
            self.closing.insert(link.clone());
            if link.1 == Direction::Dialed {
                self.covers.remove(&link.0);
            }
        }
        gone
    }

    /// Whether the wish keeps a held link: planned, or a standby (dialed covering a lost peer, or accepted).
    fn keeps(&self, id: &str, dir: Direction) -> bool {
        match &self.wanted {
            Wanted::Planned { standby_accept, .. } => {
                self.wanted.plans(id)
                    || match dir {
                        Direction::Dialed => self.covers.contains_key(id),
                        Direction::Accepted => standby_accept.contains(id),
                    }
            }
            Wanted::Seed { alive } => dir == Direction::Accepted || alive.iter().any(|(a, _)| a == id),
        }
    }

    /// Slots standby sockets may hold: the cap less the planned peers that are not lost.
    pub fn standby_room(&self) -> usize {
        let planned = self.wanted.planned_ids();
        let standing = planned.iter().filter(|id| !self.lost.contains_key(**id)).count();
        self.cap().saturating_sub(standing)
    }

    /// Sockets (held, closing, dialing) with peers the wish does not plan.
    fn standby_sockets(&self) -> usize {
        let links = self.held.iter().chain(&self.closing).filter(|(id, _)| !self.wanted.plans(id)).count();
        links + self.dialing.iter().filter(|id| !self.wanted.plans(id)).count()
    }

    fn holds(&self, id: &str) -> bool {
        self.held.iter().chain(&self.closing).any(|(h, _)| h == id) || self.dialing.contains(id)
    }

    fn dialed(&self) -> usize {
        let open = self.held.iter().chain(&self.closing).filter(|(_, d)| *d == Direction::Dialed).count();
        open + self.dialing.len()
    }

    /// Sockets this agent has: links held, links being closed, dials in flight.
    pub fn count(&self) -> usize {
        self.held.len() + self.closing.len() + self.dialing.len()
    }

    /// The peers to dial now, in order, each counted from now as a dial in flight: planned peers, then
    /// standbys for lost peers no standby covers yet, best first. `ready` says whether a peer's redial
    /// backoff has passed.
    pub fn dials(&mut self, ready: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let candidates: Vec<(String, String)> = match &self.wanted {
            Wanted::Planned { dial, .. } => dial.iter().map(|(i, u)| (i.clone(), u.clone())).collect(),
            Wanted::Seed { alive } => alive.clone(),
        };
        let seed = matches!(self.wanted, Wanted::Seed { .. });
        let mut out = Vec::new();
        for (id, url) in candidates {
            let room = if seed { self.dialed() < self.own } else { self.count() < self.cap() };
            if !room {
                break;
            }
            let dialed_link = (id.clone(), Direction::Dialed);
            let taken = if seed {
                self.dialing.contains(&id) || self.held.contains(&dialed_link) || self.closing.contains(&dialed_link)
            } else {
                self.holds(&id)
            };
            if id != self.me && !taken && ready(&id) {
                self.dialing.insert(id.clone());
                out.push((id, url));
            }
        }
        out.extend(self.standby_dials(ready));
        out
    }

    fn standby_dials(&mut self, ready: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let Wanted::Planned { standby, .. } = &self.wanted else { return Vec::new() };
        let mut out = Vec::new();
        for s in standby {
            let room = self.count() < self.cap() && self.standby_sockets() < self.standby_room();
            if !room {
                break;
            }
            let covered = self.covers.values().any(|p| *p == s.stands_for);
            let usable = s.id != self.me && !self.wanted.plans(&s.id) && !self.holds(&s.id) && ready(&s.id);
            let lost = self.lost.get(&s.stands_for).is_some_and(|worst| s.rank <= *worst);
            if lost && !covered && usable {
                self.dialing.insert(s.id.clone());
                self.covers.insert(s.id.clone(), s.stands_for.clone());
                out.push((s.id.clone(), s.url.clone()));
            }
        }
        out
    }

    /// A dial ended, having opened a socket or not.
    pub fn dial_finished(&mut self, id: &str, opened: bool) -> Finished {
        if !self.dialing.remove(id) || !opened {
            self.covers.remove(id);
            return Finished::Failed;
        }
        let link = (id.to_string(), Direction::Dialed);
        // A dial started under a higher cap may end after it was lowered: it opens only into a free slot
        // (counting every other socket; this one left `dialing` above). A standby's room may have shrunk too.
        let why = if !self.keeps(id, Direction::Dialed) {
            Refusal::Unplanned
        } else if self.count() >= self.cap()
            || (!self.wanted.plans(id) && self.standby_sockets() >= self.standby_room())
        {
            Refusal::AtCap
        } else {
            self.held.insert(link);
            return Finished::Keep;
        };
        self.covers.remove(id);
        self.closing.insert(link);
        Finished::Close(why)
    }

    /// Admits an inbound link from `id`, or says why not.
    pub fn admit(&mut self, id: &str) -> Result<(), Refusal> {
        if id == self.me {
            return Err(Refusal::Itself);
        }
        match &self.wanted {
            Wanted::Planned { accept, standby_accept, .. } => {
                let planned = accept.contains(id);
                if !planned && !standby_accept.contains(id) {
                    return Err(Refusal::NotPlanned);
                }
                if self.holds(id) {
                    return Err(Refusal::Duplicate);
                }
                if self.count() >= self.cap() || (!planned && self.standby_sockets() >= self.standby_room()) {
                    return Err(Refusal::AtCap);
                }
            }
            Wanted::Seed { .. } if self.held.contains(&(id.to_string(), Direction::Accepted)) => {
                return Err(Refusal::Duplicate);
            }
            Wanted::Seed { .. } => {}
        }
        self.held.insert((id.to_string(), Direction::Accepted));
        Ok(())
    }

    /// A link's socket is gone (closed from either end).
    pub fn closed(&mut self, id: &str, dir: Direction) {
        let link = (id.to_string(), dir);
        if self.held.remove(&link) && dir == Direction::Dialed {
            self.covers.remove(id);
        }
        self.closing.remove(&link);
    }

    /// Whether `id` is a peer the agent wants to dial: planned, or a standby.
    pub fn dials_to(&self, id: &str) -> bool {
        match &self.wanted {
            Wanted::Planned { dial, standby, .. } => dial.contains_key(id) || standby.iter().any(|s| s.id == id),
            Wanted::Seed { alive } => alive.iter().any(|(a, _)| a == id),
        }
    }

    /// Whether `id` is a planned peer.
    pub fn plans(&self, id: &str) -> bool {
        self.wanted.plans(id)
    }

    /// Whether a link with `id` is a standby: in planned mode, with a peer the plan does not name.
    pub fn is_standby(&self, id: &str) -> bool {
        matches!(self.wanted, Wanted::Planned { .. }) && !self.wanted.plans(id)
    }

    /// The planned peers this agent dials that hold no socket: blocked, lost or backing off.
    pub fn undialed(&self) -> Vec<(String, String)> {
        match &self.wanted {
            Wanted::Planned { dial, .. } => {
                dial.iter().filter(|(id, _)| !self.holds(id)).map(|(i, u)| (i.clone(), u.clone())).collect()
            }
            Wanted::Seed { .. } => Vec::new(),
        }
    }

    pub fn held(&self) -> impl Iterator<Item = &(String, Direction)> {
        self.held.iter()
    }

    /// Whether the link is held (open and wanted, not being closed).
    pub fn holds_link(&self, id: &str, dir: Direction) -> bool {
        self.held.contains(&(id.to_string(), dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn planned(dial: &[&str], accept: &[&str]) -> Wanted {
        capped(dial, accept, None)
    }

    fn capped(dial: &[&str], accept: &[&str], cap: Option<usize>) -> Wanted {
        Wanted::planned(
            dial.iter().map(|d| (d.to_string(), format!("ws://{d}/"))).collect(),
            accept.iter().map(|a| a.to_string()).collect(),
            cap,
        )
    }

    #[test]
    fn table_of_admissions() {
        let mut t = Table::new("me".into(), 2);
        t.want(planned(&["a"], &["b", "c"]));
        assert_eq!(t.admit("me"), Err(Refusal::Itself));
        assert_eq!(t.admit("x"), Err(Refusal::NotPlanned));
        assert_eq!(t.admit("a"), Err(Refusal::NotPlanned), "a is dialed, not accepted");
        assert_eq!(t.dials(|_| true), vec![("a".to_string(), "ws://a/".to_string())]);
        assert_eq!(t.admit("b"), Ok(()));
        assert_eq!(t.admit("b"), Err(Refusal::Duplicate));
        assert_eq!(t.admit("c"), Err(Refusal::AtCap), "the dial in flight holds a slot");
        assert_eq!(t.dial_finished("a", false), Finished::Failed);
        assert_eq!(t.admit("c"), Ok(()));
        assert!(t.dials(|_| true).is_empty(), "no room left for a");
    }

    #[test]
    fn a_new_plan_closes_before_it_dials_and_keeps_a_link_whose_direction_flipped() {
        let mut t = Table::new("me".into(), 2);
        t.want(planned(&["a"], &["b"]));
        t.dials(|_| true);
        assert_eq!(t.dial_finished("a", true), Finished::Keep);
        t.admit("b").unwrap();
        let gone = t.want(planned(&["c"], &["a"]));
        assert_eq!(gone, vec![("b".to_string(), Direction::Accepted)]);
        assert!(t.dials(|_| true).is_empty(), "b's socket still holds the slot");
        t.closed("b", Direction::Accepted);
        assert_eq!(t.dials(|_| true), vec![("c".to_string(), "ws://c/".to_string())]);
    }

    #[test]
    fn a_closing_link_holds_its_slot_until_it_is_gone() {
        let mut t = Table::new("me".into(), 1);
        t.want(planned(&["a"], &[]));
        t.dials(|_| true);
        t.dial_finished("a", true);
        assert_eq!(t.want(planned(&["b"], &["c"])), vec![("a".to_string(), Direction::Dialed)]);
        assert!(t.dials(|_| true).is_empty(), "b dialed while the link to a is still open");
        assert_eq!(t.admit("c"), Err(Refusal::AtCap));
        t.closed("a", Direction::Dialed);
        assert_eq!(t.dials(|_| true).len(), 1);
    }

    #[test]
    fn an_abandoned_dial_holds_its_slot_until_it_ends() {
        let mut t = Table::new("me".into(), 1);
        t.want(planned(&["a"], &[]));
        t.dials(|_| true);
        t.want(planned(&["b"], &[]));
        assert!(t.dials(|_| true).is_empty(), "b dialed while the dial to a may still open a socket");
        assert_eq!(
            t.dial_finished("a", true),
            Finished::Close(Refusal::Unplanned),
            "an opened, unwanted dial is closed"
        );
        assert!(t.dials(|_| true).is_empty(), "its socket is still open");
        t.closed("a", Direction::Dialed);
        assert_eq!(t.dials(|_| true).len(), 1);
        // Wanted again before it ended: the dial in flight is the link, no second dial.
        let mut t = Table::new("me".into(), 2);
        t.want(planned(&["a"], &[]));
        t.dials(|_| true);
        t.want(planned(&[], &[]));
        t.want(planned(&["a"], &[]));
        assert!(t.dials(|_| true).is_empty());
        assert_eq!(t.dial_finished("a", true), Finished::Keep);
    }

    #[test]
    fn a_lowered_cap_opens_nothing_until_the_sockets_are_under_it() {
        let mut t = Table::new("me".into(), 4);
        t.want(capped(&["a", "b"], &["c", "d"], Some(4)));
        assert_eq!(t.dials(|_| true).len(), 2);
        t.dial_finished("a", true);
        t.dial_finished("b", true);
        t.admit("c").unwrap();
        t.admit("d").unwrap();
        // The policy's maxPeers goes from 4 to 2: a and c stay planned, b and d go.
        let gone = t.want(capped(&["a", "e"], &["c"], Some(2)));
        assert_eq!(gone.len(), 2);
        assert_eq!(t.cap(), 2);
        assert_eq!(t.admit("c"), Err(Refusal::Duplicate));
        t.closed("b", Direction::Dialed);
        assert!(t.dials(|_| true).is_empty(), "a, c and d's closing socket fill the cap of 2");
        t.closed("d", Direction::Accepted);
        assert!(t.dials(|_| true).is_empty(), "a and c are the cap");
        // A dial in flight when the cap drops opens only into a free slot.
        let mut t = Table::new("me".into(), 4);
        t.want(capped(&["a", "b", "c", "d"], &[], Some(4)));
        assert_eq!(t.dials(|_| true).len(), 4);
        for id in ["a", "b", "c"] {
            t.dial_finished(id, true);
        }
        t.want(capped(&["a", "d"], &[], Some(2)));
        assert_eq!(t.dial_finished("d", true), Finished::Close(Refusal::AtCap), "a, b and c's sockets fill the cap");
        // The agent's own cap bounds a raised one.
        let mut t = Table::new("me".into(), 1);
        t.want(capped(&["a", "b"], &[], Some(8)));
        assert_eq!((t.cap(), t.dials(|_| true).len()), (1, 1));
    }

    #[test]
    fn seed_mode_dials_the_first_alive_and_accepts_everyone() {
        let mut t = Table::new("me".into(), 2);
        let alive = ["me", "p", "q", "r"].iter().map(|i| (i.to_string(), format!("ws://{i}/"))).collect();
        t.want(Wanted::Seed { alive });
        let ids: Vec<String> = t.dials(|_| true).into_iter().map(|(i, _)| i).collect();
        assert_eq!(ids, ["p", "q"]);
        for i in 0..10 {
            assert_eq!(t.admit(&format!("in{i}")), Ok(()));
        }
        assert_eq!(t.admit("p"), Ok(()), "the seed links twice to a peer that dials it back");
    }

    fn with_standbys(wanted: Wanted, entries: &[(&str, &str)], accepts: &[&str]) -> Wanted {
        let Wanted::Planned { dial, accept, cap, .. } = wanted else { unreachable!() };
        let standby = entries
            .iter()
            .enumerate()
            .map(|(i, (id, p))| Standby {
                id: id.to_string(),
                url: format!("ws://{id}/"),
                stands_for: p.to_string(),
                rank: if i % 3 == 2 { 2 } else { 1 },
            })
            .collect();
        Wanted::Planned { dial, accept, cap, standby, standby_accept: accepts.iter().map(|a| a.to_string()).collect() }
    }

    fn lost(ids: &[&str]) -> BTreeMap<String, u8> {
        ids.iter().map(|i| (i.to_string(), 2)).collect()
    }

    #[test]
    fn a_standby_takes_a_lost_peers_slot_and_gives_it_back() {
        let mut t = Table::new("me".into(), 2);
        t.want(with_standbys(planned(&["a"], &["b"]), &[("x", "a"), ("y", "a"), ("z", "b")], &["w"]));
        assert_eq!(t.dials(|_| true), vec![("a".to_string(), "ws://a/".to_string())]);
        t.dial_finished("a", false);
        t.admit("b").unwrap();
        assert_eq!(t.admit("w"), Err(Refusal::AtCap), "no planned peer is lost: no standby room");
        assert!(t.dials(|id| id != "a").is_empty(), "a is backing off, not lost");
        t.set_lost(lost(&["a"]));
        assert_eq!(t.standby_room(), 1);
        assert_eq!(t.dials(|id| id != "a"), vec![("x".to_string(), "ws://x/".to_string())], "the best standby for a");
        assert_eq!(t.dial_finished("x", false), Finished::Failed);
        assert_eq!(
            t.dials(|id| id != "a" && id != "x"),
            vec![("y".to_string(), "ws://y/".to_string())],
            "then the next"
        );
        assert_eq!(t.dial_finished("y", true), Finished::Keep);
        assert_eq!(t.admit("w"), Err(Refusal::AtCap), "y fills the room a left");
        assert!(t.dials(|_| true).is_empty(), "the cap is full: a is probed, not dialed");
        // a shows a sign of life: y gives way, and a is dialed into the slot once y's socket is gone.
        assert_eq!(t.set_lost(lost(&[])), vec![("y".to_string(), Direction::Dialed)]);
        assert!(t.dials(|_| true).is_empty());
        t.closed("y", Direction::Dialed);
        assert_eq!(t.dials(|_| true), vec![("a".to_string(), "ws://a/".to_string())]);
    }

    #[test]
    fn an_accepted_standby_gives_way_when_the_lost_peer_returns_and_a_new_plan_ends_standbys() {
        let mut t = Table::new("me".into(), 2);
        t.want(with_standbys(planned(&["a"], &["b"]), &[("x", "b")], &["w"]));
        t.dials(|_| true);
        t.dial_finished("a", true);
        t.set_lost(lost(&["b"]));
        assert_eq!(t.admit("w"), Ok(()), "b is lost: its slot takes a standby");
        assert_eq!(t.admit("v"), Err(Refusal::NotPlanned));
        assert!(t.dials(|_| true).is_empty(), "w took the room: x is not dialed");
        assert_eq!(t.admit("b"), Err(Refusal::AtCap), "b returns into a full table");
        assert_eq!(t.set_lost(lost(&[])), vec![("w".to_string(), Direction::Accepted)], "the standby gives way");
        t.closed("w", Direction::Accepted);
        assert_eq!(t.admit("b"), Ok(()));
        // A new plan: no peer is lost, dialed standbys close.
        let mut t = Table::new("me".into(), 3);
        t.want(with_standbys(planned(&["a"], &[]), &[("x", "a")], &[]));
        t.set_lost(lost(&["a"]));
        assert_eq!(t.dials(|id| id != "a"), vec![("x".to_string(), "ws://x/".to_string())]);
        t.dial_finished("x", true);
        let gone = t.want(with_standbys(planned(&["a"], &[]), &[("x", "a")], &[]));
        assert_eq!(gone, vec![("x".to_string(), Direction::Dialed)]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Want(Vec<u8>, Vec<u8>, Option<usize>, Vec<(u8, u8)>, Vec<u8>),
        Lost(Vec<(u8, u8)>),
        Dial,
        Finish(u8, bool),
        Admit(u8),
        Close(u8, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let ids = || proptest::collection::vec(0u8..10, 0..6);
        let standbys = proptest::collection::vec((0u8..10, 0u8..10), 0..6);
        prop_oneof![
            (ids(), ids(), proptest::option::of(0usize..5), standbys, ids())
                .prop_map(|(d, a, c, s, sa)| Op::Want(d, a, c, s, sa)),
            proptest::collection::vec((0u8..10, 1u8..3), 0..6).prop_map(Op::Lost),
            Just(Op::Dial),
            (0u8..10, any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
            (0u8..10).prop_map(Op::Admit),
            (0u8..10, any::<bool>()).prop_map(|(i, d)| Op::Close(i, d)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn the_cap_and_the_plan_hold_after_every_event(own in 0usize..5, ops in proptest::collection::vec(op(), 1..60)) {
            let name = |i: &u8| format!("n{i}");
            let names = |ids: &[u8]| ids.iter().map(name).collect::<Vec<_>>();
            let mut t = Table::new("n0".into(), own);
            for op in ops {
                let (before, held_before) = (t.count(), t.held.len());
                let standby_before = t.standby_sockets();
                match &op {
                    Op::Want(d, a, cap, s, sa) => {
                        let (dial, accept, sa) = (names(d), names(a), names(sa));
                        let dial: Vec<&str> = dial.iter().map(String::as_str).collect();
                        let accept: Vec<&str> = accept.iter().map(String::as_str).collect();
                        let entries: Vec<(String, String)> = s.iter().map(|(i, p)| (name(i), name(p))).collect();
                        let entries: Vec<(&str, &str)> = entries.iter().map(|(i, p)| (i.as_str(), p.as_str())).collect();
                        let sa: Vec<&str> = sa.iter().map(String::as_str).collect();
                        t.want(with_standbys(capped(&dial, &accept, *cap), &entries, &sa));
                    }
                    Op::Lost(ids) => { t.set_lost(ids.iter().map(|(i, r)| (name(i), *r)).collect()); }
                    Op::Dial => { t.dials(|_| true); }
                    Op::Finish(i, ok) => { t.dial_finished(&name(i), *ok); }
                    Op::Admit(i) => { let _ = t.admit(&name(i)); }
                    Op::Close(i, d) => t.closed(&name(i), if *d { Direction::Dialed } else { Direction::Accepted }),
                }
                let cap = t.cap();
                prop_assert!(cap <= own);
                prop_assert!(t.held.len() <= cap, "more links held than the cap after {:?}: {:?}", op, t);
                prop_assert!(t.count() <= cap || t.count() <= before, "a socket opened over the cap after {:?}: {:?}", op, t);
                prop_assert!(t.held.len() <= held_before || t.count() <= cap, "a link opened while over the cap after {:?}: {:?}", op, t);
                let Wanted::Planned { standby_accept, .. } = &t.wanted else { unreachable!() };
                for (id, dir) in t.held() {
                    let standby = match dir {
                        Direction::Dialed => t.covers.get(id).is_some_and(|p| t.lost.contains_key(p)),
                        Direction::Accepted => standby_accept.contains(id),
                    };
                    prop_assert!(t.plans(id) || standby, "{} held but neither planned nor a standby after {:?}", id, op);
                    prop_assert_ne!(id.as_str(), "n0");
                }
                let held_standbys = t.held.iter().filter(|(id, _)| !t.plans(id)).count();
                prop_assert!(held_standbys <= t.standby_room(), "standby links over the room after {:?}: {:?}", op, t);
                let standby_now = t.standby_sockets();
                // A new wish or loss only closes; a socket it no longer plans counts as a standby's from then.
                let opens = matches!(op, Op::Dial | Op::Admit(_) | Op::Finish(..));
                prop_assert!(!opens || standby_now <= t.standby_room() || standby_now <= standby_before, "a standby opened over the room after {:?}: {:?}", op, t);
                let covered: Vec<&String> = t.covers.values().collect();
                let distinct: BTreeSet<&&String> = covered.iter().collect();
                prop_assert_eq!(covered.len(), distinct.len(), "one lost peer covered twice: {:?}", t);
                prop_assert!(t.covers.values().all(|p| t.lost.contains_key(p)), "a standby covers a peer not lost: {:?}", t);
                let ids: Vec<&String> = t.held.iter().chain(&t.closing).map(|(i, _)| i).chain(&t.dialing).collect();
                let distinct: BTreeSet<&&String> = ids.iter().collect();
                prop_assert_eq!(ids.len(), distinct.len(), "two sockets with one peer");
            }
        }
    }
}
