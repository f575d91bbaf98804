//! The pure part of one reconcile (observe the cache → membership → plan → targets → writes) on synthetic
//! fleets of N ∈ {1k, 10k, 20k} agents with k = 4, no cluster: the CPU a Pod event costs the operator.
//!
//! * `settled`: every Pod already carries its plan (the steady state; no writes), from scratch.
//! * `join`: the settled fleet plus one new agent Ready with presence (a handful of writes), from scratch:
//!   what the oracle of `--check-incremental` costs.
//! * `kept_*`: the same as the controller does it, on the policy's view kept between reconciles (see
//!   [`kept`]); `kept_view_presence`: that view taking in a changed presence read.
//! * `presence_parse`: reading the rendezvous' presence body for N agents (every changed read costs it).
//!
//! First it prints where the bytes go at each N, counted by the allocator: the Pod cache, a presence
//! snapshot, and one pass (what it holds at its peak, and what its decision keeps).
//!
//!     cargo bench --bench reconcile
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::Assignment;
use mesh_operator::controller::decide::{self, Decision, Memory, Waves};
use mesh_operator::controller::fleet::{Basis, Fleet};
use mesh_operator::controller::observe::Filing;
use mesh_operator::controller::plan::Targets;
use mesh_operator::controller::pods::{CachedPod, Shared};
use mesh_operator::controller::policy::ValidPolicy;
use mesh_operator::controller::store::PodStore;
use mesh_operator::controller::{membership, observe};
use mesh_operator::presence::{Node, Snapshot};
use serde_json::json;

const NOW_MS: f64 = 1.0e12;

/// The system allocator, counting the bytes live and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes still allocated when `f` returns (kept by what it returns), and its peak above the start.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let out = f();
    let (live, peak) = (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed));
    (out, live.saturating_sub(start), peak - start)
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Where the bytes go at `n` agents: per structure, as the allocator counts them.
fn memory(policy: &ValidPolicy, n: usize) {
    let ((pods, _), _, _) = measure(|| fleet(policy, n, 1));
    // Built afresh, as the controller's store holds them.
    let (store, cache_bytes, _) = measure(|| {
        let store = PodStore::default();
        store.apply(&watcher::Event::Init);
        for (i, p) in pods.iter().enumerate() {
            store.apply(&watcher::Event::InitApply(Arc::new(agent_pod(i, p.keys.exact().map(Arc::as_ref)))));
        }
        store.apply(&watcher::Event::InitDone);
        store
    });
    let cache: Vec<Arc<CachedPod>> = store.namespace(&policy.namespace);
    let (snapshot, snapshot_bytes, _) = measure(|| presence_of(n + 1));
    let mut memory = Memory::default();
    let (decision, kept, peak) = measure(|| pass(policy, &cache, &snapshot, &mut memory, Instant::now()));
    drop(decision);
    let (burst_kept, burst_peak) = burst_memory(policy, n);
    // The policy's view kept between reconciles, beside the cache it files.
    let view = View::new(policy, &cache, snapshot.clone());
    let ((), view_bytes, view_peak) = measure(|| view.take_in());
    println!(
        "memory at {n} agents: Pod cache {} ({} B per Pod), presence snapshot {}, the kept view {} (built with a \
         peak of {}); from scratch, one join's pass: peak {}, decision kept {}; a burst's pass (all {n} new): peak \
         {}, decision kept {}",
        mib(cache_bytes),
        cache_bytes / n,
        mib(snapshot_bytes),
        mib(view_bytes),
        mib(view_peak),
        mib(peak),
        mib(kept),
        mib(burst_peak),
        mib(burst_kept)
    );
}

/// What the pass that plans a whole burst (n new agents, no assignment yet) holds at its peak, and keeps.
fn burst_memory(policy: &ValidPolicy, n: usize) -> (usize, usize) {
    let (bare, snapshot) = (new_agents(n), presence_of(n));
    let (mut memory, now) = (Memory::default(), Instant::now());
    pass(policy, &bare, &snapshot, &mut memory, now);
    let later = now + 2 * mesh_operator::controller::admission::QUIET;
    let (decision, kept, peak) = measure(|| pass(policy, &bare, &snapshot, &mut memory, later));
    assert_eq!(decision.waves.grow.len(), n, "every agent of the burst gets a write");
    (kept, peak)
}

