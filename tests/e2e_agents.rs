//! Real agents under the operator, on the real control plane: 20 `mesh-agent` processes on loopback
//! addresses that match their Pods' IPs, synced through the rendezvous hub, reading their assignments
//! from downward-API files that a stand-in kubelet refreshes with a random lag per Pod. Every agent's open
//! links are sampled from the agents themselves (one agent watches its own Pod instead of reading a file) for the whole test, each agent's own high-water mark is
//! checked at the end, and the Pod annotations run under the history checker.
mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use mesh_operator::api::MeshPolicy;
use mesh_operator::assignment::Assignment;
use rendezvous::FailMode;
use serde_json::json;
use support::agents::{Agent, AgentDir, Kubelet, LinkSampler, Mode, agent_pod, agents_follow_the_plan, plans};
use support::*;

const CAP: usize = 4;

fn ip(i: usize) -> String {
    format!("127.0.{}.{}", 100 + i / 250, 1 + i % 250)
}

async fn everyone_has(agents: &[Agent], key: &str) {
    wait_for(&format!("update {key} at every live agent"), Duration::from_secs(60), || async {
        for a in agents {
            if !a.updates().await?.contains(key) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The rendezvous goes down and drops every agent's link: waits until each agent has noticed.
async fn rendezvous_down(rv: &Rendezvous, agents: &[Agent]) {
    rv.set_fail(FailMode::Down);
    rv.state.lock().unwrap().hub.kick_all(false);
    wait_for("every agent to lose the rendezvous", WAIT, || async {
        for a in agents {
            if a.status().await?["rendezvousConnected"] != json!(false) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// Agents `agent-{i}` for `i` in `range`, each with its Pod, at `ip(base + i)`.
async fn spawn_fleet(
    client: &kube::Client,
    ns: &str,
    (dir, hub): (&std::path::Path, &support::agents::SyncHub),
    range: std::ops::Range<usize>,
    base: usize,
) -> Vec<Agent> {
    let mut agents = Vec::new();
    for i in range {
        let name = format!("agent-{i}");
        agents.push(Agent::spawn(dir, &name, &ip(base + i), hub, Mode::Operator, CAP).await);
        agent_pod(client, ns, &name, &ip(base + i), None).await;
    }
    agents
}

/// Update copies sent whole on mesh links, and updates received new or again, summed over the agents.
async fn mesh_copies(agents: &[Agent]) -> (f64, f64) {
    let (mut sent, mut received) = (0.0, 0.0);
    for a in agents {
        sent += a.metric("agentmesh_mesh_messages_sent_total", "").await;
        received += a.metric("agentmesh_updates_received_total", "").await;
        received += a.metric("agentmesh_duplicates_dropped_total", "").await;
    }
    (sent, received)
}

/// Writes an update at `writer` while the rendezvous is down, waits until every agent has it and every
/// copy sent has arrived, and returns how many copies crossed mesh links.
async fn copies_of_one_update(agents: &[Agent], writer: usize) -> f64 {
    let (sent0, received0) = mesh_copies(agents).await;
    everyone_has(agents, &agents[writer].append().await).await;
    wait_for("every copy sent to arrive", WAIT, || async {
        let (sent, received) = mesh_copies(agents).await;
        (sent - sent0 == received - received0).then_some(sent - sent0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_agents_hold_the_cap_follow_the_plan_and_deliver_over_the_mesh_alone() {
    let (client, ns, rv) = setup("agents").await;
    let dir = AgentDir::new();
    let hub = rv.hub();
    let history = History::start(&client, &ns, CAP).await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(1500));
    create_policy(&client, &ns, "mesh", spec(&rv, json!({"heartbeatTimeout": "30s"}))).await;
    let _op = Operator::start(&ns, "op-agents", false).await;

    let mut agents = Vec::new();
    for i in 0..20 {
        let name = format!("agent-{i}");
        // Agent 7 watches its own Pod instead of reading a downward-API file.
        let source = if i == 7 {
            vec!["--assignment-source", "pod", "--pod-name", &name, "--pod-namespace", &ns]
        } else {
            vec![]
        };
        let seed_timing = ["--seed-delay", "1s", "--seed-scan", "2s"];
        let extra: Vec<&str> = source.into_iter().chain(seed_timing).collect();
        agents.push(Agent::spawn_with(dir.path(), &name, &ip(i), &hub, Mode::Operator, CAP, &extra).await);
        agent_pod(&client, &ns, &name, &ip(i), None).await;
    }
    let apis = Arc::new(Mutex::new(agents.iter().map(|a| (a.name.clone(), a.api)).collect::<Vec<_>>()));
    let sampler = LinkSampler::start(apis.clone(), CAP);
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    everyone_has(&agents, &agents[0].append().await).await;

    // The rendezvous goes down: every update must cross the mesh alone.
    rendezvous_down(&rv, &agents).await;
    for writer in [5, 13] {
        everyone_has(&agents, &agents[writer].append().await).await;
    }
    // Over the mesh alone updates follow the broadcast tree, which the first ones have pruned: each then
    // crosses about one link per agent, where flooding sends it over every link (N·(k−1), 60 here).
    let mut copies = Vec::new();
    for writer in [1, 8, 16, 3, 11, 19, 6] {
        copies.push(copies_of_one_update(&agents, writer).await);
    }
    copies.sort_by(f64::total_cmp);
    let flood = (agents.len() * (CAP - 1)) as f64;
    assert!(copies[copies.len() / 2] <= 1.5 * agents.len() as f64, "copies per update {copies:?}, flooding {flood}");
    for a in &agents {
        assert_eq!(
            a.metric("agentmesh_rendezvous_connected", "").await,
            0.0,
            "{} reconnected during the outage",
            a.name
        );
    }

    // The rendezvous returns; three agents leave and three join: the agents follow the new plan.
    rv.set_fail(FailMode::None);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for _ in 0..3 {
        let gone = agents.remove(0);
        pods.delete(&gone.name, &DeleteParams::default()).await.unwrap();
        gone.kill().await;
    }
    for i in 20..23 {
        let name = format!("agent-{i}");
        agents.push(Agent::spawn(dir.path(), &name, &ip(i), &hub, Mode::Operator, CAP).await);
        agent_pod(&client, &ns, &name, &ip(i), None).await;
    }
    *apis.lock().unwrap() = agents.iter().map(|a| (a.name.clone(), a.api)).collect();
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    everyone_has(&agents, &agents[agents.len() - 1].append().await).await;

    // A seed-mode agent (no Pod, so in no plan) dials the first alive peers of presence: all refuse it.
    let seed = Agent::spawn(dir.path(), "seed-agent", &ip(40), &hub, Mode::Seed, CAP).await;
    wait_for("the seed agent's dials to be refused as not planned", WAIT, || async {
        (seed.metric("agentmesh_dials_failed_total", "not_planned").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(seed.links().await.unwrap(), BTreeSet::new(), "an operator-managed agent accepted a stranger");
    let mut refused = 0.0;
    for a in &agents {
        refused += a.metric("agentmesh_links_refused_total", "not_planned").await;
    }
    assert!(refused >= 1.0, "the refusals are counted where they happen");
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;

    let samples = sampler.assert_clean();
    assert!(samples > 100, "the sampler ran ({samples} samples)");
    for a in &agents {
        let max = a.metric("agentmesh_max_open_links", "").await;
        assert!(max <= CAP as f64, "{} held {max} links at once, over the cap {CAP}", a.name);
    }
    history.assert_clean();
}

/// The operator and the rendezvous are both down when an agent dies. Its neighbours pair up over their
/// standby peers: with standbys all around its ring of four, each gets its planned number of links back,
/// one of them a standby (any order of dials pairs a ring of four), and updates reach every survivor. The
/// agent then comes back where it was (same key, same address): the standbys give way and every agent
/// follows its plan again. Under the history
/// checker and the link sampler (the cap, and only planned or standby links).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standbys_stand_in_for_a_dead_agent_while_operator_and_rendezvous_are_down() {
    let (client, ns, rv) = setup("standby").await;
    let dir = AgentDir::new();
    let hub = rv.hub();
    let history = History::start(&client, &ns, CAP).await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(500));
    create_policy(&client, &ns, "mesh", spec(&rv, json!({"heartbeatTimeout": "30s"}))).await;
    let op = Operator::start(&ns, "op-standby", false).await;
    // 16 agents: at N ≥ 4k the plan is the rings, whose neighbours are rarely linked to each other. The
    // agents take a standby 3 s after a peer goes (their default).
    let mut agents = spawn_fleet(&client, &ns, (dir.path(), &hub), 0..16, 180).await;
    let apis = Arc::new(Mutex::new(agents.iter().map(|a| (a.name.clone(), a.api)).collect::<Vec<_>>()));
    let sampler = LinkSampler::start(apis.clone(), CAP);
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;

    op.kill().await;
    rendezvous_down(&rv, &agents).await;
    let assignments = assignments(&client, &ns, &agents).await;
    let (dead_at, pairs) = (0..agents.len())
        .map(|i| (i, standby_pairs(&assignments, &agents[i].node_id)))
        .max_by_key(|(_, pairs)| pairs.len())
        .unwrap();
    let paired: BTreeSet<String> = pairs.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    // A full ring of four pairs everyone whatever the order; a broken one (a pair linked in the plan) at
    // least one pair.
    let (ring, restored_at_least) = (pairs.len() == 4 && paired.len() == 4, 2);
    assert!(!pairs.is_empty(), "no agent has standbys around it: {assignments:?}");
    let dead = agents.remove(dead_at);
    apis.lock().unwrap().retain(|(name, _)| *name != dead.name);
    let (name, at, mesh) = (dead.name.clone(), dead.ip.clone(), dead.mesh);
    let killed = std::time::Instant::now();
    dead.kill().await;
    wait_for("the dead agent's neighbours back to their planned links over standbys", WAIT, || async {
        let mut restored = 0;
        for a in agents.iter().filter(|a| paired.contains(&a.node_id)) {
            let status = a.status().await?;
            let links = status["links"].as_array()?;
            let standing = links.iter().filter(|l| l["closing"] != json!(true)).count();
            let standby = links.iter().any(|l| l["standby"] == json!(true));
            restored += usize::from(standing >= assignments[&a.node_id].links() && standby);
        }
        (restored == paired.len() || (!ring && restored >= restored_at_least)).then_some(restored)
    })
    .await;
    eprintln!("neighbours back to their planned links {:.1?} after the kill (ring of four: {ring})", killed.elapsed());
    everyone_has(&agents, &agents[3].append().await).await;
    let opened: f64 = {
        let mut n = 0.0;
        for a in &agents {
            n += a.metric("agentmesh_standby_links_opened_total", "").await;
        }
        n
    };
    assert!(opened >= restored_at_least as f64, "standby link ends opened: {opened}");

    // It comes back where it was: the standbys give way to the plan.
    let listen = mesh.to_string();
    let flags = ["--listen", &listen];
    let back = Agent::spawn_with(dir.path(), &name, &at, &hub, Mode::Operator, CAP, &flags).await;
    agents.push(back);
    *apis.lock().unwrap() = agents.iter().map(|a| (a.name.clone(), a.api)).collect();
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    for a in &agents {
        let standbys = a.status().await.unwrap()["links"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["standby"] == json!(true))
            .count();
        assert_eq!(standbys, 0, "{} still holds a standby link once the plan holds", a.name);
    }
    assert!(sampler.assert_clean() > 20, "the sampler ran");
    for a in &agents {
        let max = a.metric("agentmesh_max_open_links", "").await;
        assert!(max <= CAP as f64, "{} held {max} links at once, over the cap {CAP}", a.name);
    }
    history.assert_clean();
}

/// Each agent's assignment, by node id.
async fn assignments(
    client: &kube::Client,
    ns: &str,
    agents: &[Agent],
) -> std::collections::BTreeMap<String, Assignment> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = std::collections::BTreeMap::new();
    for a in agents {
        let pod = pods.get(&a.name).await.unwrap();
        let assignment = Assignment::from_annotations(pod.metadata.annotations.as_ref().unwrap()).unwrap();
        out.insert(a.node_id.clone(), assignment);
    }
    out
}

/// The standby pairs (dialer, peer) that stand in for `lost`, each listed by both ends (standbys are
/// refreshed with a Pod's links, so one end may list an older pairing).
fn standby_pairs(
    assignments: &std::collections::BTreeMap<String, Assignment>,
    lost: &str,
) -> BTreeSet<(String, String)> {
    let accepts = |peer: &str, dialer: &String| {
        assignments.get(peer).is_some_and(|a| a.standby_accepts.iter().any(|a| a == dialer))
    };
    let mut pairs = BTreeSet::new();
    for (id, a) in assignments {
        let both = a.standbys.iter().filter(|s| s.stands_for == lost && accepts(&s.node_id, id));
        pairs.extend(both.map(|s| (id.clone(), s.node_id.to_string())));
    }
    pairs
}

/// `maxPeers` lowered from 4 to 2, then raised to 3, under real agents whose own `--max-peers` is 4: each
/// agent comes to hold the policy's cap and follows the new plan; at no sample does an agent hold more
/// links (other than ones being closed) than the cap it holds then, or open one while over it; and at no
/// event do the Pods publish more than the cap each carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_max_peers_moves_the_cap_at_every_agent() {
    let (client, ns, rv) = setup("lowered").await;
    let dir = AgentDir::new();
    let hub = rv.hub();
    let history = History::start(&client, &ns, CAP).await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(1500));
    create_policy(&client, &ns, "mesh", spec(&rv, json!({"heartbeatTimeout": "30s"}))).await;
    let _op = Operator::start(&ns, "op-lowered", false).await;
    let agents = spawn_fleet(&client, &ns, (dir.path(), &hub), 0..10, 80).await;
    let apis = Arc::new(Mutex::new(agents.iter().map(|a| (a.name.clone(), a.api)).collect::<Vec<_>>()));
    let sampler = LinkSampler::start(apis, CAP);
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    let caps = || async {
        let mut caps = BTreeSet::new();
        for a in &agents {
            caps.insert(a.status().await?["cap"].as_u64()?);
        }
        Some(caps)
    };
    assert_eq!(caps().await, Some(BTreeSet::from([4])), "the policy's cap and the agents' own are both 4");

    Api::<MeshPolicy>::namespaced(client.clone(), &ns)
        .patch("mesh", &PatchParams::default(), &Patch::Merge(json!({"spec": {"maxPeers": 2}})))
        .await
        .unwrap();
    wait_for("every agent to hold the policy's new cap", WAIT, || async {
        (caps().await? == BTreeSet::from([2])).then_some(())
    })
    .await;
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    everyone_has(&agents, &agents[3].append().await).await;
    for a in &agents {
        assert!(a.links().await.unwrap().len() <= 2, "{} holds more than the new cap", a.name);
        assert_eq!(a.metric("agentmesh_max_peers", "").await, 2.0, "{}", a.name);
    }
    // Raised to 3: the agents follow it up (their own 4 still above).
    Api::<MeshPolicy>::namespaced(client.clone(), &ns)
        .patch("mesh", &PatchParams::default(), &Patch::Merge(json!({"spec": {"maxPeers": 3}})))
        .await
        .unwrap();
    wait_for("every agent to hold the raised cap", WAIT, || async {
        (caps().await? == BTreeSet::from([3])).then_some(())
    })
    .await;
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    assert!(sampler.assert_clean() > 20, "the sampler ran");
    history.assert_clean();
}

/// TCP between two loopback addresses refused, both ways, while it lasts (iptables, rules tagged with a
/// comment and removed on drop even when the test fails).
struct Cut {
    rules: Vec<Vec<String>>,
}

impl Cut {
    fn between(a: &str, b: &str, tag: &str) -> Cut {
        let rule = |from: &str, to: &str| -> Vec<String> {
            let words = ["OUTPUT", "-p", "tcp", "-s", from, "-d", to, "-m", "comment", "--comment", tag];
            let reject = ["-j", "REJECT", "--reject-with", "tcp-reset"];
            words.iter().chain(&reject).map(|w| w.to_string()).collect()
        };
        let cut = Cut { rules: vec![rule(a, b), rule(b, a)] };
        for r in &cut.rules {
            let ok = std::process::Command::new("iptables").arg("-I").args(r).status();
            assert!(ok.is_ok_and(|s| s.success()), "iptables -I {r:?} (the test needs root and iptables)");
        }
        cut
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = std::process::Command::new("iptables").arg("-D").args(r).status();
        }
    }
}

/// Two agents whose TCP to each other is refused (iptables between their loopback addresses; each dials
/// from the address it listens on) report each other unreachable. Within the bound below the plan no
/// longer holds the pair, the status lists it, and every agent again holds exactly its plan; once the cut
/// is lifted and the back-off has passed, the pair is usable again and every agent holds its plan. The
/// history checker and the link sampler watch throughout. The bound: a link's next heartbeat meets the
/// reset (≤ 1 s), dials fail for `--unreachable-after` (2 s), then a long poll and a write wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_the_network_refuses_is_planned_around_and_healed() {
    let (client, ns, rv) = setup("cut").await;
    let dir = AgentDir::new();
    let hub = rv.hub();
    let history = History::start(&client, &ns, CAP).await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(500));
    let extra = json!({"heartbeatTimeout": "30s", "unreachableBackoff": "15s"});
    create_policy(&client, &ns, "mesh", spec(&rv, extra)).await;
    let _op = Operator::start(&ns, "op-cut", false).await;
    let mut agents = Vec::new();
    for i in 0..8 {
        let name = format!("agent-{i}");
        let flags = ["--unreachable-after", "2s"];
        agents.push(Agent::spawn_with(dir.path(), &name, &ip(140 + i), &hub, Mode::Operator, CAP, &flags).await);
        agent_pod(&client, &ns, &name, &ip(140 + i), None).await;
    }
    let apis = Arc::new(Mutex::new(agents.iter().map(|a| (a.name.clone(), a.api)).collect::<Vec<_>>()));
    let sampler = LinkSampler::start(apis, CAP);
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;

    let ids: std::collections::BTreeMap<String, String> =
        agents.iter().map(|a| (a.name.clone(), a.node_id.clone())).collect();
    let planned = plans(&client, &ns, &ids).await;
    let (a, b) = agents
        .iter()
        .find_map(|a| {
            let peer = planned.get(&a.node_id)?.iter().next()?;
            Some((a, agents.iter().find(|b| &b.node_id == peer)?))
        })
        .expect("a planned link");
    let holds = |plans: &std::collections::BTreeMap<String, BTreeSet<String>>| {
        plans.get(&a.node_id).is_some_and(|p| p.contains(&b.node_id))
    };
    let listed = |p: &MeshPolicy| {
        let links = p.status.as_ref().map(|s| s.unusable_links.clone()).unwrap_or_default();
        links
            .iter()
            .any(|u| [&u.reported_by, &u.peer] == [&a.name, &b.name] || [&u.reported_by, &u.peer] == [&b.name, &a.name])
    };
    let (cut, cut_at) = (Cut::between(&a.ip, &b.ip, &format!("mesh-e2e-{ns}")), std::time::Instant::now());
    wait_for("the plan to drop the cut pair and the status to list it", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        (!holds(&plans(&client, &ns, &ids).await) && listed(&p)).then_some(())
    })
    .await;
    let dropped = cut_at.elapsed();
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    eprintln!("cut → pair out of the plan: {dropped:.1?}; → every agent on the new plan: {:.1?}", cut_at.elapsed());
    wait_for("MeshAsPlanned once the plan avoids the pair", WAIT, || async {
        let p = policy(&client, &ns, "mesh").await;
        (condition(&p, "MeshAsPlanned")?.0 == "True").then_some(())
    })
    .await;

    drop(cut);
    wait_for("the pair usable again", 4 * WAIT, || async {
        (!listed(&policy(&client, &ns, "mesh").await)).then_some(())
    })
    .await;
    agents_follow_the_plan(&client, &ns, &agents.iter().collect::<Vec<_>>()).await;
    assert!(sampler.assert_clean() > 20, "the sampler ran");
    for agent in &agents {
        let max = agent.metric("agentmesh_max_open_links", "").await;
        assert!(max <= CAP as f64, "{} held {max} links at once, over the cap {CAP}", agent.name);
    }
    history.assert_clean();
}

/// A user who may edit the MeshPolicy but not read the join token points `spec.rendezvous.url` at a
/// presence server of their own, which lists the real agents' node ids at an address where they record
/// whatever arrives. The operator plans those addresses; the agents dial them, and get no further than a
/// TLS ClientHello: the recorder gets neither the token nor the upgrade request, and no agent holds a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steered_presence_gets_neither_the_token_nor_a_link() {
    const TOKEN: &str = "the-fleet-join-token";
    let (client, ns, rv) = setup("steered").await;
    let dir = AgentDir::new();
    rv.state.lock().unwrap().token = Some(TOKEN.into());
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let token_file = dir.path().join("token").to_str().unwrap().to_string();
    let hub = rv.hub();
    let mut agents = Vec::new();
    for i in 0..3 {
        let name = format!("agent-{i}");
        let extra = ["--join-token-file", token_file.as_str()];
        agents.push(Agent::spawn_with(dir.path(), &name, &ip(60 + i), &hub, Mode::Operator, CAP, &extra).await);
        agent_pod(&client, &ns, &name, &ip(60 + i), None).await;
    }
    wait_for("the agents on the real rendezvous", WAIT, || async {
        let connected = rv.state.lock().unwrap().hub.connected.values().filter(|c| c.alive).count();
        (connected == agents.len()).then_some(())
    })
    .await;

    // The recorder, and the steering presence that sends every agent's links to it.
    let recorder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = recorder.local_addr().unwrap();
    let recorded = Arc::new(Mutex::new((0usize, Vec::<u8>::new())));
    let record = recorded.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = recorder.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 4096];
                record.lock().unwrap().0 += 1;
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().1.extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let steering = Rendezvous::start().await;
    for a in &agents {
        let entry = rendezvous::SimAgent {
            node_id: a.node_id.clone(),
            address: format!("wss://{at}/crdt-sync"),
            hostname: Some(a.name.clone()),
            zone: None,
            alive: true,
            frozen_at_ms: None,
            unreachable: vec![],
        };
        steering.state.lock().unwrap().agents.insert(a.node_id.clone(), entry);
    }
    create_policy(&client, &ns, "mesh", spec(&steering, json!({"heartbeatTimeout": "30s"}))).await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(200));
    let _op = Operator::start(&ns, "op-steered", false).await;

    // The recorder speaks no TLS: each dial ends when its handshake times out.
    wait_for("every agent to dial the recorder and give up on it", WAIT, || async {
        for a in &agents {
            if a.metric("agentmesh_dials_failed_total", "").await < 1.0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    let (connections, bytes) = recorded.lock().unwrap().clone();
    assert!(connections >= agents.len(), "the recorder saw {connections} connections");
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!has(TOKEN.as_bytes()), "the join token reached the recorder");
    assert!(!has(b"crdt-sync") && !has(b"agentmesh-"), "an upgrade request reached the recorder");
    for a in &agents {
        assert_eq!(a.links().await, Some(BTreeSet::new()), "{} linked to the recorder", a.name);
    }
}

/// The metrics port serves metrics and health only: the test API, which writes to the document, is on
/// a port of its own, and off unless asked for.
#[tokio::test]
async fn the_metrics_port_takes_no_writes_and_the_test_api_is_off_by_default() {
    let rv = Rendezvous::start().await;
    let dir = AgentDir::new();
    mesh_operator::presence::install_crypto_provider();
    let http = reqwest::Client::new();
    let status = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    let agent = Agent::spawn(dir.path(), "a", "127.0.0.1", &rv.hub(), Mode::Operator, CAP).await;
    let write = http.post(format!("http://{}/updates", agent.metrics)).header("content-type", "application/json");
    assert_eq!(write.body("{}").send().await.unwrap().status().as_u16(), 404, "a write on the metrics port");
    assert_eq!(status(format!("http://{}/status", agent.metrics)).await, 404);
    assert_eq!(status(format!("http://{}/healthz", agent.metrics)).await, 200);
    assert_eq!(status(format!("http://{}/metrics", agent.api)).await, 404, "metrics on the test API");
    assert!(agent.status().await.is_some(), "the test API, when asked for");

    let mut plain = tokio::process::Command::new(support::agents::workspace_bins().join("mesh-agent"))
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--identity"])
        .arg(dir.path().join("plain.key"))
        .args(["--assignment-file", dir.path().join("none").to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(plain.stdout.take().unwrap()));
    let line = lines.next_line().await.unwrap().expect("the agent's listening line");
    assert!(line.contains(" test-api=off "), "{line}");
    let metrics = line.split(' ').find_map(|w| w.strip_prefix("metrics=")).unwrap().to_string();
    assert_eq!(status(format!("http://{metrics}/metrics")).await, 200);
    let write = http.post(format!("http://{metrics}/updates")).header("content-type", "application/json");
    assert_eq!(write.body("{}").send().await.unwrap().status().as_u16(), 404);
    let _ = plain.kill().await;
}
