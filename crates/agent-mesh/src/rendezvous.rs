//! The primary channel: a WebSocket to the rendezvous' `/crdt-sync`. The agent announces its presence
//! (node id, address, hostname) in the handshake, heartbeats over it, and syncs the document through it.
//! It redials with jittered backoff forever; the mesh links do not depend on it.
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::doc::Doc;
use crate::identity::Identity;
use crate::mesh::next_link;
use crate::metrics::Metrics;
use crate::{Config, handshake, transport};

pub(crate) async fn run(identity: Arc<Identity>, doc: Doc, metrics: Metrics, config: Arc<Config>, url: String) {
    let mut attempts = 0;
    loop {
        match transport::connect(&url, config.join_token.as_deref()).await {
            Ok(mut wire) => {
                let presence = (Some(config.advertise.clone()), config.hostname.clone());
                match handshake::dial(&mut wire, &identity, None, presence).await {
                    Ok(hub) => {
                        tracing::info!(hub = %hub.get(..12).unwrap_or(&hub), "rendezvous connected");
                        attempts = 0;
                        metrics.rendezvous_connected.set(1);
                        let (_keep, close) = oneshot::channel();
                        transport::run_link(wire, doc.clone(), next_link(), false, close, config.heartbeat, || {})
                            .await;
                        metrics.rendezvous_connected.set(0);
                        tracing::warn!("rendezvous link closed");
                    }
                    Err(e) => tracing::warn!(error = %e, "rendezvous handshake failed"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "rendezvous unreachable"),
        }
        tokio::time::sleep(config.backoff.delay(attempts)).await;
        attempts += 1;
    }
}
