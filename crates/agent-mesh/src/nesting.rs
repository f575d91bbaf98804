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
//! The check is only as good as its picture of what yrs will do with the update, so the relay hands yrs
//! only updates it integrates completely, in the order modelled here, and nothing it would hold pending
//! and integrate later, unchecked:
//! - the part of an update the document already holds is cut off as yrs cuts it (a block the document
//!   holds the start of continues in the list of its last held unit, whatever parent it names, so the
//!   deeper of the two counts);
//! - every block must continue its client's clocks (no hole before it, no skipped range the document
//!   lacks), every id an item builds on must be in the update or held, and so must every deleted range;
//!   otherwise the verdict is [`Verdict::Waiting`] for those ids, and the relay holds the update;
//! - an update whose items depend on each other in a cycle (counting that a client's blocks integrate in
//!   clock order) is refused: yrs would hold it pending forever.
//!
//! An item the document holds but this relay did not record is shallower than [`RECORDED_FROM`] and
//! counts as just under it, erring towards refusing. The relay checks after each update that yrs held
//! nothing back (`crate::doc`).
use std::collections::BTreeMap;

use crate::screen::{Id, Item, Parent, Shape};

/// Types may nest this deep; an update that would nest one deeper is refused.
pub const MAX_TYPE_DEPTH: u32 = 64;
/// Items this deep or deeper are remembered (types at any depth); others count as `RECORDED_FROM - 1`.
pub const RECORDED_FROM: u32 = 8;

/// An update's items that the document does not hold yet, cut where it holds their start, with their
/// container depths: what to [`Nesting::record`] once it applied.
pub struct Checked {
    items: Vec<Item>,
    depths: Vec<u32>,
}

/// What [`Nesting::check`] found.
pub enum Verdict {
    /// Every item's depth is known and within the bound, and yrs can integrate all of it.
    Ready(Checked),
    /// The update builds on these ids (the latest per client), neither in it nor held by the document yet.
    Waiting(Vec<Id>),
}

/// The container depth of every deep item received, by its range of clocks.
#[derive(Default)]
pub struct Nesting {
    /// (client, first clock) → (end clock, container depth), for types and deep items.
    deep: BTreeMap<Id, (u64, u32)>,
}

impl Nesting {
    /// Checks a received update against the document, which holds each client's clocks below
    /// `clock(client)`. Refuses an update that would nest a type past the bound (even where a depth is
    /// only a lower bound because something it builds on is missing) or that yrs could not integrate.
    pub fn check(&self, shape: &Shape, clock: impl Fn(u64) -> u32) -> Result<Verdict, String> {
        let (items, mut missing) = unheld(shape, &clock);
        let mut walk = Walk::new(&items);
        for start in 0..items.len() {
            walk.resolve(start, |id| self.outside(id, &clock))?;
        }
        missing.extend(walk.missing);
        missing.extend(deleted_beyond(shape, &items, &clock));
        let depths = walk.depth.into_iter().map(|d| d.unwrap_or(0)).collect::<Vec<_>>();
        for (item, depth) in items.iter().zip(&depths) {
            if item.is_type && depth.saturating_add(1) > MAX_TYPE_DEPTH {
                let (client, clock) = item.id;
                return Err(format!(
                    "the type at {client}:{clock} would nest at least {} deep, over {MAX_TYPE_DEPTH}",
                    depth + 1
                ));
            }
        }
        // The document holds a client's clocks up to some point, so the latest missing one per client
        // stands for all of them.
        missing.sort_unstable();
        missing.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                *earlier = *later;
            }
            same
        });
        Ok(if missing.is_empty() { Verdict::Ready(Checked { items, depths }) } else { Verdict::Waiting(missing) })
    }

    /// Records a local edit (never refused, and integrated by construction), given the document's clocks
    /// before it. Returns the deepest type it made, when that is past the bound: peers will refuse it.
    pub fn record_local(&mut self, shape: &Shape, clock: impl Fn(u64) -> u32) -> Option<u32> {
        let (items, _) = unheld(shape, &clock);
        let mut walk = Walk::new(&items);
        for start in 0..items.len() {
            let _ = walk.resolve(start, |id| Some(self.outside(id, &clock).unwrap_or(RECORDED_FROM - 1)));
        }
        let depths: Vec<u32> = walk.depth.into_iter().map(|d| d.unwrap_or(0)).collect();
        let deepest = items.iter().zip(&depths).filter(|(i, _)| i.is_type).map(|(_, d)| d + 1).max();
        self.record(Checked { items, depths }, |_| u32::MAX);
        deepest.filter(|d| *d > MAX_TYPE_DEPTH)
    }

    /// Remembers the types and deep items of an update handed to yrs, of those it integrated: the
    /// document now holds each client's clocks below `clock(client)`. Called even when yrs failed part
    /// way. Returns how many of the update's items yrs did not integrate (0 unless it failed).
    pub fn record(&mut self, checked: Checked, clock: impl Fn(u64) -> u32) -> usize {
        let mut left_out = 0;
        for (item, depth) in checked.items.iter().zip(checked.depths) {
            if item.id.1.saturating_add(item.len) > clock(item.id.0) {
                left_out += 1;
            } else if depth >= RECORDED_FROM || item.is_type {
                self.insert(item.id, u64::from(item.id.1) + u64::from(item.len), depth);
            }
        }
        left_out
    }

    /// Records `[id, end)` at `depth`, extending the record before it when that one ends where this
    /// starts at the same depth (a run of siblings, the common case, costs one record).
    fn insert(&mut self, id: Id, end: u64, depth: u32) {
        if let Some((_, (before_end, d))) = self.deep.range_mut(..id).next_back().filter(|(k, _)| k.0 == id.0)
            && *before_end == u64::from(id.1)
            && *d == depth
        {
            *before_end = end;
            return;
        }
        self.deep.insert(id, (end, depth));
    }

    /// The container depth of an item outside the update: None unless the document holds it; then
    /// recorded, or `RECORDED_FROM - 1`.
    fn outside(&self, id: Id, clock: impl Fn(u64) -> u32) -> Option<u32> {
        if id.1 >= clock(id.0) {
            return None;
        }
        let found = self.deep.range(..=id).next_back();
        let covers = |((client, _), (end, _)): &(&Id, &(u64, u32))| *client == id.0 && u64::from(id.1) < *end;
        Some(found.filter(covers).map_or(RECORDED_FROM - 1, |(_, (_, depth))| *depth))
    }
}

