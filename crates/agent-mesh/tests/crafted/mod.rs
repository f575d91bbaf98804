//! Updates crafted to nest shared types past the bound by ways the screen cannot see in one message. Each
//! is a list of sync messages, in the order a hostile peer sends them. Shared by the document tests here
//! and the process tests (`tests/hostile_links.rs`).
#![allow(dead_code)] // each test binary uses some of these

use yrs::encoding::write::Write;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::encoder::Encode;
use yrs::{Array, ArrayPrelim, ArrayRef, Transact};

pub fn update(body: Vec<u8>) -> Vec<u8> {
    Message::Sync(SyncMessage::Update(body)).encode_v1()
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
