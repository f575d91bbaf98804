//! The controller running for real against the real control plane and the rendezvous simulator.
//! Each test has its own namespace, rendezvous and controller (watching only that namespace).
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::{Assignment, Peer};
use mesh_operator::controller::{apply, decide, leader};
use rendezvous::FailMode;
use serde_json::json;
use support::*;

/// Whether the published assignments agree end to end: every dial is accepted at the other end and every
/// accept is dialed (between two write waves they may not yet).
fn settled(a: &BTreeMap<String, Option<Assignment>>, ids: &HashMap<String, String>) -> bool {
    let by_id: HashMap<&str, &Assignment> =
        a.iter().filter_map(|(pod, x)| Some((ids.get(pod)?.as_str(), x.as_ref()?))).collect();
    by_id.iter().all(|(me, x)| {
        x.peers.iter().all(|p| by_id.get(p.node_id.as_str()).is_some_and(|o| o.accepts.iter().any(|id| id == me)))
            && x.accepts.iter().all(|d| by_id.get(d.as_str()).is_some_and(|o| o.peers.iter().any(|p| p.node_id == *me)))
    })
}

/// Whether every published assignment holds exactly `k` links: the final plan when N·k is even (N > k+1).
/// Between a change's two write waves the published mesh is consistent but short of links (and may be
/// disconnected), so a test that checks connectivity waits for this too.
fn full(a: &BTreeMap<String, Option<Assignment>>, k: usize) -> bool {
    a.values().flatten().all(|x| x.links() == k)
}

/// Checks the published mesh: every link on exactly one end, each `links` annotation equal to the Pod's
/// degree and within `cap`, and connected. Returns each node's degree.
fn check_mesh(
    a: &BTreeMap<String, Option<Assignment>>,
    ids: &HashMap<String, String>,
    cap: usize,
) -> BTreeMap<String, usize> {
    let mut degree: BTreeMap<String, usize> = BTreeMap::new();
    let mut edges = BTreeSet::new();
    for (pod, asg) in a {
        let Some(asg) = asg else { continue };
        let me = &ids[pod];
        degree.entry(me.clone()).or_default();
        for p in &asg.peers {
            let them = p.node_id.to_string();
            let e = if *me < them { (me.clone(), them) } else { (them, me.clone()) };
            assert!(edges.insert(e), "link {me}–{} published on both ends", p.node_id);
            *degree.entry(me.clone()).or_default() += 1;
            *degree.entry(p.node_id.to_string()).or_default() += 1;
            assert!(p.url.starts_with("ws://127.0."), "dial URL not rewritten to the Pod IP: {}", p.url);
        }
    }
    for (pod, asg) in a {
        if let Some(asg) = asg {
            assert_eq!(asg.links(), degree[&ids[pod]], "links of {pod}");
            assert!(asg.links() <= cap, "{pod} has {} links, cap {cap}", asg.links());
        }
    }
    // connectivity over the published links
    let mut adj: HashMap<&str, Vec<&str>> = HashMap::new();
    for (a, b) in &edges {
        adj.entry(a).or_default().push(b);
        adj.entry(b).or_default().push(a);
    }
    if let Some(start) = degree.keys().next() {
        let mut seen = BTreeSet::from([start.as_str()]);
        let mut stack = vec![start.as_str()];
        while let Some(u) = stack.pop() {
            for v in adj.get(u).into_iter().flatten() {
                if seen.insert(v) {
                    stack.push(v);
                }
            }
        }
        assert_eq!(seen.len(), degree.len(), "published mesh is not connected");
    }
    degree
}

#[tokio::test]
async fn fleet_assignment_churn_readiness_and_presence() {
    let (client, ns, rv) = setup("fleet").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 50, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;

    // (a) every agent assigned, within the cap, connected, status right
    let a = wait_assigned(&client, &ns, 50).await;
    let degrees = check_mesh(&a, &pod_ids(&ids), 4);
    assert!(degrees.values().all(|d| *d == 4), "{degrees:?}");
    let p = wait_condition(&client, &ns, "mesh", "Ready", "True", "Applied").await;
    let st = p.status.clone().unwrap();
    assert_eq!(
        (st.selected, st.eligible, st.assigned, st.links, st.max_degree, st.components),
        (50, 50, 50, 100, 4, 1)
    );
    assert_eq!(st.observed_generation, p.metadata.generation);
    assert_eq!(condition(&p, "RendezvousReachable").unwrap().0, "True");
    let finalizers = p.metadata.finalizers.unwrap_or_default();
    assert_eq!(finalizers, vec!["agentmesh.dev/cleanup".to_string()]);

    // (k) a resync with nothing changed issues zero patches
    let before = op.pod_patches();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(op.pod_patches(), before, "resyncs with nothing changed patched Pods");
    let rv_before = policy(&client, &ns, "mesh").await.metadata.resource_version;
    assert_eq!(policy(&client, &ns, "mesh").await.metadata.resource_version, rv_before, "status rewritten at rest");

    // (b) one agent Pod deleted: only O(k) Pods patched
    let (before, was) = (op.pod_patches(), assignments(&client, &ns).await);
    Api::<Pod>::namespaced(client.clone(), &ns).delete("agent-17", &DeleteParams::default()).await.unwrap();
    let a = wait_for("agent-17 to leave the mesh", WAIT, || async {
        let a = assignments(&client, &ns).await;
        let gone = !a.contains_key("agent-17");
        let nobody_dials_it = a.values().flatten().all(|x| x.peers.iter().all(|p| p.node_id != ids[17]));
        let settled = settled(&a, &pod_ids(&ids));
        let live = a.values().filter(|v| v.is_some()).count();
        (gone && nobody_dials_it && settled && live == 49 && full(&a, 4)).then_some(a)
    })
    .await;
    check_mesh(&a, &pod_ids(&ids), 4);
    let patched = op.pod_patches() - before;
    // O(k) writes. The planner's bound: a leave changes at most 4k+4 links (tests/planner_properties.rs, for
    // 200 to 1,200 agents; here 50), each touching two Pods, each Pod written at most twice (a Pod that swaps
    // a peer first drops it, then gains the new one). The plan is seeded by the policy's UID, so the
    // typical count (about 2k Pods) varies from run to run.
    let changed = a.iter().filter(|(pod, now)| was.get(*pod) != Some(now)).count() as u64;
    assert!(
        (1..=2 * 2 * (4 * 4 + 4)).contains(&patched),
        "one leave took {patched} Pod writes ({changed} Pods changed)"
    );
    assert!((1..=2 * (4 * 4 + 4)).contains(&changed), "one leave changed {changed} Pods (k = 4)");

    // (c) a Pod not Ready is excluded, and its assignment removed
    set_pod_status(&client, &ns, "agent-3", "127.0.1.4", false).await;
    wait_for("agent-3 (not Ready) to lose its assignment", WAIT, || async {
        assignments(&client, &ns).await.get("agent-3").cloned().flatten().is_none().then_some(())
    })
    .await;

    // (d) dead and stale presence are excluded
    rv.state.lock().unwrap().agents.get_mut(&ids[5]).unwrap().alive = false;
    rv.state.lock().unwrap().agents.get_mut(&ids[6]).unwrap().frozen_at_ms = Some(0.0);
    let a = wait_for("agents 5 (dead) and 6 (stale) to lose their assignments", WAIT, || async {
        let a = assignments(&client, &ns).await;
        (a["agent-5"].is_none() && a["agent-6"].is_none() && settled(&a, &pod_ids(&ids)) && full(&a, 4)).then_some(a)
    })
    .await;
    let degrees = check_mesh(&a, &pod_ids(&ids), 4);
    assert_eq!(degrees.len(), 46);
    let p = wait_for("status to count 46 eligible", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        (p.status.as_ref()?.eligible == 46).then_some(p)
    })
    .await;
    assert_eq!(p.status.unwrap().selected, 49);

    // (m) maxPeers 4 → 2: every agent ≤ 2
    Api::<MeshPolicy>::namespaced(client.clone(), &ns)
        .patch("mesh", &PatchParams::default(), &Patch::Merge(json!({"spec": {"maxPeers": 2}})))
        .await
        .unwrap();
    let a = wait_for("every agent to hold at most 2 links", WAIT, || async {
        let a = assignments(&client, &ns).await;
        let live = a.values().flatten().count();
        (live == 46 && full(&a, 2) && settled(&a, &pod_ids(&ids))).then_some(a)
    })
    .await;
    check_mesh(&a, &pod_ids(&ids), 2);
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

