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
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Pod",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    for vap in docs.iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy") {
        let who = vap["spec"]["matchConditions"][0]["expression"].as_str().unwrap();
        assert!(who.contains("system:serviceaccount:ops:mo'"), "{who}");
    }
    let fence = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding" && d["metadata"]["name"] == "ops-mo-leader");
    let lease = &fence.expect("the leader fence's binding")["spec"]["paramRef"];
    assert_eq!(
        (&lease["name"], &lease["namespace"]),
        (&"mo".into(), &"ops".into()),
        "the fence reads the replicas' Lease"
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
    // `helm test` checks the release through its Service, and is not counted by it or the PDB.
    let test = docs.iter().find(|d| d["kind"] == "Pod").unwrap();
    assert_eq!(test["metadata"]["annotations"]["helm.sh/hook"], "test");
    assert!(test["metadata"]["labels"]["app.kubernetes.io/name"].is_null(), "the Service would select the test Pod");
    assert_eq!(test["spec"]["containers"][0]["args"][0], "check");
    assert_eq!(test["spec"]["containers"][0]["args"][1], "--host=$(MO_METRICS_SERVICE_HOST)");

    let docs = render(
        "mo",
        "ops",
        &[
            "watchNamespaces[0]=ci",
            "monitoring.scrape.enabled=true",
            "networkPolicy.enabled=true",
            "podDisruptionBudget.enabled=true",
            "joinTokenSecrets[0].namespace=ci",
            "joinTokenSecrets[0].name=tok",
            "admissionPolicy.enabled=false",
            "podSelector=agentmesh.dev/agent",
            "logLevel=info\\,mesh_operator=debug",
            "podAnnotations.team=ci",
            "podLabels.tier=control",
            "podLabels.app\\.kubernetes\\.io/name=other",
            "priorityClassName=system-cluster-critical",
            "imagePullSecrets[0].name=registry",
            "topologySpreadConstraints[0].maxSkew=1",
            "topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
            "topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
        ],
    );
    // What users expect of an operator chart: where and how its Pods run, and how it logs.
    let template = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"];
    let env = template["spec"]["containers"][0]["env"].as_sequence().unwrap();
    assert!(env.iter().any(|e| e["name"] == "RUST_LOG" && e["value"] == "info,mesh_operator=debug"), "{env:?}");
    assert_eq!(template["metadata"]["annotations"]["team"], "ci");
    assert_eq!(template["metadata"]["labels"]["tier"], "control");
    assert_eq!(template["metadata"]["labels"]["app.kubernetes.io/name"], "mesh-operator", "the chart's labels win");
    assert_eq!(template["spec"]["priorityClassName"], "system-cluster-critical");
    assert_eq!(template["spec"]["imagePullSecrets"][0]["name"], "registry");
    assert_eq!(template["spec"]["topologySpreadConstraints"][0]["topologyKey"], "topology.kubernetes.io/zone");
    let args =
        docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone();
    assert!(args.as_sequence().unwrap().iter().any(|a| a == "--pod-selector=agentmesh.dev/agent"), "{args:?}");
    assert!(!c["args"].as_sequence().unwrap().iter().any(|a| a.as_str().unwrap().starts_with("--pod-selector")));
    let k = kinds(&docs);
    assert!(!k.iter().any(|k| k.starts_with("ValidatingAdmissionPolicy")), "{k:?}");
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

    // By default the replicas prefer different nodes; an affinity given replaces that.
    let affinity = |docs: &[serde_yaml::Value]| {
        docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"]["affinity"].clone()
    };
    let soft =
        &affinity(&render("mo", "ops", &[]))["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(soft[0]["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname", "{soft:?}");
    let given = affinity(&render("mo", "ops", &["affinity.nodeAffinity.x=y"]));
    assert!(given["podAntiAffinity"].is_null() && !given["nodeAffinity"].is_null(), "{given:?}");
    overrides_and_extras();

    // values.schema.json rejects what the chart cannot honour, naming the value.
    for (set, named) in [
        ("replicaCount=0", "replicaCount"),
        ("logLevel=info debug", "logLevel"),
        ("monitoring.scrape.enable=true", "enable"),
        ("monitoring.scrape.kind=Probe", "kind"),
        ("metrics.prot=9000", "prot"),
        ("extraArgs[0]=oops", "extraArgs"),
    ] {
        let bad = tool("helm", &["template", "mo", CHART, "--kube-version", "1.36.3", "--set", set]);
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && stderr.contains(named), "--set {set}: {stderr}");
    }
}

