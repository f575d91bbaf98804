//! Presence as the rendezvous reports it (docs/design.md §3.3): parsing either body shape, and the liveness rules
//! the seed agents use (alive, an address, a heartbeat younger than the timeout, judged on the
//! rendezvous' clock when it sends one).
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use agent_mesh::health::{MAX_NODE_ID, MAX_UNREACHABLE};
use serde::Deserialize;

/// The local wall clock in milliseconds since the epoch, the unit presence uses.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

/// One entry of the rendezvous' `nodes` list, mirroring the agents' CRDT presence. Kept compact (88
/// bytes plus its strings, each one allocation): a body at `--max-presence-bytes` can list over half a
/// million entries.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "RawNode")]
pub struct Node {
    pub node_id: Box<str>,
    pub address: Box<str>,
    pub alive: bool,
    /// Milliseconds since the epoch: `last_seen_ms` as sent, else `last_seen` (seconds) × 1000.
    pub last_seen_ms: Option<f64>,
    pub hostname: Option<Box<str>>,
    pub unreachable: Unreachable,
}

/// The planned peers an entry reports it cannot reach, kept as one string of ids separated by newlines:
/// one allocation per entry, so a body of many short ids costs about what the body does. Empty when the
/// entry lists none, or anything but a list of at most [`MAX_UNREACHABLE`] ids of 1 to [`MAX_NODE_ID`]
/// bytes without a newline (the bounds the rendezvous holds reports to); the rest of the entry still reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unreachable(Box<str>);

impl Unreachable {
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.split('\n').filter(|id| !id.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> FromIterator<&'a str> for Unreachable {
    fn from_iter<I: IntoIterator<Item = &'a str>>(ids: I) -> Self {
        Unreachable(ids.into_iter().collect::<Vec<_>>().join("\n").into())
    }
}

impl<'de> Deserialize<'de> for Unreachable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(List)
    }
}

/// Reads an `unreachable` value without an allocation per id, and without failing the body.
struct List;

impl<'de> serde::de::Visitor<'de> for List {
    type Value = Unreachable;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of node ids")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unreachable, A::Error> {
        let (mut joined, mut ok, mut n) = (String::new(), true, 0);
        while let Some(id) = seq.next_element::<Id>()? {
            n += 1;
            match id.0 {
                Some(id) if ok && n <= MAX_UNREACHABLE => {
                    if !joined.is_empty() {
                        joined.push('\n');
                    }
                    joined.push_str(&id);
                }
                _ => ok = false,
            }
        }
        Ok(if ok { Unreachable(joined.into()) } else { Unreachable::default() })
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unreachable, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(Unreachable::default())
    }

    fn visit_unit<E>(self) -> Result<Unreachable, E> {
        Ok(Unreachable::default())
    }

    fn visit_str<E>(self, _: &str) -> Result<Unreachable, E> {
        Ok(Unreachable::default())
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unreachable, E> {
        Ok(Unreachable::default())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Unreachable, E> {
        Ok(Unreachable::default())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Unreachable, E> {
        Ok(Unreachable::default())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Unreachable, E> {
        Ok(Unreachable::default())
    }
}

/// One element of an `unreachable` list: a usable id borrowed from the body where it can be, `None` for
/// anything else (read and dropped without being kept).
struct Id<'de>(Option<std::borrow::Cow<'de, str>>);

impl<'de> Deserialize<'de> for Id<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IdVisitor)
    }
}

struct IdVisitor;

fn usable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_NODE_ID && !id.contains('\n')
}

