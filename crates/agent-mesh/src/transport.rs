//! Opening links and running them. A link is a WebSocket inside mutual TLS 1.3 (`crate::tls`): [`dial`]
//! reaches a planned node and nobody else, [`accept`] learns who dialed from the dialer's key, and
//! [`Gate`] bounds what connections that have not yet proven anything can cost. [`run_link`] carries the
//! Yjs sync messages between the socket and the document, with heartbeats and an idle timeout.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::doc::{Doc, LinkId, Outgoing};
use crate::handshake::{self, HandshakeError, Hello, Refusal};
use crate::tls::{self, Credentials};
use crate::tree::Control;
use crate::wire::{self, Frame, Wire};

/// A TCP connect, the TLS handshake and the WebSocket upgrade must each finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The text frame an agent sends the rendezvous to say it is alive.
pub const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// The link protocols an agent speaks: 2 (mutual TLS) alone, except while its fleet upgrades from agents
/// of protocol 1 (plaintext, before TLS), when it speaks both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocols {
    pub v1: bool,
    pub v2: bool,
}

impl Protocols {
    pub const V2: Protocols = Protocols { v1: false, v2: true };
    /// During an upgrade: accept both (told apart by the first byte); dial in 2, falling back to 1 only for a
    /// `ws://` peer whose URL does not say it speaks 2 ([`V2_MARK`]) and which does not answer TLS.
    pub const UPGRADE: Protocols = Protocols { v1: true, v2: true };
    /// What agents before protocol 2 speak; for tests of an upgrade.
    pub const V1: Protocols = Protocols { v1: true, v2: false };

    /// `2`, `1,2` or `1`, as flags write them.
    pub fn parse(s: &str) -> Result<Protocols, String> {
        match s.replace(' ', "").as_str() {
            "2" => Ok(Self::V2),
            "1,2" | "2,1" => Ok(Self::UPGRADE),
            "1" => Ok(Self::V1),
            _ => Err(format!("{s:?}: link protocols are 2, or 1,2 during an upgrade from agents before TLS")),
        }
    }

    /// The URL an agent listening on `addr` advertises: `wss://` once it speaks 2 alone; `ws://` while
    /// agents of protocol 1, which dial only `ws://`, must reach it, marked if it speaks 2 as well.
    pub fn advertise(self, addr: impl std::fmt::Display) -> String {
        match (self.v1, self.v2) {
            (false, _) => format!("wss://{addr}/crdt-sync"),
            (true, true) => format!("ws://{addr}/crdt-sync?{V2_MARK}"),
            (true, false) => format!("ws://{addr}/crdt-sync"),
        }
    }
}

impl Protocols {
    /// An advertised URL as these protocols need it: during an upgrade a `ws://` URL carries [`V2_MARK`],
    /// added when the operator of the agent wrote the URL without it.
    pub fn mark(self, url: String) -> String {
        let marked = url.split_once('?').is_some_and(|(_, q)| q.split('&').any(|p| p == V2_MARK));
        if marked || !(self.v1 && self.v2 && url.starts_with("ws://")) {
            return url;
        }
        let join = if url.contains('?') { '&' } else { '?' };
        format!("{url}{join}{V2_MARK}")
    }
}

/// The query an upgrading agent's `ws://` URL carries: it speaks protocol 2, so it is never dialed in 1 (a
/// failed TLS handshake with it is an attack or a fault, not an old agent).
pub const V2_MARK: &str = "link=2";

/// Dials `url` and completes a link only with node `expect`, in the protocol `protocols` choose for it;
/// returns the link and its protocol. `token`: what protocol 2 proves (a proof bound to the connection,
/// never the token) and what protocol 1 sends as a bearer header (agents before TLS require the token).
pub async fn dial_in(
    url: &str,
    creds: &Credentials,
    expect: &str,
    hello: Hello,
    token: (Option<&str>, Option<&str>),
    protocols: Protocols,
    from: Option<IpAddr>,
) -> Result<(Wire, u8), HandshakeError> {
    let (v2_token, v1_token) = token;
    let plain_url = url.starts_with("ws://");
    let marked = url.split_once('?').is_some_and(|(_, q)| q.split('&').any(|p| p == V2_MARK));
    if protocols.v2 {
        match dial_from(url, creds, expect, hello.clone(), v2_token, from).await {
            Err(HandshakeError::NotTls(_)) if protocols.v1 && plain_url && !marked => {}
            done => return done.map(|wire| (wire, 2)),
        }
    }
    if !plain_url {
        return Err(HandshakeError::Wire(format!("{url}: protocol 1 dials only ws:// URLs")));
    }
    crate::legacy::dial(url, creds.key(), expect, &hello, v1_token).await.map(|wire| (wire, 1))
}

