//! The node tier: on a real node (kubelet, containerd, runc; `hack/node.sh start`, which `make test` runs),
//! the Helm chart installed as a user would, a rendezvous Pod, and 20 agent Pods running `mesh-agent` that
//! read their assignment from a downward-API volume refreshed by the kubelet. Then what a cluster does to
//! them: the leader Pod deleted, the rendezvous Pod deleted, an agent Pod deleted, `helm upgrade`, and
//! `helm uninstall`. Throughout, the history checker replays every Pod event and a sampler reads every
//! agent's open links: no agent may ever be over its cap.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::agents::{AgentApi, LinkSampler, agents_follow_the_plan, metric_at};
use support::*;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/mesh-operator");
const AGENTS: usize = 20;
const CAP: usize = 4;
const NODE_WAIT: Duration = Duration::from_secs(180);

/// The node is tainted (`hack/node.sh`): Pods left by the API-only tests must never be scheduled onto it.
static NODE_TOLERATION: std::sync::LazyLock<Value> = std::sync::LazyLock::new(
    || json!({"key": "agentmesh.dev/node-tier", "operator": "Exists", "effect": "NoSchedule"}),
);

/// The restricted Pod Security profile, as the chart's own Pods run.
fn restricted() -> (Value, Value) {
    let pod = json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                     "seccompProfile": {"type": "RuntimeDefault"}});
    let container = json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                           "capabilities": {"drop": ["ALL"]}});
    (pod, container)
}

fn deployment(name: &str, replicas: usize, container: Value, volumes: Value) -> Deployment {
    let (pod_sc, _) = restricted();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"securityContext": pod_sc, "containers": [container], "volumes": volumes,
                         "terminationGracePeriodSeconds": 2, "tolerations": [NODE_TOLERATION.clone()]},
            },
        },
    }))
    .unwrap()
}

/// Runs helm with `args` (split at whitespace, as a shell would split this test's plain words).
fn helm(args: &str) -> String {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = tool("helm", &args);
    assert!(out.status.success(), "helm {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names `kubectl <args> -o name` prints; panics when kubectl fails.
fn kubectl_names(args: &[&str]) -> Vec<String> {
    let out = tool("kubectl", &[args, &["-o", "name"]].concat());
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

async fn node_ready(client: &Client) {
    let node = Api::<Node>::all(client.clone()).get_opt("mesh-node").await.unwrap();
    let ready = node.as_ref().and_then(|n| n.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Ready"));
    assert!(
        ready.is_some_and(|c| c.status == "True"),
        "no Ready node 'mesh-node': run `make images && hack/node.sh start` first (`make test` does)"
    );
}

/// Running Pods of `app` in `ns` whose containers are all ready.
async fn ready_pods(client: &Client, ns: &str, app: &str) -> Vec<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default().labels(app)).await.unwrap();
    pods.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let s = p.status.as_ref();
            s.and_then(|s| s.phase.as_deref()) == Some("Running")
                && s.and_then(|s| s.container_statuses.as_ref()).is_some_and(|c| c.iter().all(|c| c.ready))
        })
        .collect()
}

async fn wait_ready(client: &Client, ns: &str, app: &str, n: usize) -> Vec<Pod> {
    wait_for(&format!("{n} ready Pods of {app}"), NODE_WAIT, || async {
        let pods = ready_pods(client, ns, app).await;
        (pods.len() == n).then_some(pods)
    })
    .await
}

fn lease_holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone()
}

/// Each agent Pod's API, with the node id it reports.
async fn agent_apis(pods: &[Pod]) -> Vec<AgentApi> {
    let mut apis = Vec::new();
    for p in pods {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("a Pod IP");
        let (api, metrics): (SocketAddr, SocketAddr) =
            (format!("{ip}:9465").parse().unwrap(), format!("{ip}:9464").parse().unwrap());
        let mut view = AgentApi { name: p.name_any(), node_id: String::new(), api, metrics };
        view.node_id = wait_for(&format!("{}'s node id", p.name_any()), NODE_WAIT, || async {
            view.status().await?["nodeId"].as_str().map(str::to_string)
        })
        .await;
        apis.push(view);
    }
    apis
}

