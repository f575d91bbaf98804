//! Ways around the nesting bound (docs/design.md §3.4 rule 7) that no single message shows, each against
//! the document and real yrs: levels sent deepest first, which wait in the document until their parents
//! arrive, and a type placed beside a collected block, which yrs files under its right neighbour's parent.
//! Also the legitimate case the first guard must keep working: updates that arrive before what they
//! build on are applied, and forwarded, once it arrives.
mod crafted;

use agent_mesh::doc::{Doc, DocMetrics};
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

#[tokio::test]
async fn levels_sent_deepest_first_nest_no_deeper_than_the_bound() {
    let doc = Doc::spawn(DocMetrics::default());
    let mut inbox = doc.attach(1, true).await;
    send(&doc, 1, crafted::reversed_chain(101, "r", 100)).await;
    assert_eq!(depth(&doc, "r").await, MAX_TYPE_DEPTH as usize, "the levels up to the bound apply, no more");
    while inbox.rx.recv().await.is_some() {}
    assert!(inbox.refused.try_recv().is_ok(), "the link was let go of as refused");
}

#[tokio::test]
async fn a_type_beside_a_collected_block_counts_as_deep_as_its_right_neighbour() {
    let doc = Doc::spawn(DocMetrics::default());
    let mut inbox = doc.attach(1, true).await;
    let [legit, attack] = <[_; 2]>::try_from(crafted::beside_a_collected_block(201, "g", 60, 20)).unwrap();
    send(&doc, 1, vec![legit]).await;
    assert_eq!(depth(&doc, "g").await, 60);
    send(&doc, 1, vec![attack]).await;
    assert_eq!(depth(&doc, "g").await, 60, "nothing of the attack applied");
    while inbox.rx.recv().await.is_some() {}
    assert!(inbox.refused.try_recv().is_ok(), "the link was let go of as refused");
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
    let mut forwarded = 0;
    while let Ok(m) = onward.rx.try_recv() {
        onward.sent(m.len());
        forwarded += 1;
    }
    assert_eq!(forwarded, 10, "each level was forwarded once it applied");
    assert_eq!(metrics.updates_received.get(), 10);
    assert_eq!(metrics.protocol_errors.get(), 0);
}