/// Dials `url` in protocol 2, `wss://` or `ws://` alike: TLS completes only if the acceptor's key is
/// `expect`; then the upgrade announces `hello` (with this connection's proof of `token`, if given) and
/// waits to be admitted.
pub async fn dial(
    url: &str,
    creds: &Credentials,
    expect: &str,
    hello: Hello,
    token: Option<&str>,
) -> Result<Wire, HandshakeError> {
    dial_from(url, creds, expect, hello, token, None).await
}

/// [`dial`] from the local address `from` (the system's choice when `None`).
pub async fn dial_from(
    url: &str,
    creds: &Credentials,
    expect: &str,
    mut hello: Hello,
    token: Option<&str>,
    from: Option<IpAddr>,
) -> Result<Wire, HandshakeError> {
    let mut request = url.into_client_request().map_err(|e| HandshakeError::Wire(format!("{url}: {e}")))?;
    let (host, port) = host_port(request.uri());
    let step = |e: String| HandshakeError::Wire(format!("{url}: {e}"));
    let tcp = timeout(connect(&host, port, from)).await?.map_err(|e| step(e.to_string()))?;
    // Every message is a small TLS record or two: waiting to coalesce them (Nagle) costs a round trip.
    let _ = tcp.set_nodelay(true);
    let name =
        rustls::pki_types::ServerName::try_from(host).unwrap_or_else(|_| "agentmesh.invalid".try_into().unwrap());
    let connector = TlsConnector::from(creds.client(expect));
    let tls = timeout(connector.connect(name, tcp)).await?.map_err(|e| tls_error(&e))?;
    if let Some(token) = token {
        let exported = tls.get_ref().1.export_keying_material([0u8; 32], tls::EXPORTER_LABEL, None);
        hello.token_proof = Some(tls::token_proof(&exported.map_err(|e| HandshakeError::Tls(e.to_string()))?, token));
    }
    for (k, v) in hello.headers() {
        let v = HeaderValue::from_str(v).map_err(|_| step(format!("the {k} header is not a header value")))?;
        request.headers_mut().insert(k, v);
    }
    let upgrade = tokio_tungstenite::client_async_with_config(request, tls, Some(wire::config()));
    let (ws, _) = timeout(upgrade).await?.map_err(|e| step(e.to_string()))?;
    let mut wire = wire::from_tungstenite(ws);
    handshake::answer(&mut wire).await?;
    Ok(wire)
}

/// The host (without brackets) and port a link URL names.
fn host_port(uri: &tokio_tungstenite::tungstenite::http::Uri) -> (String, u16) {
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    (host, uri.port_u16().unwrap_or(if uri.scheme_str() == Some("wss") { 443 } else { 80 }))
}

/// Whether something accepts TCP connections at `url`'s address, dialed from `from`. The connection is
/// closed at once, having carried nothing: it tells a lost peer that may be back from one still gone,
/// without a link (a link needs a free slot).
pub async fn answers(url: &str, from: Option<IpAddr>) -> bool {
    let Ok(request) = url.into_client_request() else { return false };
    let (host, port) = host_port(request.uri());
    matches!(timeout(connect(&host, port, from)).await, Ok(Ok(_)))
}

