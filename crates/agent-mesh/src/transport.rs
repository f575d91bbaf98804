//! Opening links: dialing a WebSocket URL with the join token, accepting one and checking it, and running an
//! open link (the Yjs sync messages between the socket and the document, optional heartbeats).
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};

use crate::doc::{Doc, LinkId};
use crate::handshake::Refusal;
use crate::wire::{self, Frame, Wire};

/// A TCP connect plus WebSocket upgrade must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The text frame an agent sends the rendezvous to say it is alive.
pub const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// Dials `url` (ws://), sending the join token as a bearer header when one is set.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Wire, String> {
    let mut request = url.into_client_request().map_err(|e| format!("{url}: {e}"))?;
    if let Some(t) = token {
        let value = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| "join token is not a header value")?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let dial = tokio_tungstenite::connect_async_with_config(request, Some(wire::config()), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
        Ok(Ok((ws, _))) => Ok(wire::from_tungstenite(ws)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Whether an `Authorization` header value carries `token` (no token configured: anything goes).
pub fn token_ok(token: Option<&str>, header: Option<&[u8]>) -> bool {
    let Some(token) = token else { return true };
    let expected = format!("Bearer {token}");
    let got = header.unwrap_or_default();
    // Length is not secret; the bytes are compared without an early exit.
    got.len() == expected.len() && got.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Completes the WebSocket upgrade of an inbound connection, refusing (401) one without the join token.
#[allow(clippy::result_large_err)] // the error type is tungstenite's callback contract
pub async fn accept(tcp: TcpStream, token: Option<&str>) -> Result<Wire, Refusal> {
    let check = |req: &Request, resp: Response| {
        let sent = req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        if token_ok(token, sent) {
            Ok(resp)
        } else {
            let mut refuse = ErrorResponse::new(Some("join token required".into()));
            *refuse.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refuse)
        }
    };
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(wire::config()));
    match tokio::time::timeout(CONNECT_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => Ok(wire::from_tungstenite(ws)),
        _ => Err(Refusal::Unauthenticated),
    }
}

/// Runs an open link until either end closes it or `close` fires (with the reason sent to the peer) or is
/// dropped. `touch` is called on every frame received (the rendezvous uses it as a heartbeat).
pub async fn run_link(
    mut wire: Wire,
    doc: Doc,
    link: LinkId,
    mesh: bool,
    mut close: oneshot::Receiver<Refusal>,
    heartbeat: Option<Duration>,
    touch: impl Fn() + Send,
) {
    let mut out = doc.attach(link, mesh).await;
    let mut beat = tokio::time::interval(heartbeat.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            why = &mut close => {
                if let Ok(why) = why {
                    let _ = wire.send(Frame::Close(why.code(), why.label().into())).await;
                }
                break;
            }
            m = out.recv() => {
                let Some(bytes) = m else { break };
                if wire.send(Frame::Binary(bytes)).await.is_err() {
                    break;
                }
            }
            f = wire.recv() => match f {
                Some(Ok(Frame::Binary(bytes))) => { touch(); doc.incoming(link, bytes).await }
                Some(Ok(Frame::Text(_))) => touch(),
                _ => break,
            },
            _ = beat.tick(), if heartbeat.is_some() => {
                if wire.send(Frame::Text(HEARTBEAT.into())).await.is_err() {
                    break;
                }
            }
        }
    }
    doc.detach(link).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_check() {
        assert!(token_ok(None, None));
        assert!(token_ok(Some("t"), Some(b"Bearer t")));
        assert!(!token_ok(Some("t"), Some(b"Bearer u")));
        assert!(!token_ok(Some("t"), None));
        assert!(!token_ok(Some("t"), Some(b"Bearer tt")));
    }
}