#[tokio::test]
async fn rendezvous_outages_never_dismantle_the_mesh() {
    let (client, ns, mut rv) = setup("outage").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 12, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let before = wait_assigned(&client, &ns, 12).await;
    check_mesh(&before, &pod_ids(&ids), 4);
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "True", "PresenceRead").await;

    // (e) down (connection refused) for a minute, twelve heartbeat timeouts: nothing changes
    rv.stop().await;
    let down = std::time::Instant::now();
    let p = wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", "ConnectionFailed").await;
    assert_eq!(condition(&p, "Degraded").unwrap().1, "StalePresence");
    while down.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            assignments(&client, &ns).await,
            before,
            "the outage changed assignments after {:?}",
            down.elapsed()
        );
    }
    let p = policy(&client, &ns, "mesh").await;
    assert_eq!(condition(&p, "RendezvousReachable").unwrap().0, "False");
    assert_eq!(p.status.as_ref().unwrap().eligible, 12, "the outage aged out agents");
    // Pod changes still count: a deleted agent leaves the mesh during the outage.
    Api::<Pod>::namespaced(client.clone(), &ns).delete("agent-0", &DeleteParams::default()).await.unwrap();
    wait_for("agent-0 to leave during the outage", WAIT, || async {
        let a = assignments(&client, &ns).await;
        a.values().flatten().all(|x| x.peers.iter().all(|p| p.node_id != ids[0])).then_some(())
    })
    .await;
    rv.state.lock().unwrap().agents.remove(&ids[0]);
    rv.resume().await;
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "True", "PresenceRead").await;
    let steady = wait_assigned(&client, &ns, 11).await;

    // (f) 500, hang, garbage and an oversized body each behave like an outage, with their reason
    for (mode, reason) in [
        (FailMode::Status500, "HTTPStatus"),
        (FailMode::Hang, "Timeout"),
        (FailMode::Garbage, "MalformedBody"),
        (FailMode::Oversized, "BodyTooLarge"),
    ] {
        rv.set_fail(mode);
        let p = wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", reason).await;
        let (_, _, message) = condition(&p, "RendezvousReachable").unwrap();
        if reason == "MalformedBody" {
            assert!(message.contains("line 1 column"), "{message}");
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(assignments(&client, &ns).await, steady, "{mode:?} changed assignments");
        rv.set_fail(FailMode::None);
        wait_condition(&client, &ns, "mesh", "RendezvousReachable", "True", "PresenceRead").await;
    }
    let events = tool("kubectl", &["get", "events", "-n", &ns, "-o", "jsonpath={.items[*].reason}"]);
    let reasons = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(reasons.contains("RendezvousUnreachable") && reasons.contains("PlanChanged"), "{reasons}");
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// The images are FROM scratch: no CA certificates. Found on the real node, where every presence read
/// failed with "builder error" (the client wanted the system's roots even for http).
#[tokio::test]
async fn the_binary_reads_presence_without_system_ca_certificates() {
    let (client, ns, rv) = setup("no-roots").await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let mut op = operator_command(kubeconfig(), &ns, "op-no-roots", &log, "info", &["--leader-elect=false"])
        .env("SSL_CERT_FILE", &empty)
        .env("SSL_CERT_DIR", dir.path())
        .spawn()
        .unwrap();
    fleet(&client, &ns, &rv, 3, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let p = wait_condition(&client, &ns, "mesh", "Ready", "True", "Applied").await;
    assert_eq!(condition(&p, "RendezvousReachable").unwrap().0, "True");
    op.kill().await.unwrap();
}

#[tokio::test]
async fn join_token_from_a_secret() {
    let (client, ns, rv) = setup("token").await;
    let history = History::start(&client, &ns, 4).await;
    // The binary, logging at debug level to a file, so the test can read every line it wrote.
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let mut op = operator_binary(&ns, "op-token", &log, "debug");
    fleet(&client, &ns, &rv, 5, |_| None).await;
    rv.state.lock().unwrap().token = Some("s3cret-join-token".into());
    let extra = json!({"rendezvous": {"joinTokenSecretRef": {"name": "rv-token", "key": "token"}}});
    create_policy(&client, &ns, "mesh", spec(&rv, extra)).await;

    // (g) fails clearly without the Secret…
    let p = wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", "JoinTokenUnavailable").await;
    assert!(condition(&p, "RendezvousReachable").unwrap().2.contains("rv-token"));
    let secret = |token: &str, allowed: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": "rv-token",
            "annotations": {"agentmesh.dev/rendezvous-urls": allowed}}, "stringData": {"token": token}}))
        .unwrap()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    // …is not sent to a URL the Secret does not list (whoever edits a MeshPolicy cannot aim it elsewhere)…
    secrets.create(&PostParams::default(), &secret("s3cret-join-token", "https://rv.elsewhere:443")).await.unwrap();
    let p = wait_for("the token to be refused for an unlisted URL", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        condition(&p, "RendezvousReachable")?.2.contains("agentmesh.dev/rendezvous-urls").then_some(p)
    })
    .await;
    assert_eq!(condition(&p, "RendezvousReachable").unwrap().1, "JoinTokenUnavailable");
    assert_eq!(rv.state.lock().unwrap().bearer_requests, 0, "the token was sent to an unlisted URL");
    // …and with a wrong token…
    secrets.replace("rv-token", &PostParams::default(), &secret("wrong", &rv.url())).await.unwrap();
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", "Unauthorized").await;
    // …and works once the Secret holds the right one (picked up without a restart).
    secrets.replace("rv-token", &PostParams::default(), &secret("s3cret-join-token", &rv.url())).await.unwrap();
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "True", "PresenceRead").await;
    let a = wait_assigned(&client, &ns, 5).await;
    // The token appears nowhere the operator writes.
    let p = serde_json::to_string(&policy(&client, &ns, "mesh").await).unwrap();
    let events =
        String::from_utf8_lossy(&tool("kubectl", &["get", "events", "-n", &ns, "-o", "json"]).stdout).to_string();
    op.kill().await.unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("presence"), "the operator logged nothing about presence: {logs}");
    let encoded = "czNjcmV0LWpvaW4tdG9rZW4"; // base64 of the token, as a Secret's data holds it
    for place in [p, events, format!("{a:?}"), logs] {
        assert!(!place.contains("s3cret-join-token") && !place.contains(encoded), "token leaked: {place}");
    }
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