/// The items of `shape` the document does not hold, cut as yrs cuts them, and the ids that must arrive
/// first: the unit before a hole in a client's clocks, or the end of a skipped range the document lacks.
fn unheld(shape: &Shape, clock: impl Fn(u64) -> u32) -> (Vec<Item>, Vec<Id>) {
    let (mut items, mut missing) = (Vec::new(), Vec::new());
    let mut next: Option<Id> = None; // where the previous block of this client ended
    for item in &shape.items {
        let (client, start) = item.id;
        let held = clock(client);
        let end = item.id.1.saturating_add(item.len);
        let expected = next.filter(|n| n.0 == client).map_or(held, |n| n.1.max(held));
        next = Some((client, end.max(expected)));
        if end <= held {
            continue;
        }
        if item.parent == Parent::Skipped || start > expected {
            missing.push((client, if item.parent == Parent::Skipped { end - 1 } else { start - 1 }));
            continue;
        }
        let mut item = item.clone();
        if start < held {
            let left = (client, held - 1);
            item.parent = match item.parent {
                Parent::Item(parent) => Parent::Cut { parent: Some(parent), left, right: None },
                Parent::Beside { right, .. } => Parent::Cut { parent: None, left, right },
                _ => Parent::Cut { parent: None, left, right: None },
            };
            item.len = end - held;
            item.id = (client, held);
        }
        items.push(item);
    }
    (items, missing)
}

/// The last unit of each deleted range that is neither held nor in the update (yrs would hold the
/// deletion pending).
fn deleted_beyond<'a>(shape: &'a Shape, items: &'a [Item], clock: impl Fn(u64) -> u32 + 'a) -> Vec<Id> {
    let mut reach: BTreeMap<u64, u32> = BTreeMap::new();
    for item in items {
        let end = reach.entry(item.id.0).or_insert(0);
        *end = (*end).max(item.id.1.saturating_add(item.len));
    }
    let covered = |(client, last): Id| last < clock(client) || reach.get(&client).is_some_and(|end| last < *end);
    shape.deleted.iter().map(|&((client, at), len)| (client, at + (len - 1))).filter(|&id| !covered(id)).collect()
}