fn new_agents(n: usize) -> Vec<Arc<CachedPod>> {
    (0..n).map(|i| Arc::new(agent_pod(i, None))).collect()
}

fn policy() -> MeshPolicy {
    serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "mesh", "namespace": "ci", "uid": "7f1c0c9e-5d2b-4c51-9d0e-3a1f2b4c5d6e"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}}, "maxPeers": 4, "rendezvous": {"url": "http://rv"}}}))
    .unwrap()
}

/// A distinct 64-hex-digit id that looks like the hex Ed25519 key a real agent has (uniform digits: ids
/// that share long prefixes would make every map lookup look slower than it is).
fn node_id(i: usize) -> String {
    let half = |salt: u64| xxhash_rust::xxh3::xxh3_128_with_seed(&(i as u64).to_le_bytes(), salt);
    format!("{:032x}{:032x}", half(1), half(2))
}

fn agent_pod(i: usize, assignment: Option<&Assignment>) -> CachedPod {
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("agent-{i}"), "namespace": "ci", "uid": format!("uid-{i}"), "resourceVersion": "7",
            "labels": {"app": "agent", "pod-template-hash": "5d8f7c9b6"},
            "annotations": {"agentmesh.dev/node-id": node_id(i)}},
        "spec": {"nodeName": format!("node-{}", i % 50)},
        "status": {"podIP": format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
            "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap();
    let annotations = pod.metadata.annotations.get_or_insert_default();
    annotations.extend(assignment.iter().flat_map(|a| a.to_annotations()).map(|(k, v)| (k.to_owned(), v)));
    // As the controller's cache keeps it for the bench's policy: the labels its selector reads, shared.
    thread_local!(static SHARED: std::cell::RefCell<Shared> = Default::default());
    SHARED.with(|shared| CachedPod::new(pod, &|_| true, &|k| k == "app", &mut shared.borrow_mut()))
}

fn presence_of(n: usize) -> Arc<Snapshot> {
    let nodes: Vec<Node> = (0..n)
        .map(|i| Node {
            node_id: node_id(i).into(),
            address: "ws://0.0.0.0:3001/crdt-sync".into(),
            alive: true,
            last_seen_ms: Some(NOW_MS),
            hostname: Some(format!("agent-{i}").into()),
            unreachable: Default::default(),
        })
        .collect();
    Arc::new(Snapshot { server_node_id: None, now_ms: Some(NOW_MS), nodes: nodes.into() })
}

/// One reconcile's pure part over `pods`, with presence `snapshot`, at `at`.
fn pass(
    policy: &ValidPolicy,
    pods: &[Arc<CachedPod>],
    snapshot: &Arc<Snapshot>,
    memory: &mut Memory,
    at: Instant,
) -> Passed {
    let observed = observe::observe(policy, pods, &[]);
    let members = membership::of_policy(policy, &observed, snapshot, NOW_MS, &|_| None);
    Passed::from(decide::decide(policy, &observed, Some(&members), memory, at))
}

/// What a pass keeps of its decision: the targets and the writes.
struct Passed {
    wanted: Targets,
    waves: Waves,
}

impl From<Decision<'_>> for Passed {
    fn from(d: Decision) -> Self {
        Passed { wanted: d.wanted, waves: d.waves }
    }
}

