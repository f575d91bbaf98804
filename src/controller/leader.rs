//! Leader election on a `coordination.k8s.io` Lease. kube-lease-manager acquires and renews it; whether
//! this replica may *write* is decided here, from the Lease itself: only while the Lease names us and its
//! last renewal is younger than [`FENCE`]. kube-lease-manager keeps reporting leadership while it backs off
//! from failed renewals (or hangs in one), so its own flag cannot fence writes: a replica cut off from the
//! API would go on writing after a standby took over. The fence expires on our clock, renewals or not,
//! [`LEASE_SECONDS`] − [`FENCE`] before a standby may take the Lease.
//!
//! Clocks: the leader times its fence from `renewTime`, which it wrote from its own clock, so its skew
//! does not matter; a standby takes the Lease when `renewTime` + [`LEASE_SECONDS`] has passed on *its*
//! clock. A standby whose clock runs ahead by δ takes over δ early. Each write is abandoned at the
//! fence's end, by us and (through the request's `timeout`, counted from its arrival) by the API server,
//! so writes end [`LEASE_SECONDS`] − [`FENCE`] − δ before a standby may write, provided each reaches the
//! API server within the rest. [`SKEW_TOLERANCE`] is the δ we promise to absorb. What the timing cannot
//! cover (a write delayed longer on its way, a renewal that lands late) the API server refuses: every
//! write is conditional on the version its decision read (`apply`), and the chart's leader policy
//! refuses writes from a replica the Lease does not name.
//!
//! One source, one order: the fence is updated before the term moves, and the term moving is what
//! re-runs every policy, so a new leader never reconciles while it still reads itself as a standby.
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use super::Settings;
use crate::telemetry::Metrics;

/// The Lease duration: a standby takes over at most this long (plus up to a second) after the last renewal.
pub const LEASE_SECONDS: u64 = 15;
/// kube-lease-manager renews this long before the Lease would expire: every 5 s.
pub const GRACE_SECONDS: u64 = 10;
/// How long after a renewal the leader may still start a write wave: the 5 s renewal period plus 3 s for
/// a renewal to land before writes pause.
pub const FENCE: Duration = Duration::from_secs(8);
/// How far ahead of the leader's clock a standby's may run without both writing at once.
pub const SKEW_TOLERANCE: Duration = Duration::from_secs(5);
/// The part of the margin left for a write's trip to the API server.
const TRIP: Duration = Duration::from_secs(2);
const _: () = assert!(FENCE.as_secs() + SKEW_TOLERANCE.as_secs() + TRIP.as_secs() <= LEASE_SECONDS);
const _: () = assert!(FENCE.as_secs() > LEASE_SECONDS - GRACE_SECONDS, "the fence outlasts a renewal period");

/// The longest a single write may take when no fence bounds it.
pub const UNFENCED_WRITE: Duration = Duration::from_secs(30);

/// Whether this replica may write now, and the leadership term (bumped each time it becomes leader).
pub struct Leadership {
    elected: bool,
    state: watch::Sender<Term>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Term {
    pub number: u64,
    /// Until when writes may start; `None` while not leading.
    pub until: Option<Instant>,
}

impl Leadership {
    /// Without election (a single replica), always leading, in term 1.
    pub fn new(elected: bool) -> Self {
        Self { elected, state: watch::channel(Term { number: u64::from(!elected), until: None }).0 }
    }

    pub fn may_write(&self) -> bool {
        self.time_left().is_some()
    }

