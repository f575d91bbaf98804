//! The mesh task: keeps the links the [`Table`] wants. It is the drop-in replacement for the seed's
//! `MeshManager` / `spawn_mesh_discovery`. One task owns the table; dials, accepted connections and open
//! links run in their own tasks and report back as [`Event`]s, so every admission and every dial is decided
//! against one up-to-date count.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::assignment::Assignment;
use crate::doc::{Doc, LinkId};
use crate::handshake::{self, HandshakeError, Hello, Refusal};
use crate::identity::Identity;
use crate::links::{Direction, Finished, Table, Wanted};
use crate::metrics::Metrics;
use crate::source::Reading;
use crate::tls::Credentials;
use crate::transport::{self, Gate, Protocols};
use crate::wire::Wire;
use crate::{Config, presence};

/// How the agent chooses its links.
pub enum Selection {
    /// The operator's plan, as read by an assignment source.
    Planned(watch::Receiver<Reading>),
    /// The seed's scheme: scan presence every `scan`, the first scan after `delay`.
    Seed { delay: Duration, scan: Duration },
}

/// Redial timing: `base · 2^attempts`, at most `max`, each delay jittered down to half.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub(crate) fn delay(&self, attempts: u32) -> Duration {
        let full = self.base.saturating_mul(1 << attempts.min(16)).min(self.max);
        full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }
}

/// What the agent shows of its links.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub links: Vec<OpenLink>,
    /// The peers of the applied assignment (None before one is applied, and in seed mode).
    pub planned: Option<Vec<String>>,
    /// Why the latest assignment reading was refused (the links follow the last good one meanwhile).
    pub assignment_error: Option<String>,
    /// The cap held now: the agent's own, or its assignment's when lower.
    pub cap: usize,
    /// Planned peers every dial to which has failed for longer than `unreachable_after`, sorted.
    pub unreachable: Vec<String>,
    /// The peers the applied assignment names as standbys (to dial or accept), sorted.
    pub standbys: Vec<String>,
    /// Planned peers without a link for longer than `standby_after`, sorted: standbys may take their slots.
    pub lost: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenLink {
    pub node_id: String,
    pub direction: Direction,
    pub since_ms: f64,
    /// The link protocol: 2 (TLS), or 1 during an upgrade.
    pub protocol: u8,
    /// Being closed (no longer planned, or over a lowered cap): it holds its slot until its socket is gone.
    pub closing: bool,
    /// A standby link: its peer is no planned one.
    pub standby: bool,
}

type Admission = Result<(LinkId, oneshot::Receiver<Refusal>), Refusal>;

enum Event {
    Dialed {
        id: String,
        result: Result<(Wire, u8), HandshakeError>,
    },
    Inbound {
        id: String,
        protocol: u8,
        admit: oneshot::Sender<Admission>,
    },
    Closed {
        id: String,
        dir: Direction,
        link: LinkId,
    },
    /// A lost peer's address answered (or not) a TCP connection.
    Probed {
        id: String,
        answers: bool,
    },
}