/// `n` agents carrying the plan for the first `n` of them, and presence for `n + extra`.
fn fleet(policy: &ValidPolicy, n: usize, extra: usize) -> (Vec<Arc<CachedPod>>, Arc<Snapshot>) {
    let snapshot = presence_of(n);
    let bare = new_agents(n);
    // All n arrive at once: admission holds them, and plans them together once arrivals pause.
    let (mut memory, now) = (Memory::default(), Instant::now());
    assert!(pass(policy, &bare, &snapshot, &mut memory, now).wanted.is_empty(), "a burst waits");
    let later = now + 2 * mesh_operator::controller::admission::QUIET;
    let decision = pass(policy, &bare, &snapshot, &mut memory, later);
    let settled = (0..n).map(|i| agent_pod(i, decision.wanted[format!("agent-{i}").as_str()].as_deref()));
    let joining = (n..n + extra).map(|i| agent_pod(i, None));
    (settled.chain(joining).map(Arc::new).collect(), presence_of(n + extra))
}

fn decide(c: &mut Criterion) {
    let policy = ValidPolicy::new(&policy()).unwrap();
    for n in [1_000, 10_000, 20_000] {
        memory(&policy, n);
    }
    let mut group = c.benchmark_group("reconcile");
    group.sample_size(10);
    for n in [1_000, 10_000, 20_000] {
        for (case, extra) in [("settled", 0), ("join", 1)] {
            let (pods, snapshot) = fleet(&policy, n, extra);
            // Admission as in a settled fleet: nobody else arriving.
            let mut memory = Memory::default();
            let d = pass(&policy, &pods, &snapshot, &mut memory, Instant::now());
            let writes = d.waves.shrink.len() + d.waves.grow.len();
            assert_eq!(writes == 0, extra == 0, "{case} at {n}: {writes} writes");
            group.bench_with_input(BenchmarkId::new(case, n), &pods, |b, pods| {
                b.iter(|| pass(&policy, pods, &snapshot, &mut memory, Instant::now()))
            });
        }
        kept(&mut group, &policy, n);
        let body = presence_body(&presence_of(n));
        group.bench_with_input(BenchmarkId::new("presence_parse", n), &body, |b, body| {
            b.iter(|| mesh_operator::presence::parse(body).unwrap())
        });
    }
    group.finish();
}

/// What the controller does per event: the policy's view kept between reconciles takes in the changed
/// Pods alone. `kept_view_join`: one agent joins and the view takes it in (observe and membership);
/// `kept_join`: the same, then the decide step; `kept_landed`: the reconcile after the join's writes land
/// (the Pods they change come back with new keys); `kept_leave`: the reconcile after it leaves again (no
/// Pod took the join's writes, so none needs one); `kept_settled`: a reconcile with nothing changed.
fn kept(group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>, policy: &ValidPolicy, n: usize) {
    let (pods, snapshot) = fleet(policy, n, 1);
    let (joining, settled) = pods.split_last().unwrap();
    let view = View::new(policy, settled, snapshot);
    let mut memory = Memory::default();
    let d = view.reconcile(&mut memory);
    assert!(d.waves.is_empty(), "settled at {n}");
    let index = |pod: &str| pod.strip_prefix("agent-").and_then(|i| i.parse::<usize>().ok()).unwrap();
    let join = |view: &View, memory: &mut Memory, timed: Timed| {
        view.apply(watcher::Event::Apply(Arc::new(CachedPod::clone(joining))));
        let start = Instant::now();
        let wanted = match timed {
            Timed::View => {
                view.take_in();
                Targets::new()
            }
            _ => view.reconcile(memory).wanted,
        };
        let join = start.elapsed();
        if timed != Timed::View {
            assert!(!wanted.is_empty(), "the join is written at {n}");
        }
        let landed = (timed == Timed::Landed).then(|| {
            for (pod, to) in &wanted {
                view.apply(watcher::Event::Apply(Arc::new(agent_pod(index(pod), to.as_deref()))));
            }
            let start = Instant::now();
            let d = view.reconcile(memory);
            assert!(d.waves.is_empty(), "the join's writes settle the plan at {n}");
            let took = start.elapsed();
            for pod in wanted.keys().filter(|p| index(p) < settled.len()) {
                view.apply(watcher::Event::Apply(Arc::clone(&settled[index(pod)])));
            }
            took
        });
        view.apply(watcher::Event::Delete(Arc::new(CachedPod::clone(joining))));
        let start = Instant::now();
        view.reconcile(memory);
        match timed {
            Timed::Leave => start.elapsed(),
            Timed::Landed => landed.unwrap(),
            _ => join,
        }
    };
    let cases = [
        ("kept_view_join", Timed::View),
        ("kept_join", Timed::Join),
        ("kept_landed", Timed::Landed),
        ("kept_leave", Timed::Leave),
    ];
    for (case, timed) in cases {
        group.bench_function(BenchmarkId::new(case, n), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| join(&view, &mut memory, timed)).sum())
        });
    }
    group.bench_function(BenchmarkId::new("kept_settled", n), |b| b.iter(|| view.reconcile(&mut memory)));
    // A changed presence read judges every Pod again (here: the same entries in a new snapshot).
    group.bench_function(BenchmarkId::new("kept_view_presence", n), |b| {
        b.iter(|| {
            let again = Arc::new(Snapshot::clone(&view.snapshot.borrow()));
            *view.snapshot.borrow_mut() = again;
            view.take_in()
        })
    });
}