#[tokio::test]
async fn https_rendezvous_with_a_ca_bundle() {
    let (client, ns, _) = setup("https").await;
    let history = History::start(&client, &ns, 4).await;
    let (ca, cert, key) = test_ca();
    let tls = rendezvous::tls_config(cert.as_bytes(), key.as_bytes()).unwrap();
    let rv = Rendezvous::start_with(Some(tls)).await;
    assert!(rv.url().starts_with("https://"));
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 6, |_| None).await;
    // Without the CA the certificate is not trusted…
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let p = wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", "ConnectionFailed").await;
    assert!(condition(&p, "RendezvousReachable").unwrap().2.to_lowercase().contains("certificate"), "{p:?}");
    assert!(assignments(&client, &ns).await.values().all(Option::is_none), "assigned without presence");
    // …named in a ConfigMap that does not exist yet, it cannot be read…
    let policies = Api::<MeshPolicy>::namespaced(client.clone(), &ns);
    let set = |rendezvous: serde_json::Value| {
        let policies = policies.clone();
        async move {
            let patch = Patch::Merge(json!({"spec": {"rendezvous": rendezvous}}));
            policies.patch("mesh", &PatchParams::default(), &patch).await.unwrap();
        }
    };
    set(json!({"caConfigMapRef": {"name": "rendezvous-ca", "key": "ca.crt"}})).await;
    let p = wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", "CABundleUnavailable").await;
    assert!(condition(&p, "RendezvousReachable").unwrap().2.contains("\"rendezvous-ca\" not found"), "{p:?}");
    // …from the ConfigMap once it does, presence is read over https…
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "rendezvous-ca"}, "data": {"ca.crt": ca}})).unwrap();
    Api::namespaced(client.clone(), &ns).create(&PostParams::default(), &cm).await.unwrap();
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "True", "PresenceRead").await;
    let a = wait_assigned(&client, &ns, 6).await;
    check_mesh(&a, &pod_ids(&ids), 4);
    // …and from caBundle, base64 as Kubernetes caBundle fields are.
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ca);
    set(json!({"caConfigMapRef": null, "caBundle": encoded})).await;
    wait_for("the policy to read with caBundle", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        let reading = condition(&p, "RendezvousReachable").is_some_and(|c| c.0 == "True");
        (reading
            && p.spec.rendezvous.ca_config_map_ref.is_none()
            && p.status?.observed_generation == p.metadata.generation)
            .then_some(())
    })
    .await;
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

#[tokio::test]
async fn conflicts_observe_mode_and_deletion() {
    let (client, ns, rv) = setup("conflict").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 6, |_| None).await;
    create_policy(&client, &ns, "first", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 6).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // creation timestamps have 1 s resolution

    // (h) a newer policy selecting the same Pods reports Conflict naming them and patches nothing
    create_policy(&client, &ns, "second", spec(&rv, json!({"maxPeers": 2}))).await;
    let p = wait_condition(&client, &ns, "second", "Conflict", "True", "SelectedByOlderPolicy").await;
    assert!(condition(&p, "Conflict").unwrap().2.contains("agent-3"));
    let a = assignments(&client, &ns).await;
    assert!(a.values().flatten().all(|x| x.policy == "first" && x.links() == 4), "{a:?}");

    // (j) Observe: planned and reported, no Pod patched
    let before = op.pod_patches();
    let mut observe = spec(&rv, json!({"mode": "Observe"}));
    observe["selector"] = json!({"matchLabels": {"role": "observed"}});
    create_policy(&client, &ns, "watcher", observe).await;
    for i in 0..3 {
        let name = format!("observed-{i}");
        let id = format!("{:064x}", 0xabc0 + i);
        create_pod(&client, &ns, &name, json!({"role": "observed"}), json!({"agentmesh.dev/node-id": id})).await;
        set_pod_status(&client, &ns, &name, &format!("127.0.9.{}", i + 1), true).await;
        rv.add(&id);
    }
    wait_condition(&client, &ns, "watcher", "Ready", "True", "Observed").await;
    let p = wait_for("Observe status to count 3 eligible", WAIT, || async {
        let p = policy(&client, &ns, "watcher").await;
        (p.status.as_ref()?.eligible == 3).then_some(p)
    })
    .await;
    let st = p.status.unwrap();
    assert_eq!((st.links, st.assigned), (3, 0), "Observe mode plans, and claims no agent carries its plan");
    assert_eq!(op.pod_patches(), before, "Observe mode patched Pods");
    assert!(
        assignments(&client, &ns).await.iter().filter(|(k, _)| k.starts_with("observed")).all(|(_, v)| v.is_none())
    );

    // (i) deleting the owner removes its annotations and its finalizer; the other policy takes over
    Api::<MeshPolicy>::namespaced(client.clone(), &ns).delete("first", &DeleteParams::default()).await.unwrap();
    wait_for("MeshPolicy first to be gone (finalizer removed)", WAIT, || async {
        Api::<MeshPolicy>::namespaced(client.clone(), &ns).get_opt("first").await.unwrap().is_none().then_some(())
    })
    .await;
    wait_for("the agents to carry the second policy's assignment", WAIT, || async {
        let a = assignments(&client, &ns).await;
        let agents: Vec<&Assignment> =
            a.iter().filter(|(k, _)| k.starts_with("agent")).filter_map(|(_, v)| v.as_ref()).collect();
        (agents.len() == 6 && agents.iter().all(|x| x.policy == "second" && x.links() <= 2)).then_some(())
    })
    .await;
    wait_condition(&client, &ns, "second", "Conflict", "False", "NoConflict").await;
    Api::<MeshPolicy>::namespaced(client.clone(), &ns).delete("second", &DeleteParams::default()).await.unwrap();
    wait_for("every assignment removed", WAIT, || async {
        assignments(&client, &ns).await.values().all(Option::is_none).then_some(())
    })
    .await;
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

