//! Ways around the nesting bound (docs/design.md §3.4 rule 7) that no single message shows, each against
//! the document and real yrs, which measures the depth it really built: levels sent deepest first, a type
//! beside a collected block, and updates yrs integrates otherwise than their items say. Also what the
//! guard must keep working: honest updates, in any order, all apply; a link whose waiting updates
//! overflow is asked for what they lacked.
mod crafted;

use agent_mesh::doc::{Doc, DocMetrics, Inbox, Outgoing};
use agent_mesh::nesting::MAX_TYPE_DEPTH;
use bytes::Bytes;

async fn send(doc: &Doc, link: u64, messages: Vec<Vec<u8>>) {
    for m in messages {
        doc.incoming(link, Bytes::from(m)).await.expect("the screen passes it");
    }
}

async fn depth(doc: &Doc, root: &'static str) -> usize {
    doc.read(move |d| crafted::array_depth(d, root)).await.unwrap()
}

/// Waits until the document lets go of the link, and says whether it did so as refused.
async fn let_go_as_refused(mut inbox: Inbox) -> bool {
    while inbox.rx.recv().await.is_some() {}
    inbox.refused.try_recv().is_ok()
}

/// Takes what the document has queued for a link, counting the messages `which` picks.
fn drain(inbox: &mut Inbox, which: impl Fn(&[u8]) -> bool) -> usize {
    let mut n = 0;
    while let Ok(m) = inbox.rx.try_recv() {
        inbox.sent(m.budgeted());
        if let Outgoing::Sync(m) = m {
            n += usize::from(which(&m));
        }
    }
    n
}

#[tokio::test]
async fn levels_sent_deepest_first_nest_no_deeper_than_the_bound() {
    let doc = Doc::spawn(DocMetrics::default());
    let inbox = doc.attach(1, true).await;
    send(&doc, 1, crafted::reversed_chain(101, "r", 100)).await;
    assert_eq!(depth(&doc, "r").await, MAX_TYPE_DEPTH as usize, "the levels up to the bound apply, no more");
    assert!(let_go_as_refused(inbox).await, "the link was let go of as refused");
}

/// A link that sends more waiting updates than it may hold loses the oldest, and is asked (SyncStep1)
/// for what this document lacks, which brings them back.
#[tokio::test]
async fn a_link_whose_held_updates_overflow_is_asked_for_what_they_lacked() {
    let metrics = DocMetrics::default();
    let doc = Doc::spawn(metrics.clone());
    let mut inbox = doc.attach(1, true).await;
    let levels = agent_mesh::held::HELD_UPDATES_PER_LINK + 10;
    send(&doc, 1, crafted::reversed_chain(401, "h", levels + 1).into_iter().take(levels).collect()).await;
    doc.read(|_| ()).await;
    let step1 = drain(&mut inbox, |m| m.starts_with(&[0, 0]));
    assert!(step1 >= 2, "the SyncStep1 of the attach, and one asking for what the dropped updates lacked");
    assert_eq!(metrics.held_dropped.get(), 10);
}

#[tokio::test]
async fn a_type_beside_a_collected_block_counts_as_deep_as_its_right_neighbour() {
    let doc = Doc::spawn(DocMetrics::default());
    let inbox = doc.attach(1, true).await;
    let [legit, attack] = <[_; 2]>::try_from(crafted::beside_a_collected_block(201, "g", 60, 20)).unwrap();
    send(&doc, 1, vec![legit]).await;
    assert_eq!(depth(&doc, "g").await, 60);
    send(&doc, 1, vec![attack]).await;
    assert_eq!(depth(&doc, "g").await, 60, "nothing of the attack applied");
    assert!(let_go_as_refused(inbox).await, "the link was let go of as refused");
}

