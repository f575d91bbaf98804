//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager). A 10 s lease with a 2 s grace
//! lets a standby take over within about 12 s of the leader's death; a clean shutdown releases it at once.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use super::Settings;
use crate::telemetry::Metrics;

pub const LEASE_SECONDS: u64 = 10;
pub const GRACE_SECONDS: u64 = 2;

/// The election's tasks. Dropping it (a crash, or an aborted controller) stops them without releasing the
/// Lease, so a standby takes over only once it expires; [`release`] gives it up at once.
pub struct LeaseTask {
    mirror: JoinHandle<()>,
    manager: Option<JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>>,
}

impl Drop for LeaseTask {
    fn drop(&mut self) {
        self.mirror.abort();
        if let Some(m) = &self.manager {
            m.abort();
        }
    }
}

/// Starts competing for the Lease. `leader` and the `leader` metric follow the outcome; the returned
/// receiver lets the controller react to becoming leader.
pub async fn elect(
    client: Client,
    settings: &Settings,
    leader: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(watch::Receiver<bool>, LeaseTask)> {
    let manager = LeaseManagerBuilder::new(client, &settings.lease_name)
        .with_namespace(&settings.lease_namespace)
        .with_identity(&settings.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .with_field_manager(super::FIELD_MANAGER)
        .build()
        .await?;
    let (rx, manager) = manager.watch().await;
    let mut mirror_rx = rx.clone();
    let identity = settings.identity.clone();
    let mirror = tokio::spawn(async move {
        loop {
            let is_leader = *mirror_rx.borrow_and_update();
            leader.store(is_leader, Ordering::SeqCst);
            metrics.leader.set(i64::from(is_leader));
            info!(identity, is_leader, "leadership changed");
            if mirror_rx.changed().await.is_err() {
                leader.store(false, Ordering::SeqCst);
                return;
            }
        }
    });
    Ok((rx, LeaseTask { mirror, manager: Some(manager) }))
}

/// Gives the Lease up: once every receiver is gone the manager releases it and ends.
pub async fn release(mut task: LeaseTask) {
    task.mirror.abort();
    let Some(manager) = task.manager.take() else { return };
    match tokio::time::timeout(Duration::from_secs(5), manager).await {
        Ok(Ok(Ok(_))) => info!("leader Lease released"),
        other => tracing::warn!(?other, "could not release the leader Lease cleanly"),
    }
}