struct Open {
    link: LinkId,
    protocol: u8,
    /// Taken when the close is requested; the entry stays until the link's task reports it closed.
    close: Option<oneshot::Sender<Refusal>>,
    since_ms: f64,
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A process-wide unique link id.
pub fn next_link() -> LinkId {
    NEXT_LINK.fetch_add(1, Ordering::Relaxed)
}

pub(crate) struct Mesh {
    pub identity: Arc<Identity>,
    creds: Arc<Credentials>,
    /// Seed mode with a join token: dialers prove it, acceptors require the proof.
    prove_token: bool,
    pub doc: Doc,
    pub metrics: Metrics,
    pub config: Arc<Config>,
    table: Table,
    open: HashMap<(String, Direction), Open>,
    attempts: HashMap<String, (u32, Instant)>,
    /// Planned peers whose dials all failed since this time (a refusal counts as reached).
    failing: HashMap<String, Instant>,
    /// Planned peers without a link: counted as down from this time (see [`Mesh::alive`]).
    down: HashMap<String, Instant>,
    /// Lost peers whose address answered a probe (`true`), and then failed the dial that followed on its
    /// key or protocol (`false`: another host has the address; its answers mean nothing until a new plan).
    probed: HashMap<String, bool>,
    /// The applied assignment's planned peers (`None` before one) and standbys, shown with the links in
    /// one status update, so a reader never sees a new plan beside links not yet marked closing.
    planned: Option<Vec<String>>,
    standbys: Vec<String>,
    events: mpsc::Sender<Event>,
    status: watch::Sender<Status>,
}

impl Mesh {
    /// Starts the mesh task and the listener for inbound links.
    pub fn spawn(
        identity: Arc<Identity>,
        creds: Arc<Credentials>,
        doc: Doc,
        metrics: Metrics,
        config: Arc<Config>,
        listener: TcpListener,
        selection: Selection,
    ) -> watch::Receiver<Status> {
        let (events, rx) = mpsc::channel(1024);
        let (status, status_rx) = watch::channel(Status::default());
        let table = Table::new(identity.node_id(), config.cap);
        let prove_token = matches!(selection, Selection::Seed { .. }) && config.join_token.is_some();
        // Agents before TLS required the token on every inbound link; in protocol 2 only seed mode does.
        let require_token = prove_token || config.protocols == Protocols::V1;
        let acceptor = Acceptor {
            creds: creds.clone(),
            protocols: config.protocols,
            token: config.join_token.clone().filter(|_| require_token),
            heartbeat: config.heartbeat,
            doc: doc.clone(),
            metrics: metrics.clone(),
            events: events.clone(),
        };
        tokio::spawn(accept_loop(listener, acceptor));
        let mesh = Mesh {
            identity,
            creds,
            prove_token,
            doc,
            metrics,
            config,
            table,
            open: HashMap::new(),
            attempts: HashMap::new(),
            failing: HashMap::new(),
            down: HashMap::new(),
            probed: HashMap::new(),
            planned: None,
            standbys: Vec::new(),
            events,
            status,
        };
        tokio::spawn(mesh.run(rx, selection));
        status_rx
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>, selection: Selection) {
        let (mut reading, mut seed) = match selection {
            Selection::Planned(r) => (Some(r), None),
            Selection::Seed { delay, scan } => (None, Some(tokio::time::interval_at(Instant::now() + delay, scan))),
        };
        let mut applied = None;
        loop {
            // One clock reading decides what is dialed and when to wake: a redial that comes due between
            // two readings would be neither dialed nor waited for, and the peer never dialed again.
            let now = Instant::now();
            if seed.is_none() {
                self.judge_lost(now);
                self.dial_pass(now);
            }
            self.publish(now);
            let due = self.next_due(now);
            tokio::select! {
                Some(ev) = events.recv() => self.on_event(ev),
                changed = transport::changed(&mut reading), if reading.is_some() => match changed {
                    Some(r) => self.on_reading(&mut applied, r),
                    None => reading = None,
                },
                _ = tick(&mut seed), if seed.is_some() => {
                    self.seed_scan().await;
                    self.dial_pass(Instant::now());
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(far)), if due.is_some() => {}
            }
        }
    }

