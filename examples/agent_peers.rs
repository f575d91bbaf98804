//! How an agent turns its peer assignment into dial targets.
//!
//! The agent Pod mounts its annotations through a downward-API volume (see docs/agent-integration.md);
//! the kubelet rewrites `/etc/podinfo/annotations` when they change. Each line is `key="value"` with the
//! value quoted Go-style, which for this JSON content is also a valid JSON string.
//!
//!     cargo run --example agent_peers -- /etc/podinfo/annotations
use std::collections::BTreeMap;

#[derive(Debug, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct Peer {
    node_id: String,
    url: String,
}

/// Parses a downward-API annotations file into key → value.
fn parse_annotations(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, quoted) = line.split_once('=')?;
            Some((key.to_owned(), serde_json::from_str::<String>(quoted).ok()?))
        })
        .collect()
}

/// The peers this agent must dial: exactly these, replacing the seed's "first k alive peers" choice.
/// No assignment (not eligible yet, or the mesh disabled) means: dial nobody.
fn dial_targets(annotations: &BTreeMap<String, String>) -> Result<Vec<Peer>, serde_json::Error> {
    match annotations.get("agentmesh.dev/peers") {
        Some(json) => serde_json::from_str(json),
        None => Ok(Vec::new()),
    }
}

/// The node ids allowed to dial this agent: refuse (or close) any other inbound link, so the cap holds here
/// whatever order the agents' files are refreshed in. No assignment means: accept nobody.
fn accepted(annotations: &BTreeMap<String, String>) -> Result<Vec<String>, serde_json::Error> {
    match annotations.get("agentmesh.dev/accepts") {
        Some(json) => serde_json::from_str(json),
        None => Ok(Vec::new()),
    }
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/etc/podinfo/annotations".into());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let annotations = parse_annotations(&text);
    match (dial_targets(&annotations), accepted(&annotations)) {
        (Ok(peers), Ok(accepts)) => {
            for p in peers {
                println!("dial {} at {}", p.node_id, p.url);
            }
            for id in accepts {
                println!("accept {id}");
            }
        }
        (Err(e), _) | (_, Err(e)) => eprintln!("the assignment is malformed ({e}); keeping the current links"),
    }
}
