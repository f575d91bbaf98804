//! One policy's view of its namespace, kept between reconciles: the [`Observed`] filing of its Pods and
//! its members' [`Verdicts`], brought up to date with the Pods that changed since the last reconcile
//! (read from [`super::changes`]). A join, leave or Pod update costs that Pod, not the fleet.
//!
//! What a Pod's filing and verdict depend on besides the Pod itself is the view's [`Basis`]: the policy's
//! spec, its namespace's other policies, the Nodes' topology labels. When the basis changes, or the Pod
//! cache was relisted, the view is built again from every Pod. A view built from scratch is the oracle:
//! the property test below replays random events against it, and `--check-incremental` compares the two
//! on every reconcile.
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use kube::ResourceExt;

use super::Context;
use super::membership::{Dirty, Membership, Rules, Verdicts};
use super::observe::{Filing, Observed};
use super::pods::CachedPod;
use super::policy::ValidPolicy;
use super::store::{Cursor, Since};
use crate::api::MeshPolicy;
use crate::presence::Snapshot;

/// Changed Pods remembered for the verdicts (past this and the namespace's Pods, they are judged anew).
const DIRTY_LIMIT: usize = 1024;

#[derive(Default)]
pub struct Fleet {
    /// Where the next read of the changes starts; `None` (before the first update, or after one that did
    /// not finish) reads everything.
    cursor: Option<Cursor>,
    basis: Option<Basis>,
    pub observed: Observed,
    verdicts: Verdicts,
    /// What changed since the verdicts were last brought up to date.
    dirty: Dirty,
}

/// What every Pod's filing and verdict depend on besides the Pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Basis {
    policy: String,
    /// The namespace's policies: (UID, name, generation), sorted.
    policies: Vec<(String, String, Option<i64>)>,
    /// The Nodes' topology labels (Node → value), when the policy spreads by one. The verdicts read them
    /// from here, not from the Node cache, so a view never mixes two versions of them.
    zones: BTreeMap<String, String>,
}

impl Basis {
    /// `nodes`: the Nodes' `topologyKey` labels as (Node, value); read only when the policy has one.
    pub fn of<'a>(
        policy: &ValidPolicy,
        policies: &[Arc<MeshPolicy>],
        nodes: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Self {
        let spec = (&policy.name, &policy.uid, &policy.selector, &policy.node_id_annotation, &policy.topology_key);
        let mut others: Vec<_> =
            policies.iter().map(|p| (p.uid().unwrap_or_default(), p.name_any(), p.metadata.generation)).collect();
        others.sort();
        let zones = match policy.topology_key {
            Some(_) => nodes.filter_map(|(node, zone)| Some((node.to_owned(), zone?.to_owned()))).collect(),
            None => BTreeMap::new(),
        };
        Basis { policy: format!("{spec:?} {:?}", policy.heartbeat_timeout), policies: others, zones }
    }
}

impl Fleet {
    pub fn cursor(&self) -> Option<Cursor> {
        self.cursor
    }

    /// Takes in what changed since the last update (`since`, read up to `cursor`) under `basis`: each
    /// changed Pod filed again, or every Pod when the basis changed or the changes are everything.
    pub fn update(&mut self, filing: &Filing, basis: Basis, since: Since, cursor: Cursor) {
        // Unset while the view changes: an update cut short leaves a view the next one rebuilds.
        self.cursor = None;
        let rebuild = self.basis.as_ref() != Some(&basis);
        match since {
            Since::Everything(pods) => self.rebuild(filing, pods),
            Since::Pods(changed) if rebuild => {
                let mut all = std::mem::take(&mut self.observed.namespace_pods);
                for (name, pod) in changed {
                    match pod {
                        Some(pod) => all.insert(name, pod),
                        None => all.remove(&name),
                    };
                }
                self.rebuild(filing, all.into_values().collect());
            }
            Since::Pods(changed) => {
                for (name, pod) in changed {
                    self.dirty.ids.extend(self.observed.unfile(&name));
                    if let Some(pod) = pod {
                        self.dirty.ids.extend(self.observed.file(filing, &pod));
                    }
                    self.dirty.pods.insert(name);
                }
                // Without presence nothing takes the changes in: past a bound, judging every Pod again
                // costs less than remembering them.
                if self.dirty.pods.len() > DIRTY_LIMIT.max(self.observed.namespace_pods.len()) {
                    (self.verdicts, self.dirty) = Default::default();
                }
            }
        }
        self.basis = Some(basis);
        self.cursor = Some(cursor);
    }

