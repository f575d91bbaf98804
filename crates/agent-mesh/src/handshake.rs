//! The link handshake, inside TLS (`crate::tls` has already proven both node ids). The dialer's WebSocket
//! upgrade request announces what the acceptor needs in headers ([`Hello`]); the acceptor answers with one
//! text frame, `{"type":"welcome"}`, or closes the WebSocket with a code that says why it refused
//! ([`Refusal`]). No frame is read from a dialer before it is admitted, so a stranger costs its acceptor
//! no more than a TLS handshake and an upgrade request.
use std::time::Duration;

use tokio_tungstenite::tungstenite::http::HeaderMap;

use crate::wire::{Frame, Wire};

/// Each handshake step must complete within this.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The acceptor's answer that admits the dialer.
pub const WELCOME: &str = r#"{"type":"welcome"}"#;

/// Upgrade headers: the address other agents dial and the hostname (towards the rendezvous), and the proof
/// that the dialer knows the join token (`crate::tls::token_proof`).
pub const ADDRESS: &str = "agentmesh-address";
pub const HOSTNAME: &str = "agentmesh-hostname";
pub const TOKEN_PROOF: &str = "agentmesh-token-proof";

/// What a dialer announces about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub address: Option<String>,
    pub hostname: Option<String>,
    pub token_proof: Option<String>,
}

impl Hello {
    /// From an upgrade request's headers; a header that is not UTF-8 counts as absent.
    pub fn from_headers(headers: &HeaderMap) -> Hello {
        let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        Hello { address: get(ADDRESS), hostname: get(HOSTNAME), token_proof: get(TOKEN_PROOF) }
    }

    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [(ADDRESS, &self.address), (HOSTNAME, &self.hostname), (TOKEN_PROOF, &self.token_proof)]
            .into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// Why an acceptor turns a link away; each is a WebSocket close code the dialer sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// A join token was required and the dialer did not prove it.
    Unauthenticated,
    /// The dialer is not in this agent's `accepts` (or this agent holds no assignment).
    NotPlanned,
    /// Accepting would exceed the cap.
    AtCap,
    /// A link with this peer is already open, being closed, or being dialed.
    Duplicate,
    /// The dialer is this agent.
    Itself,
    /// An open link closed because the plan no longer holds it (also a dial that completed after its peer
    /// left the plan).
    Unplanned,
    /// An open link closed because the peer sent a message the screen refused (`crate::screen`).
    Malformed,
    /// An open link closed because the peer did not read what it was sent (over the link's budget).
    Slow,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Self::Unauthenticated,
        Self::NotPlanned,
        Self::AtCap,
        Self::Duplicate,
        Self::Itself,
        Self::Unplanned,
        Self::Malformed,
        Self::Slow,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::Unauthenticated => 4001,
            Self::Malformed => 4002,
            Self::Slow => 4008,
            Self::NotPlanned => 4003,
            Self::Duplicate => 4009,
            Self::Unplanned => 4010,
            Self::Itself => 4018,
            Self::AtCap => 4029,
        }
    }

    pub fn from_code(code: u16) -> Option<Refusal> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::NotPlanned => "not_planned",
            Self::AtCap => "at_cap",
            Self::Duplicate => "duplicate",
            Self::Itself => "itself",
            Self::Unplanned => "unplanned",
            Self::Malformed => "malformed",
            Self::Slow => "slow",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer refused the link: {0:?} ({1})")]
    Refused(Refusal, String),
    #[error("the peer closed the link during the handshake: {0} {1}")]
    Closed(u16, String),
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer answered a TLS ClientHello with something else, or hung up: it may speak only protocol 1.
    #[error("the peer does not speak TLS: {0}")]
    NotTls(String),
    #[error("unexpected handshake message: {0}")]
    Protocol(String),
    #[error("handshake step timed out")]
    TimedOut,
    #[error("socket: {0}")]
    Wire(String),
}

impl HandshakeError {
    /// The metric label of a failed dial.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Refused(r, _) => r.label(),
            Self::Tls(_) | Self::NotTls(_) => "tls",
            _ => "unreachable",
        }
    }
}

/// Admits the dialer.
pub async fn welcome(wire: &mut Wire) -> Result<(), HandshakeError> {
    match tokio::time::timeout(STEP_TIMEOUT, wire.send(Frame::Text(WELCOME.into()))).await {
        Ok(sent) => sent.map_err(|e| HandshakeError::Wire(e.0)),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

/// Closes the socket with the refusal's code; the dialer reads it as [`HandshakeError::Refused`].
pub async fn refuse(mut wire: Wire, why: Refusal) {
    let _ = tokio::time::timeout(STEP_TIMEOUT, wire.send(Frame::Close(why.code(), why.label().into()))).await;
}

/// The dialer waits for the acceptor's answer.
pub async fn answer(wire: &mut Wire) -> Result<(), HandshakeError> {
    let frame = tokio::time::timeout(STEP_TIMEOUT, wire.recv()).await.map_err(|_| HandshakeError::TimedOut)?;
    match frame {
        Some(Ok(Frame::Text(t))) if t == WELCOME => Ok(()),
        Some(Ok(Frame::Text(t))) => Err(HandshakeError::Protocol(format!("expected the welcome, got {t:.64}"))),
        Some(Ok(Frame::Close(code, reason))) => Err(match Refusal::from_code(code) {
            Some(r) => HandshakeError::Refused(r, reason),
            None => HandshakeError::Closed(code, reason),
        }),
        Some(Ok(Frame::Binary(_))) => Err(HandshakeError::Protocol("binary frame before the welcome".into())),
        Some(Err(e)) => Err(HandshakeError::Wire(e.0)),
        None => Err(HandshakeError::Closed(1006, "socket closed".into())),
    }
}