/// The ids an item's container follows, each with whether it is the parent itself (a level deeper).
fn edges(parent: &Parent) -> impl Iterator<Item = (Id, bool)> {
    let (a, b, c) = match *parent {
        Parent::Named | Parent::Collected | Parent::Skipped => (None, None, None),
        Parent::Item(id) => (Some((id, true)), None, None),
        Parent::Beside { left, right } => (left.map(|l| (l, false)), right.map(|r| (r, false)), None),
        Parent::Cut { parent, left, right } => {
            (parent.map(|p| (p, true)), Some((left, false)), right.map(|r| (r, false)))
        }
    };
    a.into_iter().chain(b).chain(c)
}

/// One depth computation over an update's items: a depth-first walk with an explicit stack (a chain of
/// neighbours can be as long as the update). It also follows each item to the block before it of its
/// client, which yrs integrates first, to find cycles.
struct Walk<'a> {
    items: &'a [Item],
    /// This update's items by first clock, for lookups by any clock they cover.
    here: BTreeMap<Id, usize>,
    depth: Vec<Option<u32>>,
    on_path: Vec<bool>,
    missing: Vec<Id>,
}

impl<'a> Walk<'a> {
    fn new(items: &'a [Item]) -> Walk<'a> {
        Walk {
            items,
            here: items.iter().enumerate().map(|(i, item)| (item.id, i)).collect(),
            depth: vec![None; items.len()],
            on_path: vec![false; items.len()],
            missing: Vec::new(),
        }
    }

    fn resolve(&mut self, start: usize, outside: impl Fn(Id) -> Option<u32>) -> Result<(), String> {
        let mut stack = vec![start];
        while let Some(&at) = stack.last() {
            if self.depth[at].is_some() {
                stack.pop();
                continue;
            }
            self.on_path[at] = true;
            let before = (at > 0 && self.items[at - 1].id.0 == self.items[at].id.0).then(|| at - 1);
            let first = edges(&self.items[at].parent).filter_map(|(id, _)| self.covering(id)).chain(before);
            let mut unresolved = None;
            for j in first {
                if self.on_path[j] {
                    let (client, clock) = self.items[at].id;
                    return Err(format!("the item at {client}:{clock} depends on itself"));
                }
                if self.depth[j].is_none() {
                    unresolved = Some(j);
                    break;
                }
            }
            if let Some(j) = unresolved {
                stack.push(j);
                continue;
            }
            let depth = edges(&self.items[at].parent).map(|edge| self.follow(edge, &outside)).max();
            self.depth[at] = Some(depth.unwrap_or(0));
            self.on_path[at] = false;
            stack.pop();
        }
        Ok(())
    }

    /// The container depth that following one edge gives, once everything it leads to in the update is
    /// resolved.
    fn follow(&mut self, (id, is_parent): (Id, bool), outside: impl Fn(Id) -> Option<u32>) -> u32 {
        let base = match self.covering(id) {
            Some(j) => self.depth[j].unwrap_or(0),
            None => outside(id).unwrap_or_else(|| {
                self.missing.push(id);
                0
            }),
        };
        base.saturating_add(u32::from(is_parent))
    }

    fn covering(&self, id: Id) -> Option<usize> {
        let (_, &i) = self.here.range(..=id).next_back()?;
        let item = &self.items[i];
        (item.id.0 == id.0 && u64::from(id.1) < u64::from(item.id.1) + u64::from(item.len.max(1))).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A document as far as nesting goes: what it recorded and the clocks it holds (client 77 holds
    /// 0..100, all unrecorded).
    struct Doc {
        nesting: Nesting,
        clocks: HashMap<u64, u32>,
    }

    impl Doc {
        fn new() -> Doc {
            Doc { nesting: Nesting::default(), clocks: HashMap::from([(77, 100)]) }
        }

        fn check(&self, items: &[Item], deleted: &[(Id, u32)]) -> Result<Verdict, String> {
            let shape = Shape { items: items.to_vec(), deleted: deleted.to_vec() };
            self.nesting.check(&shape, |c| self.clocks.get(&c).copied().unwrap_or(0))
        }

        /// Checks `items` and, if ready, integrates them as yrs would.
        fn admit(&mut self, items: &[Item]) -> Result<(), String> {
            match self.check(items, &[])? {
                Verdict::Ready(checked) => {
                    for item in &checked.items {
                        let end = self.clocks.entry(item.id.0).or_default();
                        *end = (*end).max(item.id.1 + item.len);
                    }
                    let clocks = self.clocks.clone();
                    assert_eq!(self.nesting.record(checked, |c| clocks.get(&c).copied().unwrap_or(0)), 0);
                    Ok(())
                }
                Verdict::Waiting(missing) => Err(format!("waits for {missing:?}")),
            }
        }
    }

    fn waits_for(verdict: Result<Verdict, String>) -> Vec<Id> {
        match verdict {
            Ok(Verdict::Waiting(missing)) => missing,
            Ok(Verdict::Ready(_)) => panic!("ready"),
            Err(e) => panic!("refused: {e}"),
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
        let mut d = Doc::new();
        assert!(d.admit(&chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)).is_ok());
        // One more level, in another update, under the deepest: refused, and so is a neighbour's child.
        assert!(d.admit(&chain(2, 0, 1, Parent::Item((1, MAX_TYPE_DEPTH - 1)))).is_err());
        let deepest = Some((1, MAX_TYPE_DEPTH - 1));
        let next_to = vec![item((3, 0), beside(deepest, None), true), item((3, 1), Parent::Item((3, 0)), true)];
        assert!(d.admit(&next_to).is_err(), "a type beside the deepest one sits as deep");
        assert!(d.admit(&chain(4, 0, 1, Parent::Item((1, 10)))).is_ok(), "shallower is fine");
        // Built one level per update from the start: refused at the bound all the same.
        let mut e = Doc::new();
        let mut last = None;
        for level in 0..MAX_TYPE_DEPTH {
            let top = last.map_or(Parent::Named, Parent::Item);
            assert!(e.admit(&chain(9, level, 1, top)).is_ok(), "level {level}");
            last = Some((9, level));
        }
        assert!(e.admit(&chain(9, MAX_TYPE_DEPTH, 1, Parent::Item(last.unwrap()))).is_err());
    }

    /// yrs files an item under its left neighbour's parent, or its right one's when the left is collected:
    /// the deeper counts, and a collected block adds nothing.
    #[test]
    fn an_item_between_two_neighbours_is_as_deep_as_the_deeper() {
        let mut d = Doc::new();
        d.admit(&chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)).unwrap();
        let deepest = Some((1, MAX_TYPE_DEPTH - 1));
        let collected = item((2, 0), Parent::Collected, false);
        let between = item((2, 1), beside(Some((2, 0)), deepest), true);
        let inside = item((2, 2), Parent::Item((2, 1)), true);
        assert!(d.admit(&[collected, between, inside]).is_err(), "right of a collected block, by the deepest");
        let shallow = item((3, 1), beside(Some((3, 0)), Some((1, 2))), true);
        assert!(d.admit(&[item((3, 0), Parent::Collected, false), shallow]).is_ok());
    }

    /// What an update builds on must be in it or held: an unknown parent, a hole before a client's first
    /// new block, a skipped range and a deleted range the document lacks all make it wait. A chain that
    /// would pass the bound even if the missing parent were a root is refused at once.
    #[test]
    fn an_update_waits_for_what_it_builds_on() {
        let d = Doc::new();
        assert_eq!(waits_for(d.check(&chain(1, 0, 3, Parent::Item((2, 4))), &[])), [(2, 4)]);
        assert!(d.check(&chain(1, 0, MAX_TYPE_DEPTH + 1, Parent::Item((2, 4))), &[]).is_err());
        assert_eq!(waits_for(d.check(&chain(1, 5, 1, Parent::Named), &[])), [(1, 4)], "a hole before clock 5");
        let skipped = [item((1, 0), Parent::Skipped, false), item((1, 1), Parent::Named, false)];
        assert_eq!(waits_for(d.check(&skipped, &[])), [(1, 0)]);
        let deletes = [((1, 0), 1), ((77, 99), 2), ((5, 3), 2)];
        assert_eq!(waits_for(d.check(&chain(1, 0, 1, Parent::Named), &deletes)), [(5, 4), (77, 100)]);
        let two = [item((1, 0), Parent::Item((2, 4)), false), item((1, 1), Parent::Item((2, 9)), false)];
        assert_eq!(waits_for(d.check(&two, &[])), [(2, 9)], "the latest per client");
    }

    /// yrs integrates a client's blocks in clock order: an item whose neighbour is a later block of its
    /// own client (or a cycle through another client) would stay pending forever, so it is refused.
    #[test]
    fn items_that_depend_on_each_other_in_a_cycle_are_refused() {
        let d = Doc::new();
        let forward = [item((5, 0), beside(Some((5, 2)), None), false), item((5, 1), beside(Some((5, 0)), None), true)];
        let forward = [forward.as_slice(), &[item((5, 2), Parent::Named, false)]].concat();
        assert!(d.check(&forward, &[]).is_err());
        let across = [item((1, 0), beside(Some((2, 0)), None), false), item((1, 1), Parent::Named, false)];
        let across = [across.as_slice(), &[item((2, 0), beside(Some((1, 1)), None), false)]].concat();
        assert!(d.check(&across, &[]).is_err());
    }

    /// A block the document holds the start of continues beside its last held unit, whatever parent the
    /// update names for its neighbours.
    #[test]
    fn a_block_cut_where_the_document_holds_it_sits_beside_its_held_part() {
        let mut d = Doc::new();
        d.admit(&chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)).unwrap();
        let under_deepest = Item { id: (5, 0), len: 1, parent: Parent::Item((1, MAX_TYPE_DEPTH - 1)), is_type: false };
        d.admit(&[under_deepest]).unwrap();
        // The same client's block again, now two units long, said to be beside a root item.
        let longer = Item { id: (5, 0), len: 2, parent: beside(Some((77, 0)), None), is_type: false };
        let inside =
            vec![longer, item((5, 2), beside(Some((5, 1)), None), true), item((5, 3), Parent::Item((5, 2)), true)];
        assert!(d.admit(&inside).is_err(), "5:1 continues 5:0, under the deepest type");
        // The same with a root named as the parent: yrs still links 5:1 after 5:0.
        let named = Item { id: (5, 0), len: 2, parent: Parent::Named, is_type: false };
        let inside =
            vec![named, item((5, 2), beside(Some((5, 1)), None), true), item((5, 3), Parent::Item((5, 2)), true)];
        assert!(d.admit(&inside).is_err(), "5:1 continues 5:0 though the update names a root");
    }

    /// A run of siblings is one record; a neighbour at another depth, or after a gap, is a record of
    /// its own, so no depth is ever counted other than it is.
    #[test]
    fn siblings_in_a_run_share_one_record() {
        let mut n = Nesting::default();
        let mut items: Vec<Item> = (0..100).map(|i| item((1, i), Parent::Named, true)).collect();
        items.push(item((1, 100), Parent::Item((1, 99)), true));
        items.push(item((1, 102), Parent::Named, true));
        let depths = (0..100).map(|_| 0).chain([1, 0]).collect();
        n.record(Checked { items, depths }, |_| u32::MAX);
        assert_eq!(n.deep.len(), 3);
        let clock = |_| u32::MAX;
        assert_eq!(n.outside((1, 99), clock), Some(0));
        assert_eq!(n.outside((1, 100), clock), Some(1));
        assert_eq!(n.outside((1, 101), clock), Some(RECORDED_FROM - 1), "unrecorded");
        assert_eq!(n.outside((1, 102), clock), Some(0));
    }

    /// A local edit is recorded whatever it nests, and says when it nests past the bound.
    #[test]
    fn a_local_edit_past_the_bound_is_recorded_and_reported() {
        let mut n = Nesting::default();
        let shape = |items: Vec<Item>| Shape { items, deleted: vec![] };
        assert_eq!(n.record_local(&shape(chain(1, 0, MAX_TYPE_DEPTH, Parent::Named)), |_| 0), None);
        let deeper = shape(chain(1, MAX_TYPE_DEPTH, 2, Parent::Item((1, MAX_TYPE_DEPTH - 1))));
        assert_eq!(n.record_local(&deeper, |c| if c == 1 { MAX_TYPE_DEPTH } else { 0 }), Some(MAX_TYPE_DEPTH + 2));
    }

    /// An item the document holds but this relay did not record counts as just under the recording
    /// depth: a chain under it may add only `MAX_TYPE_DEPTH - RECORDED_FROM` levels.
    #[test]
    fn a_held_unrecorded_parent_counts_as_deep_as_unrecorded_items_can_be() {
        let mut d = Doc::new();
        let room = MAX_TYPE_DEPTH - RECORDED_FROM;
        assert!(d.admit(&chain(1, 0, room, Parent::Item((77, 0)))).is_ok());
        assert!(d.admit(&chain(2, 0, room + 1, Parent::Item((77, 0)))).is_err());
    }
}
