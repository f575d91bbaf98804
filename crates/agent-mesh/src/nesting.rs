//! How deep shared types nest in the document. yrs deletes a type's contents recursively, a stack frame
//! per level: 5,000 nested maps deleted overflow a 2 MiB stack and abort the process. A peer can build such
//! a nesting in one update or one level per update, so the screen (`crate::screen`), which sees one message,
//! cannot bound it alone. The relay therefore keeps, across updates, the depth of every type it received and
//! of every item that sits at least [`RECORDED_FROM`] levels deep, and refuses an update that would put a
//! type deeper than [`MAX_TYPE_DEPTH`].
//!
//! An item's *container depth* is how many types enclose it (0 under a root type). A type's depth is its
//! item's container depth plus one. An item that names its parent takes the parent type's depth; one
//! inserted beside another (the encoding names only its origin) shares that item's container. An item that
//! refers to nothing this relay has recorded (a neighbour that is not a type and sits shallow, or something
//! the agent made itself) counts as just under [`RECORDED_FROM`]: the bound errs towards refusing.
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::screen::{Id, Item, Parent};

/// Types may nest this deep; an update that would nest one deeper is refused.
pub const MAX_TYPE_DEPTH: u32 = 64;
/// Items this deep or deeper are remembered (types at any depth); others count as `RECORDED_FROM - 1`.
pub const RECORDED_FROM: u32 = 8;

/// Container depths by item, from [`Nesting::check`] or [`Nesting::depths`].
pub struct Depths(HashMap<usize, u32>);

/// The container depth of every deep item received, by its range of clocks.
#[derive(Default)]
pub struct Nesting {
    /// (client, first clock) → (end clock, container depth), for types and deep items.
    deep: BTreeMap<Id, (u64, u32)>,
}

impl Nesting {
    /// Checks a received update's items (those the document does not hold yet): the depths to
    /// [`Nesting::record`] once it applied, or why it would nest a type past the bound.
    pub fn check(&self, items: &[Item]) -> Result<Depths, String> {
        let depths = self.depths(items);
        for (i, depth) in &depths.0 {
            if items[*i].is_type && depth + 1 > MAX_TYPE_DEPTH {
                let (client, clock) = items[*i].id;
                return Err(format!(
                    "the type at {client}:{clock} would nest {} deep, over {MAX_TYPE_DEPTH}",
                    depth + 1
                ));
            }
        }
        Ok(depths)
    }

    /// The container depth of each item.
    pub fn depths(&self, items: &[Item]) -> Depths {
        let mut resolved: HashMap<usize, u32> = HashMap::new();
        let here = index(items);
        for start in 0..items.len() {
            self.resolve(items, &here, &mut resolved, start);
        }
        Depths(resolved)
    }

    /// Remembers the types and deep items of an applied update (or of a local edit, never refused).
    pub fn record(&mut self, items: &[Item], depths: Depths) {
        for (i, depth) in depths.0 {
            let item = &items[i];
            if depth >= RECORDED_FROM || item.is_type {
                self.deep.insert(item.id, (u64::from(item.id.1) + u64::from(item.len), depth));
            }
        }
    }

    /// The container depth of `items[start]`, following parents and neighbours through this update and
    /// what is recorded, without recursion (a chain of neighbours can be as long as the update).
    fn resolve(
        &self,
        items: &[Item],
        here: &BTreeMap<Id, usize>,
        resolved: &mut HashMap<usize, u32>,
        start: usize,
    ) -> u32 {
        let mut path: Vec<(usize, bool)> = Vec::new();
        let mut on_path = HashSet::new();
        let mut at = start;
        let base = loop {
            if let Some(d) = resolved.get(&at) {
                break *d;
            }
            if !on_path.insert(at) {
                break RECORDED_FROM - 1; // a cycle of neighbours: malformed; yrs refuses it
            }
            let (next, through_type) = match &items[at].parent {
                Parent::Named => {
                    resolved.insert(at, 0);
                    break 0;
                }
                Parent::Item(id) => (*id, true),
                Parent::Beside(id) => (*id, false),
            };
            path.push((at, through_type));
            match covering(here, items, next) {
                Some(j) if !through_type || items[j].is_type => at = j,
                Some(_) => break RECORDED_FROM - 1,
                None => break self.recorded(next),
            }
        };
        // Unwind: each step through a parent type adds that type's level.
        let mut depth = base;
        for (i, through_type) in path.into_iter().rev() {
            if through_type {
                depth += 1;
            }
            resolved.insert(i, depth);
        }
        resolved[&start]
    }

