//! Screens every message a peer sends before the CRDT decoder sees it.
//!
//! yrs decodes nested values recursively and reserves whatever a count declares. So a 16 KB value nested
//! 8,000 deep overflows the stack (an abort no `catch_unwind` stops), and an 8-byte state vector that
//! declares 268 million entries reserves hundreds of MiB. This module walks the lib0 v1 encoding the way
//! yrs 0.28 reads it, without allocating, and passes a message only when:
//! - it is a sync message (SyncStep1, SyncStep2 or Update); awareness, auth and custom messages are
//!   refused unread;
//! - every declared count fits the bytes that remain (each entry takes at least one byte);
//! - values nest at most [`MAX_DEPTH`] deep;
//! - what yrs would build from it is estimated at most [`MAX_DECODED_BYTES`] (yrs spends far more per
//!   struct than the struct's bytes on the wire);
//! - it ends exactly where its encoding says.
//!
//! The walk mirrors yrs where yrs differs from Yjs (a JSON content of length n holds n + 1 strings), so
//! both read the same structure. docs/design.md §3.5 states these bounds.

/// How deep values may nest (arrays and maps inside `Any` values).
pub const MAX_DEPTH: usize = 64;
/// The most memory yrs may be estimated to spend decoding one message.
pub const MAX_DECODED_BYTES: u64 = 24 << 20;

/// What yrs allocates per decoded thing, rounded up from the sizes of its types (an `Item` box with its
/// parent and content, a block slot, an `Any`, a delete range). Checked by the hostile-frame test's
/// counting allocator.
const ITEM_COST: u64 = 320;
/// A block's slot in the update and again in the document's block store.
const BLOCK_COST: u64 = 128;
/// A subdocument: yrs builds a whole `Doc` (store, options, observers) for each; measured at about 1,140
/// bytes with its item and block.
const SUBDOC_COST: u64 = 1024;
const RANGE_COST: u64 = 48;
const ANY_COST: u64 = 48;
const ENTRY_COST: u64 = 64;
/// A `String` in a JSON content (yrs reserves what the count says, then may double it).
const JSON_STRING_COST: u64 = 96;
/// Per byte of a string yrs parses as JSON into an `Any` (embeds and formats): `[0,0,…]` is one value
/// every two bytes.
const PARSED_JSON_BYTE_COST: u64 = 32;

/// The kind of a message that passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A state vector: the peer asks for what it misses.
    Step1,
    /// The answer to a SyncStep1: an update.
    Step2,
    Update,
}

