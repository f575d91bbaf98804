//! The shared CRDT document (a `yrs` Doc) and its relay. One task owns the document; every link (mesh or
//! rendezvous) attaches to it and speaks the Yjs sync protocol: on attach each side sends its state vector
//! (SyncStep1) and answers the other's with the missing updates (SyncStep2); afterwards every update is
//! sent as it happens. An update received on one link is applied and forwarded to every other link once:
//! a bounded seen-cache (by hash of the update bytes, which relays keep verbatim) stops re-forwarding.
//!
//! What a peer sends is bounded before it costs anything (docs/design.md §3.5): every message passes
//! [`screen`] first; messages waiting for the document share one inbound budget; each link's unsent
//! messages have an outbound budget, past which the link is dropped as slow; a SyncStep1, which costs a
//! whole-document encode, is answered at most once per link per [`STEP1_INTERVAL`]; an update that would nest
//! shared types past `crate::nesting`'s bound is refused and closes its link; one that builds on what is
//! not here yet is held (`crate::held`) and checked again when it is. A forwarded update is one shared
//! buffer, not a copy per link.
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Transact, Update};

use crate::held::Held;
use crate::nesting::{Nesting, Verdict};
use crate::screen::{self, Kind, Refused};

/// Updates remembered by the seen-cache.
const SEEN_CAPACITY: usize = 1 << 16;
/// Messages queued for one link before it counts as too slow and is dropped (it resyncs on redial).
pub const LINK_QUEUE: usize = 1024;
/// Bytes queued for one link and not yet written to its socket, past which it is dropped as slow.
pub const LINK_OUT_BUDGET: usize = 16 << 20;
/// Bytes received on all links together and not yet applied; a link waits (and stops reading) for room.
pub const INBOUND_BUDGET: usize = 32 << 20;
/// A link's SyncStep1 is answered at most once in this long; later ones in the interval are dropped.
pub const STEP1_INTERVAL: Duration = Duration::from_secs(3);
/// A link whose held update has waited this long is asked for what this document lacks.
const ASK_AFTER: Duration = Duration::from_secs(1);

/// Identifies one attached link for the lifetime of the process.
pub type LinkId = u64;

type Edit = Box<dyn FnOnce(&yrs::Doc) -> Vec<u8> + Send>;
type Read = Box<dyn FnOnce(&yrs::Doc) + Send>;

enum Cmd {
    Attach { link: LinkId, mesh: bool, out: Outbox, refuse: oneshot::Sender<()> },
    Detach(LinkId),
    Incoming { link: LinkId, kind: Kind, bytes: Bytes, _room: OwnedSemaphorePermit },
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
    /// Messages refused by the screen or that did not apply.
    pub protocol_errors: Counter,
    /// SyncStep1 messages dropped because the link had one answered less than [`STEP1_INTERVAL`] ago.
    pub sync_requests_dropped: Counter,
    /// Links dropped because they could not keep up.
    pub slow_links_dropped: Counter,
    /// Updates dropped while held for what they build on: their link's budget was full, or it closed.
    pub held_dropped: Counter,
}

/// A cheap handle to the document task.
#[derive(Clone)]
pub struct Doc {
    tx: mpsc::Sender<Cmd>,
    inbound: Arc<Semaphore>,
    metrics: DocMetrics,
}

/// The messages the document sends one link, and the bytes of them not yet written to its socket.
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// A link's end of its [`Outbox`]: the writer calls [`Inbox::sent`] once a message is on the socket. When
/// `rx` ends, `refused` says whether the document refused something the peer sent (else it was too slow).
pub struct Inbox {
    pub rx: mpsc::Receiver<Bytes>,
    pub refused: oneshot::Receiver<()>,
    queued: Arc<AtomicUsize>,
}

impl Inbox {
    pub fn sent(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
    }

    /// A handle the writer task keeps to report what it sent.
    pub fn counter(&self) -> Sent {
        Sent(self.queued.clone())
    }
}

/// Reports bytes written to a link's socket (see [`Inbox::counter`]).
#[derive(Clone)]
pub struct Sent(Arc<AtomicUsize>);

