//! One WebSocket, whatever library serves it: frames in, frames out. The library dials and accepts with
//! tokio-tungstenite; a server built on another stack (the rendezvous hub uses axum) adapts its socket to
//! a [`Wire`] and runs the same handshake and sync.
use std::pin::Pin;

use futures::{Sink, SinkExt, Stream, StreamExt, future};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

/// Largest message accepted on any link: bounds the memory a peer can make an agent spend on one message.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    /// Shared: one forwarded update is the same buffer on every link.
    Binary(bytes::Bytes),
    /// Close code and reason (see [`crate::handshake::Refusal`] for the codes this protocol uses).
    Close(u16, String),
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

pub struct Wire {
    pub tx: Pin<Box<dyn Sink<Frame, Error = WireError> + Send>>,
    pub rx: Pin<Box<dyn Stream<Item = Result<Frame, WireError>> + Send>>,
}

impl Wire {
    pub async fn send(&mut self, frame: Frame) -> Result<(), WireError> {
        self.tx.send(frame).await
    }

    /// The next data or close frame; `None` once the socket is gone.
    pub async fn recv(&mut self) -> Option<Result<Frame, WireError>> {
        self.rx.next().await
    }
}

/// The WebSocket limits every link uses.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_BYTES)).max_frame_size(Some(MAX_MESSAGE_BYTES))
}

pub fn from_tungstenite<S>(ws: WebSocketStream<S>) -> Wire
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let tx = sink
        .sink_map_err(|e| WireError(e.to_string()))
        .with(|f: Frame| future::ready(Ok::<_, WireError>(to_message(f))));
    let rx = stream.filter_map(|m| {
        future::ready(match m {
            Ok(m) => from_message(m).map(Ok),
            Err(e) => Some(Err(WireError(e.to_string()))),
        })
    });
    Wire { tx: Box::pin(tx), rx: Box::pin(rx) }
}

fn to_message(f: Frame) -> Message {
    match f {
        Frame::Text(t) => Message::text(t),
        Frame::Binary(b) => Message::binary(b),
        Frame::Close(code, reason) => Message::Close(Some(CloseFrame { code: code.into(), reason: reason.into() })),
    }
}

fn from_message(m: Message) -> Option<Frame> {
    match m {
        Message::Text(t) => Some(Frame::Text(t.to_string())),
        Message::Binary(b) => Some(Frame::Binary(b)),
        Message::Close(c) => {
            Some(c.map_or(Frame::Close(1005, String::new()), |c| Frame::Close(c.code.into(), c.reason.to_string())))
        }
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
    }
}
