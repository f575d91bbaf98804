//! The `mesh-operator` command line as a user runs it: `plan` and `simulate` output, and bad input from
//! files and flags answered with a message naming what is wrong and exit code 2.
use std::io::Write;
use std::process::{Command, Output};

use serde_json::{Value, json};

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-operator"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn members(n: usize) -> String {
    let list: Vec<Value> =
        (0..n).map(|i| json!({"nodeId": format!("{i:02x}"), "domain": format!("zone-{}", i % 3)})).collect();
    Value::Array(list).to_string()
}

#[test]
fn plan_prints_each_agents_dials_and_the_metrics() {
    let out = run(&["plan", "--input", "-", "--max-peers", "4", "--format", "json"], &members(30));
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &doc["metrics"];
    assert_eq!((m["agents"].as_u64(), m["maxDegree"].as_u64(), m["minDegree"].as_u64()), (Some(30), Some(4), Some(4)));
    assert_eq!((m["links"].as_u64(), m["components"].as_u64()), (Some(60), Some(1)));
    let agents = doc["agents"].as_array().unwrap();
    let dialed: usize = agents.iter().map(|a| a["dials"].as_array().unwrap().len()).sum();
    assert_eq!(dialed, 60, "each link is dialed by exactly one end");

    let text = run(&["plan", "--input", "-"], &members(30));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("NODE-ID") && text.contains("agents 30  cap 4  links 60"), "{text}");
}

#[test]
fn plan_reads_a_presence_body_and_keeps_live_agents() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64;
    let node = |id: &str, alive: bool, age_ms: f64| json!({"node_id": id, "address": "ws://0.0.0.0:3001/crdt-sync", "alive": alive, "last_seen_ms": now - age_ms});
    let body = json!({"serverNodeId": "rv", "nowMs": now, "nodes": [
        node("a", true, 0.0), node("b", true, 0.0), node("c", true, 0.0), node("dead", false, 0.0),
        node("stale", true, 700_000.0), node("rv", true, 0.0)]});
    let out = run(&["plan", "--input", "-", "--max-peers", "2", "--format", "json"], &body.to_string());
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = doc["agents"].as_array().unwrap().iter().map(|a| a["nodeId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
}

#[test]
fn bad_input_names_the_problem_and_exits_2() {
    let cases: [(&[&str], &str, &str); 7] = [
        (&["plan", "--input", "-"], "[{\"nodeId\": \"a\",", "malformed JSON"),
        (&["plan", "--input", "-"], r#"[{"nodeId": "a"}, {"nodeId": "a"}]"#, "node id \"a\" appears more than once"),
        (&["plan", "--input", "-"], r#"[{"nodeId": ""}]"#, "node id at position 0 is empty"),
        (&["plan", "--input", "-"], "42", "expected a JSON array of members or a presence body"),
        (&["plan", "--input", "-", "--max-peers", "65"], "[]", "--max-peers"),
        (&["plan", "--input", "/nonexistent/members.json"], "", "/nonexistent/members.json"),
        (&["simulate", "--agents", "10", "--max-peers", "4", "--fail", "1.5"], "", "\"1.5\" is not a fraction"),
    ];
    for (args, input, message) in cases {
        let out = run(args, input);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: expected {message:?} in {}", stderr(&out));
    }
    let out = run(&["run", "--namespace", "ci,Bad_NS"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("\"Bad_NS\" is not a namespace name"), "{}", stderr(&out));
}

#[test]
fn simulate_compares_the_planner_with_the_seed_scheme() {
    let out = run(&["simulate", "--agents", "600", "--max-peers", "4", "--zones", "3", "--format", "json"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let keys = [
        "scheme",
        "max_links",
        "min_links",
        "components",
        "diameter",
        "connected_after_random_failure",
        "connected_after_targeted_failure",
        "connected_after_zone_loss",
        "links_changed_on_join",
        "links_changed_on_leave",
    ];
    for r in &reports {
        for k in keys {
            assert!(r.get(k).is_some(), "{k} missing from {r}");
        }
    }
    let (planner, seed) = (&reports[0], &reports[1]);
    assert_eq!(planner["max_links"], 4);
    assert!(seed["max_links"].as_u64().unwrap() > 500, "the seed's hubs accept a link from everyone: {seed}");
    assert_eq!(planner["connected_after_zone_loss"], 1.0);
    assert!(planner["connected_after_targeted_failure"].as_f64().unwrap() > 0.99);
    assert!(seed["connected_after_targeted_failure"].as_f64().unwrap() < 0.05);
}