/// Why a message was refused; `at` is the byte offset in the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("message type {0} is not sync (only sync messages are read)")]
    NotSync(u64),
    #[error("sync message type {0} is unknown")]
    UnknownSync(u64),
    #[error("the message ends early at byte {at}")]
    Truncated { at: usize },
    #[error("a number overflows at byte {at}")]
    Overflow { at: usize },
    #[error("{what} declares {count} entries with {left} bytes left at byte {at}")]
    Count { what: &'static str, count: u64, left: usize, at: usize },
    #[error("values nest deeper than {MAX_DEPTH} at byte {at}")]
    TooDeep { at: usize },
    #[error("{what} {value} is unknown at byte {at}")]
    Unknown { what: &'static str, value: u64, at: usize },
    #[error("a string is not UTF-8 at byte {at}")]
    Utf8 { at: usize },
    #[error("{what} overflows a clock at byte {at}")]
    Clock { what: &'static str, at: usize },
    #[error("decoding would take about {estimate} bytes, over {MAX_DECODED_BYTES}")]
    TooLarge { estimate: u64 },
    #[error("{left} bytes follow the end of the message")]
    Trailing { left: usize },
    #[error("{what} of one client are listed twice")]
    Repeated { what: &'static str },
}

/// Checks one link message (a binary WebSocket frame).
pub fn screen(bytes: &[u8]) -> Result<Kind, Refused> {
    estimate(bytes).map(|(kind, _)| kind)
}

/// [`screen`], with what yrs is estimated to allocate decoding the message.
pub fn estimate(bytes: &[u8]) -> Result<(Kind, u64), Refused> {
    let mut r = Reader { bytes, at: 0, end: bytes.len(), cost: 0, shape: None };
    let tag = r.var()?;
    if tag != 0 {
        return Err(Refused::NotSync(tag));
    }
    let kind = match r.var()? {
        0 => Kind::Step1,
        1 => Kind::Step2,
        2 => Kind::Update,
        other => return Err(Refused::UnknownSync(other)),
    };
    let inner = r.buf()?.len();
    r.end()?;
    let mut body = Reader { bytes, at: r.at - inner, end: r.at, cost: 0, shape: None };
    match kind {
        Kind::Step1 => body.state_vector()?,
        Kind::Step2 | Kind::Update => drop(body.update()?),
    }
    body.end()?;
    if body.cost > MAX_DECODED_BYTES {
        return Err(Refused::TooLarge { estimate: body.cost });
    }
    Ok((kind, body.cost))
}

/// An item of an update, as far as nesting goes (`crate::nesting`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// (client, clock) of its first unit.
    pub id: Id,
    pub len: u32,
    pub parent: Parent,
    /// Whether its content is a shared type (a map, array, text or XML node).
    pub is_type: bool,
}

impl Item {
    /// The clock after its last unit.
    fn end(&self) -> u32 {
        self.id.1.saturating_add(self.len)
    }
}

pub type Id = (u64, u32);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A root type, by name.
    Named,
    /// The type created by the item with this id.
    Item(Id),
    /// The parent of an item it was inserted next to: yrs takes its left neighbour's parent, or its right
    /// neighbour's when the left one is collected or missing; at least one is named.
    Beside { left: Option<Id>, right: Option<Id> },
    /// None: a collected (GC) block, which holds no content and parents nothing.
    Collected,
    /// None: a skipped range, which the update does not carry (a hole in its client's clocks).
    Skipped,
    /// A block cut where the document holds its start (made by `crate::nesting`, never read): yrs links
    /// its rest after the last held unit, `left`, whatever parent the update named (`parent`: a type, or
    /// None for a root) or right neighbour it gave.
    Cut { parent: Option<Id>, left: Id, right: Option<Id> },
}

/// What an update body holds, as far as nesting goes: its blocks (each client's in clock order, one
/// client after another) and its deleted ranges (first unit, length).
#[derive(Debug, Default)]
pub struct Shape {
    pub items: Vec<Item>,
    pub deleted: Vec<(Id, u32)>,
}

/// The shape of an update body (a SyncStep2's or an Update's payload) that already passed [`screen`].
/// Refuses an update that lists a client's blocks twice: yrs would append the second list to the first,
/// clocks restarting, which no encoder writes and nothing here models.
pub fn shape(update: &[u8]) -> Result<Shape, Refused> {
    let mut r = Reader { bytes: update, at: 0, end: update.len(), cost: 0, shape: Some(Shape::default()) };
    let mut clients = r.update()?;
    let listed = clients.len();
    clients.sort_unstable();
    clients.dedup();
    if clients.len() != listed {
        return Err(Refused::Repeated { what: "a client's blocks" });
    }
    Ok(r.shape.unwrap_or_default())
}

/// Reads `bytes[at..end]`; offsets are into the whole message, so errors name the byte.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    end: usize,
    /// What yrs is estimated to allocate for what was read so far.
    cost: u64,
    /// What was read, when asked for.
    shape: Option<Shape>,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.end - self.at
    }

    fn u8(&mut self) -> Result<u8, Refused> {
        if self.at == self.end {
            return Err(Refused::Truncated { at: self.at });
        }
        self.at += 1;
        Ok(self.bytes[self.at - 1])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refused> {
        if n > self.left() {
            return Err(Refused::Truncated { at: self.at });
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    /// An unsigned lib0 varint (7 bits a byte, at most 64 bits).
    fn var(&mut self) -> Result<u64, Refused> {
        let start = self.at;
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Refused::Overflow { at: start });
            }
            value |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Refused::Overflow { at: start })
    }

    /// A client id: yrs takes 53 bits (a JavaScript integer) and asserts it.
    fn client(&mut self) -> Result<u64, Refused> {
        let at = self.at;
        match self.var()? {
            id if id >> 53 == 0 => Ok(id),
            id => Err(Refused::Unknown { what: "client id", value: id, at }),
        }
    }

    fn var_u32(&mut self) -> Result<u32, Refused> {
        let at = self.at;
        u32::try_from(self.var()?).map_err(|_| Refused::Overflow { at })
    }

    /// A signed lib0 varint: only its length matters here.
    fn skip_signed(&mut self) -> Result<(), Refused> {
        let start = self.at;
        for _ in 0..10 {
            if self.u8()? & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(Refused::Overflow { at: start })
    }

    /// A count of entries that each take at least `min` bytes.
    fn count(&mut self, what: &'static str, min: usize) -> Result<u64, Refused> {
        let at = self.at;
        let count = self.var()?;
        let left = self.left();
        if count.saturating_mul(min as u64) > left as u64 {
            return Err(Refused::Count { what, count, left, at });
        }
        Ok(count)
    }

    fn buf(&mut self) -> Result<&'a [u8], Refused> {
        let at = self.at;
        let len = self.var()?;
        let left = self.left();
        if len > left as u64 {
            return Err(Refused::Count { what: "a buffer", count: len, left, at });
        }
        self.take(len as usize)
    }

    fn string(&mut self) -> Result<&'a str, Refused> {
        let at = self.at;
        let bytes = self.buf()?;
        self.cost += bytes.len() as u64;
        std::str::from_utf8(bytes).map_err(|_| Refused::Utf8 { at })
    }

    fn end(&self) -> Result<(), Refused> {
        match self.left() {
            0 => Ok(()),
            left => Err(Refused::Trailing { left }),
        }
    }

    fn state_vector(&mut self) -> Result<(), Refused> {
        let n = self.count("a state vector", 2)?;
        self.cost += n * ENTRY_COST;
        for _ in 0..n {
            self.client()?;
            self.var_u32()?;
        }
        Ok(())
    }

    /// An update: blocks grouped by client, then the delete set. Returns the clients whose blocks it
    /// listed, in order, when reading its shape.
    fn update(&mut self) -> Result<Vec<u64>, Refused> {
        let clients = self.count("an update's clients", 3)?;
        self.cost += clients * ENTRY_COST;
        let mut listed = Vec::new();
        for _ in 0..clients {
            let blocks = self.count("a client's blocks", 2)?;
            self.cost += blocks * BLOCK_COST;
            let client = self.client()?;
            if self.shape.is_some() {
                listed.push(client);
            }
            let mut clock = u64::from(self.var_u32()?);
            for _ in 0..blocks {
                let at = self.at;
                // Within u32: checked after the previous block.
                clock += self.block((client, clock as u32))?;
                if clock > u64::from(u32::MAX) {
                    return Err(Refused::Clock { what: "a block", at });
                }
            }
        }
        let clients = self.count("a delete set's clients", 2)?;
        self.cost += clients * ENTRY_COST;
        for _ in 0..clients {
            let client = self.client()?;
            let ranges = self.count("a delete set's ranges", 2)?;
            self.cost += ranges * RANGE_COST;
            for _ in 0..ranges {
                let at = self.at;
                let (clock, len) = (self.var_u32()?, self.var_u32()?);
                if u64::from(clock) + u64::from(len) > u64::from(u32::MAX) {
                    return Err(Refused::Clock { what: "a deleted range", at });
                }
                if let Some(shape) = self.shape.as_mut().filter(|_| len > 0) {
                    shape.deleted.push(((client, clock), len));
                }
            }
        }
        Ok(listed)
    }

    /// One block, whose first unit is `id`; returns its length in clock units (yrs refuses empty GC and
    /// skip blocks itself).
    fn block(&mut self, id: Id) -> Result<u64, Refused> {
        const HAS_ORIGIN: u8 = 0x80;
        const HAS_RIGHT_ORIGIN: u8 = 0x40;
        const HAS_PARENT_SUB: u8 = 0x20;
        let info = self.u8()?;
        if info == 0 || info == 10 {
            let len = self.var_u32()?;
            // Adjacent collected blocks are listed as one, so listing them costs less than yrs's blocks.
            let parent = if info == 0 { Parent::Collected } else { Parent::Skipped };
            if let Some(items) = self.shape.as_mut().map(|s| &mut s.items).filter(|_| len > 0) {
                match items.last_mut() {
                    Some(last) if last.parent == parent && last.id.0 == id.0 && last.end() == id.1 => {
                        last.len = last.len.saturating_add(len);
                    }
                    _ => items.push(Item { id, len, parent, is_type: false }),
                }
            }
            return Ok(u64::from(len));
        }
        self.cost += ITEM_COST;
        let left = if info & HAS_ORIGIN != 0 { Some(self.id()?) } else { None };
        let right = if info & HAS_RIGHT_ORIGIN != 0 { Some(self.id()?) } else { None };
        let parent = if left.is_some() || right.is_some() {
            Parent::Beside { left, right }
        // yrs reads this as a u32 (dropping higher bits), so it is read as one here too.
        } else if self.var_u32()? == 1 {
            self.string()?;
            Parent::Named
        } else {
            Parent::Item(self.id()?)
        };
        if left.is_none() && right.is_none() && info & HAS_PARENT_SUB != 0 {
            self.string()?;
        }
        let reference = info & 0x0f;
        let len = self.content(reference)?;
        // yrs drops an empty item without advancing the clock.
        if let Some(items) = self.shape.as_mut().map(|s| &mut s.items).filter(|_| len > 0) {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            items.push(Item { id, len, parent, is_type: reference == 7 });
        }
        Ok(len)
    }

    fn id(&mut self) -> Result<Id, Refused> {
        Ok((self.client()?, self.var_u32()?))
    }

    /// An item's content by its reference number; returns its length in clock units.
    fn content(&mut self, reference: u8) -> Result<u64, Refused> {
        let at = self.at;
        match reference {
            1 => Ok(u64::from(self.var_u32()?)),
            2 => {
                // yrs reads n + 1 strings for a declared n.
                let n = self.count("a JSON content", 1)?;
                if n + 1 > self.left() as u64 {
                    return Err(Refused::Count { what: "a JSON content", count: n + 1, left: self.left(), at });
                }
                self.cost += (n + 1) * JSON_STRING_COST;
                for _ in 0..=n {
                    self.string()?;
                }
                Ok(n + 1)
            }
            3 => {
                self.cost += self.buf()?.len() as u64;
                Ok(1)
            }
            // yrs counts a string's clock units in UTF-16.
            4 => Ok(self.string()?.encode_utf16().count() as u64),
            5 => self.json().map(|_| 1),
            6 => {
                self.string()?;
                self.json().map(|_| 1)
            }
            7 => self.type_ref().map(|_| 1),
            8 => {
                let n = self.count("an Any content", 1)?;
                for _ in 0..n {
                    self.any(1)?;
                }
                Ok(n)
            }
            9 => {
                self.cost += SUBDOC_COST;
                self.string()?;
                self.any(1).map(|_| 1)
            }
            other => Err(Refused::Unknown { what: "content", value: other.into(), at }),
        }
    }

    /// A string yrs parses as JSON (serde_json bounds its nesting; its size is what costs).
    fn json(&mut self) -> Result<(), Refused> {
        let len = self.string()?.len() as u64;
        self.cost += len * PARSED_JSON_BYTE_COST;
        Ok(())
    }

    fn type_ref(&mut self) -> Result<(), Refused> {
        let at = self.at;
        match self.u8()? {
            0 | 1 | 2 | 4 | 5 | 6 | 9 | 15 => Ok(()),
            3 => self.string().map(drop),
            other => Err(Refused::Unknown { what: "type", value: other.into(), at }),
        }
    }

    /// A lib0 `Any` value at nesting `depth`.
    fn any(&mut self, depth: usize) -> Result<(), Refused> {
        let at = self.at;
        if depth > MAX_DEPTH {
            return Err(Refused::TooDeep { at });
        }
        self.cost += ANY_COST;
        match self.u8()? {
            127 | 126 | 121 | 120 => Ok(()),
            125 => self.skip_signed(),
            124 => self.take(4).map(drop),
            123 | 122 => self.take(8).map(drop),
            119 => self.string().map(drop),
            118 => {
                let n = self.count("a map", 2)?;
                for _ in 0..n {
                    self.string()?;
                    self.any(depth + 1)?;
                }
                Ok(())
            }
            117 => {
                let n = self.count("an array", 1)?;
                for _ in 0..n {
                    self.any(depth + 1)?;
                }
                Ok(())
            }
            116 => {
                self.cost += self.buf()?.len() as u64;
                Ok(())
            }
            other => Err(Refused::Unknown { what: "value tag", value: other.into(), at }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use yrs::encoding::write::Write;
    use yrs::updates::encoder::Encode;
    use yrs::{Any, Array, Doc, Map, ReadTxn, Text, Transact, XmlFragment};

    use super::*;

    fn sync(sub: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0, sub];
        m.write_buf(body);
        m
    }

    /// An update of one item whose `Any` content is an array nested `depth` deep.
    fn nested(depth: usize) -> Vec<u8> {
        // One client, one block: client 1, clock 0; info 8 (Any), parent named "m"; then the value.
        let mut u = vec![1, 1, 1, 0, 8, 1, 1, b'm', 1];
        u.extend(std::iter::repeat_n([117, 1], depth).flatten());
        u.push(126);
        u.extend([0]);
        u
    }

    #[test]
    fn the_bombs_are_refused_with_what_and_where() {
        let depth = screen(&sync(2, &nested(8_000)));
        assert!(matches!(depth, Err(Refused::TooDeep { .. })), "{depth:?}");
        assert_eq!(screen(&sync(2, &nested(MAX_DEPTH - 1))), Ok(Kind::Update));
        let sv = screen(&[0, 0, 5, 0x80, 0x80, 0x80, 0x80, 0x01]);
        assert_eq!(sv, Err(Refused::Count { what: "a state vector", count: 1 << 28, left: 0, at: 3 }));
        assert!(matches!(screen(&[0, 0, 4, 255, 255, 255, 122]), Err(Refused::Count { .. })));
        let blocks = screen(&sync(2, &[1, 0xff, 0xff, 0xff, 0x7f, 1, 0]));
        assert!(matches!(blocks, Err(Refused::Count { what: "a client's blocks", .. })), "{blocks:?}");
        assert_eq!(screen(&[1, 3, 1, 2, 3]), Err(Refused::NotSync(1)), "awareness is never read");
        assert_eq!(screen(&[3]), Err(Refused::NotSync(3)));
        assert_eq!(screen(&[0, 7, 0]), Err(Refused::UnknownSync(7)));
        assert_eq!(screen(&[0, 2, 2, 0, 0, 9]), Err(Refused::Trailing { left: 1 }));
        assert_eq!(screen(&[0, 2, 3, 0, 0]), Err(Refused::Count { what: "a buffer", count: 3, left: 2, at: 2 }));
        assert!(matches!(screen(&[0, 0, 0x80]), Err(Refused::Truncated { .. })));
        assert!(matches!(screen(&[0; 0]), Err(Refused::Truncated { at: 0 })));
        let overflow = [0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(screen(&overflow), Err(Refused::Overflow { .. })));
    }

    /// A parent-info varint over 32 bits: yrs drops the high bits and reads 1 (a named parent, then a
    /// string), where a u64 reading takes an ID; the two then part ways, and the bytes the screen took for a
    /// buffer reach yrs as values nested 150,000 deep.
    #[test]
    fn a_field_is_read_at_the_width_yrs_reads_it() {
        let mut u = vec![1, 1, 1, 0, 8, 0x81, 0x80, 0x80, 0x80, 0x10, 3, 0, 1, 0x74];
        let nested: Vec<u8> = std::iter::repeat_n([0x75u8, 1], 150_000).flatten().chain([0x7e]).collect();
        u.write_buf(&nested);
        u.push(0);
        let refused = screen(&sync(2, &u));
        assert!(matches!(refused, Err(Refused::Overflow { .. })), "{refused:?}");
    }

    /// Item clocks as yrs assigns them: a string counts UTF-16 units, so a map after "中中" starts at 2.
    #[test]
    fn item_clocks_count_strings_in_utf16() {
        let doc = Doc::new();
        let (text, map) = (doc.get_or_insert_text("t"), doc.get_or_insert_map("m"));
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "中中");
        map.insert(&mut txn, "k", yrs::MapPrelim::default());
        let update = txn.encode_update_v1();
        let found = shape(&update).unwrap().items;
        let clocks: Vec<(u32, u32, bool)> = found.iter().map(|i| (i.id.1, i.len, i.is_type)).collect();
        assert_eq!(clocks, [(0, 2, false), (2, 1, true)]);
    }

    #[test]
    fn what_yrs_would_build_is_bounded() {
        // A million GC blocks of one clock each: two bytes each on the wire, far more decoded.
        let n: usize = 1 << 20;
        let mut u = vec![1];
        u.write_var(n);
        u.extend([1, 0]);
        u.extend(std::iter::repeat_n([0u8, 1], n).flatten());
        u.push(0);
        assert!(matches!(screen(&sync(2, &u)), Err(Refused::TooLarge { .. })));
    }

    /// Random edits of every shared type yrs has, as one update each and as the whole state.
    fn edits() -> impl Strategy<Value = Vec<(u8, u32, String)>> {
        proptest::collection::vec((0u8..6, 0u32..1000, "[a-zé😀]{0,12}"), 1..40)
    }

    fn apply(doc: &Doc, (op, n, s): &(u8, u32, String)) -> Vec<u8> {
        let (map, text, array) =
            (doc.get_or_insert_map("m"), doc.get_or_insert_text("t"), doc.get_or_insert_array("a"));
        let xml = doc.get_or_insert_xml_fragment("x");
        let mut txn = doc.transact_mut();
        match op {
            0 => drop(map.insert(&mut txn, s.as_str(), *n)),
            1 => {
                // Text offsets count bytes here; ASCII keeps every offset on a character boundary.
                let at = (*n).min(text.len(&txn));
                text.insert(&mut txn, at, &s.replace(|c: char| !c.is_ascii(), "x"));
            }
            2 => {
                let v = Any::from(vec![Any::from(s.as_str()), Any::from(f64::from(*n)), Any::Null, Any::from(true)]);
                array.push_back(&mut txn, v);
            }
            3 => {
                let len = text.len(&txn);
                if len > 0 {
                    text.remove_range(&mut txn, n % len, 1);
                }
            }
            4 => drop(map.insert(&mut txn, "nested", yrs::MapPrelim::from([(s.clone(), Any::from(*n as f64))]))),
            _ => drop(xml.push_back(&mut txn, yrs::XmlElementPrelim::empty(format!("e{n}")))),
        }
        txn.encode_update_v1()
    }

    proptest! {
        #[test]
        fn every_update_yrs_writes_passes(ops in edits()) {
            let doc = Doc::new();
            for op in &ops {
                let update = apply(&doc, op);
                prop_assert_eq!(screen(&sync(2, &update)), Ok(Kind::Update));
                prop_assert!(shape(&update).is_ok());
            }
            let txn = doc.transact();
            let state = txn.encode_state_as_update_v1(&yrs::StateVector::default());
            prop_assert_eq!(screen(&sync(1, &state)), Ok(Kind::Step2));
            prop_assert!(shape(&state).is_ok());
            prop_assert_eq!(screen(&sync(0, &txn.state_vector().encode_v1())), Ok(Kind::Step1));
        }
    }
}