/// The CRD is a template: rendered from the generated one, kept on uninstall unless `crds.keep=false`,
/// left out with `crds.enabled=false`.
#[test]
fn the_crd_is_templated_from_the_generated_one() {
    let crd_of = |docs: &[serde_yaml::Value]| docs.iter().find(|d| d["kind"] == "CustomResourceDefinition").cloned();
    let generated: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{REPO}/crds/meshpolicy.yaml")).unwrap()).unwrap();
    let crd = crd_of(&render("mo", "ops", &[])).expect("the CRD");
    // Helm reads numbers as floats: 64.0 and 64 are one value to the API server.
    fn floats(v: serde_yaml::Value) -> serde_json::Value {
        match serde_json::to_value(v).unwrap() {
            serde_json::Value::Number(n) => json!(n.as_f64()),
            serde_json::Value::Array(a) => a.into_iter().map(|v| floats(serde_yaml::to_value(v).unwrap())).collect(),
            serde_json::Value::Object(m) => {
                m.into_iter().map(|(k, v)| (k, floats(serde_yaml::to_value(v).unwrap()))).collect()
            }
            other => other,
        }
    }
    assert!(
        floats(crd["spec"].clone()) == floats(generated["spec"].clone()),
        "the chart's CRD is not the generated one"
    );
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    let unkept = crd_of(&render("mo", "ops", &["crds.keep=false"])).unwrap();
    assert!(unkept["metadata"]["annotations"]["helm.sh/resource-policy"].is_null(), "{unkept:?}");
    assert!(crd_of(&render("mo", "ops", &["crds.enabled=false"])).is_none());
}