    /// How long a write started now may take before the fence ends; `None` when no write may start.
    /// Without election, [`UNFENCED_WRITE`].
    pub fn time_left(&self) -> Option<Duration> {
        if !self.elected {
            return Some(UNFENCED_WRITE);
        }
        let until = self.state.borrow().until?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    pub fn term(&self) -> u64 {
        self.state.borrow().number
    }

    /// Fires each time this replica becomes leader.
    pub fn subscribe(&self) -> watch::Receiver<Term> {
        self.state.subscribe()
    }

    /// Takes in what the Lease says now (at local time `now`).
    fn observe(&self, lease: Option<&Lease>, identity: &str, now: Instant, metrics: &Metrics) {
        let until = lease.and_then(|l| fence_until(l, identity));
        let leading = until.is_some_and(|u| now < u);
        self.state.send_if_modified(|t| {
            let was = t.until.is_some_and(|u| now < u);
            // A fence that ran out on its own still ends a term here: that is how leadership is usually lost.
            let had = t.until.is_some();
            t.until = until.filter(|_| leading);
            if leading && !was {
                t.number += 1;
                info!(identity, term = t.number, "became leader");
            } else if had && !leading {
                info!(identity, "no longer leader: stopped writing");
                metrics.forget_policies();
            }
            metrics.leader.set(i64::from(leading));
            leading != was
        });
    }
}

/// When the fence of the Lease's holder ends, if the holder is `identity`: renewal + [`FENCE`], taken
/// on our clock (kube-lease-manager writes `renewTime` from it).
fn fence_until(lease: &Lease, identity: &str) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let age = Timestamp::now().duration_since(renewed);
    let left = FENCE.as_secs_f64() - age.as_secs_f64();
    (left > 0.0).then(|| Instant::now() + Duration::from_secs_f64(left))
}

/// The election's tasks. Dropping it (a crash, or an aborted controller) stops them without releasing the
/// Lease, so a standby takes over only once it expires; [`release`] gives it up at once.
pub struct LeaseTask {
    follow: JoinHandle<()>,
    leases: Api<Lease>,
    name: String,
    identity: String,
    manager: Option<JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>>,
    /// kube-lease-manager releases the Lease once every receiver of its channel is gone.
    manager_rx: Option<watch::Receiver<bool>>,
}

impl Drop for LeaseTask {
    fn drop(&mut self) {
        self.follow.abort();
        if let Some(m) = &self.manager {
            m.abort();
        }
    }
}

/// The field manager a replica acquires the Lease under: its own, so two replicas applying
/// `holderIdentity` at once conflict and one of them fails (under one shared manager both would succeed,
/// the last write winning while each believed it led).
pub fn lease_field_manager(identity: &str) -> String {
    format!("{}/{identity}", super::FIELD_MANAGER).chars().take(128).collect()
}

/// Starts competing for the Lease and following it into `leadership`.
pub async fn elect(
    client: Client,
    settings: &Settings,
    leadership: Arc<Leadership>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<LeaseTask> {
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&settings.lease_namespace)
        .with_identity(&settings.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .with_field_manager(lease_field_manager(&settings.identity))
        .build()
        .await?;
    let (manager_rx, manager) = manager.watch().await;
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.lease_namespace);
    let config = super::watch_config().fields(&format!("metadata.name={}", settings.lease_name));
    let identity = settings.identity.clone();
    let follow = tokio::spawn(async move {
        let mut leases = watcher(api, config).default_backoff().boxed();
        let mut current: Option<Lease> = None;
        loop {
            let fence = leadership.state.borrow().until;
            let expired = async {
                match fence {
                    Some(u) => tokio::time::sleep_until(u.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = leases.next() => match event {
                    Some(Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l))) => current = Some(l),
                    Some(Ok(watcher::Event::Delete(_))) => current = None,
                    Some(Err(e)) => metrics.watch_failed("leases", &e),
                    Some(_) => {}
                    None => return,
                },
                () = expired => {}
            }
            leadership.observe(current.as_ref(), &identity, Instant::now(), &metrics);
        }
    });
    Ok(LeaseTask {
        follow,
        leases: Api::namespaced(client, &settings.lease_namespace),
        name: settings.lease_name.clone(),
        identity: settings.identity.clone(),
        manager: Some(manager),
        manager_rx: Some(manager_rx),
    })
}

impl LeaseTask {
    /// On shutdown, a replica that does not lead stops competing at once: it must not win the Lease its
    /// leader is about to free, only to leave with it.
    pub fn withdraw_unless_leading(&mut self, leadership: &Leadership) {
        if !leadership.may_write() {
            self.manager_rx.take();
        }
    }
}

/// Gives the Lease up: dropping the last receiver makes kube-lease-manager release it and end.
pub async fn release(mut task: LeaseTask) {
    task.follow.abort();
    task.manager_rx.take();
    let Some(manager) = task.manager.take() else { return };
    match tokio::time::timeout(Duration::from_secs(3), manager).await {
        Ok(Ok(Ok(_))) => info!("leader Lease released"),
        other => tracing::warn!(?other, "could not release the leader Lease cleanly"),
    }
    give_up_if_ours(&task).await;
}

/// kube-lease-manager drops an acquire still in flight when its last receiver goes, then releases only
/// what it believes it holds: a Lease that request won stays ours. Read it back; if it names us, clear
/// the holder, conditional on the version read, so a successor's own acquire is never undone.
async fn give_up_if_ours(task: &LeaseTask) {
    let Ok(Some(lease)) = task.leases.get_opt(&task.name).await else { return };
    if lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(&task.identity) {
        return;
    }
    let clear = serde_json::json!({
        "metadata": {"resourceVersion": lease.metadata.resource_version},
        "spec": {"holderIdentity": null, "acquireTime": null, "renewTime": null, "leaseDurationSeconds": null},
    });
    let params = kube::api::PatchParams::default();
    match task.leases.patch(&task.name, &params, &kube::api::Patch::Merge(clear)).await {
        Ok(_) => info!("gave up a Lease acquired while shutting down"),
        Err(e) => tracing::warn!(error = %e, "could not give up the Lease acquired while shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: f64) -> Lease {
        let renewed = Timestamp::now() - jiff_span(renewed_secs_ago);
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": LEASE_SECONDS,
                     "renewTime": renewed.to_string()}
        }))
        .unwrap()
    }

    fn jiff_span(secs: f64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs_f64(secs)
    }

    #[test]
    fn writes_stop_a_fence_after_the_last_renewal_whatever_else_happens() {
        let metrics = Metrics::default();
        let l = Leadership::new(true);
        let now = Instant::now();
        assert!(!l.may_write());
        l.observe(Some(&lease("me", 1.0)), "me", now, &metrics);
        assert!(l.may_write());
        assert_eq!(l.term(), 1);
        let policy = crate::telemetry::PolicyLabel::new("ci", "mesh");
        metrics.selected.get_or_create(&policy).set(3);
        // No renewal seen since (the API is unreachable): the fence runs out on its own.
        l.observe(Some(&lease("me", 1.0)), "me", now + FENCE, &metrics);
        assert!(!l.may_write(), "a leader that cannot renew stops writing");
        assert!(!metrics.encode().contains("policy=\"mesh\""), "a fence run out drops the policy series");
        l.observe(Some(&lease("me", 0.0)), "me", Instant::now(), &metrics);
        assert_eq!(l.term(), 2, "leading again is a new term");
        l.observe(Some(&lease("other", 0.0)), "me", Instant::now(), &metrics);
        assert!(!l.may_write());
        l.observe(Some(&lease("me", FENCE.as_secs_f64() + 0.5)), "me", Instant::now(), &metrics);
        assert!(!l.may_write(), "a Lease renewed longer ago than the fence gives no right to write");
        assert!(Leadership::new(false).may_write());
    }
}