    /// A new assignment reading: apply it if it parsed and differs from what is applied.
    fn on_reading(&mut self, applied: &mut Option<Option<Assignment>>, r: Reading) {
        if r.error.is_some() && r.error != self.status.borrow().assignment_error {
            self.metrics.assignment_errors.inc();
            tracing::warn!(error = r.error.as_deref().unwrap_or(""), "assignment refused; keeping the current links");
        }
        self.status.send_modify(|s| s.assignment_error = r.error.clone());
        if applied.as_ref() == Some(&r.assignment) {
            return;
        }
        tracing::info!(links = r.assignment.as_ref().map_or(0, |a| a.links()), "applying a new assignment");
        let wanted = Wanted::from_assignment(r.assignment.as_ref());
        let planned =
            r.assignment.as_ref().map_or_else(Vec::new, |a| a.linked_ids().into_iter().map(str::to_string).collect());
        let standbys = r.assignment.as_ref().map_or_else(Vec::new, |a| {
            let ids =
                a.standbys.iter().map(|s| s.node_id.as_str()).chain(a.standby_accepts.iter().map(|id| id.as_str()));
            ids.collect::<std::collections::BTreeSet<_>>().into_iter().map(str::to_string).collect()
        });
        (self.planned, self.standbys) = (Some(planned.clone()), standbys);
        *applied = Some(r.assignment);
        self.attempts.clear();
        self.want(wanted);
        // A new plan starts its own count: no planned peer is lost until it has been down this long under it.
        let now = Instant::now();
        let linked: std::collections::BTreeSet<&str> = self.table.held().map(|(id, _)| id.as_str()).collect();
        self.down = planned.into_iter().filter(|id| !linked.contains(id.as_str())).map(|id| (id, now)).collect();
        self.probed.clear();
    }

    /// The seed's scan: the alive peers of the presence list in the document, in its order.
    async fn seed_scan(&mut self) {
        let me = self.identity.node_id();
        let Some(entries) = self.doc.read(presence::entries).await else { return };
        let alive = presence::seed_candidates(&entries, &me, presence::now_ms());
        self.want(Wanted::Seed { alive });
    }

    /// Closes what is no longer wanted; the table keeps their slots until their tasks report them gone.
    fn want(&mut self, wanted: Wanted) {
        let gone = self.table.want(wanted);
        self.close(gone);
        let table = &self.table;
        self.attempts.retain(|id, _| table.dials_to(id));
        self.failing.retain(|id, _| table.plans(id) && table.dials_to(id));
    }

    fn close(&mut self, links: Vec<(String, Direction)>) {
        for link in links {
            if let Some(close) = self.open.get_mut(&link).and_then(|o| o.close.take()) {
                let _ = close.send(Refusal::Unplanned);
                self.metrics.refused(Refusal::Unplanned);
            }
        }
    }

    /// Tells the table which planned peers are lost now; closes the standbys that give way.
    fn judge_lost(&mut self, now: Instant) {
        let after = self.config.standby_after;
        let rank = |since: Instant| match now.checked_duration_since(since) {
            Some(down) if down >= after.saturating_mul(2) => Some(2),
            Some(down) if down >= after => Some(1),
            _ => None,
        };
        let lost = self.down.iter().filter_map(|(id, since)| Some((id.clone(), rank(*since)?))).collect();
        let gone = self.table.set_lost(lost);
        self.close(gone);
    }

