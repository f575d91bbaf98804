//! How deep shared types nest in the document. yrs deletes a type's contents recursively, a stack frame
//! per level: 5,000 nested maps deleted overflow a 2 MiB stack and abort the process. A peer can build such
//! a nesting in one update or one level per update, so the screen (`crate::screen`), which sees one message,
//! cannot bound it alone. The relay therefore keeps, across updates, the depth of every type it received and
//! of every item that sits at least [`RECORDED_FROM`] levels deep, and refuses an update that would put a
//! type deeper than [`MAX_TYPE_DEPTH`].
//!
//! An item's *container depth* is how many types enclose it (0 under a root type). A type's depth is its
//! item's container depth plus one. An item that names its parent takes the parent type's depth. One
//! inserted beside others (the encoding names only its neighbours) shares a neighbour's container: yrs
//! takes the left one's, or the right one's when the left is collected, so the deeper of the two counts.
//!
//! An item outside the update is looked up: recorded; else held by the document, and then shallower than
//! [`RECORDED_FROM`] (counted as just under it, erring towards refusing); else *missing*. yrs would hold an
//! item that builds on a missing one pending and integrate it, unchecked, whenever the missing one
//! arrives; so such an update gets the verdict [`Verdict::Waiting`], and the relay holds it until what it
//! builds on is here and checks it again.
use std::collections::{BTreeMap, BTreeSet};

use crate::screen::{Id, Item, Parent};

/// Types may nest this deep; an update that would nest one deeper is refused.
pub const MAX_TYPE_DEPTH: u32 = 64;
/// Items this deep or deeper are remembered (types at any depth); others count as `RECORDED_FROM - 1`.
pub const RECORDED_FROM: u32 = 8;

/// Container depths, one per item, from [`Nesting::check`] or [`Nesting::depths`].
pub struct Depths(Vec<u32>);

/// What [`Nesting::check`] found.
pub enum Verdict {
    /// Every item's depth is known and within the bound: apply, then [`Nesting::record`].
    Ready(Depths),
    /// Some items build on these ids, neither in the update nor here yet.
    Waiting(Vec<Id>),
}

/// The container depth of every deep item received, by its range of clocks.
#[derive(Default)]
pub struct Nesting {
    /// (client, first clock) → (end clock, container depth), for types and deep items.
    deep: BTreeMap<Id, (u64, u32)>,
}

impl Nesting {
    /// Checks a received update's items (those the document does not hold yet); `held` says whether the
    /// document holds an id. Refuses an update that would nest a type past the bound, even where a depth
    /// is only a lower bound because something it builds on is missing.
    pub fn check(&self, items: &[Item], held: impl Fn(Id) -> bool) -> Result<Verdict, String> {
        let (depths, missing) = self.depths(items, held);
        for (item, depth) in items.iter().zip(&depths.0) {
            if item.is_type && depth.saturating_add(1) > MAX_TYPE_DEPTH {
                let (client, clock) = item.id;
                return Err(format!(
                    "the type at {client}:{clock} would nest at least {} deep, over {MAX_TYPE_DEPTH}",
                    depth + 1
                ));
            }
        }
        Ok(if missing.is_empty() { Verdict::Ready(depths) } else { Verdict::Waiting(missing) })
    }

    /// The container depth of each item, and the ids they build on that are missing (where one is, the
    /// depths that follow from it are lower bounds, counting it as a root).
    pub fn depths(&self, items: &[Item], held: impl Fn(Id) -> bool) -> (Depths, Vec<Id>) {
        let mut walk = Walk {
            items,
            here: items.iter().enumerate().map(|(i, item)| (item.id, i)).collect(),
            depth: vec![None; items.len()],
            on_path: vec![false; items.len()],
            missing: BTreeSet::new(),
        };
        for start in 0..items.len() {
            walk.resolve(start, |id| self.outside(id, &held));
        }
        let depths = walk.depth.into_iter().map(|d| d.unwrap_or(0)).collect();
        (Depths(depths), walk.missing.into_iter().collect())
    }

    /// Whether the depth under `id` is known: recorded, or held by the document.
    pub fn knows(&self, id: Id, held: impl Fn(Id) -> bool) -> bool {
        self.outside(id, held).is_some()
    }