#[tokio::test]
async fn updates_that_arrive_before_what_they_build_on_apply_once_it_arrives() {
    let metrics = DocMetrics::default();
    let doc = Doc::spawn(metrics.clone());
    let _from = doc.attach(1, true).await;
    let mut onward = doc.attach(2, true).await;
    onward.rx.recv().await.expect("the SyncStep1 every link starts with");
    send(&doc, 1, crafted::reversed_chain(301, "o", 10)).await;
    assert_eq!(depth(&doc, "o").await, 10);
    assert_eq!(drain(&mut onward, |_| true), 10, "each level was forwarded once it applied");
    assert_eq!(metrics.updates_received.get(), 10);
    assert_eq!(metrics.protocol_errors.get(), 0);
}

/// Updates yrs reads otherwise than a check of their items alone would: a block the document holds the
/// start of (its rest said to be beside another item, or under a root), an update yrs integrates only in
/// part, an item that names a later block of its own client, and a block after a hole in its client's
/// clocks (which yrs integrates, while its state vector stops at the hole). Under each, 10 more arrays.
#[tokio::test]
async fn updates_yrs_would_read_otherwise_than_the_check_nest_no_deeper_than_the_bound() {
    use crafted::{At, block, raw};
    let mut depths = Vec::new();
    // Each on a document holding arrays nested to the bound, over a link of its own per message.
    let mut attack = async |steps: Vec<Vec<u8>>| {
        let doc = Doc::spawn(DocMetrics::default());
        let legit = crafted::chain(1, "c", MAX_TYPE_DEPTH as usize);
        for (link, m) in (0..).zip(std::iter::once(legit).chain(steps)) {
            let _inbox = doc.attach(link, true).await;
            doc.incoming(link, Bytes::from(m)).await.expect("the screen passes it");
        }
        depths.push(depth(&doc, "c").await);
    };
    let max = MAX_TYPE_DEPTH;
    let deepest = (1, max - 1);
    let under = |at: (u64, u32), client: u64| {
        let mut levels = vec![block(At::Parent(at), None)];
        levels.extend((0..9).map(|i| block(At::Parent((client, i)), None)));
        raw(client, 0, &levels)
    };
    // A string under the deepest array, then the same block longer, then an array beside its new unit.
    attack(vec![
        raw(5, 0, &[block(At::Parent(deepest), Some("a"))]),
        raw(5, 0, &[block(At::Parent(deepest), Some("ab"))]),
        raw(6, 0, &[block(At::Beside(Some((5, 1)), None), None)]),
        under((6, 0), 7),
    ])
    .await;
    // The same, the longer block naming a root: yrs files its new unit under the root, and the check
    // counts the deeper of that and the held unit's place.
    attack(vec![
        raw(5, 0, &[block(At::Parent(deepest), Some("a"))]),
        raw(5, 0, &[block(At::Root("p"), Some("ab"))]),
        raw(6, 0, &[block(At::Beside(Some((5, 1)), None), None)]),
        under((6, 0), 7),
    ])
    .await;
    // An array under the one above the deepest, then a string, then a string under the string: yrs
    // integrates the first two and fails on the third.
    attack(vec![
        raw(
            8,
            0,
            &[
                block(At::Parent((1, max - 2)), None),
                block(At::Root("p"), Some("x")),
                block(At::Parent((8, 1)), Some("y")),
            ],
        ),
        under((8, 0), 9),
    ])
    .await;
    // 10:0 beside 10:2, 10:1 an array beside 10:0, 10:2 a root string: all pending in yrs; then 10:0
    // again, under the deepest, and 10:1 follows it there.
    attack(vec![
        raw(
            10,
            0,
            &[
                block(At::Beside(Some((10, 2)), None), Some("x")),
                block(At::Beside(Some((10, 0)), None), None),
                block(At::Root("p"), Some("y")),
            ],
        ),
        raw(10, 0, &[block(At::Parent(deepest), Some("z"))]),
        under((10, 1), 11),
    ])
    .await;
    // 12:10 under the one above the deepest, after a hole; then 12:10 again at the root.
    attack(vec![
        raw(12, 10, &[block(At::Parent((1, max - 2)), None)]),
        raw(12, 10, &[block(At::Root("p"), None)]),
        under((12, 10), 13),
    ])
    .await;
    assert_eq!(depths, [MAX_TYPE_DEPTH as usize; 5]);
}

