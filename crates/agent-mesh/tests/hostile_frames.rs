//! Hostile bytes on the message path: every frame a peer could send goes through `Doc::incoming` (the
//! screen, then yrs) under a counting allocator. No input may panic, abort (a stack overflow would end this
//! process), or make the agent allocate more than the stated bound while it is handled.
mod crafted;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use agent_mesh::doc::{Doc, DocMetrics};
use agent_mesh::screen::MAX_DECODED_BYTES;
use bytes::Bytes;
use crafted::{sync, var};
use proptest::prelude::*;
use yrs::updates::encoder::Encode;
use yrs::{GetString, Map, ReadTxn, Text, Transact};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The counters are process-wide: the tests that read them take turns.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What handling one message of `len` bytes may allocate beyond what was held before: what the screen
/// estimates yrs builds (nothing, for a message it refuses), the message's own buffers a few times over,
/// and a fixed allowance.
fn bound(frame: &[u8]) -> usize {
    let estimate = agent_mesh::screen::estimate(frame).map_or(0, |(_, cost)| cost);
    assert!(estimate <= MAX_DECODED_BYTES);
    estimate as usize + 4 * frame.len() + (1 << 20)
}

/// Valid message bodies of a small document, with their sync type: one update, its state, a state vector.
fn seeds() -> Vec<(u8, Vec<u8>)> {
    let doc = yrs::Doc::new();
    let (map, text) = (doc.get_or_insert_map("m"), doc.get_or_insert_text("t"));
    let update = {
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "k", yrs::Any::from(vec![yrs::Any::from("v"), yrs::Any::from(2.5)]));
        text.insert(&mut txn, 0, "hello");
        txn.encode_update_v1()
    };
    let txn = doc.transact();
    vec![
        (2, update),
        (1, txn.encode_state_as_update_v1(&yrs::StateVector::default())),
        (0, txn.state_vector().encode_v1()),
    ]
}

/// `m` with a few bytes changed, inserted or cut, or a varint made huge.
fn mutate(mut m: Vec<u8>, edits: Vec<(u16, u8, u8)>) -> Vec<u8> {
    for (at, byte, how) in edits {
        let at = usize::from(at) % (m.len() + 1);
        match how {
            0 if at < m.len() => m[at] = byte,
            1 => m.insert(at, byte),
            2 if at < m.len() => drop(m.remove(at)),
            3 if at < m.len() => m[at] = byte % 8,
            _ => m.splice(at..at, [0xff, 0xff, 0xff, 0x7f]).for_each(drop),
        }
    }
    m
}

/// Hostile frames: valid bodies mutated inside a correct frame (so they reach yrs), whole messages
/// mutated, random bodies, and values nested up to 20,000 deep.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let edits = || proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..5), 1..5);
    let bodies = (0..3usize, edits()).prop_map(|(i, edits)| {
        let (sub, body) = seeds().swap_remove(i);
        sync(sub, &mutate(body, edits))
    });
    let whole = (0..3usize, edits()).prop_map(|(i, edits)| {
        let (sub, body) = seeds().swap_remove(i);
        mutate(sync(sub, &body), edits)
    });
    let random = (0u8..3, proptest::collection::vec(any::<u8>(), 0..256)).prop_map(|(sub, b)| sync(sub, &b));
    let nested = (1u8..3, 1usize..20_000).prop_map(|(sub, depth)| {
        let mut u = vec![1, 1, 1, 0, 8, 1, 1, b'm', 1];
        u.extend(std::iter::repeat_n([117, 1], depth).flatten());
        u.extend([126, 0]);
        sync(sub, &u)
    });
    prop_oneof![3 => bodies, 1 => whole, 1 => random, 1 => nested, 1 => large()]
}

/// `n` subdocuments in a row under the root map "m" (client 0 from clock 0): each builds a document.
fn subdocuments(n: usize, u: &mut Vec<u8>) {
    var(n, u);
    u.extend([0, 0]);
    u.extend([9, 1, 1, b'm', 0, 126]);
    for i in 1..n {
        u.extend([0x89, 0]);
        var(i - 1, u);
        u.extend([0, 126]);
    }
}

/// Subdocuments cost what the screen estimates (yrs builds a whole document for each); 50,000 are over the
/// 24 MiB estimate and refused.
#[test]
fn subdocuments_cost_no_more_than_estimated() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        for n in [1_000, 15_000, 50_000] {
            let mut u = vec![1];
            subdocuments(n, &mut u);
            u.push(0);
            let frame = sync(2, &u);
            let doc = Doc::spawn(DocMetrics::default());
            let _inbox = doc.attach(1, true).await;
            doc.read(|_| ()).await;
            let before = NOW.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let allowed = bound(&frame);
            let passed = doc.incoming(1, Bytes::from(frame)).await.is_ok();
            doc.read(|_| ()).await;
            let spent = PEAK.load(Ordering::Relaxed).saturating_sub(before);
            eprintln!("{n} subdocuments: screen passed {passed}, {spent} bytes, allowed {allowed}");
            assert!(spent <= allowed, "{n} subdocuments: {spent} bytes, allowed {allowed}");
        }
    });
}