#[tokio::test]
async fn zones_spread_links() {
    let (client, ns, rv) = setup("zones").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 30, |i| Some(format!("zone-{}", i % 3))).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({"topologyKey": "zone"}))).await;
    let a = wait_assigned(&client, &ns, 30).await;
    check_mesh(&a, &pod_ids(&ids), 4);
    // (n) no agent's links all inside its own zone
    let zone_of: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i % 3)).collect();
    let mut cross: HashMap<&str, bool> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        for p in &a[&format!("agent-{i}")].as_ref().unwrap().peers {
            if zone_of[p.node_id.as_str()] != i % 3 {
                cross.insert(id, true);
                cross.insert(zone_of.get_key_value(p.node_id.as_str()).unwrap().0, true);
            }
        }
    }
    let lonely: Vec<&String> = ids.iter().filter(|id| !cross.contains_key(id.as_str())).collect();
    assert!(lonely.is_empty(), "agents with all links inside their zone: {lonely:?}");
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

#[tokio::test]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let (client, ns, rv) = setup("leader").await;
    let history = History::start(&client, &ns, 4).await;
    let a = Operator::start(&ns, "op-a", true).await;
    wait_for("op-a to lead", WAIT, || async { (a.metrics.leader.get() == 1).then_some(()) }).await;
    let b = Operator::start(&ns, "op-b", true).await;
    let ids = fleet(&client, &ns, &rv, 8, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 8).await;
    // (l) one writer
    assert_eq!(b.metrics.leader.get(), 0);
    assert_eq!(b.pod_patches(), 0, "the standby patched Pods");
    assert!(a.pod_patches() > 0);
    // kill the leader without releasing the Lease: the standby takes over once it expires
    a.kill().await;
    wait_for("op-b to take over", WAIT, || async { (b.metrics.leader.get() == 1).then_some(()) }).await;
    Api::<Pod>::namespaced(client.clone(), &ns).delete("agent-2", &DeleteParams::default()).await.unwrap();
    wait_for("op-b to replan after agent-2 left", WAIT, || async {
        let a = assignments(&client, &ns).await;
        a.values().flatten().all(|x| x.peers.iter().all(|p| p.node_id != ids[2])).then_some(())
    })
    .await;
    wait_for("the new leader's writes to be counted", WAIT, || async { (b.pod_patches() > 0).then_some(()) }).await;
    b.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// A replica that loses the Lease stops reconciling; its policy series go with it, so only the leader's
/// are scraped and an alert need not filter on `mesh_operator_leader`.
#[tokio::test]
async fn a_replica_that_loses_leadership_drops_its_policy_series() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (client, ns, rv) = setup("unlead").await;
    let a = Operator::start(&ns, "op-a", true).await;
    wait_for("op-a to lead", WAIT, || async { (a.metrics.leader.get() == 1).then_some(()) }).await;
    fleet(&client, &ns, &rv, 3, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 3).await;
    let series =
        |m: &mesh_operator::telemetry::Metrics| m.encode().lines().filter(|l| l.contains("policy=\"mesh\"")).count();
    wait_for("op-a to export the policy's series", WAIT, || async { (series(&a.metrics) > 0).then_some(()) }).await;
    // Another replica takes the Lease (as after a partition): op-a sees it and stops.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now());
    let taken = json!({"spec": {"holderIdentity": "op-z", "renewTime": now, "acquireTime": now}});
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    leases.patch("mesh-operator", &PatchParams::default(), &Patch::Merge(&taken)).await.unwrap();
    wait_for("op-a to stop leading and drop its policy series", WAIT, || async {
        (a.metrics.leader.get() == 0 && series(&a.metrics) == 0).then_some(())
    })
    .await;
    a.kill().await;
}

#[tokio::test]
async fn health_endpoints_and_metrics() {
    let (client, ns, rv) = setup("health").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 3, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 3).await;
    let base = format!("http://{}", op.metrics_addr().await);
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    wait_for("/readyz to report the watches synced", WAIT, || async {
        (get("/readyz").await.ok()?.status() == 200).then_some(())
    })
    .await;
    assert!(op.health.synced.load(std::sync::atomic::Ordering::Relaxed));
    let body = get("/metrics").await.unwrap().text().await.unwrap();
    for metric in [
        "mesh_operator_reconciles_total",
        "mesh_operator_presence_fetches_total",
        "mesh_operator_pod_patches_total{result=\"ok\"}",
        "mesh_operator_policy_eligible{namespace=",
        "mesh_operator_policy_max_peers{namespace=",
        "mesh_operator_policy_condition{namespace=",
        "mesh_operator_presence_fetches_total{namespace=",
        "mesh_operator_build_info{version=",
        "process_resident_memory_bytes ",
        "mesh_operator_leader 1",
    ] {
        assert!(body.contains(metric), "{metric} missing from /metrics:\n{body}");
    }
    // `mesh-operator check`, which the chart's `helm test` runs: ready here; an error naming the URL where
    // nothing listens.
    // The operator serves on this test's runtime: the command is awaited, not waited for. It runs without
    // system CA certificates, as in the image (FROM scratch), where the first version failed "builder error".
    let roots = tempfile::tempdir().unwrap();
    std::fs::write(roots.path().join("empty.pem"), "").unwrap();
    let command = |args: Vec<String>| {
        let roots = roots.path().to_owned();
        async move {
            let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-operator"));
            c.arg("check").args(args).env("SSL_CERT_FILE", roots.join("empty.pem")).env("SSL_CERT_DIR", &roots);
            c.output().await.unwrap()
        }
    };
    let check = |url: String| command(vec!["--url".into(), url]);
    let ready = check(base.clone()).await;
    assert!(ready.status.success(), "{}", String::from_utf8_lossy(&ready.stderr));
    assert!(String::from_utf8_lossy(&ready.stdout).contains("mesh_operator_build_info{version="));
    let addr = op.metrics_addr().await;
    let by_address = command(vec!["--host".into(), addr.ip().to_string(), "--port".into(), addr.port().to_string()]);
    assert!(by_address.await.status.success(), "check --host --port, as the chart's helm test runs it");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = check(format!("http://{closed}")).await;
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.code() == Some(1) && stderr.contains(&format!("GET http://{closed}/readyz")), "{stderr}");
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// Runs `kubectl mesh …` the way a user does: kubectl finds the plugin binary on PATH.
/// `kubectl mesh ARGS` through kubectl's plugin lookup, as the test control plane's admin.
fn kubectl_mesh_output(args: &[&str]) -> std::process::Output {
    let plugin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-mesh")).parent().unwrap().to_owned();
    let path = format!("{}:{}", plugin_dir.display(), std::env::var("PATH").unwrap_or_default());
    std::process::Command::new(tool_bin_dir().join("kubectl"))
        .arg("mesh")
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .env("PATH", path)
        .output()
        .unwrap()
}

