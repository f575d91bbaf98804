//! The link table: which links an agent holds, which it should dial next, and whether it admits an inbound
//! one. Pure; the mesh task feeds it events and carries out what it returns.
//!
//! The cap is the lower of the agent's own (`--max-peers`) and the one its assignment carries, so lowering
//! a policy's `maxPeers` lowers it at every agent that reads the new assignment.
//!
//! Invariants, in planned mode (property-tested below, after every event, whatever the order):
//! - **cap**: held links ≤ the cap; a socket opens (a dial starts, an inbound link is admitted) only while
//!   sockets (links held, links being closed, dials in flight) are under the cap. So sockets ≤ the cap,
//!   except just after the cap was lowered, when the links being closed still count until they are gone;
//! - **only planned**: every held link is with a peer the current assignment names (dialed or accepted);
//! - **one link per peer** (held, being closed or being dialed).
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

/// What the agent wants to hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The operator's plan: dial these (node id → URL), accept those, nothing else, and hold no more than
    /// `cap` (when the assignment carries one).
    Planned { dial: BTreeMap<String, String>, accept: BTreeSet<String>, cap: Option<usize> },
    /// The seed's scheme: the alive peers of the presence list, in its order (node id, URL).
    Seed { alive: Vec<(String, String)> },
}

impl Wanted {
    /// No assignment: no links.
    pub fn nothing() -> Self {
        Wanted::Planned { dial: BTreeMap::new(), accept: BTreeSet::new(), cap: None }
    }

    pub fn from_assignment(a: Option<&Assignment>) -> Self {
        match a {
            None => Self::nothing(),
            Some(a) => Wanted::Planned {
                dial: a.peers.iter().map(|p| (p.node_id.clone(), p.url.clone())).collect(),
                accept: a.accepts.iter().cloned().collect(),
                cap: a.max_peers,
            },
        }
    }