/// A TCP connection to `host:port`, from `from` when given: an agent with several addresses dials from the
/// one it advertises, so rules by address (a NetworkPolicy, a firewall) see the same address both ways.
/// Where `from` cannot be used (another address family, an address not on this host), the system chooses.
async fn connect(host: &str, port: u16, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let mut last = None;
    for to in tokio::net::lookup_host((host, port)).await? {
        let bound = from.filter(|f| f.is_ipv4() == to.is_ipv4()).and_then(|f| {
            let socket = if f.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
            socket.ok().filter(|s| s.bind(std::net::SocketAddr::new(f, 0)).is_ok())
        });
        let tried = match bound {
            Some(socket) => socket.connect(to).await,
            None => {
                if let Some(f) = from {
                    tracing::debug!(from = %f, to = %to, "dialing from the system's address instead");
                }
                TcpStream::connect(to).await
            }
        };
        match tried {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{host} resolves to no address"))))
}

/// A failed TLS handshake: [`HandshakeError::NotTls`] when the peer answered with something that is not TLS
/// or hung up before answering (an agent of protocol 1), else [`HandshakeError::Tls`] (a wrong key above all).
fn tls_error(e: &std::io::Error) -> HandshakeError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let garbled = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }));
    if garbled || matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe) {
        HandshakeError::NotTls(e.to_string())
    } else {
        HandshakeError::Tls(e.to_string())
    }
}

async fn timeout<T>(f: impl Future<Output = T>) -> Result<T, HandshakeError> {
    tokio::time::timeout(CONNECT_TIMEOUT, f).await.map_err(|_| HandshakeError::TimedOut)
}

/// An inbound connection whose dialer proved its node id, and not yet answered.
pub struct Inbound {
    pub node_id: String,
    pub hello: Hello,
    pub wire: Wire,
    /// 1 or 2.
    pub protocol: u8,
    proof: Proof,
}

enum Proof {
    /// Protocol 2: what this connection's TLS exports, which a token proof is computed over.
    Exported([u8; 32]),
    /// Protocol 1: the bearer header and what the welcome signs.
    V1(Box<crate::legacy::Pending>),
}

impl Inbound {
    /// Whether the dialer showed it knows `token`: a proof bound to this connection (2), the token (1).
    pub fn proves(&self, token: &str) -> bool {
        match &self.proof {
            Proof::Exported(x) => self.hello.token_proof.as_deref().is_some_and(|p| tls::proof_ok(x, token, p)),
            Proof::V1(pending) => token_ok(Some(token), pending.bearer.as_deref()),
        }
    }

    /// Admits the dialer.
    pub async fn welcome(&mut self) -> Result<(), HandshakeError> {
        match &self.proof {
            Proof::Exported(_) => handshake::welcome(&mut self.wire).await,
            Proof::V1(pending) => crate::legacy::welcome(&mut self.wire, pending).await,
        }
    }

    /// Turns the dialer away with `why`'s close code.
    pub async fn refuse(self, why: Refusal) {
        handshake::refuse(self.wire, why).await
    }
}

/// Accepts a link in protocol 2: the TLS handshake, then [`upgrade`].
pub async fn accept(tcp: TcpStream, creds: &Credentials) -> Result<Inbound, HandshakeError> {
    let _ = tcp.set_nodelay(true);
    let tls = timeout(TlsAcceptor::from(creds.server()).accept(tcp)).await?;
    upgrade(tls.map_err(|e| HandshakeError::Tls(e.to_string()))?).await
}

/// Accepts a link in one of `protocols`: protocol 2 starts with a TLS record, anything else is 1.
pub async fn accept_in(tcp: TcpStream, creds: &Credentials, protocols: Protocols) -> Result<Inbound, HandshakeError> {
    if protocols.v1 {
        let mut first = [0u8; 1];
        let peeked = timeout(tcp.peek(&mut first)).await?.map_err(|e| HandshakeError::Wire(e.to_string()))?;
        if !protocols.v2 || peeked == 0 || first[0] != TLS_HANDSHAKE_RECORD {
            let (node_id, hello, wire, pending) = crate::legacy::accept(tcp, creds.key()).await?;
            return Ok(Inbound { node_id, hello, wire, protocol: 1, proof: Proof::V1(Box::new(pending)) });
        }
    }
    accept(tcp, creds).await
}

