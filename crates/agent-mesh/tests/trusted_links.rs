//! Attacks on the links from the Pod network (docs/design.md §3.6): an impostor at a planned address, a
//! re-encrypting proxy, a byte relay, a flipped byte, a flood of handshakes that never finish, and a
//! join-token proof replayed on another connection. Agents run in process over real sockets on loopback.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_mesh::assignment::{Assignment, Peer};
use agent_mesh::handshake::{HandshakeError, Hello, Refusal};
use agent_mesh::identity::Identity;
use agent_mesh::mesh::Selection;
use agent_mesh::tls::Credentials;
use agent_mesh::{Agent, Config, downward, transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use yrs::{Map, Transact};

const TOKEN: &str = "join-token-never-on-the-wire";

struct Node {
    agent: Agent,
    addr: SocketAddr,
    file: PathBuf,
}

impl Node {
    fn id(&self) -> String {
        self.agent.identity.node_id()
    }

    fn url(&self) -> String {
        format!("wss://{}/crdt-sync", self.addr)
    }
}

async fn node(dir: &Path, name: &str, selection: impl FnOnce(PathBuf) -> Selection) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config::new(2, format!("wss://{addr}/crdt-sync"));
    config.join_token = Some(TOKEN.into());
    let file = dir.join(name);
    let agent = agent_mesh::start(Identity::generate(), listener, config, selection(file.clone()));
    Node { agent, addr, file }
}

async fn planned(dir: &Path, name: &str) -> Node {
    node(dir, name, |file| Selection::Planned(agent_mesh::source::watch_file(file, Duration::from_millis(20)))).await
}

/// A seed-mode agent (no rendezvous here, so its first scan finds nobody to dial): it only accepts.
async fn seed(dir: &Path, name: &str) -> Node {
    let scan = Duration::from_secs(3600);
    node(dir, name, |_| Selection::Seed { delay: Duration::from_millis(1), scan }).await
}

/// Writes `n`'s assignment: dial each (node id, url), accept `accept`.
fn assign(n: &Node, dial: &[(String, String)], accept: &[String]) {
    let peers =
        dial.iter().map(|(node_id, url)| Peer { node_id: node_id.clone().into(), url: url.clone().into() }).collect();
    let a = Assignment::new(peers, accept.iter().map(|id| id.into()), "p".into());
    let map = a.to_annotations().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    std::fs::write(&n.file, downward::render(&map)).unwrap();
}

