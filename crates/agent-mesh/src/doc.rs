//! The shared CRDT document (a `yrs` Doc) and its relay. One task owns the document; every link (mesh or
//! rendezvous) attaches to it and speaks the Yjs sync protocol: on attach each side sends its state vector
//! (SyncStep1) and answers the other's with the missing updates (SyncStep2); afterwards every update is
//! sent as it happens. An update received on one link is applied and forwarded to every other link once:
//! a bounded seen-cache (by hash of the update bytes, which relays keep verbatim) stops re-forwarding.
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Transact, Update};

/// Updates remembered by the seen-cache.
const SEEN_CAPACITY: usize = 1 << 16;
/// Messages queued for one link before it counts as too slow and is dropped (it resyncs on redial).
pub const LINK_QUEUE: usize = 1024;

/// Identifies one attached link for the lifetime of the process.
pub type LinkId = u64;

type Edit = Box<dyn FnOnce(&yrs::Doc) -> Vec<u8> + Send>;
type Read = Box<dyn FnOnce(&yrs::Doc) + Send>;

enum Cmd {
    Attach { link: LinkId, mesh: bool, out: mpsc::Sender<Vec<u8>> },
    Detach(LinkId),
    Incoming { link: LinkId, bytes: Vec<u8> },
    Edit(Edit),
    Read(Read),
}

/// What the relay counts.
#[derive(Clone, Debug, Default)]
pub struct DocMetrics {
    /// Updates received that were new.
    pub updates_received: Counter,
    /// Updates received again (over a second path) and not forwarded.
    pub duplicates_dropped: Counter,
    /// Update messages sent on mesh links (the rendezvous link not counted).
    pub mesh_messages_sent: Counter,
    /// Messages that did not decode or apply.
    pub protocol_errors: Counter,
    /// Links dropped because they could not keep up.
    pub slow_links_dropped: Counter,
}

/// A cheap handle to the document task.
#[derive(Clone)]
pub struct Doc {
    tx: mpsc::Sender<Cmd>,
}

impl Doc {
    /// Starts the document task.
    pub fn spawn(metrics: DocMetrics) -> Doc {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(Relay { doc: yrs::Doc::new(), links: HashMap::new(), seen: Seen::default(), metrics }.run(rx));
        Doc { tx }
    }

    /// Attaches a link; what the document sends it arrives on the returned receiver, starting with SyncStep1.
    /// `mesh`: whether it is a mesh link (counted in `mesh_messages_sent`) rather than the rendezvous.
    pub async fn attach(&self, link: LinkId, mesh: bool) -> mpsc::Receiver<Vec<u8>> {
        let (out, rx) = mpsc::channel(LINK_QUEUE);
        let _ = self.tx.send(Cmd::Attach { link, mesh, out }).await;
        rx
    }

    pub async fn detach(&self, link: LinkId) {
        let _ = self.tx.send(Cmd::Detach(link)).await;
    }

    /// A message received on `link`.
    pub async fn incoming(&self, link: LinkId, bytes: Vec<u8>) {
        let _ = self.tx.send(Cmd::Incoming { link, bytes }).await;
    }

    /// Runs a local change: `f` makes it in its own transaction and returns that transaction's update
    /// (`txn.encode_update_v1()`), which is sent to every link.
    pub async fn edit(&self, f: impl FnOnce(&yrs::Doc) -> Vec<u8> + Send + 'static) {
        let _ = self.tx.send(Cmd::Edit(Box::new(f))).await;
    }

    /// Reads the document (or registers an observer on it) on the document task.
    pub async fn read<R: Send + 'static>(&self, f: impl FnOnce(&yrs::Doc) -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Read(Box::new(move |d| drop(tx.send(f(d)))))).await;
        rx.await.ok()
    }
}