/// The first byte of every TLS connection (a handshake record).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Reads the dialer's node id and hello from a protocol-2 TLS connection and completes the WebSocket
/// upgrade. Reads no frame: the caller answers ([`Inbound::welcome`] or [`Inbound::refuse`]).
pub async fn upgrade(tls: tokio_rustls::server::TlsStream<TcpStream>) -> Result<Inbound, HandshakeError> {
    let conn = tls.get_ref().1;
    let node_id = tls::peer_id(conn).ok_or_else(|| HandshakeError::Tls("no node certificate".into()))?;
    let exported = conn
        .export_keying_material([0u8; 32], tls::EXPORTER_LABEL, None)
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    let mut hello = Hello::default();
    #[allow(clippy::result_large_err)] // the error type is tungstenite's callback contract
    let read = |req: &Request, resp: Response| {
        hello = Hello::from_headers(req.headers());
        Ok(resp)
    };
    let ws = timeout(tokio_tungstenite::accept_hdr_async_with_config(tls, read, Some(wire::config()))).await?;
    let wire = wire::from_tungstenite(ws.map_err(|e| HandshakeError::Wire(e.to_string()))?);
    Ok(Inbound { node_id, hello, wire, protocol: 2, proof: Proof::Exported(exported) })
}

/// Bounds the connections that have not finished their handshake: at most `total` at once, and at most
/// `per_source` from one address, so one host that opens connections and never finishes them cannot keep
/// others out (filling the gate takes `total / per_source` addresses).
pub struct Gate {
    total: usize,
    per_source: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Only sources with a connection in the gate.
    by_source: HashMap<IpAddr, usize>,
}

/// A place in the [`Gate`], given back when dropped.
pub struct Pass {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Gate {
    pub fn new(total: usize, per_source: usize) -> Arc<Gate> {
        Arc::new(Gate { total, per_source, open: Mutex::new(Open::default()) })
    }