async fn wait(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn links(n: &Node) -> BTreeSet<String> {
    n.agent.status.borrow().links.iter().map(|l| l.node_id.clone()).collect()
}

fn counter(n: &Node, family: &str, reason: &'static str) -> u64 {
    let m = &n.agent.metrics;
    let f = if family == "dial" { &m.dials_failed } else { &m.links_refused };
    f.get_or_create(&vec![("reason", reason)]).get()
}

async fn put(n: &Node, key: &'static str, value: &'static str) {
    let edit = move |d: &yrs::Doc| {
        let m = d.get_or_insert_map("m");
        let mut txn = d.transact_mut();
        m.insert(&mut txn, key, value);
        txn.encode_update_v1()
    };
    n.agent.doc.edit(edit).await;
}

async fn value(n: &Node, key: &'static str) -> Option<String> {
    let read = move |d: &yrs::Doc| d.get_or_insert_map("m").get(&d.transact(), key).map(|v| v.to_string(&d.transact()));
    n.agent.doc.read(read).await.flatten()
}

/// Agent a dials agent b through a [`Relay`]; returns once they are linked.
async fn linked_through_a_relay(dir: &Path) -> (Node, Node, Relay) {
    let a = planned(dir, "a").await;
    let b = planned(dir, "b").await;
    let relay = Relay::start(b.addr).await;
    assign(&b, &[], &[a.id()]);
    assign(&a, &[(b.id(), format!("wss://{}/crdt-sync", relay.addr))], &[]);
    wait("a and b to link through the relay", || links(&b) == BTreeSet::from([a.id()])).await;
    (a, b, relay)
}

/// Waits until `key` is in `n`'s document (the caller then checks its value).
async fn arrives(n: &Node, key: &'static str) {
    for _ in 0..1500 {
        if value(n, key).await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP relay to `to` that keeps every byte it passes, and flips one byte of the next dialer → acceptor
/// chunk when `flip` is set.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    flip: Arc<AtomicBool>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            flip: Arc::new(AtomicBool::new(false)),
        };
        let (seen, flip) = (relay.seen.clone(), relay.flip.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(to).await else { continue };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(ri, wo, seen.clone(), Some(flip.clone())));
                tokio::spawn(pipe(ro, wi, seen.clone(), None));
            }
        });
        relay
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
    flip: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
        if flip.as_ref().is_some_and(|f| f.swap(false, Ordering::SeqCst)) {
            buf[n / 2] ^= 0x01;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn an_impostor_at_a_planned_address_is_refused_before_any_byte_of_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let a = planned(dir.path(), "a").await;
    let b = planned(dir.path(), "b").await;
    // The impostor listens with a key of its own and records what reaches it.
    let impostor = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = impostor.local_addr().unwrap();
    let creds = Credentials::new(&Identity::generate());
    // (connections, handshakes completed, handshakes ended either way)
    let received = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = impostor.accept().await {
            // Counted as it arrives: the dialer gives up on the key before this side's handshake ends.
            count.lock().unwrap().0 += 1;
            let mut raw = [0u8; 1];
            let _ = tcp.peek(&mut raw).await;
            let accepted = transport::accept(tcp, &creds).await;
            let mut r = count.lock().unwrap();
            (r.1, r.2) = (r.1 + usize::from(accepted.is_ok()), r.2 + 1);
        }
    });
    assign(&a, &[(b.id(), format!("wss://{at}/crdt-sync"))], &[]);
    wait("a to fail its dial on the impostor's key", || counter(&a, "dial", "tls") >= 2).await;
    wait("the impostor's side of each handshake to end", || {
        let r = *received.lock().unwrap();
        r.2 >= 2 && r.2 == r.0
    })
    .await;
    let (tries, handshakes, _) = *received.lock().unwrap();
    assert!(tries >= 2, "the impostor saw {tries} connections");
    assert_eq!(handshakes, 0, "a finished a TLS handshake with the impostor");
    assert!(links(&a).is_empty());
    // The same plan with b's real address links at once.
    assign(&b, &[], &[a.id()]);
    assign(&a, &[(b.id(), b.url())], &[]);
    wait("a and b to link", || links(&a) == BTreeSet::from([b.id()])).await;
}

#[tokio::test]
async fn a_re_encrypting_proxy_is_refused_at_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let a = planned(dir.path(), "a").await;
    let b = planned(dir.path(), "b").await;
    assign(&b, &[], &[a.id()]);
    // The proxy's own key towards b: b admits only the node ids its plan names.
    let proxy = Credentials::new(&Identity::generate());
    let toward_b = transport::dial(&b.url(), &proxy, &b.id(), Hello::default(), None).await;
    assert!(matches!(toward_b, Err(HandshakeError::Refused(Refusal::NotPlanned, _))), "{:?}", toward_b.err());
    // Towards a, the proxy answers as b's address with its own key: a refuses it in the handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = transport::accept(tcp, &proxy).await;
        }
    });
    assign(&a, &[(b.id(), format!("wss://{at}/crdt-sync"))], &[]);
    wait("a to refuse the proxy's key", || counter(&a, "dial", "tls") >= 1).await;
    assert!(counter(&b, "refused", "not_planned") >= 1);
    assert!(links(&a).is_empty() && links(&b).is_empty());
}

#[tokio::test]
async fn a_byte_relay_carries_the_link_and_learns_neither_token_nor_update() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, relay) = linked_through_a_relay(dir.path()).await;
    put(&a, "k", "plaintext-of-an-update-in-flight").await;
    arrives(&b, "k").await;
    assert_eq!(value(&b, "k").await.as_deref(), Some("plaintext-of-an-update-in-flight"));
    let seen = relay.seen();
    assert!(seen.len() > 1000, "the relay carried {} bytes", seen.len());
    assert!(!contains(&seen, TOKEN.as_bytes()), "the join token crossed the relay");
    assert!(!contains(&seen, b"plaintext-of-an-update"), "the update crossed the relay in clear");
    assert!(!contains(&seen, b"crdt-sync"), "the upgrade request crossed the relay in clear");
}

