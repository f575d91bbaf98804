//! A second, independent implementation of the link protocol in the fleet: the Python agent
//! (`tests/python/agent.py`, written from docs/agent-integration.md) runs beside five `mesh-agent`
//! processes under the operator. It links to the pinned rendezvous, is planned like any agent, dials and
//! admits its planned peers, and an update crosses from it to every Rust agent and back. Another Python
//! agent that no plan names is refused. The Pod annotations run under the history checker.
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use agent_mesh::assignment::{Assignment, Peer};
use serde_json::json;
use support::agents::{Agent, Kubelet, Mode, agent_pod, agents_follow_the_plan};
use support::*;

const CAP: usize = 3;

fn ip(i: usize) -> String {
    format!("127.0.120.{}", 1 + i)
}

async fn everyone_has(agents: &[&Agent], key: &str) {
    wait_for(&format!("update {key} at every agent"), Duration::from_secs(60), || async {
        for a in agents {
            if !a.updates().await?.contains(key) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The directions of the links `a` holds now.
async fn directions(a: &Agent) -> BTreeSet<String> {
    let status = a.status().await.unwrap_or_default();
    let links = status["links"].as_array().cloned().unwrap_or_default();
    links.iter().filter_map(|l| l["direction"].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_agent_joins_the_fleet_as_a_planned_peer() {
    let (client, ns, rv) = setup("python").await;
    let dir = support::agents::AgentDir::new();
    let hub = rv.hub();
    let history = History::start(&client, &ns, CAP).await;
    let _kubelet = Kubelet::start(&client, &ns, dir.path(), Duration::from_millis(500));
    create_policy(&client, &ns, "mesh", spec(&rv, json!({"maxPeers": CAP, "heartbeatTimeout": "30s"}))).await;
    let _op = Operator::start(&ns, "op-python", false).await;

    let mut agents = Vec::new();
    for i in 0..5 {
        let name = format!("agent-{i}");
        agents.push(Agent::spawn(dir.path(), &name, &ip(i), &hub, Mode::Operator, CAP).await);
        agent_pod(&client, &ns, &name, &ip(i), None).await;
    }
    let python = Agent::spawn_python(dir.path(), "agent-py", &ip(9), &hub, CAP).await;
    agent_pod(&client, &ns, "agent-py", &ip(9), None).await;
    let fleet: Vec<&Agent> = agents.iter().chain([&python]).collect();
    agents_follow_the_plan(&client, &ns, &fleet).await;
    assert_eq!(python.links().await.map(|l| l.len()), Some(CAP), "the Python agent holds its plan");
    // Each agent dials ⌊k/2⌋ or ⌈k/2⌉ of its links (docs/design.md §4): with k = 3, both directions.
    let held = directions(&python).await;
    assert_eq!(held, BTreeSet::from(["accepted".to_string(), "dialed".to_string()]), "it dials and accepts");

    // Updates cross from Python to every Rust agent, and from Rust to Python.
    everyone_has(&fleet, &python.append().await).await;
    everyone_has(&fleet, &agents[2].append().await).await;

    // With the rendezvous down, only the mesh carries them.
    rv.set_fail(rendezvous::FailMode::Down);
    rv.state.lock().unwrap().hub.kick_all(false);
    wait_for("the Python agent to lose the rendezvous", WAIT, || async {
        (python.status().await?["rendezvousConnected"] == json!(false)).then_some(())
    })
    .await;
    everyone_has(&fleet, &python.append().await).await;
    everyone_has(&fleet, &agents[4].append().await).await;
    rv.set_fail(rendezvous::FailMode::None);

    // A Python agent no plan names dials a Rust agent anyway: refused as not planned.
    let stranger = Agent::spawn_python(dir.path(), "stranger-py", &ip(20), &hub, CAP).await;
    let target = &agents[0];
    let peer = Peer { node_id: target.node_id.clone().into(), url: format!("wss://{}/crdt-sync", target.mesh).into() };
    let plan = Assignment::new(vec![peer], [], "mesh".into());
    let map = plan.to_annotations().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    std::fs::write(&stranger.annotations, agent_mesh::downward::render(&map)).unwrap();
    wait_for("the stranger to be refused as not planned", WAIT, || async {
        (stranger.status().await?["refused"]["not_planned"].as_u64()? >= 1).then_some(())
    })
    .await;
    assert_eq!(stranger.links().await, Some(BTreeSet::new()));
    agents_follow_the_plan(&client, &ns, &fleet).await;
    history.assert_clean();
}