/// Large messages of the shapes yrs spends most on per byte: many blocks, JSON contents of many strings,
/// `Any` contents of many values, and embedded JSON. Some pass the screen, some are refused as too large.
fn large() -> impl Strategy<Value = Vec<u8>> {
    (0u8..5, 1usize..400_000).prop_map(|(shape, n)| {
        // One client, clock 0.
        let mut u = vec![1];
        match shape {
            0 => {
                var(n, &mut u);
                u.extend([1, 0]);
                u.extend(std::iter::repeat_n([0u8, 1], n).flatten());
            }
            1 => {
                u.extend([1, 1, 0, 2, 1, 1, b'm']);
                var(n, &mut u);
                u.extend(std::iter::repeat_n(0u8, n + 1));
            }
            2 => {
                u.extend([1, 1, 0, 8, 1, 1, b'm']);
                var(n, &mut u);
                u.extend(std::iter::repeat_n(126u8, n));
            }
            3 => subdocuments(n, &mut u),
            _ => {
                u.extend([1, 1, 0, 5, 1, 1, b'm']);
                let json: Vec<u8> =
                    std::iter::once(b'[').chain(std::iter::repeat_n(*b"0,", n).flatten()).chain(*b"0]").collect();
                var(json.len(), &mut u);
                u.extend(json);
            }
        }
        u.push(0);
        sync(2, &u)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5_000, ..ProptestConfig::default() })]
    #[test]
    fn no_frame_panics_aborts_or_allocates_past_the_bound(frame in frames()) {
        let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let doc = Doc::spawn(DocMetrics::default());
            let mut inbox = doc.attach(1, true).await;
            doc.read(|_| ()).await;
            let before = NOW.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let (len, allowed) = (frame.len(), bound(&frame));
            let _ = doc.incoming(1, Bytes::from(frame)).await;
            doc.read(|_| ()).await;
            let spent = PEAK.load(Ordering::Relaxed).saturating_sub(before);
            while inbox.rx.try_recv().is_ok() {}
            prop_assert!(spent <= allowed, "{spent} bytes for a {len}-byte frame, allowed {allowed}");
            Ok(())
        })?;
    }
}

/// The bombs of the issue that found them, one by one, each on a document that then still takes a good
/// update.
#[test]
fn the_known_bombs_cost_their_link_nothing_more() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(known_bombs());
}

async fn known_bombs() {
    let doc = Doc::spawn(DocMetrics::default());
    let _inbox = doc.attach(1, true).await;
    let mut depth = vec![1, 1, 1, 0, 8, 1, 1, b'm', 1];
    depth.extend(std::iter::repeat_n([117u8, 1], 8_000).flatten());
    depth.extend([126, 0]);
    let bombs = [
        sync(2, &depth),
        vec![0, 0, 5, 0x80, 0x80, 0x80, 0x80, 0x01],
        vec![0, 0, 4, 255, 255, 255, 122],
        sync(2, &[1, 0xff, 0xff, 0xff, 0x7f, 1, 0]),
        vec![1, 4, 0x80, 0x80, 0x80, 0x01],
    ];
    for bomb in bombs {
        let before = NOW.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        assert!(doc.incoming(1, Bytes::from(bomb.clone())).await.is_err(), "{bomb:?} passed the screen");
        assert!(PEAK.load(Ordering::Relaxed).saturating_sub(before) < 1 << 20);
    }
    let (sub, update) = seeds().swap_remove(0);
    doc.incoming(1, Bytes::from(sync(sub, &update))).await.unwrap();
    nested_types_are_refused_by_the_document().await;
    let got = doc.read(|d| d.get_or_insert_text("t").get_string(&d.transact())).await;
    assert_eq!(got.as_deref(), Some("hello"));
}

/// 5,000 maps, each inside the one before: small enough for the screen, but deleting the outermost would
/// recurse 5,000 deep in yrs. The document refuses the update and lets go of its link, marked refused.
async fn nested_types_are_refused_by_the_document() {
    let doc = Doc::spawn(DocMetrics::default());
    let mut inbox = doc.attach(7, true).await;
    let update = {
        let source = yrs::Doc::new();
        let root = source.get_or_insert_map("m");
        let mut txn = source.transact_mut();
        let mut map = root.insert(&mut txn, "k", yrs::MapPrelim::default());
        for _ in 0..5_000 {
            map = map.insert(&mut txn, "k", yrs::MapPrelim::default());
        }
        txn.encode_update_v1()
    };
    doc.incoming(7, Bytes::from(sync(2, &update))).await.expect("the screen passes it");
    while inbox.rx.recv().await.is_some() {}
    assert!(inbox.refused.try_recv().is_ok(), "the link was let go of as refused, not as slow");
    let depth = doc.read(|d| d.get_or_insert_map("m").len(&d.transact())).await;
    assert_eq!(depth, Some(0), "nothing of it was applied");
}