    /// The container depth of an item outside this update: recorded, or at most `RECORDED_FROM - 1`.
    fn recorded(&self, id: Id) -> u32 {
        let found = self.deep.range(..=id).next_back();
        let covers = |((client, _), (end, _)): &(&Id, &(u64, u32))| *client == id.0 && u64::from(id.1) < *end;
        found.filter(covers).map_or(RECORDED_FROM - 1, |(_, (_, depth))| *depth)
    }
}

/// This update's items by first clock, for lookups by any clock they cover.
fn index(items: &[Item]) -> BTreeMap<Id, usize> {
    items.iter().enumerate().map(|(i, item)| (item.id, i)).collect()
}

fn covering(here: &BTreeMap<Id, usize>, items: &[Item], id: Id) -> Option<usize> {
    let (_, &i) = here.range(..=id).next_back()?;
    let item = &items[i];
    (item.id.0 == id.0 && u64::from(id.1) < u64::from(item.id.1) + u64::from(item.len.max(1))).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Nesting {
        fn admit(&mut self, items: &[Item]) -> Result<(), String> {
            let depths = self.check(items)?;
            self.record(items, depths);
            Ok(())
        }
    }

    fn item(id: Id, parent: Parent, is_type: bool) -> Item {
        Item { id, len: 1, parent, is_type }
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
        assert!(n.admit(&chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)).is_ok());
        // One more level, in another update, under the deepest: refused, and so is a neighbour's child.
        assert!(n.admit(&chain(2, 0, 1, Parent::Item((1, MAX_TYPE_DEPTH - 1)))).is_err());
        let beside =
            vec![item((3, 0), Parent::Beside((1, MAX_TYPE_DEPTH - 1)), true), item((3, 1), Parent::Item((3, 0)), true)];
        assert!(n.admit(&beside).is_err(), "a type beside the deepest one sits as deep");
        assert!(n.admit(&chain(4, 0, 1, Parent::Item((1, 10)))).is_ok(), "shallower is fine");
        // Built one level per update from the start: refused at the bound all the same.
        let mut m = Nesting::default();
        let mut last = None;
        for level in 0..MAX_TYPE_DEPTH {
            let top = last.map_or(Parent::Named, Parent::Item);
            assert!(m.admit(&chain(9, level, 1, top)).is_ok(), "level {level}");
            last = Some((9, level));
        }
        assert!(m.admit(&chain(9, MAX_TYPE_DEPTH, 1, Parent::Item(last.unwrap()))).is_err());
        // A cycle of neighbours resolves (yrs refuses it later) without looping.
        let cycle = vec![item((5, 0), Parent::Beside((5, 1)), false), item((5, 1), Parent::Beside((5, 0)), false)];
        assert!(n.admit(&cycle).is_ok());
    }

    /// An item that refers to nothing recorded counts as just under the recording depth: a chain under an
    /// unknown parent may add only `MAX_TYPE_DEPTH - RECORDED_FROM` levels.
    #[test]
    fn an_unknown_parent_counts_as_deep_as_unrecorded_items_can_be() {
        let mut n = Nesting::default();
        let room = MAX_TYPE_DEPTH - RECORDED_FROM;
        assert!(n.admit(&chain(1, 0, room, Parent::Item((77, 0)))).is_ok());
        assert!(n.admit(&chain(2, 0, room + 1, Parent::Item((77, 0)))).is_err());
    }
}
