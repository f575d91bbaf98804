//! What an agent counts, as Prometheus metrics (the embedding program registers them where it serves them).
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::doc::DocMetrics;
use crate::handshake::Refusal;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub links_dialed: Counter,
    pub dials_failed: Family<Labels, Counter>,
    pub links_accepted: Counter,
    pub links_refused: Family<Labels, Counter>,
    pub links_closed: Counter,
    pub open_links: Gauge,
    /// The most links this agent has held at once since it started (a cap check that needs no sampling).
    pub max_open_links: Gauge,
    /// The cap held now: `--max-peers`, or the assignment's when lower.
    pub cap: Gauge,
    pub rendezvous_connected: Gauge,
    /// Planned peers this agent reports unreachable.
    pub unreachable_peers: Gauge,
    /// Open standby links (standing in for lost planned peers), and those ever opened.
    pub standby_links: Gauge,
    pub standby_links_opened: Counter,
    pub assignment_errors: Counter,
    pub doc: DocMetrics,
}

impl Metrics {
    pub fn refused(&self, why: Refusal) {
        self.links_refused.get_or_create(&vec![("reason", why.label())]).inc();
    }

    pub fn dial_failed(&self, why: &'static str) {
        self.dials_failed.get_or_create(&vec![("reason", why)]).inc();
    }

    pub fn set_open(&self, n: usize) {
        self.open_links.set(n as i64);
        if n as i64 > self.max_open_links.get() {
            self.max_open_links.set(n as i64);
        }
    }

    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("agentmesh");
        r.register("links_dialed", "Mesh links this agent dialed and opened", self.links_dialed.clone());
        r.register("dials_failed", "Dials that did not open a link, by reason", self.dials_failed.clone());
        r.register("links_accepted", "Inbound mesh links admitted", self.links_accepted.clone());
        r.register("links_refused", "Inbound mesh links refused or evicted, by reason", self.links_refused.clone());
        r.register("links_closed", "Mesh links closed (either end)", self.links_closed.clone());
        r.register("open_links", "Mesh links open now", self.open_links.clone());
        r.register("max_peers", "The most mesh links this agent may hold now (its cap)", self.cap.clone());
        r.register("max_open_links", "Most mesh links open at once since start", self.max_open_links.clone());
        r.register("rendezvous_connected", "1 while the rendezvous link is up", self.rendezvous_connected.clone());
        r.register(
            "unreachable_peers",
            "Planned peers every dial to has failed past the grace period",
            self.unreachable_peers.clone(),
        );
        r.register(
            "standby_links",
            "Standby links open now, in slots of lost planned peers",
            self.standby_links.clone(),
        );
        r.register(
            "standby_links_opened",
            "Standby links opened (dialed or accepted)",
            self.standby_links_opened.clone(),
        );
        r.register("assignment_errors", "Assignment readings refused as malformed", self.assignment_errors.clone());
        let d = &self.doc;
        r.register("updates_received", "New document updates received", d.updates_received.clone());
        r.register("duplicates_dropped", "Updates received again and not forwarded", d.duplicates_dropped.clone());
        r.register("mesh_messages_sent", "Update messages sent whole on mesh links", d.mesh_messages_sent.clone());
        r.register("mesh_announcements_sent", "Update ids announced on mesh links", d.announcements_sent.clone());
        r.register(
            "mesh_announcement_bytes_sent",
            "Bytes of the frames that announced update ids on mesh links",
            d.announcement_bytes.clone(),
        );
        r.register(
            "mesh_grafts_sent",
            "Announced updates asked for because they did not arrive",
            d.grafts_sent.clone(),
        );
        r.register(
            "mesh_prunes_sent",
            "Mesh links made lazy because an update arrived on them twice",
            d.prunes_sent.clone(),
        );
        r.register("protocol_errors", "Messages that did not decode or apply", d.protocol_errors.clone());
        r.register(
            "sync_requests_dropped",
            "SyncStep1 messages dropped: the link had one answered in the last few seconds",
            d.sync_requests_dropped.clone(),
        );
        r.register("slow_links_dropped", "Links dropped for not keeping up", d.slow_links_dropped.clone());
        r.register(
            "held_dropped",
            "Updates dropped while held for what they build on: their link's budget was full, or it closed",
            d.held_dropped.clone(),
        );
    }
}