    /// Planned peers down for `standby_after` or longer, sorted.
    fn lost(&self, now: Instant) -> Vec<String> {
        let after = self.config.standby_after;
        let lost = |since: &Instant| since.checked_add(after).is_some_and(|at| at <= now);
        let mut ids: Vec<String> =
            self.down.iter().filter(|(_, since)| lost(since)).map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    /// A planned peer showed it is there (it dialed, refused, or its address answered): it is not lost,
    /// and a standby in its slot gives way. It is lost again only after the longest redial backoff and
    /// `standby_after` more: a peer that redials at its backoff must find its slot free, not taken again.
    /// When only its address answered (`probed`), it is dialed as soon as the slot is free; otherwise its
    /// backoff stands (two agents refusing each other must not redial at once, forever).
    fn alive(&mut self, id: &str, probed: bool) {
        if let Some(since) = self.down.get_mut(id) {
            let now = Instant::now();
            *since = now.checked_add(self.config.backoff.max).unwrap_or(now);
            if probed {
                self.attempts.remove(id);
            }
        }
    }

    /// A link with `id` opened (`up`) or closed: a planned peer's down time starts when its link closes.
    fn linked(&mut self, id: &str, up: bool) {
        if up {
            self.down.remove(id);
        } else if self.table.plans(id) {
            self.down.insert(id.to_string(), Instant::now());
        }
        if up && self.table.is_standby(id) {
            self.metrics.standby_links_opened.inc();
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Dialed { id, result } => self.dialed(id, result),
            Event::Inbound { id, protocol, admit } => match self.table.admit(&id) {
                Ok(()) => {
                    let (close, rx) = oneshot::channel();
                    let link = next_link();
                    let _ = admit.send(Ok((link, rx)));
                    self.metrics.links_accepted.inc();
                    self.linked(&id, true);
                    let open = Open { link, protocol, close: Some(close), since_ms: presence::now_ms() };
                    self.open.insert((id, Direction::Accepted), open);
                }
                Err(why) => {
                    self.metrics.refused(why);
                    self.alive(&id, false);
                    let _ = admit.send(Err(why));
                }
            },
            Event::Closed { id, dir, link } => {
                let key = (id, dir);
                if self.open.get(&key).is_some_and(|o| o.link == link) {
                    self.open.remove(&key);
                    let held = self.table.holds_link(&key.0, dir);
                    self.table.closed(&key.0, dir);
                    self.metrics.links_closed.inc();
                    if held {
                        self.linked(&key.0, false);
                    }
                    if dir == Direction::Dialed && self.table.dials_to(&key.0) {
                        self.back_off(&key.0);
                    }
                }
            }
            Event::Probed { id, answers } => {
                if answers && self.probed.get(&id) != Some(&false) {
                    tracing::debug!(peer = %short(&id), "a lost peer's address answers");
                    self.probed.insert(id.clone(), true);
                    self.alive(&id, true);
                }
            }
        }
    }

    fn dialed(&mut self, id: String, result: Result<(Wire, u8), HandshakeError>) {
        let link = next_link();
        let events = self.events.clone();
        // The dial after a probe answered tells whether the answer was the peer's: another key or another
        // protocol at its address is another host; a timeout or a refused connection is the peer gone again.
        let other_host =
            matches!(result, Err(HandshakeError::Tls(_) | HandshakeError::NotTls(_) | HandshakeError::Protocol(_)));
        match self.probed.get_mut(&id) {
            Some(answered) if other_host => *answered = false,
            Some(_) => drop(self.probed.remove(&id)),
            None => {}
        }
        match &result {
            Ok(_) | Err(HandshakeError::Refused(..)) => {
                self.failing.remove(&id);
                self.alive(&id, false);
            }
            Err(_) if self.table.plans(&id) && self.table.dials_to(&id) => {
                self.failing.entry(id.clone()).or_insert_with(Instant::now);
            }
            Err(_) => {}
        }
        match (self.table.dial_finished(&id, result.is_ok()), result) {
            (Finished::Keep, Ok((wire, protocol))) => {
                self.metrics.links_dialed.inc();
                self.attempts.remove(&id);
                self.linked(&id, true);
                let (close, rx) = oneshot::channel();
                let open = Open { link, protocol, close: Some(close), since_ms: presence::now_ms() };
                self.open.insert((id.clone(), Direction::Dialed), open);
                tokio::spawn(run_then_report(wire, self.doc.clone(), link, rx, id, self.config.heartbeat, events));
            }
            (Finished::Close(why), Ok((wire, protocol))) => {
                let open = Open { link, protocol, close: None, since_ms: presence::now_ms() };
                self.open.insert((id.clone(), Direction::Dialed), open);
                tokio::spawn(async move {
                    handshake::refuse(wire, why).await;
                    let _ = events.send(Event::Closed { id, dir: Direction::Dialed, link }).await;
                });
            }
            (_, result) => {
                if let Err(e) = &result {
                    tracing::debug!(peer = %short(&id), error = %e, "dial failed");
                }
                self.metrics.dial_failed(result.err().map_or("unreachable", |e| e.label()));
                self.back_off(&id);
            }
        }
    }

    fn back_off(&mut self, id: &str) {
        let entry = self.attempts.entry(id.to_string()).or_insert((0, Instant::now()));
        entry.1 = Instant::now() + self.config.backoff.delay(entry.0);
        entry.0 += 1;
    }

    /// When, after `now`, the earliest backoff of a wanted, unlinked peer ends, a failing peer turns
    /// unreachable, or a planned peer turns lost. What came due by `now` was handled with that same `now`.
    fn next_due(&self, now: Instant) -> Option<Instant> {
        let backoffs = self.attempts.values().map(|(_, at)| *at);
        let turning = self.failing.values().filter_map(|since| self.unreachable_from(*since));
        let after = self.config.standby_after;
        let losing =
            self.down.values().flat_map(|since| [since.checked_add(after), since.checked_add(after.saturating_mul(2))]);
        backoffs.chain(turning).chain(losing.flatten()).filter(|at| *at > now).min()
    }

    /// When a peer failing since `since` turns unreachable (never, for a grace beyond the clock).
    fn unreachable_from(&self, since: Instant) -> Option<Instant> {
        since.checked_add(self.config.unreachable_after)
    }

    fn unreachable(&self, now: Instant) -> Vec<String> {
        let turned = |since: Instant| self.unreachable_from(since).is_some_and(|at| at <= now);
        let mut ids: Vec<String> =
            self.failing.iter().filter(|(_, since)| turned(**since)).map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    /// Starts every dial the table wants now (the seed dials only on its scans), and probes the lost
    /// planned peers it has no slot to dial.
    fn dial_pass(&mut self, now: Instant) {
        let attempts = &self.attempts;
        let ready = |id: &str| attempts.get(id).is_none_or(|(_, at)| *at <= now);
        let due = self.table.dials(ready);
        let lost = self.lost(now);
        let deaf = |id: &String| self.probed.get(id) == Some(&false);
        let probes: Vec<(String, String)> = self
            .table
            .undialed()
            .into_iter()
            .filter(|(id, _)| ready(id) && !deaf(id) && lost.binary_search(id).is_ok())
            .collect();
        for (id, url) in probes {
            self.back_off(&id);
            let (events, from) = (self.events.clone(), self.config.dial_from);
            tokio::spawn(async move {
                let answers = transport::answers(&url, from).await;
                let _ = events.send(Event::Probed { id, answers }).await;
            });
        }
        for (id, url) in due {
            let how = Dial {
                creds: self.creds.clone(),
                proof_of: self.config.join_token.clone().filter(|_| self.prove_token),
                bearer: self.config.join_token.clone(),
                protocols: self.config.protocols,
                from: self.config.dial_from,
            };
            tokio::spawn(dial(how, id, url, self.events.clone()));
        }
    }

    fn publish(&mut self, now: Instant) {
        let mut links: Vec<OpenLink> = self
            .open
            .iter()
            .map(|((id, dir), o)| OpenLink {
                node_id: id.clone(),
                direction: *dir,
                since_ms: o.since_ms,
                protocol: o.protocol,
                closing: !self.table.holds_link(id, *dir),
                standby: self.table.is_standby(id),
            })
            .collect();
        links.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        self.metrics.set_open(links.len());
        let cap = self.table.cap();
        self.metrics.cap.set(cap as i64);
        let unreachable = self.unreachable(now);
        self.metrics.unreachable_peers.set(unreachable.len() as i64);
        let standbys = links.iter().filter(|l| l.standby && !l.closing).count();
        self.metrics.standby_links.set(standbys as i64);
        let lost = self.lost(now);
        let (planned, standbys) = (&self.planned, &self.standbys);
        self.status.send_if_modified(|s| {
            let changed = s.cap != cap
                || s.unreachable != unreachable
                || s.lost != lost
                || s.planned != *planned
                || s.standbys != *standbys
                || s.links.len() != links.len()
                || s.links.iter().zip(&links).any(|(a, b)| a.node_id != b.node_id || a.closing != b.closing);
            s.links = links;
            s.cap = cap;
            s.unreachable = unreachable;
            s.lost = lost;
            s.planned.clone_from(planned);
            s.standbys.clone_from(standbys);
            changed
        });
    }
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    if let Some(i) = i {
        i.tick().await;
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// How one dial goes: the token is proven in protocol 2 only in seed mode, and sent as a bearer header in
/// protocol 1 (agents before TLS require it).
struct Dial {
    creds: Arc<Credentials>,
    proof_of: Option<String>,
    bearer: Option<String>,
    protocols: Protocols,
    from: Option<std::net::IpAddr>,
}

async fn dial(how: Dial, id: String, url: String, events: mpsc::Sender<Event>) {
    let tokens = (how.proof_of.as_deref(), how.bearer.as_deref());
    let result = transport::dial_in(&url, &how.creds, &id, Hello::default(), tokens, how.protocols, how.from).await;
    let _ = events.send(Event::Dialed { id, result }).await;
}

async fn run_then_report(
    wire: Wire,
    doc: Doc,
    link: LinkId,
    close: oneshot::Receiver<Refusal>,
    id: String,
    heartbeat: Duration,
    events: mpsc::Sender<Event>,
) {
    supervised(wire, doc, link, close, heartbeat).await;
    let _ = events.send(Event::Closed { id, dir: Direction::Dialed, link }).await;
}

/// Runs a mesh link in a task of its own, so that even a panic in it ends with the link reported closed
/// (its slot freed) rather than held forever.
async fn supervised(wire: Wire, doc: Doc, link: LinkId, close: oneshot::Receiver<Refusal>, heartbeat: Duration) {
    let talk = transport::Talk::heartbeats(heartbeat);
    if let Err(e) = tokio::spawn(transport::run_link(wire, doc, link, true, close, talk)).await {
        tracing::error!(error = %e, "a link task failed");
    }
}

/// Inbound connections that have not finished their handshake, at once and from one address: a flood of
/// connections that never finish costs at most this many sockets, and one host cannot keep others out.
const MAX_HANDSHAKES: usize = 128;
const MAX_HANDSHAKES_PER_SOURCE: usize = 4;

struct Acceptor {
    creds: Arc<Credentials>,
    protocols: Protocols,
    /// Required, proven on the connection, from every dialer (seed mode with a token).
    token: Option<String>,
    heartbeat: Duration,
    doc: Doc,
    metrics: Metrics,
    events: mpsc::Sender<Event>,
}

async fn accept_loop(listener: TcpListener, acceptor: Acceptor) {
    let acceptor = Arc::new(acceptor);
    let gate = Gate::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE);
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            // Out of file descriptors, most likely: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(pass) = gate.enter(from.ip()) else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move { acceptor.one(tcp, pass).await });
    }
}

impl Acceptor {
    /// Runs the handshake, asks the mesh task to admit the dialer's node id, answers, then runs the link.
    async fn one(&self, tcp: TcpStream, pass: transport::Pass) {
        let mut inbound = match transport::accept_in(tcp, &self.creds, self.protocols).await {
            Ok(inbound) if self.token.as_deref().is_none_or(|t| inbound.proves(t)) => inbound,
            Ok(inbound) => {
                self.metrics.refused(Refusal::Unauthenticated);
                return inbound.refuse(Refusal::Unauthenticated).await;
            }
            Err(e) => return tracing::debug!(error = %e, "inbound handshake failed"),
        };
        let (id, protocol) = (inbound.node_id.clone(), inbound.protocol);
        let (admit, decision) = oneshot::channel();
        if self.events.send(Event::Inbound { id: id.clone(), protocol, admit }).await.is_err() {
            return;
        }
        let (link, close) = match decision.await {
            Ok(Ok(admitted)) => admitted,
            Ok(Err(why)) => return inbound.refuse(why).await,
            Err(_) => return,
        };
        drop(pass);
        match inbound.welcome().await {
            Ok(()) => supervised(inbound.wire, self.doc.clone(), link, close, self.heartbeat).await,
            Err(_) => drop(inbound),
        }
        let _ = self.events.send(Event::Closed { id, dir: Direction::Accepted, link }).await;
    }
}