fn kubectl_mesh(args: &[&str]) -> String {
    let out = kubectl_mesh_output(args);
    assert!(out.status.success(), "kubectl mesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn kubectl_mesh_plugin_status_explain_graph() {
    let (client, ns, rv) = setup("plugin").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 6, |i| Some(format!("zone-{}", i % 2))).await;
    set_pod_status(&client, &ns, "agent-5", "127.0.1.6", false).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({"topologyKey": "zone"}))).await;
    wait_assigned(&client, &ns, 5).await;
    wait_for("agent-5 listed as excluded", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        p.status?.excluded.iter().any(|e| e.pod == "agent-5").then_some(())
    })
    .await;

    let status = kubectl_mesh(&["status", "mesh", "-n", &ns]);
    assert_eq!(status.lines().count(), 7, "{status}");
    assert!(
        status.lines().any(|l| l.starts_with("agent-0") && l.contains("zone-0") && l.contains("eligible")),
        "{status}"
    );
    assert!(status.lines().any(|l| l.starts_with("agent-5") && l.contains("not Ready")), "{status}");
    let explain = kubectl_mesh(&["explain", "agent-5", "-n", &ns]);
    assert!(explain.contains("left out of the mesh: Pod is not Ready"), "{explain}");
    let explain = kubectl_mesh(&["explain", "agent-1", "-n", &ns]);
    assert!(explain.contains("links"), "{explain}");
    let dot = kubectl_mesh(&["graph", "mesh", "-n", &ns, "--format", "dot"]);
    assert!(dot.starts_with("digraph") && dot.matches(" -> ").count() == 10, "5 agents × 4 links / 2: {dot}");
    let mermaid = kubectl_mesh(&["graph", "mesh", "-n", &ns, "--format", "mermaid"]);
    assert_eq!(mermaid.matches("-->").count(), 10, "{mermaid}");
    kubectl_flags(&client, &ns).await;
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// `kubectl mesh` takes kubectl's flags: output formats, no headers, every policy of a namespace or of
/// all namespaces, a kubeconfig and a context; it reads a zone from the Node as the operator does, and a
/// user without rights gets a hint.
async fn kubectl_flags(client: &kube::Client, ns: &str) {
    let rows = kubectl_mesh(&["status", "mesh", "-n", ns, "--no-headers"]);
    assert_eq!(rows.lines().count(), 6, "{rows}");
    let json: serde_json::Value =
        serde_json::from_str(&kubectl_mesh(&["status", "mesh", "-n", ns, "-o", "json"])).unwrap();
    let items = json["items"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    assert!(items.iter().all(|i| i["policy"] == "mesh" && i["nodeId"].as_str().unwrap().len() == 64), "{json}");
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&kubectl_mesh(&["status", "mesh", "-n", ns, "-o", "yaml"])).unwrap();
    assert_eq!(yaml["items"].as_sequence().unwrap().len(), 6);
    let wide = kubectl_mesh(&["status", "mesh", "-n", ns, "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("ACCEPTS"), "{wide}");
    let all = kubectl_mesh(&["status", "-A"]);
    assert!(all.starts_with("NAMESPACE") && all.lines().any(|l| l.starts_with(ns)), "{all}");
    assert!(kubectl_mesh(&["status", "-n", ns]).starts_with("POLICY"));
    assert!(kubectl_mesh(&["--version"]).contains(env!("CARGO_PKG_VERSION")));
    let context = tool("kubectl", &["config", "current-context", "--kubeconfig", kubeconfig().to_str().unwrap()]);
    let context = String::from_utf8(context.stdout).unwrap();
    kubectl_mesh(&["status", "mesh", "-n", ns, "--context", context.trim()]);
    let missing = kubectl_mesh_output(&["status", "mesh", "-n", ns, "--context", "no-such-context"]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no-such-context"));
    // A Pod without the zone label on a Node with one.
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(json!({"metadata": {"name": format!("{ns}-node"), "labels": {"zone": "zone-n"}}}))
            .unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "on-node", "labels": {"app": "agent"}},
        "spec": {"nodeName": format!("{ns}-node"), "containers": [{"name": "c", "image": "agent"}]}}))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.unwrap();
    let status = kubectl_mesh(&["status", "mesh", "-n", ns]);
    assert!(status.lines().any(|l| l.starts_with("on-node") && l.contains("zone-n")), "{status}");
    nodes.delete(&format!("{ns}-node"), &DeleteParams::default()).await.unwrap();
    // A user who may read nothing here.
    let dir = tempfile::tempdir().unwrap();
    let nobody = replica_kubeconfig(dir.path(), ns, "nobody");
    let refused = kubectl_mesh_output(&["status", "mesh", "-n", ns, "--kubeconfig", nobody.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && (stderr.contains("403") || stderr.contains("forbidden")), "{stderr}");
    assert!(stderr.contains("hint: your user may not read this"), "{stderr}");
}

#[tokio::test]
async fn sigterm_stops_the_binary_cleanly_and_releases_the_lease() {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "sigterm").await;
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let mut child = operator_binary(&ns, "op-term", &log, "info");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases.get_opt("mesh-operator").await.unwrap().and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty())
    };
    wait_for("the binary to take the Lease", WAIT, || async { holder().await.filter(|h| h == "op-term") }).await;
    let pid = child.id().unwrap() as i32;
    assert_eq!(send_sigterm(pid), 0, "sending SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exit within 20 s").unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(holder().await, None, "the Lease was not released");
}

