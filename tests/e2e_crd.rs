//! The generated MeshPolicy CRD on the real apiserver: it installs, defaults apply, printer columns show,
//! every example is accepted and invalid specs are rejected at admission with a message naming the field.
mod support;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use mesh_operator::api::{MeshPolicy, Mode};
use serde_json::{Value, json};
use support::*;

fn policy(spec: Value) -> Value {
    json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
           "metadata": {"name": "p"}, "spec": spec})
}

fn valid_spec() -> Value {
    json!({"selector": {"matchLabels": {"app": "agent"}}, "rendezvous": {"url": "http://rv.example:8080"}})
}

fn with(mut base: Value, path: &[&str], value: Value) -> Value {
    let mut cur = &mut base;
    for key in &path[..path.len() - 1] {
        cur = cur.as_object_mut().unwrap().entry(key.to_string()).or_insert(json!({}));
    }
    let last = path[path.len() - 1];
    if value.is_null() {
        cur.as_object_mut().unwrap().remove(last);
    } else {
        cur[last] = value;
    }
    base
}

async fn create(client: &kube::Client, ns: &str, body: Value) -> Result<DynamicObject, kube::Error> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("agentmesh.dev", "v1alpha1", "MeshPolicy"));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let obj: DynamicObject = serde_json::from_value(body).unwrap();
    api.create(&PostParams::default(), &obj).await
}

#[tokio::test]
async fn defaults_apply_and_typed_round_trip() {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "crd-defaults").await;
    create(&client, &ns, policy(valid_spec())).await.expect("a minimal policy is accepted");
    let mp = Api::<MeshPolicy>::namespaced(client, &ns).get("p").await.unwrap();
    assert_eq!(mp.spec.max_peers, 4);
    assert_eq!(mp.spec.rendezvous.poll_interval, "10s");
    assert_eq!(mp.spec.rendezvous.presence_path, "/presence");
    assert_eq!(mp.spec.heartbeat_timeout, "600s");
    assert_eq!(mp.spec.mode, Mode::Enforce);
}

