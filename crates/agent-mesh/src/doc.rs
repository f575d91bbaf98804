//! The shared CRDT document (a `yrs` Doc) and its relay. One task owns the document; every link (mesh or
//! rendezvous) attaches to it and speaks the Yjs sync protocol: on attach each side sends its state vector
//! (SyncStep1) and answers the other's with the missing updates (SyncStep2); afterwards every update is
//! sent as it happens. An update received on one link is applied and forwarded to every other link once:
//! a bounded seen-cache (by the update's id, a hash of its bytes, which relays keep verbatim) stops
//! re-forwarding.
//!
//! What a peer sends is bounded before it costs anything (docs/design.md §3.5): every message passes
//! [`screen`] first; messages waiting for the document share one inbound budget; each link's unsent
//! messages have an outbound budget, past which the link is dropped as slow; a SyncStep1, which costs a
//! whole-document encode, is answered at most once per link per [`STEP1_INTERVAL`]; an update that would nest
//! shared types past `crate::nesting`'s bound is refused and closes its link; one that builds on what is
//! not here yet is held (`crate::held`) and checked again when it is. A forwarded update is one shared
//! buffer, not a copy per link.
//!
//! Over mesh links, updates follow the broadcast tree (`crate::tree`): whole over its links, as ids over
//! the others, which ask for what does not arrive. The rendezvous link gets every update whole.
use std::collections::{HashMap, VecDeque};
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
pub use crate::tree::LinkId;
use crate::tree::{Action, Broadcast, Control, Origin, Tree, UpdateId, update_id};

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
/// Queued announcements go out at least every this many messages.
const FLUSH_EVERY: usize = 64;
// The tree asks again for what no graft brought only once a link may answer again.
const _: () = assert!(crate::tree::ASK_AGAIN_AFTER.as_millis() > STEP1_INTERVAL.as_millis());

type Edit = Box<dyn FnOnce(&yrs::Doc) -> Vec<u8> + Send>;
type Read = Box<dyn FnOnce(&yrs::Doc) + Send>;

enum Cmd {
    Attach { link: LinkId, mesh: bool, out: Outbox, refuse: oneshot::Sender<()> },
    Detach(LinkId),
    Incoming { link: LinkId, kind: Kind, bytes: Bytes, _room: OwnedSemaphorePermit },
    Tree { link: LinkId, control: Control },
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
    /// Update messages sent on mesh links (the rendezvous link not counted): the payload copies.
    pub mesh_messages_sent: Counter,
    /// Update ids announced on mesh links (`ihave`), and the bytes of those frames.
    pub announcements_sent: Counter,
    pub announcement_bytes: Counter,
    /// Update ids asked for (`graft`), and links pruned from the tree (`prune` sent).
    pub grafts_sent: Counter,
    pub prunes_sent: Counter,
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

/// What the document sends a link: a sync message (a binary frame) or a tree message (a text frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    Sync(Bytes),
    Tree(String),
}

impl Outgoing {
    /// The bytes it counts against its link's budget: a sync message's. A tree message is small and
    /// bounded (`crate::tree::MAX_IDS`), and the queue's length bounds how many wait.
    pub fn budgeted(&self) -> usize {
        match self {
            Outgoing::Sync(b) => b.len(),
            Outgoing::Tree(_) => 0,
        }
    }
}

/// The messages the document sends one link, and the bytes of them not yet written to its socket.
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    queued: Arc<AtomicUsize>,
}