/// A Lease won by an acquire still in flight when the replica shuts down is given up all the same:
/// kube-lease-manager cancels that request when the last receiver goes, and then believes it holds nothing.
#[tokio::test]
async fn release_gives_up_a_lease_won_by_an_acquire_in_flight() {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = client().await;
    let ns = namespace(&client, "lease-inflight").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let held_by = |who: &str| -> Lease {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        serde_json::from_value(json!({"metadata": {"name": "mesh-operator"}, "spec": {"holderIdentity": who,
            "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now}}))
        .unwrap()
    };
    leases.create(&PostParams::default(), &held_by("op-a")).await.unwrap();
    let (_, task) = elect(&client, &ns, "op-b").await;
    wait_for("op-b to see op-a lead", WAIT, || async { leases.get_opt("mesh-operator").await.ok()?.map(|_| ()) }).await;
    // op-b's acquire lands on the server, and op-b shuts down before it has read the answer.
    let mut won = leases.get("mesh-operator").await.unwrap();
    won.spec = held_by("op-b").spec;
    leases.replace("mesh-operator", &PostParams::default(), &won).await.unwrap();
    leader::release(task).await;
    let holder = leases.get("mesh-operator").await.unwrap().spec.and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the Lease stayed with a replica that shut down");
}

/// Leader election alone (no controller) for `identity` on the Lease `mesh-operator` in `ns`.
async fn elect(
    client: &kube::Client,
    ns: &str,
    identity: &str,
) -> (std::sync::Arc<leader::Leadership>, leader::LeaseTask) {
    let settings = mesh_operator::controller::Settings {
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        leader_elect: true,
        lease_namespace: ns.into(),
        lease_name: "mesh-operator".into(),
        identity: identity.into(),
        max_presence_bytes: 1024,
        apply_concurrency: 1,
        namespaces: vec![],
        pod_selector: None,
        check_incremental: false,
        plan_event_interval: Duration::from_secs(60),
    };
    let leadership = std::sync::Arc::new(leader::Leadership::new(true));
    let task = leader::elect(client.clone(), &settings, leadership.clone(), Default::default()).await.unwrap();
    (leadership, task)
}

/// Two replicas acquiring one Lease at once: only one may win. While op-a holds it, op-b's acquisition
/// (the server-side apply kube-lease-manager sends, under op-b's field manager) conflicts instead of
/// replacing op-a as holder.
#[tokio::test]
async fn a_lease_is_held_by_one_replica_at_a_time() {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = client().await;
    let ns = namespace(&client, "acquire").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let (leadership, task) = elect(&client, &ns, "op-a").await;
    wait_for("op-a to lead", WAIT, || async { leadership.may_write().then_some(()) }).await;
    let acquire = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "spec": {"holderIdentity": "op-b", "leaseDurationSeconds": leader::LEASE_SECONDS}});
    let as_b = PatchParams::apply(&leader::lease_field_manager("op-b"));
    let raced = leases.patch("mesh-operator", &as_b, &Patch::Apply(&acquire)).await;
    assert!(matches!(&raced, Err(kube::Error::Api(s)) if s.code == 409), "op-b acquired a held Lease: {raced:?}");
    let holder = leases.get("mesh-operator").await.unwrap().spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("op-a"));
    leader::release(task).await;
}

/// The `mesh-operator` binary watching `ns` (its Lease there too), stdout and stderr into `log`.
/// SIGTERM via the kill(1) command, to keep the tests free of unsafe code.
fn send_sigterm(pid: i32) -> i32 {
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().code().unwrap_or(-1)
}

/// A write carries the UID and resourceVersion of the Pod the plan saw: a Pod deleted since is not
/// re-created by server-side apply, one recreated under the same name does not get its predecessor's
/// peers, and a Pod changed since (or a write repeated) is refused, to be decided again.
#[tokio::test]
async fn writes_reach_only_the_pod_version_the_plan_saw() {
    let client = client().await;
    let ns = namespace(&client, "uid").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let old = create_pod(&client, &ns, "agent-0", json!({"app": "agent"}), json!({})).await;
    pods.delete("agent-0", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    wait_for("agent-0 to be gone", WAIT, || async { pods.get_opt("agent-0").await.unwrap().is_none().then_some(()) })
        .await;
    let to = Assignment::new(vec![Peer { node_id: "ab".into(), url: "ws://127.0.0.9:1/".into() }], [], "mesh".into());
    let to = std::sync::Arc::new(to.with_max_peers(4));
    let write = |pod: &Pod| decide::Write {
        pod: "agent-0".into(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        to: Some(to.clone()),
        from: None,
        node_id: None,
    };
    let waves = |pod: &Pod| decide::Waves { shrink: vec![], grow: vec![write(pod)] };
    let exp = apply::Expectations::default();
    let counter = Default::default();
    let unelected = leader::Leadership::new(false);
    let outcome = apply::apply(&pods, &waves(&old), 4, &unelected, &exp, &counter).await;
    assert!(outcome.failed.values().all(apply::WriteError::is_stale) && outcome.written.is_empty(), "{outcome:?}");
    assert!(pods.get_opt("agent-0").await.unwrap().is_none(), "server-side apply re-created a deleted Pod");

    let fresh = create_pod(&client, &ns, "agent-0", json!({"app": "agent"}), json!({})).await;
    let outcome = apply::apply(&pods, &waves(&old), 4, &unelected, &exp, &counter).await;
    assert!(outcome.failed["agent-0"].is_stale(), "{outcome:?}");
    assert_eq!(
        Assignment::from_annotations(pods.get("agent-0").await.unwrap().annotations()),
        None,
        "the recreated Pod got its predecessor's assignment"
    );

    // A Pod changed since the decision read it (here by the kubelet) refuses the write.
    set_pod_status(&client, &ns, "agent-0", "127.0.0.9", true).await;
    let outcome = apply::apply(&pods, &waves(&fresh), 4, &unelected, &exp, &counter).await;
    assert!(outcome.failed["agent-0"].is_stale(), "{outcome:?}");
    assert_eq!(Assignment::from_annotations(pods.get("agent-0").await.unwrap().annotations()), None);
    // Decided on the Pod as it is, it lands; the same write again is refused.
    let current = pods.get("agent-0").await.unwrap();
    let outcome = apply::apply(&pods, &waves(&current), 4, &unelected, &exp, &counter).await;
    assert!(outcome.failed.is_empty() && outcome.patched == 1, "{outcome:?}");
    let outcome = apply::apply(&pods, &waves(&current), 4, &unelected, &exp, &counter).await;
    assert!(outcome.failed["agent-0"].is_stale(), "a repeated write landed: {outcome:?}");
    assert_eq!(Assignment::from_annotations(pods.get("agent-0").await.unwrap().annotations()).as_ref(), Some(&*to));
    // A Pod that drops a peer and gains another gets a shrink write, then a grow write decided on the
    // same version: the grow is conditional on the version the shrink left, not refused as stale.
    let now = pods.get("agent-0").await.unwrap();
    let swap =
        Assignment::new(vec![Peer { node_id: "cd".into(), url: "ws://127.0.0.10:1/".into() }], [], "mesh".into());
    let kept = std::sync::Arc::new(Assignment::new(vec![], [], "mesh".into()).with_max_peers(4));
    let both = decide::Waves {
        shrink: vec![decide::Write { to: Some(kept), ..write(&now) }],
        grow: vec![decide::Write { to: Some(std::sync::Arc::new(swap.clone().with_max_peers(4))), ..write(&now) }],
    };
    let outcome = apply::apply(&pods, &both, 4, &unelected, &exp, &counter).await;
    assert!(outcome.failed.is_empty() && outcome.patched == 2, "{outcome:?}");
    let carried = Assignment::from_annotations(pods.get("agent-0").await.unwrap().annotations());
    assert_eq!(carried, Some(swap.with_max_peers(4)));
    // And a leader that lost its fence writes nothing at all.
    let standby = leader::Leadership::new(true);
    let outcome = apply::apply(&pods, &waves(&current), 4, &standby, &exp, &counter).await;
    assert!(outcome.lost_leadership && outcome.patched == 0);
}

/// Hostile input from the rendezvous and from Pods (a 100 kB address, many Pods claiming one node id) is
/// reported, bounded, and does not stop the status from being written.
#[tokio::test]
async fn hostile_presence_and_pods_are_reported_within_bounds() {
    let (client, ns, rv) = setup("hostile").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 6, |_| None).await;
    rv.state.lock().unwrap().agents.get_mut(&ids[0]).unwrap().address = format!("http://{}", "x".repeat(100_000));
    for i in 0..40 {
        let name = format!("impostor-{i}");
        create_pod(&client, &ns, &name, json!({"app": "agent"}), json!({"agentmesh.dev/node-id": ids[1]})).await;
        set_pod_status(&client, &ns, &name, &format!("127.0.9.{}", i + 1), true).await;
    }
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_condition(&client, &ns, "mesh", "Degraded", "True", "DuplicateNodeId").await;
    // The four good agents arrived together: admission plans them once arrivals pause.
    let p = wait_for("the four good agents in the plan", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        (p.status.as_ref()?.eligible == 4).then_some(p)
    })
    .await;
    let st = p.status.clone().unwrap();
    assert_eq!(st.selected, 46, "agent-0 (bad address) and the 41 claimants of one id are out");
    let bad = st.excluded.iter().find(|e| e.pod == "agent-0").expect("agent-0 listed");
    assert!(bad.reason.contains("100007 bytes is longer than 2048"), "{}", bad.reason);
    let (_, _, message) = condition(&p, "Degraded").unwrap();
    assert!(message.len() <= 1030 && message.contains("impostor-"), "{}", message.len());
    assert!(serde_json::to_string(&st).unwrap().len() < 64 * 1024, "status grew with the input");
    let a = wait_assigned(&client, &ns, 4).await;
    assert!(a.keys().filter(|k| k.starts_with("impostor")).all(|k| a[k].is_none()));
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// A policy that switches its node-id annotation makes the Pod cache list again for the new key; meanwhile
/// no reconcile reads Pods without their node ids, so no agent loses its assignment and nothing is written.
#[tokio::test]
async fn a_new_node_id_annotation_relists_the_cache_without_touching_the_mesh() {
    let (client, ns, rv) = setup("relist").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    let ids = fleet(&client, &ns, &rv, 8, |_| None).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (i, id) in ids.iter().enumerate() {
        let both = json!({"metadata": {"annotations": {"example.com/id": id}}});
        pods.patch(&format!("agent-{i}"), &PatchParams::default(), &Patch::Merge(&both)).await.unwrap();
    }
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    let before = wait_assigned(&client, &ns, 8).await;
    let patches = op.pod_patches();
    let switch = json!({"spec": {"identity": {"nodeIdAnnotation": "example.com/id"}}});
    let mps: Api<MeshPolicy> = Api::namespaced(client.clone(), &ns);
    mps.patch("mesh", &PatchParams::default(), &Patch::Merge(&switch)).await.unwrap();
    wait_for("the policy reconciled with its new node-id annotation", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        let st = p.status?;
        (st.observed_generation == p.metadata.generation && st.eligible == 8).then_some(())
    })
    .await;
    assert_eq!(assignments(&client, &ns).await, before, "the same agents, the same plan");
    assert_eq!(op.pod_patches(), patches, "nothing to write");
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// The finalizer helper's patch made from a cached policy older than the stored one (our own add not seen
/// yet) is refused with 422; the reconcile recognises it as a stale read, not a failure, and only while
/// the stored policy differs from what it read.
#[tokio::test]
async fn a_finalizer_patch_from_a_stale_read_is_told_from_a_refusal() {
    use kube::runtime::{controller::Action, finalizer};
    use mesh_operator::controller::{error, reconcile};
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "stale-finalizer").await;
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), &ns);
    let mp: MeshPolicy = serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "mesh"}, "spec": {"selector": {"matchLabels": {"app": "agent"}},
        "rendezvous": {"url": "http://127.0.0.1:9"}}}))
    .unwrap();
    let read = std::sync::Arc::new(api.create(&PostParams::default(), &mp).await.unwrap());
    let run = |p: std::sync::Arc<MeshPolicy>| {
        finalizer(&api, "agentmesh.dev/test", p, |_| async { Ok::<_, error::Error>(Action::await_change()) })
    };
    run(read.clone()).await.expect("the first run adds the finalizer");
    let refused = run(read.clone()).await.expect_err("a second add from the same read is refused");
    assert!(error::finalizer_patch_refused(&refused), "{refused}");
    let rv = read.resource_version();
    assert!(reconcile::changed_since(&api, "mesh", rv.as_deref()).await, "the stored policy moved on");
    let stored = api.get("mesh").await.unwrap().resource_version();
    assert!(!reconcile::changed_since(&api, "mesh", stored.as_deref()).await, "a refusal of the current version");
}