    fn rebuild(&mut self, filing: &Filing, pods: Vec<Arc<CachedPod>>) {
        self.observed = filing.observe(&pods);
        (self.verdicts, self.dirty) = Default::default();
    }

    /// Judges the view's Pods under `snap` on the clock `rules` carry (see [`Verdicts`]); the result is
    /// [`Fleet::membership`].
    pub fn judge(&mut self, snap: &Arc<Snapshot>, rules: &Rules) {
        // Unset while the verdicts change, as in `update`.
        let cursor = self.cursor.take();
        let dirty = std::mem::take(&mut self.dirty);
        self.verdicts.update(&self.observed, snap, rules, &zone_of(&self.basis), &dirty);
        self.cursor = cursor;
    }

    /// The membership as last judged.
    pub fn membership(&self) -> &Membership {
        self.verdicts.membership()
    }

    /// The first difference between this view and one built from scratch from `all` (every Pod of the
    /// namespace as of the last update), with the membership under `presence` when given.
    pub fn check(
        &mut self,
        filing: &Filing,
        all: &[Arc<CachedPod>],
        presence: Option<(&Arc<Snapshot>, &Rules)>,
    ) -> Result<(), String> {
        let fresh = filing.observe(all);
        let (a, b) = (&self.observed, &fresh);
        differ("selected", &a.selected, &b.selected)?;
        differ("pods", &a.pods, &b.pods)?;
        differ("carried", &a.carried, &b.carried)?;
        differ("namespace Pods", &a.namespace_pods, &b.namespace_pods)?;
        if a.conflicted != b.conflicted || a.foreign != b.foreign {
            return Err(format!(
                "conflicted or foreign Pods differ: {a:?} vs {b:?}",
                a = (&a.conflicted, &a.foreign),
                b = (&b.conflicted, &b.foreign)
            ));
        }
        let Some((snap, rules)) = presence else { return Ok(()) };
        self.judge(snap, rules);
        let mut verdicts = Verdicts::default();
        verdicts.update(&fresh, snap, rules, &zone_of(&self.basis), &Dirty::default());
        let (kept, fresh) = (self.membership(), verdicts.membership());
        differ("agents", &kept.agents, &fresh.agents)?;
        differ("excluded", &kept.excluded, &fresh.excluded)
    }
}

/// A Node's zone as `basis` has it.
fn zone_of(basis: &Option<Basis>) -> impl Fn(&str) -> Option<String> + '_ {
    move |node| basis.as_ref()?.zones.get(node).cloned()
}

/// The first key at which `kept` and `fresh` differ, as an error naming `what`.
fn differ<K: Ord + Debug, V: PartialEq + Debug>(
    what: &str,
    kept: &BTreeMap<K, V>,
    fresh: &BTreeMap<K, V>,
) -> Result<(), String> {
    match kept.keys().chain(fresh.keys()).find(|k| kept.get(*k) != fresh.get(*k)) {
        None => Ok(()),
        Some(k) => Err(format!("{what} differ at {k:?}: kept {:?}, from scratch {:?}", kept.get(k), fresh.get(k))),
    }
}