/// The rendezvous: its node key in a Secret (so a restarted Pod keeps its node id), its node id in a
/// ConfigMap the agents read to pin it, one Deployment and its Service. Returns the Service's address.
async fn rendezvous(client: &Client, ns: &str) -> String {
    let (_, sc) = restricted();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let node_id = agent_mesh::identity::Identity::load_or_create(&path).unwrap().node_id();
    let key = std::fs::read(&path).unwrap();
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "rendezvous-key"},
        "data": {"node.key": base64::engine::general_purpose::STANDARD.encode(&key)}}))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap();
    let pin: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "rendezvous-pin"},
        "data": {"nodeId": node_id}}))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &pin).await.unwrap();
    let container = json!({"name": "rendezvous", "image": "mesh.local/rendezvous:dev",
        "args": ["--listen", "0.0.0.0:8080", "--identity", "/var/run/rendezvous/node.key"], "securityContext": sc,
        "ports": [{"containerPort": 8080}],
        "volumeMounts": [{"name": "key", "mountPath": "/var/run/rendezvous", "readOnly": true}]});
    // Readable by the Pod's group only (fsGroup in `deployment`).
    let volumes = json!([{"name": "key", "secret": {"secretName": "rendezvous-key", "defaultMode": 0o440}}]);
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment("rendezvous", 1, container, volumes))
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "rendezvous"},
        "spec": {"selector": {"app": "rendezvous"}, "ports": [{"port": 8080, "targetPort": 8080}]}}))
    .unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &svc).await.unwrap();
    svc.spec.unwrap().cluster_ip.unwrap()
}

async fn agents(client: &Client, ns: &str, hub_ip: &str) {
    let (_, sc) = restricted();
    let container = json!({"name": "agent", "image": "mesh.local/mesh-agent:dev",
        "args": ["--listen", "0.0.0.0:3001", "--advertise", "wss://$(POD_IP):3001/crdt-sync",
                 "--metrics", "0.0.0.0:9464", "--test-api", "0.0.0.0:9465", "--identity", "/var/lib/agent/agent.key",
                 "--rendezvous", format!("wss://{hub_ip}:8080/crdt-sync"), "--max-peers", CAP.to_string(),
                 "--heartbeat", "1s"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "RENDEZVOUS_NODE_ID",
                 "valueFrom": {"configMapKeyRef": {"name": "rendezvous-pin", "key": "nodeId"}}}],
        "securityContext": sc,
        "volumeMounts": [{"name": "podinfo", "mountPath": "/etc/podinfo"},
                         {"name": "identity", "mountPath": "/var/lib/agent"}]});
    let volumes = json!([
        {"name": "podinfo", "downwardAPI": {"items": [{"path": "annotations",
            "fieldRef": {"fieldPath": "metadata.annotations"}}]}},
        {"name": "identity", "emptyDir": {}},
    ]);
    let mut d = deployment("agent", AGENTS, container, volumes);
    d.spec.as_mut().unwrap().strategy = serde_json::from_value(json!({"type": "Recreate"})).unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &d).await.unwrap();
}

/// Every agent has every update in `keys`.
async fn delivered(apis: &[AgentApi], keys: &BTreeSet<String>) {
    wait_for("every agent to have every update", NODE_WAIT, || async {
        for a in apis {
            if !keys.is_subset(&a.updates().await?) {
                return None;
            }
        }
        Some(())
    })
    .await
}