impl<'de> serde::de::Visitor<'de> for IdVisitor {
    type Value = Id<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a node id")
    }

    fn visit_borrowed_str<E>(self, id: &'de str) -> Result<Id<'de>, E> {
        Ok(Id(usable(id).then_some(std::borrow::Cow::Borrowed(id))))
    }

    fn visit_str<E>(self, id: &str) -> Result<Id<'de>, E> {
        Ok(Id(usable(id).then(|| std::borrow::Cow::Owned(id.to_owned()))))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Id<'de>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Id(None))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Id<'de>, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(Id(None))
    }

    fn visit_unit<E>(self) -> Result<Id<'de>, E> {
        Ok(Id(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Id<'de>, E> {
        Ok(Id(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Id<'de>, E> {
        Ok(Id(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Id<'de>, E> {
        Ok(Id(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Id<'de>, E> {
        Ok(Id(None))
    }
}

/// A node as the body spells it.
#[derive(Deserialize)]
struct RawNode {
    node_id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    alive: bool,
    #[serde(default)]
    last_seen: Option<f64>,
    #[serde(default)]
    last_seen_ms: Option<f64>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    unreachable: Unreachable,
}

impl From<RawNode> for Node {
    fn from(raw: RawNode) -> Self {
        Node {
            unreachable: raw.unreachable,
            node_id: raw.node_id.into_boxed_str(),
            address: raw.address.into_boxed_str(),
            alive: raw.alive,
            last_seen_ms: raw.last_seen_ms.or(raw.last_seen.map(|s| s * 1000.0)),
            hostname: raw.hostname.map(String::into_boxed_str),
        }
    }
}

impl Node {
    /// The heartbeat in milliseconds, when it is a number.
    pub fn heartbeat_ms(&self) -> Option<f64> {
        self.last_seen_ms.filter(|t| t.is_finite())
    }
}

/// A parsed presence body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The rendezvous' own node, never a mesh peer.
    pub server_node_id: Option<String>,
    /// The rendezvous' clock when it answered.
    pub now_ms: Option<f64>,
    /// Shared: policies reading one body share its list, and a snapshot aged by a `304` copies none of it.
    pub nodes: Arc<Vec<Node>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("presence body is empty")]
    Empty,
    #[error(
        "presence body must be a JSON array of nodes or an object with \"nodes\", found {found:?} at line {line} column {column}"
    )]
    Shape { found: char, line: usize, column: usize },
    #[error("malformed presence JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    server_node_id: Option<String>,
    #[serde(default)]
    now_ms: Option<f64>,
    nodes: Vec<Node>,
}

/// Parses either body shape. Errors carry serde's line and column and the offending field.
pub fn parse(body: &[u8]) -> Result<Snapshot, ParseError> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace()).ok_or(ParseError::Empty)?;
    let (server_node_id, now_ms, mut nodes) = match body[start] {
        b'[' => (None, None, serde_json::from_slice::<Vec<Node>>(body)?),
        b'{' => {
            let e: Envelope = serde_json::from_slice(body)?;
            (e.server_node_id, e.now_ms, e.nodes)
        }
        other => {
            let before = &body[..start];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = start - before.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
            return Err(ParseError::Shape { found: other as char, line, column });
        }
    };
    // The list grew by doubling: kept as long as the snapshot is, its spare half would be memory for nothing.
    nodes.shrink_to_fit();
    Ok(Snapshot { server_node_id, now_ms, nodes: Arc::new(nodes) })
}