/// A link's end of its [`Outbox`]: the writer calls [`Inbox::sent`] once a message is on the socket. When
/// `rx` ends, `refused` says whether the document refused something the peer sent (else it was too slow).
pub struct Inbox {
    pub rx: mpsc::Receiver<Outgoing>,
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
    fn offer(&self, m: Outgoing) -> bool {
        let len = m.budgeted();
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
    /// Starts the document task, broadcasting over the tree.
    pub fn spawn(metrics: DocMetrics) -> Doc {
        Doc::spawn_with(metrics, Broadcast::default())
    }

    /// Starts the document task, broadcasting over mesh links as `broadcast` says.
    pub fn spawn_with(metrics: DocMetrics, broadcast: Broadcast) -> Doc {
        let (tx, rx) = mpsc::channel(1024);
        let relay = Relay {
            doc: yrs::Doc::new(),
            links: HashMap::new(),
            seen: Seen::default(),
            nesting: Nesting::default(),
            held: Held::default(),
            tree: match broadcast {
                Broadcast::Tree { graft_after } => Some(Tree::new(graft_after)),
                Broadcast::Flood => None,
            },
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

    /// What the relay counts.
    pub fn metrics(&self) -> &DocMetrics {
        &self.metrics
    }

    pub async fn detach(&self, link: LinkId) {
        let _ = self.tx.send(Cmd::Detach(link)).await;
    }

    /// A tree message received on mesh link `link` (parsed and bounded by `Control::parse`).
    pub async fn tree(&self, link: LinkId, control: Control) {
        let _ = self.tx.send(Cmd::Tree { link, control }).await;
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

/// Updates seen lately, by id (`tree::update_id`), each with whether a copy came over the tree (a mesh
/// link's update, or this agent's own edit; not the rendezvous' or an answer's).
#[derive(Default)]
struct Seen {
    set: HashMap<UpdateId, bool>,
    order: VecDeque<UpdateId>,
}

impl Seen {
    fn contains(&self, id: UpdateId) -> bool {
        self.set.contains_key(&id)
    }

    /// Whether a copy came over the tree, if it was seen.
    fn over_tree(&self, id: UpdateId) -> Option<bool> {
        self.set.get(&id).copied()
    }

    fn came_over_tree(&mut self, id: UpdateId) {
        if let Some(over) = self.set.get_mut(&id) {
            *over = true;
        }
    }

    /// Whether `id` is new (and remembers it, and whether this copy came over the tree).
    fn first_time(&mut self, id: UpdateId, over_tree: bool) -> bool {
        if self.set.contains_key(&id) {
            return false;
        }
        self.set.insert(id, over_tree);
        self.order.push_back(id);
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
    /// The broadcast tree over the mesh links (`None`: flood them).
    tree: Option<Tree>,
    metrics: DocMetrics,
}

fn encode(m: SyncMessage) -> Outgoing {
    Outgoing::Sync(Bytes::from(Message::Sync(m).encode_v1()))
}

impl Relay {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut since_flush = 0;
        loop {
            let due = self.tree.as_ref().and_then(Tree::next_due);
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => return,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.tree_due();
                    continue;
                }
            };
            match cmd {
                Cmd::Attach { link, mesh, out, refuse } => self.attach(link, mesh, out, refuse),
                Cmd::Detach(link) => {
                    self.let_go(link);
                    self.metrics.held_dropped.inc_by(self.held.forget(link));
                }
                Cmd::Incoming { link, kind, bytes, _room } => self.incoming(link, kind, &bytes),
                Cmd::Tree { link, control } => self.heard(link, control),
                Cmd::Edit(f) => self.edit(f),
                Cmd::Read(f) => f(&self.doc),
            }
            // Announcements wait until nothing else does, so one frame carries many ids; under a steady
            // stream, for at most a few dozen messages.
            since_flush += 1;
            if rx.is_empty() || since_flush >= FLUSH_EVERY {
                since_flush = 0;
                let flushed = self.tree.as_mut().map(Tree::flush).unwrap_or_default();
                self.act(&flushed, None);
            }
        }
    }

    /// A new link gets this document's state vector first; a mesh link also hears that this end speaks
    /// the tree.
    fn attach(&mut self, link: LinkId, mesh: bool, out: Outbox, refuse: oneshot::Sender<()>) {
        let step1 = encode(SyncMessage::SyncStep1(self.doc.transact().state_vector()));
        let tree = self.tree.as_mut().filter(|_| mesh);
        if !out.offer(step1) || tree.as_ref().is_some_and(|_| !out.offer(Outgoing::Tree(Control::Hello.to_text()))) {
            return;
        }
        if let Some(t) = tree {
            t.attach(link);
        }
        self.links.insert(link, Link { out, refuse, mesh, answered: None, asked: None });
    }

    /// A tree message from a mesh link's peer.
    fn heard(&mut self, link: LinkId, control: Control) {
        let Some(tree) = self.tree.as_mut() else { return };
        let seen = &self.seen;
        let actions = tree.heard(link, control, Instant::now(), |id| seen.contains(id));
        self.act(&actions, None);
    }

    fn tree_due(&mut self) {
        let Some(tree) = self.tree.as_mut() else { return };
        let seen = &self.seen;
        let actions = tree.due(Instant::now(), |id| seen.contains(id));
        self.act(&actions, None);
    }

    /// Carries out what the tree says; `update` is the new update a `Push` sends.
    fn act(&mut self, actions: &[Action], update: Option<&Outgoing>) {
        let mut slow = Vec::new();
        for action in actions {
            let (link, message) = match action {
                Action::Push(l) => (*l, update.cloned()),
                Action::Resend(l, payload) => (*l, Some(Outgoing::Sync(payload.clone()))),
                Action::Send(l, control) => (*l, Some(Outgoing::Tree(control.to_text()))),
                Action::Ask(l) => {
                    self.ask(*l);
                    continue;
                }
            };
            let (Some(l), Some(message)) = (self.links.get(&link), message) else { continue };
            if slow.contains(&link) {
                continue;
            }
            let len = if let Outgoing::Tree(text) = &message { text.len() as u64 } else { 0 };
            let mesh = l.mesh;
            if !l.out.offer(message) {
                slow.push(link);
                continue;
            }
            match action {
                Action::Push(_) | Action::Resend(..) if mesh => self.metrics.mesh_messages_sent.inc(),
                Action::Send(_, Control::IHave(ids)) => {
                    self.metrics.announcements_sent.inc_by(ids.len() as u64);
                    self.metrics.announcement_bytes.inc_by(len)
                }
                Action::Send(_, Control::Graft(ids)) => self.metrics.grafts_sent.inc_by(ids.len() as u64),
                Action::Send(_, Control::Prune) => self.metrics.prunes_sent.inc(),
                _ => 0,
            };
        }
        for id in slow {
            self.drop_slow(id);
        }
    }

    /// A link that does not keep up is let go (it resyncs on redial).
    fn drop_slow(&mut self, link: LinkId) {
        self.let_go(link);
        self.metrics.slow_links_dropped.inc();
    }

    /// Takes a link out of the relay and the tree (which may ask the other links to fill the gap).
    fn let_go(&mut self, link: LinkId) -> Option<Link> {
        let gone = self.links.remove(&link);
        let actions = self.tree.as_mut().map(|t| t.detach(link)).unwrap_or_default();
        self.act(&actions, None);
        gone
    }

    /// A local edit: never refused, but what it nests counts for what peers add under it.
    fn edit(&mut self, f: Edit) {
        let before = self.clocks();
        let update = f(&self.doc);
        let deepest = screen::shape(&update).ok().and_then(|shape| self.nesting.record_local(&shape, &before));
        if let Some(depth) = deepest {
            tracing::warn!(depth, "a local edit nests shared types past the bound: every peer will refuse it");
        }
        let id = update_id(&update);
        // This agent is the update's root in the tree: copies that come back are duplicates.
        if self.seen.first_time(id, true) {
            self.forward(None, id, update, true);
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
            (_, Ok(Message::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u)))) => {
                self.update(link, u, kind == Kind::Update)
            }
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
            self.drop_slow(link);
        }
    }

    /// An update received whole; `broadcast` unless it is a SyncStep2 (an answer to this link alone, whose
    /// copies say nothing about the tree).
    fn update(&mut self, from: LinkId, bytes: Vec<u8>, broadcast: bool) {
        let id = update_id(&bytes);
        if let Some(came_over_tree) = self.seen.over_tree(id) {
            self.metrics.duplicates_dropped.inc();
            if self.over_tree(from, broadcast)
                && let Some(tree) = self.tree.as_mut()
            {
                self.seen.came_over_tree(id);
                let actions = tree.again(id, from, !came_over_tree, Instant::now());
                let pushes = actions.iter().any(|a| matches!(a, Action::Push(_)));
                let message = pushes.then(|| encode(SyncMessage::Update(bytes)));
                self.act(&actions, message.as_ref());
            }
            return;
        }
        if self.accept(from, id, bytes, broadcast) {
            self.release();
        }
    }

    /// Whether an update from `from` came over the tree: a mesh link's update, not an answer.
    fn over_tree(&self, from: LinkId, broadcast: bool) -> bool {
        broadcast && self.links.get(&from).is_some_and(|l| l.mesh)
    }

    /// Applies and forwards an update whose depths are known and within the bound, holds one that builds
    /// on what is not here yet, and refuses (closing its link) one that nests too deep or that yrs does
    /// not integrate whole. Whether it applied.
    fn accept(&mut self, from: LinkId, id: UpdateId, bytes: Vec<u8>, broadcast: bool) -> bool {
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
                self.seen.first_time(id, self.over_tree(from, broadcast));
                self.forward(Some(from), id, bytes, broadcast);
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
        if let Some(l) = self.links.get_mut(&link)
            && l.out.offer(step1)
        {
            l.asked = Some(Instant::now());
        }
    }

    /// Lets go of a link whose update was refused, and of what it had held.
    fn refuse(&mut self, from: LinkId, why: &str) {
        tracing::debug!(error = %why, "refused an update; closing its link");
        self.metrics.protocol_errors.inc();
        if let Some(link) = self.let_go(from) {
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
            let id = update_id(&bytes);
            if self.seen.contains(id) {
                self.metrics.duplicates_dropped.inc();
            } else {
                // Most held updates are a mesh link's updates that came before what they build on.
                self.accept(from, id, bytes, true);
            }
        }
    }

    /// The document's clock for each client: it holds every clock below (the relay never lets it hold a
    /// hole, so the state vector is exact).
    fn clocks(&self) -> impl Fn(u64) -> u32 + use<> {
        let state = self.doc.transact().state_vector();
        move |client| state.get(&yrs::ClientID::new(client))
    }

    /// Sends a new update on to the links but its source, one shared buffer for all: whole to the
    /// rendezvous, and over the mesh as the tree says (whole to every mesh link when flooding). A link
    /// over its budget is dropped. What came as a SyncStep2 goes on as one, so that its second copies
    /// prune nothing (see [`Relay::update`]).
    fn forward(&mut self, from: Option<LinkId>, id: UpdateId, update: Vec<u8>, broadcast: bool) {
        let message = encode(if broadcast { SyncMessage::Update(update) } else { SyncMessage::SyncStep2(update) });
        let origin = match from.and_then(|f| self.links.get(&f).map(|l| (f, l.mesh))) {
            None => Origin::Local,
            Some((f, true)) if broadcast => Origin::Mesh(f),
            Some((f, true)) => Origin::Answer(f),
            Some((_, false)) => Origin::Hub,
        };
        let flooded = |l: &Link| !l.mesh || self.tree.is_none();
        let mut actions: Vec<Action> = self
            .links
            .iter()
            .filter(|(id, l)| Some(**id) != from && flooded(l))
            .map(|(id, _)| Action::Push(*id))
            .collect();
        if let (Some(tree), Outgoing::Sync(payload)) = (self.tree.as_mut(), &message) {
            actions.extend(tree.received(id, origin, payload, Instant::now()));
        }
        self.act(&actions, Some(&message));
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

    /// Pumps everything `rx` has queued into `to` as arriving on `link`; the sync messages it carried.
    async fn pump(inbox: &mut Inbox, to: &Doc, link: LinkId) -> usize {
        let mut n = 0;
        while let Ok(m) = inbox.rx.try_recv() {
            inbox.sent(m.budgeted());
            match m {
                Outgoing::Sync(bytes) => {
                    to.incoming(link, bytes).await.unwrap();
                    n += 1;
                }
                Outgoing::Tree(text) => to.tree(link, Control::parse(&text).unwrap().unwrap()).await,
            }
        }
        to.read(|_| ()).await;
        n
    }

    fn sync(m: Outgoing) -> Bytes {
        match m {
            Outgoing::Sync(bytes) => bytes,
            Outgoing::Tree(text) => panic!("a tree message where a sync one was expected: {text}"),
        }
    }

    #[tokio::test]
    async fn two_documents_sync_and_a_relayed_update_is_forwarded_once() {
        let flood = || Doc::spawn_with(DocMetrics::default(), Broadcast::Flood);
        let (a, b, c) = (flood(), flood(), flood());
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
        let message = sync(a_to_b.rx.try_recv().unwrap());
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

    #[tokio::test(start_paused = true)]
    async fn the_tree_prunes_a_second_path_and_grafts_around_a_broken_one() {
        let metrics: Vec<DocMetrics> = (0..3).map(|_| DocMetrics::default()).collect();
        let docs: Vec<Doc> = metrics.iter().map(|m| Doc::spawn(m.clone())).collect();
        let (a, b, c) = (&docs[0], &docs[1], &docs[2]);
        // A triangle. Link ids: a–b is 1 at a and 2 at b, b–c 3 and 4, a–c 5 and 6.
        let mut wires = vec![
            (a.attach(1, true).await, b, 2),
            (b.attach(2, true).await, a, 1),
            (b.attach(3, true).await, c, 4),
            (c.attach(4, true).await, b, 3),
            (a.attach(5, true).await, c, 6),
            (c.attach(6, true).await, a, 5),
        ];
        async fn settle(wires: &mut [(Inbox, &Doc, LinkId)]) -> usize {
            let mut total = 0;
            loop {
                let mut moved = 0;
                for (inbox, to, link) in wires.iter_mut() {
                    moved += pump(inbox, to, *link).await;
                }
                if moved == 0 {
                    return total;
                }
                total += moved;
            }
        }
        settle(&mut wires).await;
        let copies = || metrics.iter().map(|m| m.mesh_messages_sent.get()).sum::<u64>();
        put(a, "one").await;
        settle(&mut wires).await;
        assert_eq!(keys(c).await, ["one"]);
        let prunes: u64 = metrics.iter().map(|m| m.prunes_sent.get()).sum();
        assert!(prunes > 0, "the first update arrived twice somewhere and pruned that link");
        let before = copies();
        put(a, "two").await;
        settle(&mut wires).await;
        assert_eq!((keys(b).await.len(), keys(c).await.len()), (2, 2));
        assert_eq!(copies() - before, 2, "the second update crossed the tree's two links, once each");
        // a–c goes. If it was in the tree, b's link to c is lazy at b: c hears of the update by id and
        // asks for it.
        wires.retain(|(_, _, link)| ![5, 6].contains(link));
        a.detach(5).await;
        c.detach(6).await;
        put(a, "three").await;
        settle(&mut wires).await;
        tokio::time::sleep(crate::tree::GRAFT_AFTER * 2).await;
        settle(&mut wires).await;
        assert_eq!(keys(c).await, ["one", "three", "two"]);
        put(b, "four").await;
        settle(&mut wires).await;
        assert_eq!(keys(c).await.len(), 4, "the repaired tree carries updates whole again");
        assert_eq!(keys(a).await.len(), 4);
    }
}