    /// Remembers the types and deep items of an applied update (or of a local edit, never refused).
    pub fn record(&mut self, items: &[Item], depths: Depths) {
        for (item, depth) in items.iter().zip(depths.0) {
            if depth >= RECORDED_FROM || item.is_type {
                self.deep.insert(item.id, (u64::from(item.id.1) + u64::from(item.len), depth));
            }
        }
    }

    /// The container depth of an item outside the update: recorded, or `RECORDED_FROM - 1` if the
    /// document holds it, or None: missing.
    fn outside(&self, id: Id, held: impl Fn(Id) -> bool) -> Option<u32> {
        let found = self.deep.range(..=id).next_back();
        let covers = |((client, _), (end, _)): &(&Id, &(u64, u32))| *client == id.0 && u64::from(id.1) < *end;
        match found.filter(covers) {
            Some((_, (_, depth))) => Some(*depth),
            None => held(id).then_some(RECORDED_FROM - 1),
        }
    }
}

/// The ids an item's container follows, each with whether it is the parent itself (a level deeper).
fn edges(parent: &Parent) -> impl Iterator<Item = (Id, bool)> {
    let (a, b) = match *parent {
        Parent::Named | Parent::Collected => (None, None),
        Parent::Item(id) => (Some((id, true)), None),
        Parent::Beside { left, right } => (left.map(|l| (l, false)), right.map(|r| (r, false))),
    };
    a.into_iter().chain(b)
}

/// One depth computation over an update's items: a depth-first walk with an explicit stack (a chain of
/// neighbours can be as long as the update).
struct Walk<'a> {
    items: &'a [Item],
    /// This update's items by first clock, for lookups by any clock they cover.
    here: BTreeMap<Id, usize>,
    depth: Vec<Option<u32>>,
    on_path: Vec<bool>,
    missing: BTreeSet<Id>,
}

