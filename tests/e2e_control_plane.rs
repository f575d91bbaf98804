//! Smoke tests proving the local control plane is a real one: watches, the status subresource,
//! server-side apply with managedFields, kubectl through the generated kubeconfig, and ServiceAccount
//! tokens under RBAC.
mod support;

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::*;

#[tokio::test]
async fn pod_status_change_arrives_through_a_watch() {
    let client = client().await;
    let ns = namespace(&client, "watch").await;
    create_pod(&client, &ns, "agent-0", json!({"app": "agent"}), json!({})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut stream = watcher(pods, watcher::Config::default()).applied_objects().boxed();

    set_pod_status(&client, &ns, "agent-0", "127.0.0.10", true).await;

    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(pod) = stream.next().await {
            let pod = pod.expect("a watch event");
            let status = pod.status.unwrap_or_default();
            if status.pod_ip.as_deref() == Some("127.0.0.10") {
                return status;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("timed out after 20s waiting for the Pod status change to arrive through the watch");
    assert_eq!(seen.phase.as_deref(), Some("Running"));
    let ready = seen.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
}

#[tokio::test]
async fn server_side_apply_records_the_field_manager() {
    let client = client().await;
    let ns = namespace(&client, "ssa").await;
    create_pod(&client, &ns, "agent-0", json!({"app": "agent"}), json!({})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-0",
        "annotations": {"agentmesh.dev/links": "3"}}});
    pods.patch("agent-0", &PatchParams::apply("mesh-operator-smoke"), &Patch::Apply(&patch)).await.unwrap();

    let pod = pods.get("agent-0").await.unwrap();
    assert_eq!(pod.metadata.annotations.unwrap()["agentmesh.dev/links"], "3");
    let entry = pod
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("mesh-operator-smoke"))
        .expect("a managedFields entry for the field manager");
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
    let fields = serde_json::to_string(&entry.fields_v1.unwrap()).unwrap();
    assert!(fields.contains("agentmesh.dev/links"), "managed fields: {fields}");
}

#[tokio::test]
async fn kubectl_works_through_the_generated_kubeconfig() {
    let client = client().await;
    let ns = namespace(&client, "kubectl").await;
    create_pod(&client, &ns, "agent-7", json!({"app": "agent"}), json!({})).await;
    let out = tool("kubectl", &["get", "pods", "-n", &ns, "-o", "name"]);
    assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod/agent-7");
}

#[tokio::test]
async fn service_account_tokens_authenticate_and_rbac_authorizes() {
    let client = client().await;
    let ns = namespace(&client, "rbac").await;
    let out = tool("kubectl", &["create", "token", "default", "-n", &ns, "--duration", "10m"]);
    assert!(out.status.success(), "TokenRequest failed: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();

    let sa_client = client_with_token(&token).await;
    let err = Api::<Pod>::namespaced(sa_client, &ns).list(&Default::default()).await.unwrap_err();
    // Authenticated as the ServiceAccount (not 401) and denied by RBAC (403), naming the identity.
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains(&format!("system:serviceaccount:{ns}:default")), "{}", status.message);
        }
        other => panic!("expected a 403 from RBAC, got {other:?}"),
    }
}