/// An agent Pod Ready before its presence entry: the operator holds a long poll at the rendezvous while
/// it waits, and the entry's arrival answers it (docs/presence-api.md). The poll interval is long, so
/// only the held read or the prompt polls can find the entry soon; `held` shows which.
#[tokio::test]
async fn a_ready_pod_waiting_for_presence_is_served_by_a_long_poll() {
    let (client, ns, rv) = setup("longpoll").await;
    let history = History::start(&client, &ns, 4).await;
    let op = Operator::start(&ns, "op-a", false).await;
    fleet(&client, &ns, &rv, 4, |_| None).await;
    let slow = json!({"rendezvous": {"pollInterval": "20s"}, "heartbeatTimeout": "60s"});
    create_policy(&client, &ns, "mesh", spec(&rv, slow)).await;
    wait_assigned(&client, &ns, 4).await;
    let id = format!("{:064x}", 0xfeed_u128);
    create_pod(&client, &ns, "late", json!({"app": "agent"}), json!({"agentmesh.dev/node-id": id})).await;
    set_pod_status(&client, &ns, "late", "127.0.9.9", true).await;
    wait_for("the operator to hold a read at the rendezvous", WAIT, || async {
        (rv.state.lock().unwrap().held > 0).then_some(())
    })
    .await;
    rv.add(&id);
    wait_for("the late agent's assignment", WAIT, || async {
        assignments(&client, &ns).await.get("late").cloned().flatten().map(|_| ())
    })
    .await;
    assert!(rv.state.lock().unwrap().released > 0, "no held read was answered by the new entry");
    op.kill().await;
    assert!(history.assert_clean() > 0, "the history checker saw no event");
}

