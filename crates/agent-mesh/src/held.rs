//! Updates the relay holds until what they build on arrives (`crate::nesting`'s `Verdict::Waiting`).
//! yrs would hold them itself and integrate them, unchecked, whenever their dependencies arrive; held
//! here, they are checked again first. Updates arrive out of order only briefly (two paths of unequal
//! speed), so each link may have a few held; past that its oldest are dropped, and an attacker's cost only
//! their own link. A held update is not yet in the seen-cache: another link's copy is held (or applied)
//! on its own, so dropping one never loses the others.
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::doc::LinkId;
use crate::screen::Id;

/// Bytes of updates held for one link; past it the link's oldest are dropped.
pub const HELD_BYTES_PER_LINK: usize = 1 << 20;
/// Updates held for one link; past it the link's oldest are dropped.
pub const HELD_UPDATES_PER_LINK: usize = 256;
/// Missing ids (the latest per client) remembered per held update; it is checked again once these are
/// here, and may wait again. Each counts 16 bytes against the link's budget.
const ANCHORS_KEPT: usize = 1024;
const ANCHOR_BYTES: usize = 16;

struct Waiting {
    bytes: Vec<u8>,
    /// Sorted; those before `cursor` are here already (clocks only grow, so they stay here).
    anchors: Vec<Id>,
    cursor: usize,
    since: Instant,
}

impl Waiting {
    fn cost(&self) -> usize {
        self.bytes.len() + self.anchors.len() * ANCHOR_BYTES
    }

    /// Whether every anchor is here, looking at each at most once after it arrived.
    fn ready(&mut self, here: impl Fn(Id) -> bool) -> bool {
        while self.anchors.get(self.cursor).is_some_and(|&a| here(a)) {
            self.cursor += 1;
        }
        self.cursor == self.anchors.len()
    }
}

#[derive(Default)]
pub struct Held {
    by_link: HashMap<LinkId, (VecDeque<Waiting>, usize)>,
}

impl Held {
    /// Holds `bytes` from `link` until `anchors` are here; returns how many older updates of the link
    /// were dropped to make room (the update itself, if it alone is over the budget).
    pub fn hold(&mut self, link: LinkId, bytes: Vec<u8>, mut anchors: Vec<Id>) -> u64 {
        anchors.truncate(ANCHORS_KEPT);
        let cost = bytes.len() + anchors.len() * ANCHOR_BYTES;
        if cost > HELD_BYTES_PER_LINK {
            return 1;
        }
        let (queue, size) = self.by_link.entry(link).or_default();
        let mut dropped = 0;
        while *size + cost > HELD_BYTES_PER_LINK || queue.len() >= HELD_UPDATES_PER_LINK {
            let Some(old) = queue.pop_front() else { break };
            *size -= old.cost();
            dropped += 1;
        }
        *size += cost;
        queue.push_back(Waiting { bytes, anchors, cursor: 0, since: Instant::now() });
        dropped
    }

    /// Takes a held update whose anchors `here` now knows (of each link's, the oldest first).
    pub fn next_ready(&mut self, here: impl Fn(Id) -> bool) -> Option<(LinkId, Vec<u8>)> {
        let (link, at) = self
            .by_link
            .iter_mut()
            .find_map(|(link, (queue, _))| queue.iter_mut().position(|w| w.ready(&here)).map(|at| (*link, at)))?;
        let (queue, size) = self.by_link.get_mut(&link)?;
        let waiting = queue.remove(at)?;
        *size -= waiting.cost();
        if queue.is_empty() {
            self.by_link.remove(&link);
        }
        Some((link, waiting.bytes))
    }

    /// How long the oldest update `link` holds has waited.
    pub fn oldest(&self, link: LinkId) -> Option<Duration> {
        self.by_link.get(&link)?.0.front().map(|w| w.since.elapsed())
    }

    /// Drops what `link` had held (it closed); returns how many.
    pub fn forget(&mut self, link: LinkId) -> u64 {
        self.by_link.remove(&link).map_or(0, |(queue, _)| queue.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_link_holds_within_its_budget_and_releases_what_is_ready() {
        let mut held = Held::default();
        for i in 0..HELD_UPDATES_PER_LINK as u32 {
            assert_eq!(held.hold(1, vec![0; 8], vec![(9, i)]), 0);
        }
        assert_eq!(held.hold(1, vec![0; 8], vec![(9, 999)]), 1, "the oldest gives way");
        assert_eq!(held.hold(2, vec![0; HELD_BYTES_PER_LINK + 1], vec![]), 1, "too large to hold at all");
        let most = HELD_BYTES_PER_LINK - ANCHOR_BYTES;
        assert_eq!(held.hold(2, vec![0; most], vec![(9, 0)]), 0, "another link's budget");
        assert_eq!(held.hold(2, vec![1], vec![(9, 0)]), 1);
        assert_eq!(held.next_ready(|id| id == (9, 1)), Some((1, vec![0; 8])));
        assert_eq!(held.next_ready(|id| id == (9, 1)), None, "each once");
        assert_eq!(held.next_ready(|id| id == (9, 0)), Some((2, vec![1])), "link 1's (9, 0) gave way");
        assert_eq!(held.forget(1), HELD_UPDATES_PER_LINK as u64 - 1);
        assert_eq!(held.next_ready(|_| true), None);
    }
}
