//! The link handshake: who is on the other end, proven. The join token (a bearer header on the WebSocket
//! upgrade) proves membership of the fleet; a signed nonce each way proves the node id, so an `accepts`
//! list cannot be passed by claiming someone else's id.
//!
//! Acceptor → dialer: `{"type":"challenge","nodeId":A,"nonce":N1}`
//! Dialer → acceptor: `{"type":"hello","nodeId":D,"nonce":N2,"signature":sig_D("dial",D,A,N1),"address"?,"hostname"?}`
//! Acceptor → dialer: `{"type":"welcome","signature":sig_A("accept",A,D,N2)}`, or a close frame whose code
//! says why it refused ([`Refusal`]).
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, verify};
use crate::wire::{Frame, Wire};

/// Each handshake step must complete within this.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Greeting {
    #[serde(rename_all = "camelCase")]
    Challenge { node_id: String, nonce: String },
    #[serde(rename_all = "camelCase")]
    Hello {
        node_id: String,
        nonce: String,
        signature: String,
        #[serde(default)]
        address: Option<String>,
        #[serde(default)]
        hostname: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Welcome { signature: String },
}

/// Why an acceptor turns a link away; each is a WebSocket close code the dialer sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Bad or missing join token, or a signature that does not verify.
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
    #[error("the peer {0:?} is not the node the plan names")]
    WrongPeer(String),
    #[error("the peer's signature does not verify")]
    BadSignature,
    #[error("unexpected handshake message: {0}")]
    Protocol(String),
    #[error("handshake step timed out")]
    TimedOut,
    #[error("socket: {0}")]
    Wire(String),
}

/// What an acceptor learns from a verified hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerHello {
    pub node_id: String,
    pub address: Option<String>,
    pub hostname: Option<String>,
    nonce: String,
}

fn payload(role: &str, signer: &str, other: &str, nonce: &str) -> Vec<u8> {
    format!("agentmesh-link-v1\n{role}\n{signer}\n{other}\n{nonce}").into_bytes()
}

fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

async fn send(wire: &mut Wire, g: &Greeting) -> Result<(), HandshakeError> {
    let text = serde_json::to_string(g).expect("greetings serialize");
    match tokio::time::timeout(STEP_TIMEOUT, wire.send(Frame::Text(text))).await {
        Ok(sent) => sent.map_err(|e| HandshakeError::Wire(e.0)),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

async fn recv(wire: &mut Wire) -> Result<Greeting, HandshakeError> {
    let frame = tokio::time::timeout(STEP_TIMEOUT, wire.recv()).await.map_err(|_| HandshakeError::TimedOut)?;
    match frame {
        Some(Ok(Frame::Text(t))) => serde_json::from_str(&t).map_err(|e| HandshakeError::Protocol(e.to_string())),
        Some(Ok(Frame::Close(code, reason))) => Err(match Refusal::from_code(code) {
            Some(r) => HandshakeError::Refused(r, reason),
            None => HandshakeError::Closed(code, reason),
        }),
        Some(Ok(Frame::Binary(_))) => Err(HandshakeError::Protocol("binary frame before the handshake ended".into())),
        Some(Err(e)) => Err(HandshakeError::Wire(e.0)),
        None => Err(HandshakeError::Closed(1006, "socket closed".into())),
    }
}

/// The acceptor's half, up to admission: challenges the dialer and verifies its hello. The caller then
/// admits it ([`welcome`]) or turns it away ([`refuse`]).
pub async fn challenge(wire: &mut Wire, me: &Identity) -> Result<PeerHello, HandshakeError> {
    let challenge = nonce();
    send(wire, &Greeting::Challenge { node_id: me.node_id(), nonce: challenge.clone() }).await?;
    match recv(wire).await? {
        Greeting::Hello { node_id, nonce, signature, address, hostname } => {
            if !verify(&node_id, &payload("dial", &node_id, &me.node_id(), &challenge), &signature) {
                return Err(HandshakeError::BadSignature);
            }
            Ok(PeerHello { node_id, address, hostname, nonce })
        }
        other => Err(HandshakeError::Protocol(format!("expected hello, got {other:?}"))),
    }
}

pub async fn welcome(wire: &mut Wire, me: &Identity, peer: &PeerHello) -> Result<(), HandshakeError> {
    let signature = me.sign(&payload("accept", &me.node_id(), &peer.node_id, &peer.nonce));
    send(wire, &Greeting::Welcome { signature }).await
}

/// Closes the socket with the refusal's code; the dialer reads it as [`HandshakeError::Refused`].
pub async fn refuse(mut wire: Wire, why: Refusal) {
    let _ = tokio::time::timeout(STEP_TIMEOUT, wire.send(Frame::Close(why.code(), why.label().into()))).await;
}

/// The dialer's half. `expect`: the node id the plan names (None: whoever answers, as with the rendezvous).
/// `presence`: the address and hostname to announce. Returns the verified node id of the acceptor.
pub async fn dial(
    wire: &mut Wire,
    me: &Identity,
    expect: Option<&str>,
    presence: (Option<String>, Option<String>),
) -> Result<String, HandshakeError> {
    let Greeting::Challenge { node_id: peer, nonce: challenge } = recv(wire).await? else {
        return Err(HandshakeError::Protocol("expected a challenge".into()));
    };
    if expect.is_some_and(|e| e != peer) {
        return Err(HandshakeError::WrongPeer(peer));
    }
    let mine = nonce();
    let signature = me.sign(&payload("dial", &me.node_id(), &peer, &challenge));
    let (address, hostname) = presence;
    send(wire, &Greeting::Hello { node_id: me.node_id(), nonce: mine.clone(), signature, address, hostname }).await?;
    match recv(wire).await? {
        Greeting::Welcome { signature }
            if verify(&peer, &payload("accept", &peer, &me.node_id(), &mine), &signature) =>
        {
            Ok(peer)
        }
        Greeting::Welcome { .. } => Err(HandshakeError::BadSignature),
        other => Err(HandshakeError::Protocol(format!("expected welcome, got {other:?}"))),
    }
}