/// `helm upgrade` applies a changed CRD (Helm never upgrades one from crds/), and `helm uninstall` leaves
/// it. The release takes over the CRD the other tests installed, as `--take-ownership` says.
#[tokio::test]
async fn helm_upgrade_applies_a_changed_crd() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let admin = client().await;
    install_crd(&admin).await;
    let ns = namespace(&admin, "crd-upgrade").await;
    let release = format!("crd-{}", &ns[ns.len() - 6..]);
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let cap_doc = || async {
        let crd = crds.get("meshpolicies.agentmesh.dev").await.unwrap();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["maxPeers"]["description"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let original = cap_doc().await;
    let helm = |args: &[&str]| {
        let base = ["-n", ns.as_str(), "--set", "admissionPolicy.enabled=false", "--set", "replicaCount=1"];
        ok(tool("helm", &[args, &base[..]].concat()), &format!("helm {args:?}"))
    };
    helm(&["install", &release, CHART, "--take-ownership"]);
    // The next release of the chart, whose CRD documents a field differently.
    let next = tempfile::tempdir().unwrap();
    copy_dir(std::path::Path::new(CHART), next.path());
    let crd_file = next.path().join("files/crds/meshpolicy.yaml");
    let changed =
        std::fs::read_to_string(&crd_file).unwrap().replace("description: 'The cap:", "description: 'The cap (next):");
    assert!(changed.contains("The cap (next):"), "the CRD's maxPeers description moved");
    std::fs::write(&crd_file, changed).unwrap();
    helm(&["upgrade", &release, next.path().to_str().unwrap()]);
    let upgraded = cap_doc().await;
    assert!(upgraded.starts_with("The cap (next):"), "helm upgrade left the CRD as it was: {upgraded:?}");
    helm(&["upgrade", &release, CHART]);
    assert_eq!(cap_doc().await, original, "the upgrade back restores it");
    ok(tool("helm", &["uninstall", &release, "-n", &ns, "--wait"]), "helm uninstall");
    assert!(crds.get_opt("meshpolicies.agentmesh.dev").await.unwrap().is_some(), "helm uninstall deleted the CRD");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every metric name the operator and the agent library export, with the suffixes Prometheus adds to a
/// counter's and a histogram's samples.
fn exported_metric_names() -> std::collections::BTreeSet<String> {
    let mut agent = prometheus_client::registry::Registry::default();
    agent_mesh::metrics::Metrics::default().register(&mut agent);
    let mut text = populated().encode();
    prometheus_client::encoding::text::encode(&mut text, &agent).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

/// The operator's metrics with one series in every family: an empty family is not encoded at all.
fn populated() -> mesh_operator::telemetry::Metrics {
    use mesh_operator::telemetry::*;
    let m = Metrics::default();
    let policy = PolicyLabel::new("ci", "p");
    m.reconciles.get_or_create(&ResultLabel { result: "ok".into() }).inc();
    m.pod_patches.get_or_create(&ResultLabel { result: "ok".into() }).inc();
    m.step_duration.get_or_create(&StepLabel { step: "decide" }).observe(0.1);
    m.reconcile_errors.get_or_create(&KindLabel { kind: "status".into() }).inc();
    m.watch_errors.get_or_create(&WatchLabel { watch: "pods", kind: "expired" }).inc();
    m.presence_fetches.get_or_create(&policy.with("ok")).inc();
    m.presence_errors.get_or_create(&policy.with("Timeout")).inc();
    m.presence_duration.get_or_create(&policy).observe(0.1);
    m.presence_bytes.get_or_create(&policy).inc();
    for gauge in [&m.selected, &m.eligible, &m.assigned, &m.links, &m.max_degree, &m.max_peers] {
        gauge.get_or_create(&policy).set(1);
    }
    m.set_condition(&policy, "Ready", "True");
    m
}

/// The metric names a PromQL expression uses: the identifiers with one of our prefixes.
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| ["mesh_operator_", "agentmesh_", "process_"].iter().any(|p| w.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// The chart's alerts: promtool checks them and runs their unit tests (tests/monitoring), and each names
/// only metrics that are exported and has a runbook section in docs/operations.md.
#[test]
fn alerts_pass_their_promtool_tests() {
    let docs = render("mo", "ops", &["monitoring.alerts.enabled=true", "monitoring.alerts.agents=true"]);
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").expect("a PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/monitoring/alerts.test.yaml");
    std::fs::copy(tests, dir.path().join("alerts.test.yaml")).unwrap();
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/promtool.sh")).output().unwrap();
    let promtool = ok(out, "hack/promtool.sh").trim().to_string();
    let run =
        |args: &[&str]| std::process::Command::new(&promtool).args(args).current_dir(dir.path()).output().unwrap();
    ok(run(&["check", "rules", "rules.yaml"]), "promtool check rules");
    ok(run(&["test", "rules", "alerts.test.yaml"]), "promtool test rules");

    let exported = exported_metric_names();
    let runbooks = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let tested = std::fs::read_to_string(tests).unwrap();
    for r in rules {
        let (alert, expr) = (r["alert"].as_str().unwrap(), r["expr"].as_str().unwrap());
        for m in metrics_in(expr) {
            assert!(exported.contains(&m), "alert {alert} uses {m}, which nothing exports");
        }
        let heading = format!("### {alert}\n");
        assert!(runbooks.contains(&heading), "docs/operations.md has no runbook section {heading:?}");
        assert!(tested.contains(&format!("alertname: {alert}")), "{alert} has no promtool test");
    }
}

/// The dashboard: valid JSON whose every query names only metrics that are exported.
#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let docs = render("mo", "ops", &["monitoring.dashboard.enabled=true"]);
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "the sidecar's label");
    let json: serde_json::Value = serde_json::from_str(cm["data"]["mesh-operator.json"].as_str().unwrap()).unwrap();
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    exprs(&json, &mut found);
    assert!(found.len() > 15, "the walk finds the panels' queries: {found:?}");
    let exported = exported_metric_names();
    let used: std::collections::BTreeSet<String> = found.iter().flat_map(|e| metrics_in(e)).collect();
    let unknown: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics nothing exports: {unknown:?}");
    for m in ["mesh_operator_policy_condition", "mesh_operator_pod_patches_total", "process_resident_memory_bytes"] {
        assert!(used.contains(m), "the dashboard shows {m}");
    }
}

/// The chart's monitoring objects, and the agents' example PodMonitor, against the Prometheus Operator's
/// own CRDs (from its pinned Go module): the API server, validating fields strictly, accepts each as
/// rendered.
#[tokio::test]
async fn monitoring_objects_fit_the_prometheus_operator_crds() {
    let admin = client().await;
    let out = std::process::Command::new(format!("{REPO}/hack/monitoring-crds.sh")).output().unwrap();
    let crds = ok(out, "hack/monitoring-crds.sh").trim().to_owned();
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let file = format!("{crds}/monitoring.coreos.com_{kind}.yaml");
        ok(tool("kubectl", &["apply", "--server-side", "--force-conflicts", "-f", &file]), "kubectl apply a CRD");
        let crd = format!("crd/{kind}.monitoring.coreos.com");
        ok(tool("kubectl", &["wait", "--for", "condition=established", "--timeout=60s", &crd]), "kubectl wait");
    }
    let ns = namespace(&admin, "monitoring").await;
    let dir = tempfile::tempdir().unwrap();
    for kind in ["ServiceMonitor", "PodMonitor"] {
        let sets = [
            "monitoring.scrape.enabled=true".to_string(),
            format!("monitoring.scrape.kind={kind}"),
            "monitoring.scrape.relabelings[0].targetLabel=team".into(),
            "monitoring.scrape.relabelings[0].replacement=ci".into(),
            "monitoring.alerts.enabled=true".into(),
            "monitoring.alerts.agents=true".into(),
            "monitoring.dashboard.enabled=true".into(),
        ];
        let mut args = vec!["template", "mo", CHART, "--namespace", &ns, "--kube-version", "1.36.3"];
        for s in &sets {
            args.extend(["--set", s]);
        }
        for t in ["templates/monitor.yaml", "templates/prometheusrule.yaml", "templates/dashboard.yaml"] {
            args.extend(["--show-only", t]);
        }
        let file = dir.path().join(format!("{kind}.yaml"));
        std::fs::write(&file, ok(tool("helm", &args), "helm template")).unwrap();
        let apply = ["apply", "--dry-run=server", "--validate=strict", "-n", &ns, "-f", file.to_str().unwrap()];
        ok(tool("kubectl", &apply), &format!("the chart's {kind}, PrometheusRule and dashboard"));
    }
    let example = format!("{REPO}/examples/cluster/agents-podmonitor.yaml");
    ok(tool("kubectl", &["apply", "--dry-run=server", "--validate=strict", "-n", &ns, "-f", &example]), "the example");
}

/// Scraping: a ServiceMonitor or a PodMonitor, keeping the policies' namespace label.
#[test]
fn the_scrape_is_a_service_or_pod_monitor() {
    for (kind, endpoints) in [("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")] {
        let docs = render(
            "mo",
            "ops",
            &[
                "monitoring.scrape.enabled=true",
                &format!("monitoring.scrape.kind={kind}"),
                "monitoring.scrape.labels.release=prom",
            ],
        );
        let m = docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
        let e = &m["spec"][endpoints][0];
        assert_eq!((&e["port"], &e["honorLabels"]), (&"metrics".into(), &true.into()), "{kind}: {e:?}");
        // The job label the alerts select by, unique per install whatever the kind.
        assert_eq!(e["relabelings"][0]["targetLabel"], "job");
        assert_eq!(e["relabelings"][0]["replacement"], "ops/mo");
        assert_eq!(m["metadata"]["labels"]["release"], "prom");
    }
}

/// The chart's README lists every value with its comment from values.yaml; it is generated, and this
/// fails when it was not regenerated after a change.
#[test]
fn the_chart_readme_matches_the_values() {
    let out = std::process::Command::new("python3")
        .args([&format!("{REPO}/hack/chart-readme.py"), "--check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Names, the ServiceAccount, extra flags and environment, the metrics NetworkPolicy's peers, and the
/// chart as a subchart.
fn overrides_and_extras() {
    let docs = render(
        "mo",
        "ops",
        &[
            "fullnameOverride=mesh",
            "extraArgs[0]=--apply-concurrency=32",
            "extraEnv[0].name=HTTPS_PROXY",
            "extraEnv[0].value=http://proxy:3128",
        ],
    );
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deploy["metadata"]["name"], "mesh");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert!(c["args"].as_sequence().unwrap().iter().any(|a| a == "--apply-concurrency=32"), "{c:?}");
    assert!(c["env"].as_sequence().unwrap().iter().any(|e| e["name"] == "HTTPS_PROXY"), "{c:?}");
    let docs = render("mo", "ops", &["nameOverride=mesh"]);
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deploy["metadata"]["name"], "mo-mesh");
    assert_eq!(deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "mesh");

    let sa = ["serviceAccount.create=false", "serviceAccount.name=ci-sa"];
    let docs = render("mo", "ops", &sa);
    assert!(!kinds(&docs).contains(&"ServiceAccount".to_string()), "an existing ServiceAccount is not created");
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deploy["spec"]["template"]["spec"]["serviceAccountName"], "ci-sa");
    for binding in docs.iter().filter(|d| d["kind"].as_str().unwrap().ends_with("RoleBinding")) {
        assert_eq!(binding["subjects"][0]["name"], "ci-sa", "{binding:?}");
    }
    for vap in docs.iter().filter(|d| d["kind"] == "ValidatingAdmissionPolicy") {
        let who = vap["spec"]["matchConditions"][0]["expression"].as_str().unwrap();
        assert!(who.contains("system:serviceaccount:ops:ci-sa'"), "{who}");
    }
    let unnamed = tool("helm", &["template", "mo", CHART, "--kube-version", "1.36.3", "--set", sa[0]]);
    assert!(!unnamed.status.success() && String::from_utf8_lossy(&unnamed.stderr).contains("serviceAccount.name"));
    let docs = render("mo", "ops", &["serviceAccount.annotations.team=ci"]);
    let account = docs.iter().find(|d| d["kind"] == "ServiceAccount").unwrap();
    assert_eq!(account["metadata"]["annotations"]["team"], "ci");

    let docs = render("mo", "ops", &["networkPolicy.enabled=true"]);
    let np = docs.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    assert!(np["spec"]["ingress"][0]["from"][0]["podSelector"].is_mapping(), "only its namespace's Pods: {np:?}");

    // As a subchart, with global values and its own.
    let parent = tempfile::tempdir().unwrap();
    let charts = parent.path().join("charts");
    std::fs::create_dir(&charts).unwrap();
    ok(std::process::Command::new("cp").args(["-r", CHART, charts.to_str().unwrap()]).output().unwrap(), "cp -r");
    std::fs::write(parent.path().join("Chart.yaml"), "apiVersion: v2\nname: platform\nversion: 1.0.0\n").unwrap();
    std::fs::write(
        parent.path().join("values.yaml"),
        "global: {registry: example.com}\nmesh-operator: {replicaCount: 1}\n",
    )
    .unwrap();
    let yaml = ok(
        tool("helm", &["template", "p", parent.path().to_str().unwrap(), "--kube-version", "1.36.3"]),
        "helm template of a parent chart",
    );
    assert!(yaml.contains("kind: Deployment") && yaml.contains("replicas: 1"), "{yaml}");
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
    // Render and apply the chart (the CRD is already installed, as for a second install in a cluster).
    let args = [
        "template",
        release.as_str(),
        CHART,
        "--namespace",
        ns.as_str(),
        "--kube-version",
        "1.36.3",
        "--skip-tests",
        "--set",
        "crds.enabled=false",
        "--set",
        &format!("joinTokenSecrets[0].namespace={ns}"),
        "--set",
        "joinTokenSecrets[0].name=rv-token",
        "--set",
        &format!("caConfigMaps[0].namespace={ns}"),
        "--set",
        "caConfigMaps[0].name=rv-ca",
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
        // The token Secret is watched (list and watch scoped to its name), never read by name per poll.
        (vec!["watch", "secrets/rv-token", "-n", &ns], true),
        (vec!["list", "secrets/rv-token", "-n", &ns], true),
        (vec!["get", "secrets/rv-token", "-n", &ns], false),
        (vec!["watch", "secrets/other", "-n", &ns], false),
        (vec!["list", "secrets", "-n", &ns], false),
        // Likewise the CA ConfigMap a policy may name, and no other ConfigMap.
        (vec!["watch", "configmaps/rv-ca", "-n", &ns], true),
        (vec!["get", "configmaps/rv-ca", "-n", &ns], false),
        (vec!["list", "configmaps", "-n", &ns], false),
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
    let token = replica_token(&admin, &ns, sa, "chart-sa").await;
    let sa_client = client_with_token(&token).await;
    let rv = Rendezvous::start().await;
    rv.state.lock().unwrap().token = Some("join".into());
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({"metadata": {"name": "rv-token",
            "annotations": {"agentmesh.dev/rendezvous-urls": rv.url()}}, "stringData": {"token": "join"}}))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let history = History::start(&admin, &ns, 3).await;
    let op = Operator::start_watching(sa_client, (&release, &ns), &[&ns], "chart-sa", true).await;
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
    for kind in mesh_operator::controller::Error::KINDS {
        let errors =
            op.metrics.reconcile_errors.get_or_create(&mesh_operator::telemetry::KindLabel { kind: kind.into() });
        assert_eq!(errors.get(), 0, "reconcile errors of kind {kind}");
    }
    // Revoking the grant stops the token: the Secret's watch restarts within its timeout, is refused, and
    // the policy says so, naming the Secret (the mesh stays as planned).
    ok(tool("kubectl", &["delete", "rolebinding", "-n", &ns, &format!("{release}-token-rv-token")]), "revoke");
    wait_for("the revoked token Secret to be reported", Duration::from_secs(90), || async {
        let p = policies.get("mesh").await.ok()?;
        let c = p.status?.conditions.into_iter().find(|c| c.type_ == "RendezvousReachable")?;
        (c.status == "False" && c.reason == "JoinTokenUnavailable" && c.message.contains("rv-token")).then_some(())
    })
    .await;
    op.kill().await;
    assert!(history.assert_clean() > 0);
}

/// `watchNamespaces` with two namespaces: Roles in exactly those, the controller (with the chart's
/// ServiceAccount) serving both, and the admission policy holding its Pod and MeshPolicy writes to the
/// fields it owns, which RBAC alone cannot.
#[tokio::test]
async fn namespace_scoped_chart_serves_the_listed_namespaces_and_admission_narrows_writes() {
    let admin = client().await;
    install_crd(&admin).await;
    let (ops, ci_a, ci_b) =
        (namespace(&admin, "ops").await, namespace(&admin, "ci-a").await, namespace(&admin, "ci-b").await);
    let release = format!("mo-{}", &ops[ops.len() - 6..]);
    let namespaces = format!("watchNamespaces={{{ci_a},{ci_b}}}");
    let args = [
        "template",
        &release,
        CHART,
        "--namespace",
        &ops,
        "--kube-version",
        "1.36.3",
        "--set",
        &namespaces,
        "--set",
        "crds.enabled=false",
        "--skip-tests",
    ];
    let rendered = ok(tool("helm", &args), "helm template");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let flags = &deploy["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(flags.as_sequence().unwrap().iter().any(|a| a.as_str() == Some(&format!("--namespace={ci_a},{ci_b}"))));
    // As `helm install -n ops` does: namespaced objects without a namespace go to the release's.
    let cluster_scoped =
        ["ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"];
    let placed: Vec<String> = docs
        .into_iter()
        .map(|mut d| {
            let kind = d["kind"].as_str().unwrap().to_owned();
            if !cluster_scoped.contains(&kind.as_str()) && d["metadata"].get("namespace").is_none() {
                d["metadata"]["namespace"] = ops.clone().into();
            }
            serde_yaml::to_string(&d).unwrap()
        })
        .collect();
    let file = std::env::temp_dir().join(format!("{release}.yaml"));
    std::fs::write(&file, placed.join("---\n")).unwrap();
    ok(tool("kubectl", &["apply", "-f", file.to_str().unwrap()]), "kubectl apply");

    for (args, allowed) in [
        (vec!["patch", "pods", "-n", ci_a.as_str()], true),
        (vec!["watch", "meshpolicies.agentmesh.dev", "-n", ci_b.as_str()], true),
        (vec!["watch", "pods", "-n", ops.as_str()], false),
        (vec!["watch", "pods", "-n", "default"], false),
        (vec!["list", "pods", "--all-namespaces"], false),
        (vec!["update", "leases.coordination.k8s.io", "-n", ops.as_str()], true),
        (vec!["watch", "nodes"], true),
    ] {
        assert_eq!(can_i(&ops, &release, &args), allowed, "can-i {args:?}");
    }

    let token = replica_token(&admin, &ops, &release, "chart-sa").await;
    let sa_client = client_with_token(&token).await;
    let rv = Rendezvous::start().await;
    let histories = [History::start(&admin, &ci_a, 2).await, History::start(&admin, &ci_b, 2).await];
    let op = Operator::start_watching(sa_client.clone(), (&release, &ops), &[&ci_a, &ci_b], "chart-sa", true).await;
    for ns in [&ci_a, &ci_b] {
        fleet(&admin, ns, &rv, 5, |_| None).await;
        let mp: MeshPolicy = serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1",
            "kind": "MeshPolicy", "metadata": {"name": "mesh"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "maxPeers": 2,
                     "rendezvous": {"url": rv.url(), "pollInterval": "1s", "timeout": "1s"}}}))
        .unwrap();
        Api::<MeshPolicy>::namespaced(admin.clone(), ns).create(&PostParams::default(), &mp).await.unwrap();
    }
    for ns in [&ci_a, &ci_b] {
        let policies: Api<MeshPolicy> = Api::namespaced(admin.clone(), ns);
        wait_for(&format!("the controller to assign the 5 agents in {ns}"), Duration::from_secs(60), || async {
            let st = policies.get("mesh").await.ok()?.status?;
            (st.assigned == 5 && st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")).then_some(())
        })
        .await;
    }
    op.kill().await;
    for history in &histories {
        assert!(history.assert_clean() > 0);
    }

    // The admission policy: as the operator's ServiceAccount, only its own annotations and finalizers move.
    use kube::api::{Patch, PatchParams};
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(sa_client.clone(), &ci_a);
    let merge = |body: serde_json::Value| Patch::Merge(body);
    let denied = |r: Result<k8s_openapi::api::core::v1::Pod, kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("mesh-operator may"), "{what}: denied, but not by the admission policy: {s:?}")
        }
        other => panic!("{what} was allowed: {other:?}"),
    };
    let pp = PatchParams::default();
    denied(pods.patch("agent-0", &pp, &merge(json!({"metadata": {"labels": {"app": "other"}}}))).await, "a label");
    denied(
        pods.patch("agent-0", &pp, &merge(json!({"metadata": {"annotations": {"agentmesh.dev/node-id": "ff"}}}))).await,
        "the node-id annotation",
    );
    denied(
        pods.patch("agent-0", &pp, &merge(json!({"metadata": {"finalizers": ["x.dev/hold"]}}))).await,
        "a finalizer",
    );
    denied(pods.patch("agent-0", &pp, &merge(json!({"spec": {"activeDeadlineSeconds": 60}}))).await, "the spec");
    pods.patch("agent-0", &pp, &merge(json!({"metadata": {"annotations": {"agentmesh.dev/links": "2"}}})))
        .await
        .expect("its own annotation");
    // The leader fence: the same write from a replica in another Pod, which the Lease does not name.
    let other = client_with_token(&replica_token(&admin, &ops, &release, "chart-sb").await).await;
    let refused = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(other, &ci_a)
        .patch("agent-0", &pp, &merge(json!({"metadata": {"annotations": {"agentmesh.dev/links": "3"}}})))
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("does not hold the leader Lease")),
        "a replica the Lease does not name wrote a Pod: {refused:?}"
    );
    let policies: Api<MeshPolicy> = Api::namespaced(sa_client, &ci_a);
    let spec_change = policies.patch("mesh", &pp, &merge(json!({"spec": {"maxPeers": 8}}))).await;
    assert!(
        matches!(&spec_change, Err(kube::Error::Api(s)) if s.message.contains("may not change the spec")),
        "{spec_change:?}"
    );
    let finalizers = json!({"metadata": {"finalizers": ["agentmesh.dev/cleanup", "agentmesh.dev/test"]}});
    policies.patch("mesh", &pp, &merge(finalizers)).await.expect("finalizers are the operator's to change");
    // The same requests from anyone else are not this policy's business.
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(admin.clone(), &ci_a)
        .patch("agent-0", &pp, &merge(json!({"metadata": {"labels": {"team": "x"}}})))
        .await
        .expect("the admin is not held by the operator's policy");
}
