//! Link protocol 1, spoken only while a fleet upgrades from agents that predate TLS
//! ([`crate::transport::Protocols::UPGRADE`]): a plaintext WebSocket, the join token as a bearer header,
//! and a signed nonce each way to prove the node ids.
//!
//! Acceptor → dialer: `{"type":"challenge","nodeId":A,"nonce":N1}`
//! Dialer → acceptor: `{"type":"hello","nodeId":D,"nonce":N2,"signature":sig_D("dial",D,A,N1),"address"?,"hostname"?}`
//! Acceptor → dialer: `{"type":"welcome","signature":sig_A("accept",A,D,N2)}`, or a close code ([`Refusal`]).
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};

use crate::handshake::{HandshakeError, Hello, Refusal, STEP_TIMEOUT};
use crate::identity::is_node_id;
use crate::wire::{self, Frame, Wire};

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

/// What the acceptor keeps between the dialer's hello and its answer.
pub(crate) struct Pending {
    key: SigningKey,
    peer: String,
    nonce: String,
    /// The upgrade's `Authorization` header, checked by `transport::Inbound::proves`.
    pub bearer: Option<Vec<u8>>,
}

fn payload(role: &str, signer: &str, other: &str, nonce: &str) -> Vec<u8> {
    format!("agentmesh-link-v1\n{role}\n{signer}\n{other}\n{nonce}").into_bytes()
}

fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn node_id(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

fn sign(key: &SigningKey, message: &[u8]) -> String {
    hex::encode(key.sign(message).to_bytes())
}

/// Whether `signature` (hex) is `id`'s signature of `message`; malformed input is not.
fn verify(id: &str, message: &[u8], signature: &str) -> bool {
    let key = hex::decode(id).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
    let sig = hex::decode(signature).ok().and_then(|b| <[u8; 64]>::try_from(b).ok());
    match (is_node_id(id).then_some(key).flatten().and_then(|k| VerifyingKey::from_bytes(&k).ok()), sig) {
        (Some(key), Some(sig)) => key.verify_strict(message, &Signature::from_bytes(&sig)).is_ok(),
        _ => false,
    }
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

/// Dials `url` (`ws://`) in protocol 1: the token, if any, as a bearer header, then the signed exchange,
/// which fails unless the acceptor proves it is `expect`.
pub(crate) async fn dial(
    url: &str,
    key: &SigningKey,
    expect: &str,
    hello: &Hello,
    token: Option<&str>,
) -> Result<Wire, HandshakeError> {
    let mut request = url.into_client_request().map_err(|e| HandshakeError::Wire(format!("{url}: {e}")))?;
    if let Some(t) = token {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| HandshakeError::Wire("the join token is not a header value".into()))?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(wire::config()), true);
    let (ws, _) = tokio::time::timeout(crate::transport::CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| HandshakeError::TimedOut)?
        .map_err(|e| HandshakeError::Wire(format!("{url}: {e}")))?;
    let mut wire = wire::from_tungstenite(ws);
    let Greeting::Challenge { node_id: peer, nonce: challenge } = recv(&mut wire).await? else {
        return Err(HandshakeError::Protocol("expected a challenge".into()));
    };
    if peer != expect {
        return Err(HandshakeError::Tls(format!("the peer is node {peer}, not the planned {expect}")));
    }
    let (me, mine) = (node_id(key), nonce());
    let signature = sign(key, &payload("dial", &me, &peer, &challenge));
    let (address, hostname) = (hello.address.clone(), hello.hostname.clone());
    send(&mut wire, &Greeting::Hello { node_id: me.clone(), nonce: mine.clone(), signature, address, hostname })
        .await?;
    match recv(&mut wire).await? {
        Greeting::Welcome { signature } if verify(&peer, &payload("accept", &peer, &me, &mine), &signature) => Ok(wire),
        Greeting::Welcome { .. } => Err(HandshakeError::Tls("the peer's signature does not verify".into())),
        other => Err(HandshakeError::Protocol(format!("expected welcome, got {other:?}"))),
    }
}

/// Accepts a protocol-1 connection up to admission: the upgrade, the challenge, the verified hello.
pub(crate) async fn accept(tcp: TcpStream, key: &SigningKey) -> Result<(String, Hello, Wire, Pending), HandshakeError> {
    let mut bearer = None;
    #[allow(clippy::result_large_err)] // the error type is tungstenite's callback contract
    let read = |req: &Request, resp: Response| {
        bearer = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
        Ok(resp)
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(tcp, read, Some(wire::config()));
    let ws = tokio::time::timeout(crate::transport::CONNECT_TIMEOUT, upgrade)
        .await
        .map_err(|_| HandshakeError::TimedOut)?
        .map_err(|e| HandshakeError::Wire(e.to_string()))?;
    let mut wire = wire::from_tungstenite(ws);
    let (me, challenge) = (node_id(key), nonce());
    send(&mut wire, &Greeting::Challenge { node_id: me.clone(), nonce: challenge.clone() }).await?;
    match recv(&mut wire).await? {
        Greeting::Hello { node_id: peer, nonce, signature, address, hostname } => {
            if !verify(&peer, &payload("dial", &peer, &me, &challenge), &signature) {
                return Err(HandshakeError::Tls("the dialer's signature does not verify".into()));
            }
            let hello = Hello { address, hostname, token_proof: None };
            let pending = Pending { key: key.clone(), peer: peer.clone(), nonce, bearer };
            Ok((peer, hello, wire, pending))
        }
        other => Err(HandshakeError::Protocol(format!("expected hello, got {other:?}"))),
    }
}

/// Admits a protocol-1 dialer.
pub(crate) async fn welcome(wire: &mut Wire, pending: &Pending) -> Result<(), HandshakeError> {
    let me = node_id(&pending.key);
    let signature = sign(&pending.key, &payload("accept", &me, &pending.peer, &pending.nonce));
    send(wire, &Greeting::Welcome { signature }).await
}