#[tokio::test]
async fn invalid_policies_are_rejected_naming_the_field() {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "crd-invalid").await;
    let base = valid_spec();
    let https = with(base.clone(), &["rendezvous", "url"], json!("https://rv.example:8443"));
    let ca_ref = json!({"name": "kube-root-ca.crt", "key": "ca.crt"});
    let cases: Vec<(&str, Value)> = vec![
        ("spec.maxPeers", with(base.clone(), &["maxPeers"], json!(65))),
        ("spec.maxPeers", with(base.clone(), &["maxPeers"], json!(-1))),
        ("spec.rendezvous.url", with(base.clone(), &["rendezvous", "url"], json!("ftp://rv.example/x"))),
        ("spec.rendezvous.url", with(base.clone(), &["rendezvous", "url"], json!("rendezvous:8080"))),
        ("spec.rendezvous", with(base.clone(), &["rendezvous"], Value::Null)),
        ("spec.selector", with(base.clone(), &["selector"], Value::Null)),
        ("spec.selector", with(base.clone(), &["selector"], json!({}))),
        ("spec.heartbeatTimeout", with(base.clone(), &["heartbeatTimeout"], json!("5s"))),
        ("spec.heartbeatTimeout", with(base.clone(), &["heartbeatTimeout"], json!("ten minutes"))),
        ("spec.rendezvous.pollInterval", with(base.clone(), &["rendezvous", "pollInterval"], json!("10 seconds"))),
        ("spec.rendezvous.pollInterval", with(base.clone(), &["rendezvous", "pollInterval"], json!("500ms"))),
        ("spec.rendezvous.timeout", with(base.clone(), &["rendezvous", "timeout"], json!("20s"))),
        ("spec.mode", with(base.clone(), &["mode"], json!("Enforcing"))),
        ("spec.topologyKey", with(base.clone(), &["topologyKey"], json!("not a label key!"))),
        ("spec.rendezvous.presencePath", with(base.clone(), &["rendezvous", "presencePath"], json!("presence"))),
        // caBundle is base64, as Kubernetes caBundle fields are: PEM as is is refused.
        (
            "spec.rendezvous.caBundle",
            with(https.clone(), &["rendezvous", "caBundle"], json!("-----BEGIN CERTIFICATE-----\nMIIB\n")),
        ),
        ("spec.rendezvous.caBundle", with(base.clone(), &["rendezvous", "caBundle"], json!("LS0tLS1CRUdJTg=="))),
        ("spec.rendezvous.caConfigMapRef", with(base.clone(), &["rendezvous", "caConfigMapRef"], ca_ref.clone())),
        (
            "spec.rendezvous.caConfigMapRef",
            with(
                with(https.clone(), &["rendezvous", "caConfigMapRef"], ca_ref.clone()),
                &["rendezvous", "caBundle"],
                json!("LS0tLS1CRUdJTg=="),
            ),
        ),
        (
            "spec.rendezvous.joinTokenSecretRef.name",
            with(base.clone(), &["rendezvous", "joinTokenSecretRef"], json!({"name": "Bad_Name", "key": "token"})),
        ),
        ("spec.identity.nodeIdAnnotation", with(base.clone(), &["identity", "nodeIdAnnotation"], json!(""))),
    ];
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for (field, spec) in cases {
        match create(&client, &ns, policy(spec.clone())).await {
            Ok(_) => failures.push(format!("accepted, expected a rejection naming {field}: {spec}")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(field) {
                    failures.push(format!("{field}: got {} {:?}", status.code, status.message));
                }
            }
            Err(other) => failures.push(format!("{field}: unexpected error {other}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn every_example_is_accepted_and_kubectl_shows_the_columns() {
    let client = client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "crd-examples").await;
    let mut count = 0;
    for entry in std::fs::read_dir(format!("{REPO}/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            // As a user applies it, without a warning.
            let out = tool("kubectl", &["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{} rejected: {stderr}", path.display());
            assert!(!stderr.contains("Warning"), "kubectl apply -f {} warned: {stderr}", path.display());
            count += 1;
        }
    }
    assert!(count >= 3, "found {count} example policies");
    // The agents' NetworkPolicy too (their PodMonitor is checked against its CRD in tests/e2e_helm.rs).
    let np = format!("{REPO}/examples/cluster/agents-networkpolicy.yaml");
    let out = tool("kubectl", &["apply", "--dry-run=server", "-n", &ns, "-f", &np]);
    assert!(out.status.success(), "{np}: {}", String::from_utf8_lossy(&out.stderr));
    let out = tool("kubectl", &["get", "mp", "-n", &ns]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "MODE", "MAX-PEERS", "SELECTED", "ELIGIBLE", "ASSIGNED", "LINKS", "READY", "AGE"]);
    assert!(stdout.contains("build-agents-zonal"), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("Observe")), "an Observe policy says so: {stdout}");
    let wide = tool("kubectl", &["get", "mp", "-n", &ns, "-o", "wide"]);
    let wide = String::from_utf8_lossy(&wide.stdout);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    for column in ["MAX-DEGREE", "COMPONENTS", "REASON"] {
        assert!(header.contains(&column), "-o wide lacks {column}: {header:?}");
    }
    // kubectl explain reads the CRD's descriptions.
    let explain = tool("kubectl", &["explain", "mp.spec.rendezvous.pollInterval"]);
    let explain = String::from_utf8_lossy(&explain.stdout);
    assert!(explain.contains("How often presence is read"), "{explain}");
    // The category and short name resolve too.
    let out = tool("kubectl", &["get", "agentmesh", "-n", &ns, "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), count, "{out:?}");
}

/// kube-apiserver warns about every schema `format` it does not know when a CRD is created (helm install
/// showed `Warning: unrecognized format "uint32"`, schemars' format for a `u32`). A server-side dry run
/// creates the CRD under another group, so the whole schema is judged and nothing is left behind.
#[tokio::test]
async fn the_crd_schema_uses_only_formats_kubernetes_knows() {
    let crd = std::fs::read_to_string(format!("{REPO}/crds/meshpolicy.yaml")).unwrap();
    let renamed = crd
        .replace("name: meshpolicies.agentmesh.dev", "name: meshpolicies.formatcheck.agentmesh.dev")
        .replace("group: agentmesh.dev", "group: formatcheck.agentmesh.dev");
    assert_ne!(renamed, crd, "the CRD's name and group were found");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), renamed).unwrap();
    let out = tool("kubectl", &["create", "--dry-run=server", "-f", file.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Warning"), "creating the CRD warned: {stderr}");
}
