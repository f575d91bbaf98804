//! Hostile messages for the tests: sync messages around any body, and updates crafted to nest shared
//! types past the bound by ways the screen cannot see in one message (each a list of sync messages, in
//! the order a hostile peer sends them). Shared by the document tests here and the process tests
//! (`tests/hostile_links.rs`).
#![allow(dead_code)] // each test binary uses some of these

use yrs::encoding::write::Write;
use yrs::{Array, ArrayPrelim, ArrayRef, Transact};

/// A sync message of type `sub` (0 SyncStep1, 1 SyncStep2, 2 Update) around `body`, whatever `body` is.
pub fn sync(sub: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0, sub];
    m.write_buf(body);
    m
}

/// `n` as a lib0 varint, appended to `out`.
pub fn var(n: usize, out: &mut Vec<u8>) {
    out.write_var(n);
}

pub fn update(body: Vec<u8>) -> Vec<u8> {
    sync(2, &body)
}

/// `n` arrays on `client`, each inside the one before (the first in the root array `root`), one update
/// per level, sent deepest first: each update's parent is not there yet when it arrives.
pub fn reversed_chain(client: u64, root: &str, n: usize) -> Vec<Vec<u8>> {
    let source = yrs::Doc::with_client_id(client);
    let mut at: ArrayRef = source.get_or_insert_array(root);
    let mut levels = Vec::new();
    for _ in 0..n {
        let mut txn = source.transact_mut();
        at = at.push_back(&mut txn, ArrayPrelim::default());
        levels.push(update(txn.encode_update_v1()));
    }
    levels.reverse();
    levels
}

/// A legitimate chain of `depth` arrays on `client` under the root array `root`, with a string in the
/// deepest; then, from `client + 1`, an array whose left neighbour is a garbage-collected block and whose
/// right neighbour is that string, with `extra` arrays nested in it. yrs takes the parent from the right
/// neighbour when the left one is collected, so the new arrays nest `depth + 1 + extra` deep.
pub fn beside_a_collected_block(client: u64, root: &str, depth: u32, extra: u32) -> Vec<Vec<u8>> {
    let source = yrs::Doc::with_client_id(client);
    let mut at: ArrayRef = source.get_or_insert_array(root);
    let legit = {
        let mut txn = source.transact_mut();
        for _ in 0..depth {
            at = at.push_back(&mut txn, ArrayPrelim::default());
        }
        at.push_back(&mut txn, "v");
        txn.encode_update_v1()
    };
    let attacker = client + 1;
    let mut u: Vec<u8> = Vec::new();
    u.write_var(1u32); // one client
    u.write_var(2 + extra); // its blocks
    u.write_var(attacker);
    u.write_var(0u32); // from clock 0
    u.write_u8(0); // a GC block of length 1
    u.write_var(1u32);
    u.write_u8(0x80 | 0x40 | 7); // a type with both origins
    u.write_var(attacker);
    u.write_var(0u32); // left: the GC block
    u.write_var(client);
    u.write_var(depth); // right: the string (the chain took clocks 0..depth)
    u.write_var(0u32); // an array
    for level in 0..extra {
        u.write_u8(7); // a type under a parent named by id
        u.write_var(0u32);
        u.write_var(attacker);
        u.write_var(1 + level);
        u.write_var(0u32);
    }
    u.write_var(0u32); // an empty delete set
    vec![update(legit), update(u)]
}

/// How deep arrays nest under the root array `root`, walked without recursion.
pub fn array_depth(doc: &yrs::Doc, root: &str) -> usize {
    let root = doc.get_or_insert_array(root);
    let txn = doc.transact();
    let mut deepest = 0;
    let mut stack = vec![(root, 0)];
    while let Some((array, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        for value in array.iter(&txn) {
            if let yrs::Out::YArray(inner) = value {
                stack.push((inner, depth + 1));
            }
        }
    }
    deepest
}

/// Where a hand-written block goes.
pub enum At {
    Root(&'static str),
    Parent((u64, u32)),
    Beside(Option<(u64, u32)>, Option<(u64, u32)>),
}

/// A hand-written block: a string, or an empty array (a shared type).
pub fn block(at: At, text: Option<&str>) -> Vec<u8> {
    let mut b: Vec<u8> = Vec::new();
    let content = if text.is_some() { 4 } else { 7 };
    match at {
        At::Root(name) => {
            b.write_u8(content);
            b.write_var(1u32);
            b.write_string(name);
        }
        At::Parent((client, clock)) => {
            b.write_u8(content);
            b.write_var(0u32);
            b.write_var(client);
            b.write_var(clock);
        }
        At::Beside(left, right) => {
            b.write_u8(content | if left.is_some() { 0x80 } else { 0 } | if right.is_some() { 0x40 } else { 0 });
            for (client, clock) in left.into_iter().chain(right) {
                b.write_var(client);
                b.write_var(clock);
            }
        }
    }
    match text {
        Some(s) => b.write_string(s),
        None => b.write_var(0u32),
    }
    b
}

/// An update message of `client`'s `blocks` from `clock` on, with no deletions.
pub fn raw(client: u64, clock: u32, blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut u: Vec<u8> = Vec::new();
    u.write_var(1u32);
    u.write_var(blocks.len() as u32);
    u.write_var(client);
    u.write_var(clock);
    for b in blocks {
        u.extend_from_slice(b);
    }
    u.write_var(0u32);
    update(u)
}

/// `n` arrays on `client`, each inside the one before, the first in the root array `root`, as one update;
/// the deepest is `(client, n - 1)`, `n` deep.
pub fn chain(client: u64, root: &str, n: usize) -> Vec<u8> {
    let source = yrs::Doc::with_client_id(client);
    let mut at: ArrayRef = source.get_or_insert_array(root);
    let mut txn = source.transact_mut();
    for _ in 0..n {
        at = at.push_back(&mut txn, ArrayPrelim::default());
    }
    update(txn.encode_update_v1())
}