    fn keeps(&self, id: &str, dir: Direction) -> bool {
        match self {
            Wanted::Planned { dial, accept, .. } => dial.contains_key(id) || accept.contains(id),
            Wanted::Seed { alive } => dir == Direction::Accepted || alive.iter().any(|(a, _)| a == id),
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
}

impl Table {
    pub fn new(me: String, own: usize) -> Self {
        let (held, closing, dialing) = Default::default();
        Self { me, own, wanted: Wanted::nothing(), held, closing, dialing }
    }

    /// The cap now: the agent's own, or the wish's when that is lower.
    pub fn cap(&self) -> usize {
        match self.wanted {
            Wanted::Planned { cap: Some(c), .. } => c.min(self.own),
            _ => self.own,
        }
    }

    /// Adopts a new wish. Returns the held links to close now; they hold their slots until closed, and
    /// nothing new is dialed into them before. A dial in flight that is no longer wanted is closed when it
    /// ends ([`Table::dial_finished`]). Under a lowered cap, held links past it are closed too (an
    /// assignment the strict reader accepts never names more links than its cap, so only a wish built
    /// otherwise meets this).
    pub fn want(&mut self, wanted: Wanted) -> Vec<(String, Direction)> {
        self.wanted = wanted;
        let wanted = &self.wanted;
        let mut gone: Vec<(String, Direction)> =
            self.held.iter().filter(|(id, d)| !wanted.keeps(id, *d)).cloned().collect();
        let kept = self.held.len() - gone.len();
        let over = kept.saturating_sub(self.cap());
        gone.extend(self.held.iter().filter(|(id, d)| wanted.keeps(id, *d)).rev().take(over).cloned());
        for link in &gone {
            self.held.remove(link);
            self.closing.insert(link.clone());
        }
        gone
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

    /// The peers to dial now, in order, each counted from now as a dial in flight. `ready` says whether a
    /// peer's redial backoff has passed.
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
        out
    }

    /// A dial ended, having opened a socket or not.
    pub fn dial_finished(&mut self, id: &str, opened: bool) -> Finished {
        if !self.dialing.remove(id) || !opened {
            return Finished::Failed;
        }
        let link = (id.to_string(), Direction::Dialed);
        // A dial started under a higher cap may end after it was lowered: it opens only into a free slot
        // (counting every other socket; this one left `dialing` above).
        let why = if !self.wanted.keeps(id, Direction::Dialed) {
            Refusal::Unplanned
        } else if self.count() >= self.cap() {
            Refusal::AtCap
        } else {
            self.held.insert(link);
            return Finished::Keep;
        };
        self.closing.insert(link);
        Finished::Close(why)
    }

    /// Admits an inbound link from `id`, or says why not.
    pub fn admit(&mut self, id: &str) -> Result<(), Refusal> {
        if id == self.me {
            return Err(Refusal::Itself);
        }
        match &self.wanted {
            Wanted::Planned { accept, .. } if !accept.contains(id) => return Err(Refusal::NotPlanned),
            Wanted::Planned { .. } if self.holds(id) => return Err(Refusal::Duplicate),
            Wanted::Planned { .. } if self.count() >= self.cap() => return Err(Refusal::AtCap),
            Wanted::Seed { .. } if self.held.contains(&(id.to_string(), Direction::Accepted)) => {
                return Err(Refusal::Duplicate);
            }
            _ => {}
        }
        self.held.insert((id.to_string(), Direction::Accepted));
        Ok(())
    }

    /// A link's socket is gone (closed from either end).
    pub fn closed(&mut self, id: &str, dir: Direction) {
        let link = (id.to_string(), dir);
        self.held.remove(&link);
        self.closing.remove(&link);
    }

    /// Whether `id` is a peer the agent wants to dial.
    pub fn dials_to(&self, id: &str) -> bool {
        matches!(&self.wanted, Wanted::Planned { dial, .. } if dial.contains_key(id))
            || matches!(&self.wanted, Wanted::Seed { alive } if alive.iter().any(|(a, _)| a == id))
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
        Wanted::Planned {
            dial: dial.iter().map(|d| (d.to_string(), format!("ws://{d}/"))).collect(),
            accept: accept.iter().map(|a| a.to_string()).collect(),
            cap,
        }
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

    #[derive(Clone, Debug)]
    enum Op {
        Want(Vec<u8>, Vec<u8>, Option<usize>),
        Dial,
        Finish(u8, bool),
        Admit(u8),
        Close(u8, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let ids = || proptest::collection::vec(0u8..8, 0..6);
        prop_oneof![
            (ids(), ids(), proptest::option::of(0usize..5)).prop_map(|(d, a, c)| Op::Want(d, a, c)),
            Just(Op::Dial),
            (0u8..8, any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
            (0u8..8).prop_map(Op::Admit),
            (0u8..8, any::<bool>()).prop_map(|(i, d)| Op::Close(i, d)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn the_cap_and_the_plan_hold_after_every_event(own in 0usize..5, ops in proptest::collection::vec(op(), 1..60)) {
            let name = |i: &u8| format!("n{i}");
            let mut t = Table::new("n0".into(), own);
            let mut planned_ids: BTreeSet<String> = BTreeSet::new();
            for op in ops {
                let (before, held_before) = (t.count(), t.held.len());
                match &op {
                    Op::Want(d, a, cap) => {
                        let dial: Vec<String> = d.iter().map(name).collect();
                        let accept: Vec<String> = a.iter().map(name).collect();
                        planned_ids = dial.iter().chain(&accept).cloned().collect();
                        let dial: Vec<&str> = dial.iter().map(String::as_str).collect();
                        let accept: Vec<&str> = accept.iter().map(String::as_str).collect();
                        t.want(capped(&dial, &accept, *cap));
                    }
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
                for (id, _) in t.held() {
                    prop_assert!(planned_ids.contains(id), "{} held but not planned after {:?}", id, op);
                    prop_assert_ne!(id.as_str(), "n0");
                }
                let ids: Vec<&String> = t.held.iter().chain(&t.closing).map(|(i, _)| i).chain(&t.dialing).collect();
                let distinct: BTreeSet<&&String> = ids.iter().collect();
                prop_assert_eq!(ids.len(), distinct.len(), "two sockets with one peer");
            }
        }
    }
}