impl Sent {
    pub fn sent(&self, len: usize) {
        self.0.fetch_sub(len, Ordering::Relaxed);
    }
}

impl Outbox {
    /// Queues `m` unless that would pass the link's message count or byte budget.
    fn offer(&self, m: Bytes) -> bool {
        let len = m.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > LINK_OUT_BUDGET {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        if self.tx.try_send(m).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl Doc {
    /// Starts the document task.
    pub fn spawn(metrics: DocMetrics) -> Doc {
        let (tx, rx) = mpsc::channel(1024);
        let relay = Relay {
            doc: yrs::Doc::new(),
            links: HashMap::new(),
            seen: Seen::default(),
            nesting: Nesting::default(),
            held: Held::default(),
            metrics: metrics.clone(),
        };
        tokio::spawn(relay.run(rx));
        Doc { tx, inbound: Arc::new(Semaphore::new(INBOUND_BUDGET)), metrics }
    }

    /// Attaches a link; what the document sends it arrives in the returned inbox, starting with SyncStep1.
    /// `mesh`: whether it is a mesh link (counted in `mesh_messages_sent`) rather than the rendezvous.
    pub async fn attach(&self, link: LinkId, mesh: bool) -> Inbox {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let out = Outbox { tx, queued: queued.clone() };
        let (refuse, refused) = oneshot::channel();
        let _ = self.tx.send(Cmd::Attach { link, mesh, out, refuse }).await;
        Inbox { rx, refused, queued }
    }

    pub async fn detach(&self, link: LinkId) {
        let _ = self.tx.send(Cmd::Detach(link)).await;
    }

    /// A message received on `link`. It is screened here, so a refused one never reaches the document
    /// task; the caller closes the link on an error. Waits while the inbound budget is spent.
    pub async fn incoming(&self, link: LinkId, bytes: Bytes) -> Result<(), Refused> {
        let kind = screen::screen(&bytes).inspect_err(|_| {
            self.metrics.protocol_errors.inc();
        })?;
        // A message is at most the WebSocket limit, far below the budget, so this always completes.
        let want = u32::try_from(bytes.len().clamp(1, INBOUND_BUDGET)).unwrap_or(u32::MAX);
        let Ok(room) = self.inbound.clone().acquire_many_owned(want).await else { return Ok(()) };
        let _ = self.tx.send(Cmd::Incoming { link, kind, bytes, _room: room }).await;
        Ok(())
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
    fn key(bytes: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    }

    fn contains(&self, bytes: &[u8]) -> bool {
        self.set.contains(&Self::key(bytes))
    }

    /// Whether `bytes` is new (and remembers it).
    fn first_time(&mut self, bytes: &[u8]) -> bool {
        let key = Self::key(bytes);
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
    out: Outbox,
    /// Fired when the document refuses what this link sent (the nesting bound).
    refuse: oneshot::Sender<()>,
    mesh: bool,
    /// When this link's last SyncStep1 was answered.
    answered: Option<Instant>,
    /// When this document last sent the link a SyncStep1 because an update from it had to wait.
    asked: Option<Instant>,
}

struct Relay {
    doc: yrs::Doc,
    links: HashMap<LinkId, Link>,
    seen: Seen,
    nesting: Nesting,
    held: Held,
    metrics: DocMetrics,
}

fn encode(m: SyncMessage) -> Bytes {
    Bytes::from(Message::Sync(m).encode_v1())
}

impl Relay {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Cmd::Attach { link, mesh, out, refuse } => {
                    let step1 = encode(SyncMessage::SyncStep1(self.doc.transact().state_vector()));
                    if out.offer(step1) {
                        self.links.insert(link, Link { out, refuse, mesh, answered: None, asked: None });
                    }
                }
                Cmd::Detach(link) => {
                    self.links.remove(&link);
                    self.metrics.held_dropped.inc_by(self.held.forget(link));
                }
                Cmd::Incoming { link, kind, bytes, _room } => self.incoming(link, kind, &bytes),
                Cmd::Edit(f) => self.edit(f),
                Cmd::Read(f) => f(&self.doc),
            }
        }
    }

    /// A local edit: never refused, but what it nests counts for what peers add under it.
    fn edit(&mut self, f: Edit) {
        let before = self.clocks();
        let update = f(&self.doc);
        let deepest = screen::shape(&update).ok().and_then(|shape| self.nesting.record_local(&shape, &before));
        if let Some(depth) = deepest {
            tracing::warn!(depth, "a local edit nests shared types past the bound: every peer will refuse it");
        }
        if self.seen.first_time(&update) {
            self.forward(None, update);
        }
        self.release();
    }

    /// A screened message. yrs is not known to panic on screened input; a panic must still cost only the
    /// message, never the agent.
    fn incoming(&mut self, link: LinkId, kind: Kind, bytes: &[u8]) {
        let decoded =
            catch_unwind(|| Message::decode_v1(bytes)).unwrap_or(Err(yrs::encoding::read::Error::EndOfBuffer(0)));
        match (kind, decoded) {
            (Kind::Step1, Ok(Message::Sync(SyncMessage::SyncStep1(sv)))) => self.answer(link, &sv),
            (_, Ok(Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u)))) => self.update(link, u),
            _ => drop(self.metrics.protocol_errors.inc()),
        }
    }

