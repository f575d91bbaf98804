//! Opening links: dialing a WebSocket URL with the join token, accepting one and checking it, and running an
//! open link (the Yjs sync messages between the socket and the document, heartbeats, the idle timeout).
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
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

/// A link on which nothing arrives for this long is dead (every end sends at least a heartbeat every
/// [`MAX_HEARTBEAT`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest heartbeat interval the protocol allows (and the shortest this crate uses).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(5);
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// A frame the peer does not take within this ends the link.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs an open link until either end closes it, it goes silent for [`IDLE_TIMEOUT`], a send stalls for
/// [`SEND_TIMEOUT`], or `close` fires (its reason sent to the peer) or is dropped. Writing happens in a task
/// of its own, so a peer that stops reading never keeps this loop from reading or from closing; the link is
/// gone (its socket dropped) when this returns, within a second of a close request. `touch` is called on
/// every frame received (the rendezvous uses it as a heartbeat).
pub async fn run_link(
    wire: Wire,
    doc: Doc,
    link: LinkId,
    mesh: bool,
    mut close: oneshot::Receiver<Refusal>,
    heartbeat: Duration,
    touch: impl Fn() + Send,
) {
    let Wire { tx, mut rx } = wire;
    let (frames, queued) = mpsc::channel(crate::doc::LINK_QUEUE);
    let mut out = doc.attach(link, mesh).await;
    let mut writer = Some(tokio::spawn(write_frames(tx, queued, out.counter())));
    let mut beat = tokio::time::interval(heartbeat.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT));
    let mut heard = Instant::now();
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
                let Some(bytes) = m else { why = Some(Refusal::Slow); break };
                let len = bytes.len();
                if frames.try_send(Frame::Binary(bytes)).is_err() {
                    out.sent(len);
                    why = Some(Refusal::Slow);
                    break;
                }
            }
            f = rx.next() => {
                heard = Instant::now();
                match f {
                    Some(Ok(Frame::Binary(bytes))) => {
                        touch();
                        if let Err(e) = doc.incoming(link, bytes).await {
                            tracing::debug!(error = %e, "refused a message; closing the link");
                            why = Some(Refusal::Malformed);
                            break;
                        }
                    }
                    Some(Ok(Frame::Text(_))) => touch(),
                    _ => break,
                }
            }
            _ = beat.tick() => if frames.try_send(Frame::Text(HEARTBEAT.into())).is_err() { break },
            _ = tokio::time::sleep_until(heard + IDLE_TIMEOUT) => break,
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

    #[test]
    fn the_token_check() {
        assert!(token_ok(None, None));
        assert!(token_ok(Some("t"), Some(b"Bearer t")));
        assert!(!token_ok(Some("t"), Some(b"Bearer u")));
        assert!(!token_ok(Some("t"), None));
        assert!(!token_ok(Some("t"), Some(b"Bearer tt")));
    }
}
