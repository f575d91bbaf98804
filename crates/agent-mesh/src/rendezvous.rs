//! The primary channel: a link to the rendezvous' `/crdt-sync`, pinned to its node key. The agent
//! announces its presence (address, hostname) in the handshake and proves the join token without sending
//! it, heartbeats over the link, and syncs the document through it. It redials with jittered backoff
//! forever; the mesh links do not depend on it.
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::doc::Doc;
use crate::handshake::{HandshakeError, Hello};
use crate::mesh::next_link;
use crate::metrics::Metrics;
use crate::tls::Credentials;
use crate::transport::Protocols;
use crate::{Config, Pinned, transport};

pub(crate) async fn run(creds: Arc<Credentials>, doc: Doc, metrics: Metrics, config: Arc<Config>, hub: Pinned) {
    let mut attempts = 0;
    loop {
        let hello =
            Hello { address: Some(config.advertise.clone()), hostname: config.hostname.clone(), token_proof: None };
        // Never a fallback to protocol 1 here: a fleet's rendezvous is upgraded before its agents.
        let protocols = if config.protocols.v2 { Protocols::V2 } else { Protocols::V1 };
        let tokens = (config.join_token.as_deref(), config.join_token.as_deref());
        match transport::dial_in(&hub.url, &creds, &hub.node_id, hello, tokens, protocols).await {
            Ok((wire, _)) => {
                tracing::info!(hub = %hub.node_id.get(..12).unwrap_or(&hub.node_id), "rendezvous connected");
                attempts = 0;
                metrics.rendezvous_connected.set(1);
                let (_keep, close) = oneshot::channel();
                transport::run_link(wire, doc.clone(), next_link(), false, close, config.heartbeat, || {}).await;
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