#[derive(Default)]
struct Seen {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Seen {
    /// Whether `bytes` is new (and remembers it).
    fn first_time(&mut self, bytes: &[u8]) -> bool {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let key = h.finish();
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > SEEN_CAPACITY {
            self.order.pop_front().map(|old| self.set.remove(&old));
        }
        true
    }
}

struct Link {
    out: mpsc::Sender<Vec<u8>>,
    mesh: bool,
}

struct Relay {
    doc: yrs::Doc,
    links: HashMap<LinkId, Link>,
    seen: Seen,
    metrics: DocMetrics,
}

fn encode(m: SyncMessage) -> Vec<u8> {
    Message::Sync(m).encode_v1()
}

impl Relay {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Cmd::Attach { link, mesh, out } => {
                    let step1 = encode(SyncMessage::SyncStep1(self.doc.transact().state_vector()));
                    if out.try_send(step1).is_ok() {
                        self.links.insert(link, Link { out, mesh });
                    }
                }
                Cmd::Detach(link) => drop(self.links.remove(&link)),
                Cmd::Incoming { link, bytes } => self.incoming(link, &bytes),
                Cmd::Edit(f) => {
                    let update = f(&self.doc);
                    if self.seen.first_time(&update) {
                        self.forward(None, update);
                    }
                }
                Cmd::Read(f) => f(&self.doc),
            }
        }
    }

    fn incoming(&mut self, link: LinkId, bytes: &[u8]) {
        // yrs decodes hostile bytes without panicking as far as we know; a panic here must still only cost
        // the message, never the agent.
        let decoded =
            catch_unwind(|| Message::decode_v1(bytes)).unwrap_or(Err(yrs::encoding::read::Error::EndOfBuffer(0)));
        match decoded {
            Ok(Message::Sync(SyncMessage::SyncStep1(sv))) => self.answer(link, &sv),
            Ok(Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u))) => self.update(link, u),
            Ok(_) => {}
            Err(_) => {
                self.metrics.protocol_errors.inc();
            }
        }
    }

    fn answer(&mut self, link: LinkId, sv: &StateVector) {
        let diff = self.doc.transact().encode_state_as_update_v1(sv);
        let answered =
            self.links.get(&link).is_some_and(|l| l.out.try_send(encode(SyncMessage::SyncStep2(diff))).is_ok());
        if !answered && self.links.remove(&link).is_some() {
            // A peer that asks faster than it reads is dropped, not buffered for.
            self.metrics.slow_links_dropped.inc();
        }
    }

    fn update(&mut self, from: LinkId, bytes: Vec<u8>) {
        if !self.seen.first_time(&bytes) {
            self.metrics.duplicates_dropped.inc();
            return;
        }
        let doc = &self.doc;
        let applied = catch_unwind(AssertUnwindSafe(|| {
            let update = Update::decode_v1(&bytes).map_err(|e| e.to_string())?;
            doc.transact_mut().apply_update(update).map_err(|e| e.to_string())
        }));
        if !matches!(applied, Ok(Ok(()))) {
            self.metrics.protocol_errors.inc();
            return;
        }
        self.metrics.updates_received.inc();
        self.forward(Some(from), bytes);
    }

    /// Sends an update to every link but its source; a link whose queue is full is dropped.
    fn forward(&mut self, from: Option<LinkId>, update: Vec<u8>) {
        let message = encode(SyncMessage::Update(update));
        let mut slow = Vec::new();
        for (id, link) in &self.links {
            if Some(*id) == from {
                continue;
            }
            match link.out.try_send(message.clone()) {
                Ok(()) if link.mesh => {
                    self.metrics.mesh_messages_sent.inc();
                }
                Ok(()) => {}
                Err(_) => slow.push(*id),
            }
        }
        for id in slow {
            self.links.remove(&id);
            self.metrics.slow_links_dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::Map;

    async fn put(doc: &Doc, key: &'static str) {
        doc.edit(move |d| {
            let map = d.get_or_insert_map("m");
            let mut txn = d.transact_mut();
            map.insert(&mut txn, key, "v");
            txn.encode_update_v1()
        })
        .await;
        doc.read(|_| ()).await;
    }

    async fn keys(doc: &Doc) -> Vec<String> {
        doc.read(|d| {
            let map = d.get_or_insert_map("m");
            let txn = d.transact();
            let mut k: Vec<String> = map.keys(&txn).map(str::to_string).collect();
            k.sort();
            k
        })
        .await
        .unwrap()
    }

    /// Pumps everything `rx` has queued into `to` as arriving on `link`.
    async fn pump(rx: &mut mpsc::Receiver<Vec<u8>>, to: &Doc, link: LinkId) -> usize {
        let mut n = 0;
        while let Ok(m) = rx.try_recv() {
            to.incoming(link, m).await;
            n += 1;
        }
        to.read(|_| ()).await;
        n
    }

    #[tokio::test]
    async fn two_documents_sync_and_a_relayed_update_is_forwarded_once() {
        let (a, b, c) =
            (Doc::spawn(DocMetrics::default()), Doc::spawn(DocMetrics::default()), Doc::spawn(DocMetrics::default()));
        put(&a, "early").await;
        // a—b and b—c, b in the middle.
        let mut a_to_b = a.attach(1, true).await;
        let mut b_to_a = b.attach(2, true).await;
        let mut b_to_c = b.attach(3, true).await;
        let mut c_to_b = c.attach(4, true).await;
        for _ in 0..3 {
            pump(&mut a_to_b, &b, 2).await;
            pump(&mut b_to_a, &a, 1).await;
            pump(&mut b_to_c, &c, 4).await;
            pump(&mut c_to_b, &b, 3).await;
        }
        assert_eq!(keys(&c).await, ["early"], "SyncStep1/2 carried the earlier update across b");
        put(&a, "late").await;
        pump(&mut a_to_b, &b, 2).await;
        assert_eq!(pump(&mut b_to_c, &c, 4).await, 1);
        assert_eq!(keys(&c).await, ["early", "late"]);
        // The same update again (over a second path) is dropped, not forwarded.
        put(&a, "again").await;
        let message = a_to_b.try_recv().unwrap();
        b.incoming(2, message.clone()).await;
        b.incoming(3, message).await;
        b.read(|_| ()).await;
        assert_eq!(pump(&mut b_to_c, &c, 4).await, 1);
        assert_eq!(pump(&mut b_to_a, &a, 1).await, 0);
        // Garbage costs the message, nothing else.
        b.incoming(2, vec![0xff, 0xff, 0xff]).await;
        put(&a, "after").await;
        pump(&mut a_to_b, &b, 2).await;
        pump(&mut b_to_c, &c, 4).await;
        assert_eq!(keys(&c).await, ["after", "again", "early", "late"]);
    }
}