async fn scale(client: &Client, ns: &str, name: &str, replicas: usize) {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch_scale(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": replicas}})))
        .await
        .unwrap();
}

fn ours(p: &Pod) -> BTreeMap<String, String> {
    p.annotations()
        .iter()
        .filter(|(k, _)| k.starts_with("agentmesh.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tokio::test]
async fn the_chart_on_a_real_node() {
    let client = client().await;
    node_ready(&client).await;
    let started = Instant::now();
    let op_ns = namespace(&client, "node-op").await;
    let ns = namespace(&client, "node-agents").await;

    // Install as a user would: images by name, the chart's own security context, --wait for readiness. A
    // release of its own per run (its cluster-scoped objects carry its name): a failed run leaves nothing
    // in the next one's way.
    let release = format!("mo-{}", &op_ns[op_ns.len() - 6..]);
    helm(&format!(
        "install {release} {CHART} -n {op_ns} --take-ownership --set image.repository=mesh.local/mesh-operator --set image.tag=dev \
         --set watchNamespaces={{{ns}}} --set tolerations[0].key=agentmesh.dev/node-tier \
         --set tolerations[0].operator=Exists --set tolerations[0].effect=NoSchedule --wait --timeout 180s"
    ));
    let operators = wait_ready(&client, &op_ns, "app.kubernetes.io/name=mesh-operator", 2).await;
    let names: BTreeSet<String> = operators.iter().map(|p| p.name_any()).collect();
    let leases = Api::<Lease>::namespaced(client.clone(), &op_ns);
    let leader = wait_for("a replica to hold the Lease", NODE_WAIT, || async {
        lease_holder(&leases.get_opt(&release).await.ok()??).filter(|h| names.contains(h))
    })
    .await;
    eprintln!("chart installed, both replicas Ready, {leader} leads: {:?}", started.elapsed());
    // The chart's own test: a Pod that runs `mesh-operator check` against the metrics Service.
    let tested = helm(&format!("test {release} -n {op_ns} --timeout 120s"));
    assert!(tested.contains("Phase:") && tested.contains("Succeeded"), "helm test: {tested}");

    let hub_ip = rendezvous(&client, &ns).await;
    let history = History::start(&client, &ns, CAP).await;
    create_policy(
        &client,
        &ns,
        "mesh",
        json!({
            "selector": {"matchLabels": {"app": "agent"}}, "maxPeers": CAP, "heartbeatTimeout": "20s",
            "rendezvous": {"url": format!("http://{hub_ip}:8080"), "pollInterval": "2s", "timeout": "2s"},
        }),
    )
    .await;
    agents(&client, &ns, &hub_ip).await;
    let pods = wait_ready(&client, &ns, "app=agent", AGENTS).await;
    let apis = agent_apis(&pods).await;
    let sampled = Arc::new(Mutex::new(apis.iter().map(|a| (a.name.clone(), a.api)).collect::<Vec<_>>()));
    let sampler = LinkSampler::start(sampled.clone(), CAP);
    agents_follow_the_plan(&client, &ns, &apis).await;
    eprintln!("{AGENTS} agent Pods follow the plan: {:?}", started.elapsed());

    // The rendezvous Pod deleted (and kept down): updates still reach every agent, over the mesh.
    scale(&client, &ns, "rendezvous", 0).await;
    wait_for("the rendezvous Pod to be gone", NODE_WAIT, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        pods.list(&ListParams::default().labels("app=rendezvous")).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    let mut keys = BTreeSet::new();
    for a in apis.iter().step_by(5) {
        keys.insert(a.append().await);
    }
    delivered(&apis, &keys).await;
    eprintln!("rendezvous down: {} updates reached all {AGENTS} agents", keys.len());
    scale(&client, &ns, "rendezvous", 1).await;
    wait_ready(&client, &ns, "app=rendezvous", 1).await;

    // The leader Pod and an agent Pod deleted together: the successor must replan (the agent's peers lose a
    // link; its replacement is a new identity) while the leadership changes hands, under the checkers.
    let gone = apis[3].clone();
    let deleted = Instant::now();
    Api::<Pod>::namespaced(client.clone(), &op_ns).delete(&leader, &DeleteParams::default()).await.unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns).delete(&gone.name, &DeleteParams::default()).await.unwrap();
    // The leader releases the Lease on SIGTERM: the standby or the Deployment's replacement may take it.
    let successor = wait_for("another replica to take the Lease", NODE_WAIT, || async {
        let holder = lease_holder(&leases.get_opt(&release).await.ok()??)?;
        let running = ready_pods(&client, &op_ns, "app.kubernetes.io/name=mesh-operator").await;
        (holder != leader && running.iter().any(|p| p.name_any() == holder)).then_some(holder)
    })
    .await;
    let took = deleted.elapsed();
    let standby = if names.contains(&successor) { "the standby" } else { "the replacement" };
    eprintln!("leader {leader} deleted: {standby} {successor} leads {took:?} later");
    wait_ready(&client, &op_ns, "app.kubernetes.io/name=mesh-operator", 2).await;
    let pods = wait_for("the agent Pod to be gone and replaced", NODE_WAIT, || async {
        Api::<Pod>::namespaced(client.clone(), &ns).get_opt(&gone.name).await.ok()?.is_none().then_some(())?;
        let pods = ready_pods(&client, &ns, "app=agent").await;
        (pods.len() == AGENTS).then_some(pods)
    })
    .await;
    let apis = agent_apis(&pods).await;
    *sampled.lock().unwrap() = apis.iter().map(|a| (a.name.clone(), a.api)).collect();
    agents_follow_the_plan(&client, &ns, &apis).await;
    let listed = Api::<Pod>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
    assert!(
        listed.items.iter().all(|p| ours(p).values().all(|v| !v.contains(&gone.node_id))),
        "a Pod still names the deleted agent {}",
        gone.node_id
    );
    eprintln!(
        "agent {} deleted and replaced: the plan followed again, {:?} after both deletions",
        gone.name,
        deleted.elapsed()
    );

    // helm upgrade with a changed value: a rolling update that leaves the plan as it is.
    let before: BTreeMap<String, BTreeMap<String, String>> =
        listed.items.iter().map(|p| (p.name_any(), ours(p))).collect();
    helm(&format!("upgrade {release} {CHART} -n {op_ns} --reuse-values --set logFormat=text --wait --timeout 180s"));
    let upgraded = wait_for("both replicas to run the upgraded template", NODE_WAIT, || async {
        let pods = ready_pods(&client, &op_ns, "app.kubernetes.io/name=mesh-operator").await;
        let text = |p: &Pod| serde_json::to_string(&p.spec).unwrap().contains("--log-format=text");
        (pods.len() == 2 && pods.iter().all(text)).then_some(pods)
    })
    .await;
    let new_leader = wait_for("an upgraded replica to lead", NODE_WAIT, || async {
        let holder = lease_holder(&leases.get_opt(&release).await.ok()??)?;
        upgraded.iter().find(|p| p.name_any() == holder).cloned()
    })
    .await;
    // Its first reconcile has run, and it patched nothing: the same plan.
    let ip = new_leader.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("the leader's Pod IP");
    let metrics: SocketAddr = format!("{ip}:8080").parse().unwrap();
    wait_for("the upgraded leader's first reconcile", NODE_WAIT, || async {
        (metric_at(metrics, "mesh_operator_reconciles_total", "").await? > 0.0).then_some(())
    })
    .await;
    assert_eq!(metric_at(metrics, "mesh_operator_pod_patches_total", "").await, Some(0.0), "the upgrade rewired");
    agents_follow_the_plan(&client, &ns, &apis).await;
    let after = Api::<Pod>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap();
    let after: BTreeMap<String, BTreeMap<String, String>> =
        after.items.iter().map(|p| (p.name_any(), ours(p))).collect();
    assert_eq!(before, after, "helm upgrade changed the agents' assignments");

    // Uninstall as the operations guide says: delete the MeshPolicies (their annotations go), then the chart.
    Api::<mesh_operator::api::MeshPolicy>::namespaced(client.clone(), &ns)
        .delete("mesh", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("every agentmesh.dev annotation but node-id to be removed", NODE_WAIT, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.ok()?;
        pods.items.iter().all(|p| ours(p).keys().all(|k| k == "agentmesh.dev/node-id")).then_some(())
    })
    .await;
    helm(&format!("uninstall {release} -n {op_ns} --wait --timeout 120s"));
    // What the operations guide says stays: the Lease (its last holder cannot release it: the chart's RBAC
    // goes with the chart), besides the CRD and the namespaces.
    let kept = [format!("lease.coordination.k8s.io/{release}")];
    wait_for(
        &format!("nothing but {kept:?} left in {op_ns} (Pods terminate after helm returns)"),
        NODE_WAIT,
        || async {
            let left = kubectl_names(&["get", "all,serviceaccounts,roles,rolebindings,leases", "-n", &op_ns]);
            (left.iter().filter(|l| !l.ends_with("/default")).collect::<Vec<_>>() == kept.iter().collect::<Vec<_>>())
                .then_some(())
        },
    )
    .await;
    let elsewhere = kubectl_names(&["get", "roles,rolebindings", "-n", &ns]);
    let cluster = kubectl_names(&[
        "get",
        "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
    ]);
    let left: Vec<&String> = elsewhere.iter().chain(&cluster).filter(|n| n.contains(&release)).collect();
    assert!(left.is_empty(), "left behind by helm uninstall: {left:?}");

    let samples = sampler.assert_clean();
    let events = history.assert_clean();
    eprintln!(
        "node tier done in {:?}: {samples} link samples, {events} Pod events replayed, no cap exceeded",
        started.elapsed()
    );
}