impl Snapshot {
    /// Whether `node` counts as present: alive, with an address, not the rendezvous, and a heartbeat
    /// younger than `timeout` on the rendezvous' clock (`now_ms`, else `fallback_now_ms`).
    pub fn is_live(&self, node: &Node, timeout: Duration, fallback_now_ms: f64) -> bool {
        let now = self.now_ms.filter(|t| t.is_finite()).unwrap_or(fallback_now_ms);
        node.alive
            && !node.address.is_empty()
            && self.server_node_id.as_deref() != Some(&*node.node_id)
            && node.heartbeat_ms().is_some_and(|seen| now - seen < timeout.as_millis() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"{"node_id":"ab","address":"ws://0.0.0.0:3001/crdt-sync","alive":true,"last_seen":1763999990.0,"last_seen_ms":1763999990123.0,"hostname":"agent-7"}"#;

    #[test]
    fn parses_both_shapes() {
        let bare = parse(format!("[{NODE}]").as_bytes()).unwrap();
        assert_eq!(bare.nodes.len(), 1);
        assert_eq!(bare.now_ms, None);
        let wrapped =
            parse(format!(r#" {{"serverNodeId":"9f","nowMs":1764000000000,"nodes":[{NODE}]}}"#).as_bytes()).unwrap();
        assert_eq!(wrapped.server_node_id.as_deref(), Some("9f"));
        assert_eq!(wrapped.nodes[0].hostname.as_deref(), Some("agent-7"));
        assert_eq!(wrapped.nodes[0].heartbeat_ms(), Some(1763999990123.0));
    }

    /// A health report reads as its ids; anything else in its place (too many, too long, empty, with a
    /// newline, not a string, not a list) reads as none, and the rest of the entry and the body still count.
    #[test]
    fn unreachable_lists_read_within_bounds_or_as_none() {
        let read = |list: &str| {
            let body = format!(r#"[{{"node_id":"ab","alive":true,"unreachable":{list}}}]"#);
            let snap = parse(body.as_bytes()).unwrap_or_else(|e| panic!("{list}: {e}"));
            assert!(snap.nodes[0].alive, "{list}");
            snap.nodes[0].unreachable.ids().map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(read(r#"["c1", "d\u0032"]"#), ["c1", "d2"]);
        assert_eq!(read("[]"), Vec::<String>::new());
        let many = serde_json::to_string(&(0..65).map(|i| i.to_string()).collect::<Vec<_>>()).unwrap();
        let long = serde_json::to_string(&["a".repeat(257)]).unwrap();
        for bad in [many.as_str(), &long, r#"[""]"#, r#"["a\nb"]"#, r#"["a", 1]"#, r#"["a", ["b", {"c": []}]]"#] {
            assert_eq!(read(bad), Vec::<String>::new(), "{bad}");
        }
        for bad in ["null", r#""a""#, "7", "true", r#"{"a": ["b"]}"#] {
            assert_eq!(read(bad), Vec::<String>::new(), "{bad}");
        }
        let sixty_four = serde_json::to_string(&(0..64).map(|i| i.to_string()).collect::<Vec<_>>()).unwrap();
        assert_eq!(read(&sixty_four).len(), 64);
        assert!(parse(br#"[{"node_id":"ab","unreachable":["a"#).is_err(), "a cut body is still malformed");
    }

    #[tokio::test]
    async fn one_body_read_by_two_policies_is_one_snapshot() {
        let fetcher = Fetcher::new(1 << 20);
        let body = format!("[{NODE}]");
        let url = "http://rv/presence";
        let first = fetcher.parse_shared(url, body.as_bytes()).await.unwrap();
        let again = fetcher.parse_shared(url, body.as_bytes()).await.unwrap();
        assert!(Arc::ptr_eq(&first.nodes, &again.nodes), "the same body is parsed once and shared");
        let elsewhere = fetcher.parse_shared("http://other/presence", body.as_bytes()).await.unwrap();
        assert!(!Arc::ptr_eq(&first.nodes, &elsewhere.nodes), "shared per URL");
        let changed = fetcher.parse_shared(url, b"[]").await.unwrap();
        assert!(changed.nodes.is_empty(), "a new body is parsed");
        let weak = Arc::downgrade(&changed.nodes);
        drop(changed);
        assert_eq!(weak.strong_count(), 0, "the fetcher holds no snapshot itself");
    }

    #[test]
    fn every_fetch_error_reason_is_listed() {
        let errors = [
            FetchError::Connect(String::new()),
            FetchError::Timeout(Duration::ZERO),
            FetchError::Status(401),
            FetchError::Status(500),
            FetchError::TooLarge { limit: 1 },
            FetchError::Malformed(ParseError::Empty),
            FetchError::Token(String::new()),
            FetchError::Ca(String::new()),
            FetchError::Other(String::new()),
        ];
        let reasons: Vec<&str> = errors.iter().map(FetchError::reason).collect();
        for reason in &reasons {
            assert!(FetchError::REASONS.contains(reason), "{reason} is not in FetchError::REASONS");
        }
        assert!(FetchError::REASONS.iter().all(|r| reasons.contains(r)), "REASONS lists only real reasons");
    }

    #[test]
    fn malformed_bodies_say_where() {
        let err = parse(b"[{\"node_id\": \"ab\",\n  \"alive\": \"yes\"}]").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("boolean"), "{err}");
        let err = parse(b"\n  <html>").unwrap_err().to_string();
        assert!(err.contains("'<'") && err.contains("line 2 column 3"), "{err}");
        assert!(matches!(parse(b"  "), Err(ParseError::Empty)));
        assert!(parse(b"{\"nodes\": [").is_err());
    }

    #[test]
    fn liveness_follows_the_seed_rules_on_the_rendezvous_clock() {
        let snap =
            parse(format!(r#"{{"serverNodeId":"9f","nowMs":1764000000000,"nodes":[{NODE}]}}"#).as_bytes()).unwrap();
        let node = &snap.nodes[0];
        let ten_min = Duration::from_secs(600);
        // The controller's own clock is far ahead; the rendezvous' clock decides.
        assert!(snap.is_live(node, ten_min, 9e15));
        assert!(!snap.is_live(node, Duration::from_secs(5), 0.0), "10 s old heartbeat, 5 s timeout");
        let mut dead = node.clone();
        dead.alive = false;
        assert!(!snap.is_live(&dead, ten_min, 0.0));
        let mut no_addr = node.clone();
        no_addr.address = "".into();
        assert!(!snap.is_live(&no_addr, ten_min, 0.0));
        let mut server = node.clone();
        server.node_id = "9f".into();
        assert!(!snap.is_live(&server, ten_min, 0.0), "the rendezvous is never a peer");
        let seconds_only = parse(br#"[{"node_id":"ab","last_seen":1763999990.0}]"#).unwrap();
        assert_eq!(seconds_only.nodes[0].heartbeat_ms(), Some(1763999990000.0), "seconds when no milliseconds");
    }
}

/// Why presence could not be read. Each variant is a condition reason and a metric label.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connection refused or failed: {0}")]
    Connect(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("body larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Malformed(#[from] ParseError),
    #[error("join token unavailable: {0}")]
    Token(String),
    #[error("CA bundle unavailable: {0}")]
    Ca(String),
    #[error("{0}")]
    Other(String),
}

impl FetchError {
    /// Every value [`Self::reason`] returns.
    pub const REASONS: [&'static str; 9] = [
        "ConnectionFailed",
        "Timeout",
        "Unauthorized",
        "HTTPStatus",
        "BodyTooLarge",
        "MalformedBody",
        "JoinTokenUnavailable",
        "CABundleUnavailable",
        "RequestFailed",
    ];

    /// A CamelCase reason for conditions and a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "ConnectionFailed",
            Self::Timeout(_) => "Timeout",
            Self::Status(401 | 403) => "Unauthorized",
            Self::Status(_) => "HTTPStatus",
            Self::TooLarge { .. } => "BodyTooLarge",
            Self::Malformed(_) => "MalformedBody",
            Self::Token(_) => "JoinTokenUnavailable",
            Self::Ca(_) => "CABundleUnavailable",
            Self::Other(_) => "RequestFailed",
        }
    }
}

/// One presence request.
pub struct Request<'a> {
    pub url: &'a str,
    pub token: Option<&'a str>,
    pub ca_bundle: Option<&'a str>,
    pub timeout: Duration,
    /// The ETag of the last good answer, for a conditional GET.
    pub etag: Option<&'a str>,
    /// Asks the rendezvous to hold its answer until the list changes, for this long at most (a long
    /// poll: `Prefer: wait`, docs/presence-api.md). The request may then take this long plus `timeout`.
    pub wait: Option<Duration>,
}

/// An answer. `waits`: the rendezvous said it honours `Prefer: wait` (`Preference-Applied`).
pub enum Fetched {
    New { snapshot: Snapshot, etag: Option<String>, bytes: usize, waits: bool },
    NotModified { waits: bool },
}

fn bundle_certs(pem: &str) -> Result<Vec<reqwest::Certificate>, FetchError> {
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| FetchError::Ca(format!("the CA bundle is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(FetchError::Ca("the CA bundle holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The most HTTP clients kept, one per CA bundle in use.
const MAX_CLIENTS: usize = 64;

/// The rendezvous client: one HTTP client per CA bundle, and a body-size cap enforced while reading.
pub struct Fetcher {
    max_bytes: usize,
    clients: std::sync::Mutex<HashMap<Option<String>, reqwest::Client>>,
    /// One body parsed at a time: each parse briefly needs about twice the snapshot it builds, and
    /// policies polling together must not add those peaks up.
    parsing: tokio::sync::Mutex<()>,
    /// The last body read from each URL (by its hash) and the snapshot parsed from it, while a policy
    /// still holds it: policies reading one rendezvous share one snapshot, and an unchanged body is not
    /// parsed again.
    recent: std::sync::Mutex<HashMap<String, Recent>>,
}

/// What [`Fetcher::recent`] keeps of one URL's last body: its hash and its snapshot, the list held weakly.
struct Recent {
    hash: u128,
    server_node_id: Option<String>,
    now_ms: Option<f64>,
    nodes: Weak<Vec<Node>>,
}

impl Fetcher {
    pub fn new(max_bytes: usize) -> Self {
        install_crypto_provider();
        Self { max_bytes, clients: Default::default(), parsing: Default::default(), recent: Default::default() }
    }

    fn client(&self, ca_bundle: Option<&str>) -> Result<reqwest::Client, FetchError> {
        let mut clients = self.clients.lock().expect("client cache lock");
        if let Some(c) = clients.get(&ca_bundle.map(str::to_owned)) {
            return Ok(c.clone());
        }
        let built = match ca_bundle {
            Some(pem) => Self::builder().tls_certs_only(bundle_certs(pem)?).build(),
            // The image is FROM scratch: no system roots, without which the platform verifier refuses to
            // start. Plain http needs none; https then needs `caBundle`, and fails naming the issuer.
            None => Self::builder().build().or_else(|e| {
                tracing::warn!(error = %e, "no system CA certificates: https rendezvous URLs need spec.rendezvous.caBundle");
                Self::builder().tls_certs_only(Vec::new()).build()
            }),
        };
        let client = built.map_err(|e| FetchError::Other(e.to_string()))?;
        // CA bundles come and go (a rotated ConfigMap, a deleted policy): past a bound, start over.
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(ca_bundle.map(str::to_owned), client.clone());
        Ok(client)
    }

    fn builder() -> reqwest::ClientBuilder {
        // A fresh connection per poll: an outage shows as refused at once, not as a stale pooled socket.
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).pool_max_idle_per_host(0)
    }

    /// One read: the request and the body within `req.timeout`, then the parse (which may wait for
    /// another policy's, and must not count against this rendezvous' time).
    pub async fn fetch(&self, req: &Request<'_>) -> Result<Fetched, FetchError> {
        let client = self.client(req.ca_bundle)?;
        let limit = req.timeout + req.wait.unwrap_or_default();
        let (read, waits) =
            tokio::time::timeout(limit, self.read(&client, req)).await.unwrap_or(Err(FetchError::Timeout(limit)))?;
        let Some((body, etag)) = read else { return Ok(Fetched::NotModified { waits }) };
        let snapshot = self.parse_shared(req.url, &body).await?;
        Ok(Fetched::New { snapshot, etag, bytes: body.len(), waits })
    }

    /// The body and its ETag, or `None` when unchanged since `req.etag`; whether the rendezvous honours
    /// `Prefer: wait`.
    async fn read(
        &self,
        client: &reqwest::Client,
        req: &Request<'_>,
    ) -> Result<(Option<(Vec<u8>, Option<String>)>, bool), FetchError> {
        let mut r = client.get(req.url).header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = req.token {
            r = r.bearer_auth(token);
        }
        if let Some(etag) = req.etag {
            r = r.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        if let Some(wait) = req.wait {
            r = r.header("prefer", format!("wait={}", wait.as_secs()));
        }
        let mut resp = r.send().await.map_err(|e| {
            if e.is_connect() { FetchError::Connect(root_cause(&e)) } else { FetchError::Other(root_cause(&e)) }
        })?;
        let status = resp.status();
        let applied = resp.headers().get_all("preference-applied").iter().filter_map(|v| v.to_str().ok());
        let waits =
            req.wait.is_some() && applied.flat_map(|v| v.split([',', ';'])).any(|p| p.trim().starts_with("wait"));
        if status == reqwest::StatusCode::NOT_MODIFIED && req.etag.is_some() {
            return Ok((None, waits));
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        if resp.content_length().is_some_and(|len| len > self.max_bytes as u64) {
            return Err(FetchError::TooLarge { limit: self.max_bytes });
        }
        let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut body = Vec::with_capacity(resp.content_length().map_or(0, |len| len as usize));
        while let Some(chunk) = resp.chunk().await.map_err(|e| FetchError::Other(root_cause(&e)))? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge { limit: self.max_bytes });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((Some((body, etag)), waits))
    }

    /// `body` (read from `url`) parsed, or the snapshot already parsed from the same body.
    async fn parse_shared(&self, url: &str, body: &[u8]) -> Result<Snapshot, ParseError> {
        let hash = xxhash_rust::xxh3::xxh3_128(body);
        if let Some(snapshot) = self.reuse(url, hash) {
            return Ok(snapshot);
        }
        let _one = self.parsing.lock().await;
        // Another policy may have parsed the same body while this one waited.
        if let Some(snapshot) = self.reuse(url, hash) {
            return Ok(snapshot);
        }
        let snapshot = parse(body)?;
        let (server_node_id, now_ms) = (snapshot.server_node_id.clone(), snapshot.now_ms);
        let entry = Recent { hash, server_node_id, now_ms, nodes: Arc::downgrade(&snapshot.nodes) };
        let mut recent = self.recent.lock().expect("recent bodies lock");
        recent.retain(|_, r| r.nodes.strong_count() > 0);
        recent.insert(url.to_owned(), entry);
        Ok(snapshot)
    }

    /// The snapshot parsed from `url`'s last body, if that body hashed to `hash` and a policy still holds it.
    fn reuse(&self, url: &str, hash: u128) -> Option<Snapshot> {
        let recent = self.recent.lock().expect("recent bodies lock");
        let r = recent.get(url).filter(|r| r.hash == hash)?;
        Some(Snapshot { server_node_id: r.server_node_id.clone(), now_ms: r.now_ms, nodes: r.nodes.upgrade()? })
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// rustls needs one process-wide crypto provider; kube and the presence client share ring's.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