#[tokio::test]
async fn a_flipped_byte_closes_the_link_and_reaches_no_document() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, relay) = linked_through_a_relay(dir.path()).await;
    let closed = a.agent.metrics.links_closed.get();
    relay.flip.store(true, Ordering::SeqCst);
    put(&a, "k", "sent-while-a-byte-flips").await;
    wait("the link to close", || a.agent.metrics.links_closed.get() > closed).await;
    assert_eq!(b.agent.metrics.doc.protocol_errors.get(), 0, "a tampered message reached b's document");
    // The link comes back and carries the update intact.
    wait("a and b to link again", || links(&b) == BTreeSet::from([a.id()])).await;
    arrives(&b, "k").await;
    assert_eq!(value(&b, "k").await.as_deref(), Some("sent-while-a-byte-flips"));
}

/// From one address of its own, a flood keeps 1,000 connections open that send nothing, opening a new one
/// whenever one closes, for as long as the test runs: a gate without a limit per source would stay full.
#[tokio::test]
async fn a_flood_of_handshakes_that_never_finish_keeps_no_planned_link_out() {
    let dir = tempfile::tempdir().unwrap();
    let a = planned(dir.path(), "a").await;
    let b = planned(dir.path(), "b").await;
    let target = a.addr;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = open.clone();
    let flood = tokio::spawn(async move {
        let mut held: Vec<TcpStream> = Vec::new();
        loop {
            // Closed by the agent (over the gate, or its handshake timed out): replaced at once.
            held.retain(
                |tcp| matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            );
            while held.len() < 1000 {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.77:0".parse().unwrap()).unwrap();
                match socket.connect(target).await {
                    Ok(tcp) => held.push(tcp),
                    Err(_) => break,
                }
            }
            count.store(held.len(), Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    });
    wait("the flood to hold 1,000 connections", || open.load(Ordering::SeqCst) >= 1000).await;
    assign(&a, &[], &[b.id()]);
    assign(&b, &[(a.id(), a.url())], &[]);
    wait("a and b to link during the flood", || links(&a) == BTreeSet::from([b.id()])).await;
    flood.abort();
}

#[tokio::test]
async fn a_token_proof_counts_only_on_its_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let a = seed(dir.path(), "a").await;
    let victim = Credentials::new(&Identity::generate());
    let (thief_id, thief) = {
        let id = Identity::generate();
        (id.node_id(), Credentials::new(&id))
    };
    // The thief accepts a link from an agent that holds the token, and keeps the proof it was sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("wss://{}/crdt-sync", listener.local_addr().unwrap());
    let thief = Arc::new(thief);
    let accepting = thief.clone();
    let stolen = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        transport::accept(tcp, &accepting).await.unwrap().hello.token_proof
    });
    let _ = transport::dial(&url, &victim, &thief_id, Hello::default(), Some(TOKEN)).await;
    let proof = stolen.await.unwrap().expect("the victim sent a proof");
    assert!(!proof.contains(TOKEN));
    // Replayed on the thief's own connection to a seed-mode agent, it proves nothing.
    let replay = Hello { token_proof: Some(proof), ..Hello::default() };
    let replayed = transport::dial(&a.url(), &thief, &a.id(), replay, None).await;
    assert!(matches!(replayed, Err(HandshakeError::Refused(Refusal::Unauthenticated, _))), "{:?}", replayed.err());
    let guessed = transport::dial(&a.url(), &thief, &a.id(), Hello::default(), Some("a guess")).await;
    assert!(matches!(guessed, Err(HandshakeError::Refused(Refusal::Unauthenticated, _))), "{:?}", guessed.err());
    // The token itself, proven on this connection, is admitted.
    // (Until its first scan, a seed-mode agent plans nothing and refuses as not planned.)
    let mut proven = Err(HandshakeError::TimedOut);
    for _ in 0..500 {
        proven = transport::dial(&a.url(), &victim, &a.id(), Hello::default(), Some(TOKEN)).await;
        if !matches!(proven, Err(HandshakeError::Refused(Refusal::NotPlanned, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(proven.is_ok(), "{:?}", proven.err());
}