/// Takes into `fleet` the Pods that changed since it last looked, with `policies` (the namespace's) and
/// the Node cache as its basis; with `--check-incremental`, also returns every Pod of the namespace as of
/// the same instant.
pub fn refresh(
    ctx: &Context,
    policy: &ValidPolicy,
    filing: &Filing,
    policies: &[Arc<MeshPolicy>],
    fleet: &mut Fleet,
) -> Option<Vec<Arc<CachedPod>>> {
    let nodes = policy.topology_key.as_ref().map(|_| ctx.nodes.state()).unwrap_or_default();
    let key = policy.topology_key.as_deref().unwrap_or_default();
    let labels =
        nodes.iter().map(|n| (n.metadata.name.as_deref().unwrap_or_default(), n.labels().get(key).map(String::as_str)));
    let basis = Basis::of(policy, policies, labels);
    let batch = ctx.pods.read(&policy.namespace, fleet.cursor(), ctx.check_incremental);
    fleet.update(filing, basis, batch.since, batch.cursor);
    batch.all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::{Assignment, Peer};
    use crate::controller::store::PodStore;
    use crate::presence::Node;
    use kube::runtime::watcher;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW_MS: f64 = 1.0e12;

    /// One Pod as the test draws it: every field the filing and the verdicts read.
    #[derive(Clone, Debug)]
    struct PodDraw {
        app: u8,
        old_tier: bool,
        node_id: Option<u8>,
        other_id_key: bool,
        keys: u8,
        links: Vec<u8>,
        ready: bool,
        ip: Option<u8>,
        terminating: bool,
        node: u8,
        zone: Option<u8>,
    }

    fn pod_draw() -> impl Strategy<Value = PodDraw> {
        (
            (
                prop_oneof![3 => Just(0u8), 1 => 1u8..3],
                prop::bool::weighted(0.2),
                prop::option::weighted(0.9, 0u8..6),
                prop::bool::weighted(0.1),
            ),
            (0u8..5, prop::collection::vec(0u8..6, 0..3)),
            (prop::bool::weighted(0.8), prop::option::weighted(0.9, 0u8..4), prop::bool::weighted(0.1)),
            (0u8..3, prop::option::of(0u8..2)),
        )
            .prop_map(
                |((app, old_tier, node_id, other_id_key), (keys, links), (ready, ip, terminating), (node, zone))| {
                    PodDraw { app, old_tier, node_id, other_id_key, keys, links, ready, ip, terminating, node, zone }
                },
            )
    }

    /// A presence entry as the test draws it: ids, hostnames and IPs are few, so they collide.
    fn node_draw() -> impl Strategy<Value = Node> {
        (
            0u8..6,
            prop::option::of(0u8..8),
            prop_oneof![4 => 0u8..2, 1 => Just(2u8)],
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(id, host, address, alive, stale)| Node {
                node_id: format!("n{id}").into(),
                address: ["ws://0.0.0.0:1/x", "ws://10.0.0.1:1/x", "http://bad/"][address as usize].into(),
                alive,
                last_seen_ms: Some(NOW_MS - if stale { 120_000.0 } else { 1_000.0 }),
                hostname: host.map(|h| format!("p{h}").into()),
                unreachable: Default::default(),
            })
    }

    #[derive(Clone, Debug)]
    enum Event {
        /// A Pod created or changed (a join, a relabel, a write landing or not, readiness).
        Apply(u8, PodDraw),
        Delete(u8),
        /// Only a Pod's keys change (a write landing), or only its readiness.
        Keys(u8, u8, Vec<u8>),
        Ready(u8, bool),
        Presence(Vec<Node>),
        Clock(bool),
        /// The policy's spec edited: (selects web too, other node-id annotation, topology key, short heartbeat).
        Edit(bool, bool, bool, bool),
        /// The namespace's other policies: an older one selecting tier=old, and `q`.
        Others(bool, bool),
        /// A Node's zone label.
        Zone(u8, Option<u8>),
        Relist,
        Reconcile,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            6 => (0u8..8, pod_draw()).prop_map(|(i, p)| Event::Apply(i, p)),
            2 => (0u8..8).prop_map(Event::Delete),
            3 => (0u8..8, 0u8..5, prop::collection::vec(0u8..6, 0..3)).prop_map(|(i, k, l)| Event::Keys(i, k, l)),
            1 => (0u8..8, any::<bool>()).prop_map(|(i, r)| Event::Ready(i, r)),
            1 => prop::collection::vec(node_draw(), 0..12).prop_map(Event::Presence),
            1 => any::<bool>().prop_map(Event::Clock),
            1 => (any::<bool>(), prop::bool::weighted(0.1), any::<bool>(), prop::bool::weighted(0.2)).prop_map(|(a, b, c, d)| Event::Edit(a, b, c, d)),
            1 => (any::<bool>(), prop::bool::weighted(0.8)).prop_map(|(a, b)| Event::Others(a, b)),
            1 => (0u8..3, prop::option::of(0u8..2)).prop_map(|(n, z)| Event::Zone(n, z)),
            1 => Just(Event::Relist),
            5 => Just(Event::Reconcile),
        ]
    }

    fn assignment(policy: Option<&str>, links: &[u8]) -> Assignment {
        let peers = links.iter().map(|l| Peer { node_id: format!("n{l}").into(), url: "ws://10.0.0.9:1/".into() });
        let a = Assignment::new(peers.collect(), [], policy.unwrap_or_default().into()).with_max_peers(4);
        match policy {
            Some(_) => a,
            None => Assignment { policy: String::new(), ..a },
        }
    }

    fn pod(i: u8, d: &PodDraw) -> CachedPod {
        let mut annotations = serde_json::Map::new();
        if let Some(id) = d.node_id {
            let key = if d.other_id_key { "example.com/id" } else { crate::assignment::NODE_ID };
            annotations.insert(key.into(), json!(format!("n{id}")));
        }
        let keys = match d.keys {
            1 => Some(assignment(Some("mesh"), &d.links)),
            2 => Some(assignment(Some("q"), &d.links)),
            3 => Some(assignment(Some("gone"), &d.links)),
            4 => Some(assignment(None, &d.links)),
            _ => None,
        };
        for (k, v) in keys.iter().flat_map(Assignment::to_annotations) {
            if !(d.keys == 4 && k == crate::assignment::POLICY) {
                annotations.insert(k.into(), json!(v));
            }
        }
        let app = ["agent", "web", "db"][d.app as usize];
        let mut labels = json!({ "app": app });
        if d.old_tier {
            labels["tier"] = json!("old");
        }
        if let Some(z) = d.zone {
            labels["zone"] = json!(format!("z{z}"));
        }
        let pod = json!({
            "metadata": {"name": format!("p{i}"), "namespace": "ci", "uid": format!("u{i}"), "resourceVersion": "1",
                "labels": labels, "annotations": annotations,
                "deletionTimestamp": d.terminating.then_some("2026-01-01T00:00:00Z")},
            "spec": {"nodeName": format!("node-{}", d.node)},
            "status": {"podIP": d.ip.map(|ip| format!("10.0.0.{ip}")),
                "conditions": [{"type": "Ready", "status": if d.ready { "True" } else { "False" }}]}
        });
        CachedPod::from_pod(serde_json::from_value(pod).unwrap())
    }

    fn mesh_policy(name: &str, created: i64, spec: serde_json::Value, generation: i64) -> Arc<MeshPolicy> {
        let mut p = MeshPolicy::new(name, serde_json::from_value(spec).unwrap());
        p.metadata.namespace = Some("ci".into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.metadata.generation = Some(generation);
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        Arc::new(p)
    }

    /// The world the events act on: the Pod cache with its changes, the policies, presence, the Nodes.
    struct World {
        store: PodStore,
        edit: (bool, bool, bool, bool),
        generation: i64,
        others: (bool, bool),
        snapshot: Arc<Snapshot>,
        clock: f64,
        zones: BTreeMap<String, String>,
        drawn: BTreeMap<u8, PodDraw>,
    }

    impl World {
        fn new() -> Self {
            let w = World {
                store: PodStore::default(),
                edit: Default::default(),
                generation: 1,
                others: (false, false),
                snapshot: Default::default(),
                clock: NOW_MS,
                zones: Default::default(),
                drawn: Default::default(),
            };
            w.store.apply(&watcher::Event::InitDone);
            w
        }

        fn policies(&self) -> Vec<Arc<MeshPolicy>> {
            let (web, other_key, topology, short) = self.edit;
            let mut selector = json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["agent"]}]});
            if web {
                selector["matchExpressions"][0]["values"] = json!(["agent", "web"]);
            }
            let mut spec = json!({"selector": selector, "rendezvous": {"url": "http://rv"},
                "heartbeatTimeout": if short { "30s" } else { "60s" }});
            if other_key {
                spec["identity"] = json!({"nodeIdAnnotation": "example.com/id"});
            }
            if topology {
                spec["topologyKey"] = json!("zone");
            }
            let mut out = vec![mesh_policy("mesh", 20, spec, self.generation)];
            let other = |labels| json!({"selector": {"matchLabels": labels}, "rendezvous": {"url": "http://rv"}});
            if self.others.0 {
                out.push(mesh_policy("old", 10, other(json!({"tier": "old"})), 1));
            }
            if self.others.1 {
                out.push(mesh_policy("q", 30, other(json!({"app": "db"})), 1));
            }
            out
        }

        fn act(&mut self, e: &Event) {
            match e.clone() {
                Event::Apply(i, d) => {
                    self.store.apply(&watcher::Event::Apply(Arc::new(pod(i, &d))));
                    self.drawn.insert(i, d);
                }
                Event::Keys(i, keys, links) => {
                    if let Some(d) = self.drawn.get(&i).cloned() {
                        self.act(&Event::Apply(i, PodDraw { keys, links, ..d }));
                    }
                }
                Event::Ready(i, ready) => {
                    if let Some(d) = self.drawn.get(&i).cloned() {
                        self.act(&Event::Apply(i, PodDraw { ready, ..d }));
                    }
                }
                Event::Delete(i) => {
                    self.drawn.remove(&i);
                    let gone = CachedPod::from_pod(
                        serde_json::from_value(json!({"metadata": {"name": format!("p{i}"), "namespace": "ci"}}))
                            .unwrap(),
                    );
                    self.store.apply(&watcher::Event::Delete(Arc::new(gone)));
                }
                Event::Presence(nodes) => {
                    self.snapshot =
                        Arc::new(Snapshot { now_ms: Some(NOW_MS), nodes: nodes.into(), ..Default::default() });
                }
                Event::Clock(later) => self.clock = if later { NOW_MS + 1.0 } else { NOW_MS },
                Event::Edit(a, b, c, d) => (self.edit, self.generation) = ((a, b, c, d), self.generation + 1),
                Event::Others(a, b) => self.others = (a, b),
                Event::Zone(n, z) => {
                    let node = format!("node-{n}");
                    match z {
                        Some(z) => self.zones.insert(node, format!("z{z}")),
                        None => self.zones.remove(&node),
                    };
                }
                Event::Relist => {
                    // New objects, as a relist makes.
                    let pods: Vec<_> =
                        self.store.namespace("ci").iter().map(|p| Arc::new(CachedPod::clone(p))).collect();
                    self.store.apply(&watcher::Event::Init);
                    for p in pods {
                        self.store.apply(&watcher::Event::InitApply(p));
                    }
                    self.store.apply(&watcher::Event::InitDone);
                }
                Event::Reconcile => {}
            }
        }

        /// One reconcile's view: `fleet` brought up to date, then checked against one built from scratch.
        fn reconcile(&self, fleet: &mut Fleet) -> Result<(), String> {
            let policies = self.policies();
            let policy = ValidPolicy::new(&policies[0]).unwrap();
            let filing = Filing::new(&policy, &policies);
            let zones = self.zones.iter().map(|(n, z)| (n.as_str(), Some(z.as_str())));
            let basis = Basis::of(&policy, &policies, zones);
            let batch = self.store.read("ci", fleet.cursor(), true);
            fleet.update(&filing, basis, batch.since, batch.cursor);
            let rules = Rules::of(&policy, self.clock);
            fleet.judge(&self.snapshot, &rules);
            fleet.check(&filing, &batch.all.unwrap(), Some((&self.snapshot, &rules)))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// The oracle: after any sequence of joins, leaves, relabels, writes landing or not, readiness,
        /// presence and clock changes, policy edits, Node labels and relists, the kept view equals one
        /// built from scratch, at every reconcile.
        #[test]
        fn the_kept_view_equals_one_built_from_scratch(events in prop::collection::vec(event(), 1..80)) {
            let mut world = World::new();
            let mut fleet = Fleet::default();
            for e in &events {
                world.act(e);
                if matches!(e, Event::Reconcile) {
                    prop_assert_eq!(world.reconcile(&mut fleet), Ok(()));
                }
            }
            prop_assert_eq!(world.reconcile(&mut fleet), Ok(()));
        }
    }

    /// The oracle can fail: a view that missed a change differs from one built from scratch.
    #[test]
    fn a_view_that_missed_a_change_is_caught() {
        let mut world = World::new();
        let mut fleet = Fleet::default();
        let agent = PodDraw {
            app: 0,
            old_tier: false,
            node_id: Some(1),
            other_id_key: false,
            keys: 0,
            links: vec![],
            ready: true,
            ip: Some(1),
            terminating: false,
            node: 0,
            zone: None,
        };
        world.act(&Event::Presence(vec![Node {
            node_id: "n1".into(),
            address: "ws://0.0.0.0:1/".into(),
            alive: true,
            last_seen_ms: Some(NOW_MS),
            hostname: None,
            unreachable: Default::default(),
        }]));
        world.act(&Event::Apply(1, agent.clone()));
        assert_eq!(world.reconcile(&mut fleet), Ok(()));
        world.act(&Event::Apply(1, PodDraw { ready: false, ..agent }));
        // The view skips the change: its cursor moves past the record it never took in.
        fleet.cursor = Some(world.store.read("ci", fleet.cursor, false).cursor);
        let missed = world.reconcile(&mut fleet).unwrap_err();
        assert!(missed.contains("p1"), "{missed}");
    }
}