impl Walk<'_> {
    fn resolve(&mut self, start: usize, outside: impl Fn(Id) -> Option<u32>) {
        let mut stack = vec![start];
        while let Some(&at) = stack.last() {
            if self.depth[at].is_some() {
                stack.pop();
                continue;
            }
            self.on_path[at] = true;
            let unresolved = edges(&self.items[at].parent)
                .filter_map(|(id, _)| self.covering(id))
                .find(|&j| self.depth[j].is_none() && !self.on_path[j]);
            if let Some(j) = unresolved {
                stack.push(j);
                continue;
            }
            let depth = edges(&self.items[at].parent).map(|edge| self.follow(edge, &outside)).max();
            self.depth[at] = Some(depth.unwrap_or(0));
            self.on_path[at] = false;
            stack.pop();
        }
    }

    /// The container depth that following one edge gives, once everything it leads to in the update is
    /// resolved.
    fn follow(&mut self, (id, is_parent): (Id, bool), outside: impl Fn(Id) -> Option<u32>) -> u32 {
        let level = u32::from(is_parent);
        let base = match self.covering(id) {
            // A non-type parent, or a cycle of neighbours, is malformed: yrs never integrates it.
            Some(j) if (is_parent && !self.items[j].is_type) || self.on_path[j] => RECORDED_FROM - 1,
            Some(j) => self.depth[j].unwrap_or(0),
            None => outside(id).unwrap_or_else(|| {
                self.missing.insert(id);
                0
            }),
        };
        base.saturating_add(level)
    }

    fn covering(&self, id: Id) -> Option<usize> {
        let (_, &i) = self.here.range(..=id).next_back()?;
        let item = &self.items[i];
        (item.id.0 == id.0 && u64::from(id.1) < u64::from(item.id.1) + u64::from(item.len.max(1))).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks and records `items` against a document that holds only what `n` recorded, plus client 77.
    fn admit(n: &mut Nesting, items: &[Item]) -> Result<(), String> {
        let held = |id: Id| id.0 == 77;
        match n.check(items, held)? {
            Verdict::Ready(depths) => {
                n.record(items, depths);
                Ok(())
            }
            Verdict::Waiting(missing) => Err(format!("waits for {missing:?}")),
        }
    }

    fn item(id: Id, parent: Parent, is_type: bool) -> Item {
        Item { id, len: 1, parent, is_type }
    }

    fn beside(left: Option<Id>, right: Option<Id>) -> Parent {
        Parent::Beside { left, right }
    }

    /// A chain of `n` maps, each inside the one before, on client `c` from clock `from`, under `top`.
    fn chain(c: u64, from: u32, n: u32, top: Parent) -> Vec<Item> {
        (0..n)
            .map(|i| item((c, from + i), if i == 0 { top.clone() } else { Parent::Item((c, from + i - 1)) }, true))
            .collect()
    }

    #[test]
    fn nesting_is_bounded_within_an_update_and_across_updates() {
        let mut n = Nesting::default();
        assert!(admit(&mut n, &chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)).is_ok());
        // One more level, in another update, under the deepest: refused, and so is a neighbour's child.
        assert!(admit(&mut n, &chain(2, 0, 1, Parent::Item((1, MAX_TYPE_DEPTH - 1)))).is_err());
        let deepest = Some((1, MAX_TYPE_DEPTH - 1));
        let next_to = vec![item((3, 0), beside(deepest, None), true), item((3, 1), Parent::Item((3, 0)), true)];
        assert!(admit(&mut n, &next_to).is_err(), "a type beside the deepest one sits as deep");
        assert!(admit(&mut n, &chain(4, 0, 1, Parent::Item((1, 10)))).is_ok(), "shallower is fine");
        // Built one level per update from the start: refused at the bound all the same.
        let mut m = Nesting::default();
        let mut last = None;
        for level in 0..MAX_TYPE_DEPTH {
            let top = last.map_or(Parent::Named, Parent::Item);
            assert!(admit(&mut m, &chain(9, level, 1, top)).is_ok(), "level {level}");
            last = Some((9, level));
        }
        assert!(admit(&mut m, &chain(9, MAX_TYPE_DEPTH, 1, Parent::Item(last.unwrap()))).is_err());
        // A cycle of neighbours resolves (yrs never integrates it) without looping.
        let cycle =
            vec![item((5, 0), beside(Some((5, 1)), None), false), item((5, 1), beside(Some((5, 0)), None), false)];
        assert!(admit(&mut n, &cycle).is_ok());
    }

    /// yrs files an item under its left neighbour's parent, or its right one's when the left is collected:
    /// the deeper counts, and a collected block adds nothing.
    #[test]
    fn an_item_between_two_neighbours_is_as_deep_as_the_deeper() {
        let mut n = Nesting::default();
        admit(&mut n, &chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)).unwrap();
        let deepest = Some((1, MAX_TYPE_DEPTH - 1));
        let collected = item((2, 0), Parent::Collected, false);
        let between = item((2, 1), beside(Some((2, 0)), deepest), true);
        let inside = item((2, 2), Parent::Item((2, 1)), true);
        assert!(admit(&mut n, &[collected, between, inside]).is_err(), "right of a collected block, by the deepest");
        let shallow = item((3, 1), beside(Some((3, 0)), Some((1, 2))), true);
        assert!(admit(&mut n, &[item((3, 0), Parent::Collected, false), shallow]).is_ok());
    }

    /// An item that builds on what is neither here nor in its update waits; a chain that would pass the
    /// bound even if the missing parent were a root is refused at once.
    #[test]
    fn an_update_that_builds_on_a_missing_item_waits_for_it() {
        let n = Nesting::default();
        let held = |_| false;
        match n.check(&chain(1, 5, 3, Parent::Item((1, 4))), held) {
            Ok(Verdict::Waiting(missing)) => assert_eq!(missing, [(1, 4)]),
            _ => panic!("it should wait for 1:4"),
        }
        assert!(n.check(&chain(1, 5, MAX_TYPE_DEPTH, Parent::Item((1, 4))), held).is_err());
        assert!(!n.knows((1, 4), held));
    }

    /// An item the document holds but this relay did not record counts as just under the recording
    /// depth: a chain under it may add only `MAX_TYPE_DEPTH - RECORDED_FROM` levels.
    #[test]
    fn a_held_unrecorded_parent_counts_as_deep_as_unrecorded_items_can_be() {
        let mut n = Nesting::default();
        let room = MAX_TYPE_DEPTH - RECORDED_FROM;
        assert!(admit(&mut n, &chain(1, 0, room, Parent::Item((77, 0)))).is_ok());
        assert!(admit(&mut n, &chain(2, 0, room + 1, Parent::Item((77, 0)))).is_err());
    }
}