    fn answer(&mut self, link: LinkId, sv: &StateVector) {
        let Some(l) = self.links.get_mut(&link) else { return };
        if l.answered.is_some_and(|at| at.elapsed() < STEP1_INTERVAL) {
            self.metrics.sync_requests_dropped.inc();
            return;
        }
        l.answered = Some(Instant::now());
        let diff = self.doc.transact().encode_state_as_update_v1(sv);
        if !l.out.offer(encode(SyncMessage::SyncStep2(diff))) {
            // A peer that asks faster than it reads is dropped, not buffered for.
            self.links.remove(&link);
            self.metrics.slow_links_dropped.inc();
        }
    }

    fn update(&mut self, from: LinkId, bytes: Vec<u8>) {
        if self.seen.contains(&bytes) {
            self.metrics.duplicates_dropped.inc();
            return;
        }
        if self.accept(from, bytes) {
            self.release();
        }
    }

    /// Applies and forwards an update whose depths are known and within the bound, holds one that builds
    /// on what is not here yet, and refuses (closing its link) one that nests too deep or that yrs does
    /// not integrate whole. Whether it applied.
    fn accept(&mut self, from: LinkId, bytes: Vec<u8>) -> bool {
        let clocks = self.clocks();
        let shape = screen::shape(&bytes).map_err(|e| e.to_string());
        match shape.and_then(|shape| self.nesting.check(&shape, &clocks)) {
            Ok(Verdict::Ready(checked)) => {
                let doc = &self.doc;
                let applied = catch_unwind(AssertUnwindSafe(|| {
                    let update = Update::decode_v1(&bytes).map_err(|e| e.to_string())?;
                    doc.transact_mut().apply_update(update).map_err(|e| e.to_string())
                }));
                let held_back = self.drop_pending();
                let left_out = self.nesting.record(checked, self.clocks());
                let applied = match applied {
                    Ok(Ok(())) if !held_back && left_out == 0 => Ok(()),
                    Ok(Ok(())) => Err(format!("yrs held back {left_out} items the check found complete")),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("yrs panicked".to_string()),
                };
                if let Err(why) = applied {
                    self.refuse(from, &why);
                    return false;
                }
                self.metrics.updates_received.inc();
                self.seen.first_time(&bytes);
                self.forward(Some(from), bytes);
                true
            }
            Ok(Verdict::Waiting(anchors)) => {
                // Out of order for a moment is normal; a link whose updates wait longer, or overflow
                // what it may hold, is asked for what this document lacks.
                let waited = self.held.oldest(from).is_some_and(|t| t >= ASK_AFTER);
                let dropped = self.held.hold(from, bytes, anchors);
                self.metrics.held_dropped.inc_by(dropped);
                if waited || dropped > 0 {
                    self.ask(from);
                }
                false
            }
            Err(why) => {
                self.refuse(from, &why);
                false
            }
        }
    }