/// What the check must never do: refuse, drop or hold forever an honest update. Three documents edit
/// (maps, text with deletions, arrays nested in one another) and sync with each other now and then, so
/// their updates build on each other's; the relay receives every update in a random order and ends up
/// holding exactly what they hold.
mod honest {
    use super::*;
    use proptest::prelude::*;
    use yrs::updates::decoder::Decode;
    use yrs::{Array, ArrayPrelim, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

    fn edit(doc: &yrs::Doc, op: u8, n: u32) -> Vec<u8> {
        let (map, text, array) =
            (doc.get_or_insert_map("m"), doc.get_or_insert_text("t"), doc.get_or_insert_array("a"));
        let mut txn = doc.transact_mut();
        let len = text.len(&txn);
        match op {
            0 => drop(map.insert(&mut txn, format!("k{}", n % 7), n)),
            1 => text.insert(&mut txn, n % (len + 1), "ab"),
            2 if len > 0 => text.remove_range(&mut txn, n % len, 1),
            _ => {
                // An array inside the last array at the end of the chain, a few levels at most.
                let mut at = array.clone();
                for _ in 0..n % 5 {
                    match at.get(&txn, at.len(&txn).saturating_sub(1)) {
                        Some(yrs::Out::YArray(inner)) => at = inner,
                        _ => break,
                    }
                }
                at.push_back(&mut txn, ArrayPrelim::default());
            }
        }
        txn.encode_update_v1()
    }

    fn sync(from: &yrs::Doc, to: &yrs::Doc) {
        let diff = from.transact().encode_state_as_update_v1(&to.transact().state_vector());
        to.transact_mut().apply_update(Update::decode_v1(&diff).unwrap()).unwrap();
    }

    fn contents(doc: &yrs::Doc) -> (String, StateVector) {
        let (map, text, array) =
            (doc.get_or_insert_map("m"), doc.get_or_insert_text("t"), doc.get_or_insert_array("a"));
        let txn = doc.transact();
        let mut entries: Vec<String> = map.iter(&txn).map(|(k, v)| format!("{k}={}", v.to_string(&txn))).collect();
        entries.sort();
        (format!("{:?} {:?} {}", entries, text.get_string(&txn), array.len(&txn)), txn.state_vector())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn every_honest_update_applies_whatever_order_it_arrives_in(
            ops in proptest::collection::vec((0usize..3, 0u8..5, 0u32..100), 1..60),
            order in any::<u64>(),
        ) {
            let docs: Vec<yrs::Doc> = (1..=3).map(yrs::Doc::with_client_id).collect();
            let mut updates = Vec::new();
            for (i, op, n) in ops {
                if op == 4 {
                    sync(&docs[i], &docs[(i + 1) % 3]);
                } else {
                    updates.push(edit(&docs[i], op, n));
                }
            }
            for (a, b) in [(0, 1), (1, 2), (2, 0), (0, 1)] {
                sync(&docs[a], &docs[b]);
            }
            // A deterministic shuffle from `order`.
            let mut keyed: Vec<(u64, Vec<u8>)> = updates.into_iter().enumerate()
                .map(|(i, u)| ((i as u64 + 1).wrapping_mul(order | 1).rotate_left(17), u)).collect();
            keyed.sort_by_key(|(k, _)| *k);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (relayed, errors, dropped) = rt.block_on(async {
                let metrics = DocMetrics::default();
                let relay = Doc::spawn(metrics.clone());
                let _inbox = relay.attach(1, true).await;
                for (_, u) in keyed {
                    relay.incoming(1, Bytes::from(crafted::update(u))).await.unwrap();
                }
                let got = relay.read(|d| {
                    let state = d.transact().encode_state_as_update_v1(&StateVector::default());
                    let copy = yrs::Doc::new();
                    copy.transact_mut().apply_update(Update::decode_v1(&state).unwrap()).unwrap();
                    contents(&copy)
                }).await.unwrap();
                (got, metrics.protocol_errors.get(), metrics.held_dropped.get())
            });
            prop_assert_eq!(errors, 0);
            prop_assert_eq!(dropped, 0);
            prop_assert_eq!(relayed, contents(&docs[0]));
        }
    }
}
