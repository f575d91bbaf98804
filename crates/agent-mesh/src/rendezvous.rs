//! The primary channel: a link to the rendezvous' `/crdt-sync`, pinned to its node key. The agent
//! announces its presence (address, hostname) in the handshake and proves the join token without sending
//! it, heartbeats over the link, reports the planned peers it cannot reach ([`crate::health`]), and syncs
//! the document through it. It redials with jittered backoff forever; the mesh links do not depend on it.
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::doc::Doc;
use crate::handshake::{HandshakeError, Hello};
use crate::health::Health;
use crate::mesh::{Status, next_link};
use crate::metrics::Metrics;
use crate::tls::Credentials;
use crate::transport::Protocols;
use crate::{Config, Pinned, transport};

/// The health report text, following the mesh's status.
pub(crate) fn reports(mut status: watch::Receiver<Status>) -> watch::Receiver<String> {
    let text = |s: &Status| Health { unreachable: s.unreachable.clone() }.to_text();
    let (tx, rx) = watch::channel(text(&status.borrow_and_update()));
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let now = text(&status.borrow_and_update());
            tx.send_if_modified(|t| (*t != now).then(|| *t = now).is_some());
        }
    });
    rx
}

pub(crate) async fn run(
    creds: Arc<Credentials>,
    doc: Doc,
    metrics: Metrics,
    config: Arc<Config>,
    hub: Pinned,
    reports: watch::Receiver<String>,
) {
    let mut attempts = 0;
    loop {
        let hello =
            Hello { address: Some(config.advertise.clone()), hostname: config.hostname.clone(), token_proof: None };
        // Never a fallback to protocol 1 here: a fleet's rendezvous is upgraded before its agents.
        let protocols = if config.protocols.v2 { Protocols::V2 } else { Protocols::V1 };
        let tokens = (config.join_token.as_deref(), config.join_token.as_deref());
        match transport::dial_in(&hub.url, &creds, &hub.node_id, hello, tokens, protocols, config.dial_from).await {
            Ok((wire, _)) => {
                tracing::info!(hub = %hub.node_id.get(..12).unwrap_or(&hub.node_id), "rendezvous connected");
                attempts = 0;
                metrics.rendezvous_connected.set(1);
                let (_keep, close) = oneshot::channel();
                let talk =
                    transport::Talk { report: Some(reports.clone()), ..transport::Talk::heartbeats(config.heartbeat) };
                transport::run_link(wire, doc.clone(), next_link(), false, close, talk).await;
                metrics.rendezvous_connected.set(0);
                tracing::warn!("rendezvous link closed");
            }
            // A wrong key or a refusal needs someone's attention; a rendezvous that is down does not.
            Err(e @ (HandshakeError::Tls(_) | HandshakeError::Refused(..))) => {
                tracing::warn!(error = %e, "rendezvous refused the link, or is not the pinned node")
            }
            Err(e) => tracing::debug!(error = %e, "rendezvous unreachable"),
        }
        tokio::time::sleep(config.backoff.delay(attempts)).await;
        attempts += 1;
    }
}