    /// A place for a connection from `source`, if there is one.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Option<Pass> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.total || open.by_source.get(&source).is_some_and(|n| *n >= self.per_source) {
            return None;
        }
        open.total += 1;
        *open.by_source.entry(source).or_default() += 1;
        Some(Pass { gate: self.clone(), source })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// Whether an `Authorization` header value carries `token` (no token configured: anything goes). The
/// rendezvous' presence API takes the token this way; links never carry it.
pub fn token_ok(token: Option<&str>, header: Option<&[u8]>) -> bool {
    let Some(token) = token else { return true };
    let expected = format!("Bearer {token}");
    let got = header.unwrap_or_default();
    // Length is not secret; the bytes are compared without an early exit.
    got.len() == expected.len() && got.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A link on which nothing arrives for this long is dead (every end sends at least a heartbeat every
/// [`MAX_HEARTBEAT`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest heartbeat interval the protocol allows (and the shortest this crate uses).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(5);
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// A frame the peer does not take within this ends the link.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What a link carries besides the document.
pub struct Talk<F> {
    /// How often to say it is alive.
    pub heartbeat: Duration,
    /// A text sent when the link starts (unless empty) and whenever it changes: an agent's link health,
    /// on its rendezvous link.
    pub report: Option<watch::Receiver<String>>,
    /// Called on every frame received, with the text of a text frame (the rendezvous reads heartbeats
    /// and reports this way).
    pub heard: F,
}

impl Talk<fn(Option<&str>)> {
    /// Heartbeats every `heartbeat`, and nothing else.
    pub fn heartbeats(heartbeat: Duration) -> Self {
        Talk { heartbeat, report: None, heard: |_| {} }
    }
}

/// Runs an open link until either end closes it, it goes silent for [`IDLE_TIMEOUT`], a send stalls for
/// [`SEND_TIMEOUT`], or `close` fires (its reason sent to the peer) or is dropped. Writing happens in a task
/// of its own, so a peer that stops reading never keeps this loop from reading or from closing; the link is
/// gone (its socket dropped) when this returns, within a second of a close request.
pub async fn run_link<F: Fn(Option<&str>) + Send>(
    wire: Wire,
    doc: Doc,
    link: LinkId,
    mesh: bool,
    mut close: oneshot::Receiver<Refusal>,
    talk: Talk<F>,
) {
    let Talk { heartbeat, mut report, heard } = talk;
    let Wire { tx, mut rx } = wire;
    let (frames, queued) = mpsc::channel(crate::doc::LINK_QUEUE);
    let mut out = doc.attach(link, mesh).await;
    let mut writer = Some(tokio::spawn(write_frames(tx, queued, out.counter())));
    if let Some(text) = report.as_mut().map(|r| r.borrow_and_update().clone()).filter(|t| !t.is_empty()) {
        let _ = frames.try_send(Frame::Text(text));
    }
    let mut beat = tokio::time::interval(heartbeat.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT));
    let mut last_heard = Instant::now();
    let mut why = None;
    loop {
        let writing = writer.as_mut().expect("the writer runs until the loop ends");
        tokio::select! {
            reason = &mut close => {
                why = reason.ok();
                break;
            }
            m = out.rx.recv() => {
                // The document let go of this link (over its budget), or the queue to the socket is full:
                // a peer that does not keep up is dropped (it resyncs on redial).
                let Some(m) = m else {
                    why = Some(if out.refused.try_recv().is_ok() { Refusal::Malformed } else { Refusal::Slow });
                    break;
                };
                let len = m.budgeted();
                let frame = match m {
                    Outgoing::Sync(bytes) => Frame::Binary(bytes),
                    Outgoing::Tree(text) => Frame::Text(text),
                };
                if frames.try_send(frame).is_err() {
                    out.sent(len);
                    why = Some(Refusal::Slow);
                    break;
                }
            }
            f = rx.next() => {
                last_heard = Instant::now();
                match f {
                    Some(Ok(Frame::Binary(bytes))) => {
                        heard(None);
                        // Waiting for room in the inbound budget must not keep a close from being heard.
                        let taken = tokio::select! {
                            taken = doc.incoming(link, bytes) => taken,
                            reason = &mut close => {
                                why = reason.ok();
                                break;
                            }
                        };
                        if let Err(e) = taken {
                            tracing::debug!(error = %e, "refused a message; closing the link");
                            why = Some(Refusal::Malformed);
                            break;
                        }
                    }
                    Some(Ok(Frame::Text(text))) => {
                        heard(Some(&text));
                        let parsed = if mesh { Control::parse(&text) } else { Ok(None) };
                        match parsed {
                            Ok(Some(control)) => doc.tree(link, control).await,
                            Ok(None) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "refused a tree message; closing the link");
                                doc.metrics().protocol_errors.inc();
                                why = Some(Refusal::Malformed);
                                break;
                            }
                        }
                    }
                    _ => break,
                }
            }
            _ = beat.tick() => if frames.try_send(Frame::Text(HEARTBEAT.into())).is_err() { break },
            text = changed(&mut report), if report.is_some() => match text {
                Some(text) => if frames.try_send(Frame::Text(text)).is_err() { break },
                None => report = None,
            },
            _ = tokio::time::sleep_until(last_heard + IDLE_TIMEOUT) => break,
            _ = writing => { writer = None; break }
        }
    }
    doc.detach(link).await;
    if let Some(why) = why {
        let _ = frames.try_send(Frame::Close(why.code(), why.label().into()));
    }
    drop(frames);
    if let Some(mut w) = writer
        && tokio::time::timeout(Duration::from_secs(1), &mut w).await.is_err()
    {
        // Awaited after the abort, so the socket is gone when this returns (and the slot can be reused).
        w.abort();
        let _ = w.await;
    }
}

/// The next value of an optional watch; `None` once its sender is gone.
pub(crate) async fn changed<T: Clone>(r: &mut Option<watch::Receiver<T>>) -> Option<T> {
    let r = r.as_mut()?;
    r.changed().await.ok()?;
    Some(r.borrow_and_update().clone())
}