/// What [`kept`] times of a join: the view taking it in, the reconcile, the reconcile after its writes
/// land, or the reconcile after it leaves again.
#[derive(Clone, Copy, PartialEq)]
enum Timed {
    View,
    Join,
    Landed,
    Leave,
}

/// A policy's view as the controller keeps it, over a Pod cache written through its changelog.
struct View<'a> {
    policy: &'a ValidPolicy,
    store: PodStore,
    fleet: std::cell::RefCell<Fleet>,
    snapshot: std::cell::RefCell<Arc<Snapshot>>,
    clock: std::cell::Cell<Instant>,
}

impl<'a> View<'a> {
    fn new(policy: &'a ValidPolicy, pods: &[Arc<CachedPod>], snapshot: Arc<Snapshot>) -> Self {
        let clock = Instant::now().into();
        let view =
            View { policy, store: PodStore::default(), fleet: Default::default(), snapshot: snapshot.into(), clock };
        view.apply(watcher::Event::Init);
        for p in pods {
            view.apply(watcher::Event::InitApply(Arc::new(CachedPod::clone(p))));
        }
        view.apply(watcher::Event::InitDone);
        view
    }

    fn apply(&self, event: watcher::Event<Arc<CachedPod>>) {
        self.store.apply(&event);
    }

    fn take_in(&self) {
        let filing = Filing::new(self.policy, &[]);
        let basis = Basis::of(self.policy, &[], std::iter::empty());
        let mut fleet = self.fleet.borrow_mut();
        let batch = self.store.read(&self.policy.namespace, fleet.cursor(), false);
        fleet.update(&filing, basis, batch.since, batch.cursor);
        fleet.judge(&self.snapshot.borrow(), &membership::Rules::of(self.policy, NOW_MS));
    }

    /// A reconcile, each on a clock later than the last by more than admission's quiet time: the same
    /// agent joining again and again would otherwise be a burst, and held.
    fn reconcile(&self, memory: &mut Memory) -> Passed {
        self.take_in();
        let fleet = self.fleet.borrow();
        let now = self.clock.get() + 2 * mesh_operator::controller::admission::QUIET;
        self.clock.set(now);
        Passed::from(decide::decide(self.policy, &fleet.observed, Some(fleet.membership()), memory, now))
    }
}

/// The body a rendezvous serves for `s`.
fn presence_body(s: &Snapshot) -> Vec<u8> {
    let nodes: Vec<_> = s
        .nodes
        .iter()
        .map(|n| {
            json!({"node_id": n.node_id, "address": n.address, "alive": n.alive,
        "last_seen": n.last_seen_ms.map(|t| t / 1000.0), "last_seen_ms": n.last_seen_ms, "hostname": n.hostname})
        })
        .collect();
    serde_json::to_vec(&json!({"serverNodeId": "rendezvous", "nowMs": s.now_ms, "nodes": nodes})).unwrap()
}

criterion_group!(benches, decide);
criterion_main!(benches);