/// A churning fleet changes its plan with every join; the PlanChanged Events sum those changes rather
/// than report each (docs/user-guide.md). With Events at most every 10 s, six joins one after another
/// make fewer than six Events, and one of them sums several changes.
#[tokio::test]
async fn plan_changes_in_a_churning_fleet_are_summed_into_few_events() {
    let (client, ns, rv) = setup("events").await;
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let mut op = operator_binary_on(kubeconfig(), &ns, "op-events", &log, "info", &["--plan-event-interval", "10s"]);
    fleet(&client, &ns, &rv, 6, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 6).await;
    let notes = || async {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
        let list = events.list(&Default::default()).await.unwrap();
        let changed = list.items.into_iter().filter(|e| e.reason.as_deref() == Some("PlanChanged"));
        changed
            .flat_map(|e| vec![e.note.unwrap_or_default(); e.series.map_or(1, |s| s.count) as usize])
            .collect::<Vec<_>>()
    };
    let first = wait_for("the first PlanChanged Event", WAIT, || async {
        let n = notes().await.len();
        (n > 0).then_some(n)
    })
    .await;
    let mut hash = policy(&client, &ns, "mesh").await.status.unwrap().plan_hash;
    for i in 6..12 {
        let name = format!("agent-{i}");
        present_agent(&client, &ns, &rv, &name, i, json!({"app": "agent"})).await;
        hash = wait_for(&format!("{name} to change the plan"), WAIT, || async {
            let now = policy(&client, &ns, "mesh").await.status?.plan_hash;
            (now != hash).then_some(now)
        })
        .await;
    }
    let summed = wait_for("an Event summing several plan changes", WAIT, || async {
        notes().await.into_iter().find(|n| n.contains("plan changes since the last"))
    })
    .await;
    assert!(summed.contains("Pod writes"), "{summed}");
    let added = notes().await.len() - first;
    assert!(added < 6, "six plan changes made {added} PlanChanged Events");
    op.kill().await.unwrap();
}

/// The binary's JSON logs: a presence outage is logged once at warn when it starts (not at every failed
/// read), under the reconcile's span naming the namespace and policy, and once when it ends.
#[tokio::test]
async fn an_outage_is_logged_once_under_the_policy_span() {
    let (client, ns, rv) = setup("logs").await;
    let log = std::env::temp_dir().join(format!("{ns}-operator.log"));
    let kubeconfig = kubeconfig();
    let mut op = operator_binary_on(kubeconfig, &ns, "op-logs", &log, "info", &["--log-format", "json"]);
    fleet(&client, &ns, &rv, 3, |_| None).await;
    create_policy(&client, &ns, "mesh", spec(&rv, json!({}))).await;
    wait_assigned(&client, &ns, 3).await;
    rv.set_fail(FailMode::Status500);
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "False", "HTTPStatus").await;
    let reads = || rv.state.lock().unwrap().requests;
    let failing = reads();
    wait_for("three more failed reads", WAIT, || async { (reads() >= failing + 3).then_some(()) }).await;
    rv.set_fail(FailMode::None);
    wait_condition(&client, &ns, "mesh", "RendezvousReachable", "True", "PresenceRead").await;
    let lines = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let said = |lines: &[serde_json::Value], what: &str| -> Vec<serde_json::Value> {
        lines.iter().filter(|l| l["message"] == what).cloned().collect()
    };
    let back = wait_for("the end of the outage in the log", WAIT, || async {
        let lines = lines();
        (!said(&lines, "presence readable again").is_empty()).then_some(lines)
    })
    .await;
    // A slow read on this busy machine may time out on its own: count the outage's failures only.
    let down: Vec<_> = said(&back, "presence unavailable; keeping the last snapshot")
        .into_iter()
        .filter(|l| l["reason"] == "HTTPStatus")
        .collect();
    assert_eq!(down.len(), 1, "the outage's start, once: {down:?}");
    assert_eq!(down[0]["level"], "WARN");
    assert_eq!(
        (&down[0]["span"]["namespace"], &down[0]["span"]["policy"]),
        (&json!(ns), &json!("mesh")),
        "{}",
        down[0]
    );
    op.kill().await.unwrap();
}

/// The krew manifest `hack/krew-package.py` writes installs kubectl-mesh with krew itself (built from its
/// pinned module), and krew refuses an archive whose sha256 is not the manifest's.
#[test]
fn kubectl_mesh_installs_from_its_krew_manifest() {
    let run = |cmd: &str, args: &[&str], env: &[(&str, &std::path::Path)]| {
        let mut c = std::process::Command::new(cmd);
        c.args(args).envs(env.iter().map(|(k, v)| (*k, v.as_os_str())));
        c.output().unwrap()
    };
    let out = run(&format!("{REPO}/hack/krew.sh"), &[], &[]);
    assert!(out.status.success(), "hack/krew.sh: {}", String::from_utf8_lossy(&out.stderr));
    let krew = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let dist = tempfile::tempdir().unwrap();
    let package = [
        "--binary",
        env!("CARGO_BIN_EXE_kubectl-mesh"),
        "--version",
        "v0.1.0",
        "--uri",
        "https://releases.example.com/v0.1.0/kubectl-mesh_linux_amd64.tar.gz",
        "--out",
        dist.path().to_str().unwrap(),
    ];
    let out = run(&format!("{REPO}/hack/krew-package.py"), &package, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (manifest, archive) = (dist.path().join("mesh.yaml"), dist.path().join("kubectl-mesh_linux_amd64.tar.gz"));
    let install = |archive: &std::path::Path| {
        let root = tempfile::tempdir().unwrap();
        let args =
            ["install", &format!("--manifest={}", manifest.display()), &format!("--archive={}", archive.display())];
        let out = run(&krew, &args, &[("KREW_ROOT", root.path())]);
        (root, out)
    };
    let (root, out) = install(&archive);
    assert!(out.status.success(), "krew install: {}", String::from_utf8_lossy(&out.stderr));
    let version = run(root.path().join("bin/kubectl-mesh").to_str().unwrap(), &["--version"], &[]);
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("kubectl mesh "), "{version:?}");
    let tampered = dist.path().join("tampered.tar.gz");
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes.extend_from_slice(b"\0");
    std::fs::write(&tampered, bytes).unwrap();
    let (_, out) = install(&tampered);
    assert!(!out.status.success(), "krew installed an archive whose sha256 differs from the manifest's");
}