    /// Sends a link whose updates wait this document's state (SyncStep1), at most once per
    /// [`STEP1_INTERVAL`]: its answer brings what they build on, and what any of them that was dropped
    /// while held carried.
    fn ask(&mut self, link: LinkId) {
        if self.links.get(&link).is_none_or(|l| l.asked.is_some_and(|at| at.elapsed() < STEP1_INTERVAL)) {
            return;
        }
        let step1 = encode(SyncMessage::SyncStep1(self.doc.transact().state_vector()));
        if let Some(l) = self.links.get_mut(&link) {
            l.asked = Some(Instant::now());
            l.out.offer(step1);
        }
    }

    /// Lets go of a link whose update was refused, and of what it had held.
    fn refuse(&mut self, from: LinkId, why: &str) {
        tracing::debug!(error = %why, "refused an update; closing its link");
        self.metrics.protocol_errors.inc();
        if let Some(link) = self.links.remove(&from) {
            let _ = link.refuse.send(());
        }
        self.metrics.held_dropped.inc_by(self.held.forget(from));
    }

    /// Empties what yrs holds pending, which nothing should leave there: blocks or deletions integrated
    /// later would be unchecked. Whether there was any.
    fn drop_pending(&mut self) -> bool {
        let mut txn = self.doc.transact_mut();
        let store = yrs::WriteTxn::store_mut(&mut txn);
        let found = store.pending_update().is_some_and(|p| !p.update.is_empty())
            || store.pending_ds().is_some_and(|ds| !ds.is_empty());
        yrs::WriteTxn::prune_pending(&mut txn);
        found
    }

    /// Checks again, and applies, the held updates whose missing ids are now here, until none is left.
    fn release(&mut self) {
        loop {
            let clocks = self.clocks();
            let here = |(client, clock): screen::Id| clock < clocks(client);
            let Some((from, bytes)) = self.held.next_ready(here) else { return };
            if self.seen.contains(&bytes) {
                self.metrics.duplicates_dropped.inc();
            } else {
                self.accept(from, bytes);
            }
        }
    }

    /// The document's clock for each client: it holds every clock below (the relay never lets it hold a
    /// hole, so the state vector is exact).
    fn clocks(&self) -> impl Fn(u64) -> u32 + use<> {
        let state = self.doc.transact().state_vector();
        move |client| state.get(&yrs::ClientID::new(client))
    }

    /// Sends an update to every link but its source, one shared buffer for all; a link over its budget is
    /// dropped.
    fn forward(&mut self, from: Option<LinkId>, update: Vec<u8>) {
        let message = encode(SyncMessage::Update(update));
        let mut slow = Vec::new();
        for (id, link) in &self.links {
            if Some(*id) == from {
                continue;
            }
            if !link.out.offer(message.clone()) {
                slow.push(*id);
            } else if link.mesh {
                self.metrics.mesh_messages_sent.inc();
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
    async fn pump(inbox: &mut Inbox, to: &Doc, link: LinkId) -> usize {
        let mut n = 0;
        while let Ok(m) = inbox.rx.try_recv() {
            inbox.sent(m.len());
            to.incoming(link, m).await.unwrap();
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
        let message = a_to_b.rx.try_recv().unwrap();
        b.incoming(2, message.clone()).await.unwrap();
        b.incoming(3, message).await.unwrap();
        b.read(|_| ()).await;
        assert_eq!(pump(&mut b_to_c, &c, 4).await, 1);
        assert_eq!(pump(&mut b_to_a, &a, 1).await, 0);
        // Garbage costs the message, nothing else.
        assert!(b.incoming(2, Bytes::from_static(&[0xff, 0xff, 0xff])).await.is_err());
        put(&a, "after").await;
        pump(&mut a_to_b, &b, 2).await;
        pump(&mut b_to_c, &c, 4).await;
        assert_eq!(keys(&c).await, ["after", "again", "early", "late"]);
    }
}