async fn write_frames(
    mut tx: std::pin::Pin<Box<dyn futures::Sink<Frame, Error = crate::wire::WireError> + Send>>,
    mut queued: mpsc::Receiver<Frame>,
    sent: crate::doc::Sent,
) {
    use futures::SinkExt;
    while let Some(frame) = queued.recv().await {
        let len = if let Frame::Binary(b) = &frame { b.len() } else { 0 };
        let ok = matches!(tokio::time::timeout(SEND_TIMEOUT, tx.send(frame)).await, Ok(Ok(())));
        sent.sent(len);
        if !ok {
            return;
        }
    }
    let _ = tokio::time::timeout(SEND_TIMEOUT, tx.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{DocMetrics, INBOUND_BUDGET};
    use crate::wire::WireError;
    use futures::SinkExt;

    /// A valid update message of about `len` bytes (one long string).
    fn big_update(len: usize) -> bytes::Bytes {
        use yrs::updates::encoder::Encode;
        use yrs::{Text, Transact};
        let doc = yrs::Doc::new();
        let text = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, &"x".repeat(len));
        let update = txn.encode_update_v1();
        yrs::sync::Message::Sync(yrs::sync::SyncMessage::Update(update)).encode_v1().into()
    }

    /// While the document is too busy to take what links received (the inbound budget spent), a link
    /// whose own message waits for room still hears that it must close, and ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_waiting_for_the_inbound_budget_still_closes() {
        let doc = Doc::spawn(DocMetrics::default());
        // Holds the document task until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (entered, busy_now) = oneshot::channel();
        let busy = doc.clone();
        tokio::spawn(async move {
            busy.read(move |_| {
                let _ = entered.send(());
                let _ = held.recv();
            })
            .await
        });
        busy_now.await.unwrap();
        let message = big_update(7 << 20);
        for _ in 0..INBOUND_BUDGET / message.len() {
            doc.incoming(1, message.clone()).await.unwrap();
        }
        let (frames_in, rx) = futures::channel::mpsc::unbounded::<Result<Frame, WireError>>();
        let (tx, _frames_out) = futures::channel::mpsc::unbounded::<Frame>();
        // Says when the link took the frame: from then on it waits for room in the budget.
        let (taken, took) = oneshot::channel();
        let mut taken = Some(taken);
        let rx = rx.inspect(move |_| {
            if let Some(t) = taken.take() {
                let _ = t.send(());
            }
        });
        let wire = Wire { tx: Box::pin(tx.sink_map_err(|e| WireError(e.to_string()))), rx: Box::pin(rx) };
        let (close, closed) = oneshot::channel();
        let link = tokio::spawn(run_link(wire, doc.clone(), 2, true, closed, Talk::heartbeats(MIN_HEARTBEAT)));
        frames_in.unbounded_send(Ok(Frame::Binary(message))).unwrap();
        took.await.unwrap();
        let _ = close.send(Refusal::Unplanned);
        let ended = tokio::time::timeout(Duration::from_secs(60), link).await;
        let _ = release.send(());
        assert!(ended.is_ok(), "the link ended while the document was still busy");
    }

    #[test]
    fn the_gate_counts_places_and_forgets_sources_that_left() {
        let gate = Gate::new(3, 2);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let (a1, a2) = (gate.enter(a).unwrap(), gate.enter(a).unwrap());
        assert!(gate.enter(a).is_none(), "two per source");
        let b1 = gate.enter(b).unwrap();
        assert!(gate.enter("10.0.0.3".parse().unwrap()).is_none(), "three in all");
        drop((a1, a2, b1));
        let open = gate.open.lock().unwrap();
        assert_eq!((open.total, open.by_source.len()), (0, 0));
    }

    #[test]
    fn an_upgrading_agent_marks_its_url() {
        let up = Protocols::UPGRADE;
        assert_eq!(up.mark("ws://10.0.0.1:3001/crdt-sync".into()), "ws://10.0.0.1:3001/crdt-sync?link=2");
        assert_eq!(up.mark("ws://h:1/x?a=b".into()), "ws://h:1/x?a=b&link=2");
        assert_eq!(up.mark("ws://h:1/x?link=2".into()), "ws://h:1/x?link=2");
        assert_eq!(up.mark(up.advertise("h:1")), up.advertise("h:1"));
        assert_eq!(Protocols::V2.mark("wss://h:1/x".into()), "wss://h:1/x");
        assert_eq!(Protocols::V1.mark("ws://h:1/x".into()), "ws://h:1/x");
    }

    #[test]
    fn the_token_check() {
        assert!(token_ok(None, None));
        assert!(token_ok(Some("t"), Some(b"Bearer t")));
        assert!(!token_ok(Some("t"), Some(b"Bearer u")));
        assert!(!token_ok(Some("t"), None));
        assert!(!token_ok(Some("t"), Some(b"Bearer tt")));
    }
}
