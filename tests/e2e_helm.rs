//! The Helm chart: lint, render with default and non-default values, apply to the real control plane, and
//! run the controller with the chart's ServiceAccount token, so with exactly the chart's RBAC.
mod support;

use std::time::Duration;

use kube::api::{Api, PostParams};
use mesh_operator::api::MeshPolicy;
use serde::Deserialize;
use serde_json::json;
use support::*;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/mesh-operator");

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn render(release: &str, ns: &str, sets: &[&str]) -> Vec<serde_yaml::Value> {
    let mut args = vec!["template", release, CHART, "--namespace", ns, "--kube-version", "1.36.3"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let yaml = ok(tool("helm", &args), "helm template");
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    let mut k: Vec<String> = docs.iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect();
    k.sort();
    k
}

#[test]
fn chart_lints_and_renders() {
    ok(tool("helm", &["lint", CHART, "--strict"]), "helm lint");
    let docs = render("mo", "ops", &[]);
    assert_eq!(
        kinds(&docs),
        ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    );
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["args"].as_sequence().unwrap().iter().any(|a| a == "--leader-elect=true"));

    let docs = render(
        "mo",
        "ops",
        &[
            "watchNamespaces[0]=ci",
            "serviceMonitor.enabled=true",
            "networkPolicy.enabled=true",
            "podDisruptionBudget.enabled=true",
            "joinTokenSecrets[0].namespace=ci",
            "joinTokenSecrets[0].name=tok",
        ],
    );
    let k = kinds(&docs);
    for want in ["ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget"] {
        assert!(k.contains(&want.to_string()), "{want} missing: {k:?}");
    }
    let token_role = docs.iter().find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "mo-token-tok").unwrap();
    assert_eq!(token_role["metadata"]["namespace"], "ci");
    assert_eq!(token_role["rules"][0]["resourceNames"][0], "tok");
    let ns_role = docs.iter().find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "mo").unwrap();
    assert_eq!(ns_role["metadata"]["namespace"], "ci");
    // Namespace-scoped: the only cluster-wide grant is reading Node metadata.
    let cluster_roles: Vec<&serde_yaml::Value> = docs.iter().filter(|d| d["kind"] == "ClusterRole").collect();
    assert_eq!(cluster_roles.len(), 1);
    assert_eq!(cluster_roles[0]["rules"].as_sequence().unwrap().len(), 1);
    assert_eq!(cluster_roles[0]["rules"][0]["resources"][0], "nodes");

    // values.schema.json rejects what the chart cannot honour, naming the value.
    let bad = tool("helm", &["template", "mo", CHART, "--kube-version", "1.36.3", "--set", "replicaCount=0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("replicaCount"), "{}", String::from_utf8_lossy(&bad.stderr));
}

fn can_i(ns: &str, sa: &str, args: &[&str]) -> bool {
    let who = format!("system:serviceaccount:{ns}:{sa}");
    let mut all = vec!["auth", "can-i"];
    all.extend(args);
    all.extend(["--as", &who]);
    let out = tool("kubectl", &all);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {args:?}: {other:?} {}", String::from_utf8_lossy(&out.stderr)),
    }
}

#[tokio::test]
async fn controller_runs_with_the_charts_rbac_and_nothing_more() {
    let admin = client().await;
    install_crd(&admin).await;
    let ns = namespace(&admin, "helm").await;
    let release = format!("mo-{}", &ns[ns.len() - 6..]);
    // Render and apply the chart (the CRD is already installed, as `helm install` would do from crds/).
    let args = [
        "template",
        release.as_str(),
        CHART,
        "--namespace",
        ns.as_str(),
        "--kube-version",
        "1.36.3",
        "--set",
        &format!("joinTokenSecrets[0].namespace={ns}"),
        "--set",
        "joinTokenSecrets[0].name=rv-token",
    ];
    let rendered = ok(tool("helm", &args), "helm template");
    let file = std::env::temp_dir().join(format!("{release}.yaml"));
    std::fs::write(&file, rendered).unwrap();
    ok(tool("kubectl", &["apply", "-n", &ns, "-f", file.to_str().unwrap()]), "kubectl apply");

    // What the ServiceAccount may and may not do.
    let sa = release.as_str();
    for (args, allowed) in [
        (vec!["patch", "pods", "-n", &ns], true),
        (vec!["watch", "pods", "-n", "default"], true),
        (vec!["patch", "meshpolicies.agentmesh.dev", "-n", &ns], true),
        (vec!["update", "meshpolicies.agentmesh.dev/status", "-n", &ns], true),
        (vec!["create", "events.events.k8s.io", "-n", &ns], true),
        (vec!["update", "leases.coordination.k8s.io", "-n", &ns], true),
        (vec!["get", "secrets/rv-token", "-n", &ns], true),
        (vec!["get", "secrets/other", "-n", &ns], false),
        (vec!["list", "secrets", "-n", &ns], false),
        (vec!["get", "secrets", "-n", "kube-system"], false),
        (vec!["delete", "pods", "-n", &ns], false),
        (vec!["create", "pods", "-n", &ns], false),
        (vec!["delete", "meshpolicies.agentmesh.dev", "-n", &ns], false),
        (vec!["create", "deployments.apps", "-n", &ns], false),
        (vec!["update", "leases.coordination.k8s.io", "-n", "kube-system"], false),
        (vec!["patch", "nodes"], false),
    ] {
        assert_eq!(can_i(&ns, sa, &args), allowed, "can-i {args:?}");
    }

    // The controller, authenticated as that ServiceAccount, runs a basic scenario.
    let token = ok(tool("kubectl", &["create", "token", sa, "-n", &ns, "--duration", "1h"]), "kubectl create token");
    let sa_client = client_with_token(&token).await;
    let rv = Rendezvous::start().await;
    rv.state.lock().unwrap().token = Some("join".into());
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({"metadata": {"name": "rv-token"}, "stringData": {"token": "join"}})).unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let op = Operator::start_as(sa_client, &ns, "chart-sa", true).await;
    fleet(&admin, &ns, &rv, 6, |_| None).await;
    let mp: MeshPolicy = serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "mesh"}, "spec": {"selector": {"matchLabels": {"app": "agent"}}, "maxPeers": 3,
        "rendezvous": {"url": rv.url(), "pollInterval": "1s", "timeout": "1s",
                       "joinTokenSecretRef": {"name": "rv-token", "key": "token"}}}}))
    .unwrap();
    let policies: Api<MeshPolicy> = Api::namespaced(admin.clone(), &ns);
    policies.create(&PostParams::default(), &mp).await.unwrap();
    wait_for("the chart-RBAC controller to assign all 6 agents and report Ready", Duration::from_secs(60), || async {
        let p = policies.get("mesh").await.ok()?;
        let st = p.status?;
        let ready = st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && st.assigned == 6).then_some(())
    })
    .await;
    let events = tool("kubectl", &["get", "events.events.k8s.io", "-n", &ns, "-o", "jsonpath={.items[*].reason}"]);
    assert!(String::from_utf8_lossy(&events.stdout).contains("PlanChanged"), "{events:?}");
    assert_eq!(
        op.metrics.reconcile_errors.get_or_create(&mesh_operator::telemetry::KindLabel { kind: "kube".into() }).get(),
        0
    );
    op.kill().await;
}
