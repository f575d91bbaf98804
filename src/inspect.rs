//! What `kubectl mesh` shows, computed from a MeshPolicy and the Pods of its namespace (no API calls here).
use std::collections::BTreeMap;
use std::fmt::Write;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::api::MeshPolicy;
use crate::assignment::Assignment;

/// One row of `kubectl mesh status`.
#[derive(Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub pod: String,
    pub node_id: String,
    /// The Pod's Node.
    pub node: String,
    /// Its failure domain, from the Pod's `topologyKey` label or else its Node's, as the operator reads it.
    pub zone: String,
    /// The agents it dials and those that dial it: Pod names where known, else short node ids.
    pub dials: Vec<String>,
    pub accepts: Vec<String>,
    pub links: usize,
    pub eligibility: String,
}

fn current(pod: &Pod) -> Option<Assignment> {
    Assignment::from_annotations(pod.annotations())
}

fn node_id(policy: &MeshPolicy, pod: &Pod) -> String {
    pod.annotations().get(&policy.spec.identity.node_id_annotation).cloned().unwrap_or_else(|| "-".into())
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Rows for every Pod the policy selects, by Pod name. `node_zone` gives a Node's `topologyKey` label.
pub fn status_rows(policy: &MeshPolicy, pods: &[Pod], node_zone: &dyn Fn(&str) -> Option<String>) -> Vec<AgentRow> {
    let excluded: BTreeMap<&str, &str> =
        policy.status.iter().flat_map(|s| s.excluded.iter()).map(|e| (e.pod.as_str(), e.reason.as_str())).collect();
    let names: BTreeMap<String, String> =
        pods.iter().map(|p| (node_id(policy, p), p.name_any())).filter(|(id, _)| id != "-").collect();
    let name_of = |id: &str| names.get(id).cloned().unwrap_or_else(|| short(id));
    let mut rows: Vec<AgentRow> = pods
        .iter()
        .filter(|p| policy.selects(*p))
        .map(|p| {
            let name = p.name_any();
            let own = current(p).filter(|a| a.policy == policy.name_any());
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            let zone = policy
                .spec
                .topology_key
                .as_ref()
                .and_then(|k| p.labels().get(k).cloned().or_else(|| node.as_deref().and_then(node_zone)));
            let eligibility = match (&own, excluded.get(name.as_str())) {
                (_, Some(why)) => why.to_string(),
                (Some(_), None) => "eligible".into(),
                (None, None) => "not assigned".into(),
            };
            AgentRow {
                node_id: node_id(policy, p),
                node: node.unwrap_or_else(|| "-".into()),
                zone: zone.unwrap_or_else(|| "-".into()),
                dials: own.iter().flat_map(|a| a.peers.iter().map(|x| name_of(&x.node_id))).collect(),
                accepts: own.iter().flat_map(|a| a.accepts.iter().map(|x| name_of(x))).collect(),
                links: own.as_ref().map_or(0, Assignment::links),
                eligibility,
                pod: name,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.pod.cmp(&b.pod));
    rows
}

/// The rows as a table whose columns fit their widest cell; `wide` adds the full node id, the Node and
/// the accepts. `policy` (and `namespace`) columns come first when the rows are of several policies.
pub fn status_table(rows: &[(String, String, AgentRow)], scope: Scope, wide: bool, headers: bool) -> String {
    let mut head = match scope {
        Scope::Policy => vec![],
        Scope::Namespace => vec!["POLICY"],
        Scope::All => vec!["NAMESPACE", "POLICY"],
    };
    head.extend(["POD", "NODE-ID", "ZONE", "LINKS", "DIALS"]);
    if wide {
        head.extend(["ACCEPTS", "NODE"]);
    }
    head.push("ELIGIBILITY");
    let mut cells: Vec<Vec<String>> = vec![];
    for (ns, policy, r) in rows {
        let mut row = match scope {
            Scope::Policy => vec![],
            Scope::Namespace => vec![policy.clone()],
            Scope::All => vec![ns.clone(), policy.clone()],
        };
        let id = if wide { r.node_id.clone() } else { short(&r.node_id) };
        row.extend([r.pod.clone(), id, r.zone.clone(), r.links.to_string(), list(&r.dials)]);
        if wide {
            row.extend([list(&r.accepts), r.node.clone()]);
        }
        row.push(r.eligibility.clone());
        cells.push(row);
    }
    table(&head, &cells, headers)
}

/// Which rows a status table holds: one policy's, a namespace's policies', or every namespace's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Policy,
    Namespace,
    All,
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "-".into() } else { items.join(",") }
}

/// `s` safe to print on a terminal: annotations, reasons and URLs are not ours, and a control character in
/// one (an escape sequence) must not reach the user's terminal as is. Each becomes `\u{..}`, as Rust's
/// `escape_debug` writes it; a newline too, so a table row stays one line.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    // Bidirectional overrides and isolates too: they reorder what the terminal shows.
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return s.into();
    }
    s.chars().map(|c| if unsafe_char(c) { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() }).collect()
}

/// Columns padded to their widest cell, two spaces apart, as kubectl prints them.
fn table(head: &[&str], rows: &[Vec<String>], headers: bool) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| printable(c).into_owned()).collect()).collect();
    let rows = &rows;
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let padded = cells
            .iter()
            .enumerate()
            .map(|(i, c)| if i == last { c.to_string() } else { format!("{c:<w$}", w = widths[i]) });
        padded.collect::<Vec<_>>().join("  ") + "\n"
    };
    let mut out = if headers { line(head.to_vec()) } else { String::new() };
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Why `pod` has, or lacks, peers.
pub fn explain(pod: &Pod, policies: &[MeshPolicy]) -> String {
    let name = pod.name_any();
    let selecting: Vec<&MeshPolicy> = policies.iter().filter(|p| p.selects(pod)).collect();
    let Some(policy) =
        selecting.iter().min_by_key(|p| (p.metadata.creation_timestamp.as_ref().map(|t| t.0), p.name_any()))
    else {
        return format!("{name}: not selected by any MeshPolicy in its namespace, so it gets no peers");
    };
    let mut out = String::new();
    if selecting.len() > 1 {
        let others: Vec<String> = selecting.iter().map(|p| p.name_any()).filter(|n| *n != policy.name_any()).collect();
        let _ = writeln!(
            out,
            "conflict: also selected by {}; the older policy {} owns it",
            others.join(", "),
            policy.name_any()
        );
    }
    let status = policy.status.clone().unwrap_or_default();
    let cond = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    if let Some(c) = cond("RendezvousReachable").filter(|c| c.status == "False") {
        let _ = writeln!(
            out,
            "rendezvous: unreachable ({}: {}); planning from the last presence read",
            printable(&c.reason),
            printable(&c.message)
        );
    }
    if let Some(c) = cond("MeshAsPlanned").filter(|c| c.status == "False") {
        let _ = writeln!(out, "links: {}", printable(&c.message));
    }
    match (current(pod).filter(|a| a.policy == policy.name_any()), status.excluded.iter().find(|e| e.pod == name)) {
        (_, Some(e)) => {
            let why = printable(&e.reason);
            let _ = writeln!(out, "{name}: selected by {}, but left out of the mesh: {why}", policy.name_any());
        }
        (Some(a), None) => {
            let (links, peers) = (a.links(), &a.peers);
            let _ =
                writeln!(out, "{name}: in the mesh of {} with {links} links; dials {}", policy.name_any(), peers.len());
            for p in peers {
                let _ = writeln!(out, "  → {} {}", printable(&short(&p.node_id)), printable(&p.url));
            }
            for s in &a.standbys {
                let (id, stands_for) = (short(&s.node_id), short(&s.stands_for));
                let (id, stands_for) = (printable(&id), printable(&stands_for));
                let _ = writeln!(out, "  standby → {id} while {stands_for} is lost (rank {})", s.rank);
            }
            if !a.standby_accepts.is_empty() {
                let _ = writeln!(out, "  standby for {} peers that may dial it", a.standby_accepts.len());
            }
            for u in status.unusable_links.iter().filter(|u| u.reported_by == name || u.peer == name) {
                let (by, peer) = (printable(&u.reported_by), printable(&u.peer));
                let other = if u.reported_by == name { &peer } else { &by };
                let when = u.retry_after.0.strftime("%Y-%m-%dT%H:%M:%SZ");
                let _ = writeln!(
                    out,
                    "  avoids {other}: {by} could not reach {peer} ({} failures; may be planned again after {when})",
                    u.failures
                );
            }
        }
        (None, None) => {
            let _ = writeln!(
                out,
                "{name}: selected by {} but not assigned yet (mode {:?})",
                policy.name_any(),
                policy.spec.mode
            );
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

/// The published mesh as Graphviz or Mermaid: one edge per link, from dialer to peer, labelled by Pod.
pub fn graph(policy: &MeshPolicy, pods: &[Pod], format: GraphFormat) -> String {
    let mine: Vec<(&Pod, Assignment)> =
        pods.iter().filter_map(|p| current(p).filter(|a| a.policy == policy.name_any()).map(|a| (p, a))).collect();
    let by_id: BTreeMap<String, String> = mine.iter().map(|(p, _)| (node_id(policy, p), p.name_any())).collect();
    // A node id is not ours: printable, and without the quote that would end a dot string.
    let label = |id: &str| by_id.get(id).cloned().unwrap_or_else(|| printable(&short(id)).replace('"', "\\\""));
    let mut out = String::new();
    match format {
        GraphFormat::Dot => {
            let _ = writeln!(out, "digraph \"{}\" {{", policy.name_any());
            for (p, a) in &mine {
                let _ = writeln!(out, "  \"{}\";", p.name_any());
                for peer in &a.peers {
                    let _ = writeln!(out, "  \"{}\" -> \"{}\";", p.name_any(), label(&peer.node_id));
                }
            }
            out.push_str("}\n");
        }
        GraphFormat::Mermaid => {
            out.push_str("graph LR\n");
            for (p, a) in &mine {
                for peer in &a.peers {
                    let _ = writeln!(
                        out,
                        "  {}[{}] --> {}[{}]",
                        mermaid_id(&p.name_any()),
                        p.name_any(),
                        mermaid_id(&label(&peer.node_id)),
                        label(&peer.node_id)
                    );
                }
            }
        }
    }
    out
}

fn mermaid_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> MeshPolicy {
        serde_json::from_value(json!({"apiVersion": "agentmesh.dev/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": "mesh", "namespace": "ci"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "rendezvous": {"url": "http://rv"}, "topologyKey": "zone"},
            "status": {"excluded": [{"pod": "b", "reason": "Pod is not Ready"}],
                       "unusableLinks": [{"reportedBy": "a", "peer": "b", "failures": 2, "retryAfter": "2026-12-07T10:00:00Z"}]}}))
        .unwrap()
    }

    fn pod(name: &str, id: &str, peers: &[&str]) -> Pod {
        let peers: Vec<_> = peers.iter().map(|p| json!({"nodeId": p, "url": format!("ws://{p}")})).collect();
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "ci", "labels": {"app": "agent", "zone": "z1"},
            "annotations": {"agentmesh.dev/node-id": id, "agentmesh.dev/peers": serde_json::to_string(&peers).unwrap(),
                            "agentmesh.dev/links": peers.len().to_string(), "agentmesh.dev/policy": "mesh"}}}),
        )
        .unwrap()
    }

    #[test]
    fn status_explain_and_graph() {
        let pods = vec![pod("a", "aa", &["cc"]), pod("b", "bb", &[]), pod("c", "cc", &[])];
        let rows = status_rows(&policy(), &pods, &|_| None);
        assert_eq!(rows[0].dials, vec!["c".to_string()]);
        assert_eq!(rows[0].eligibility, "eligible");
        assert_eq!(rows[1].eligibility, "Pod is not Ready");
        assert!(explain(&pods[1], &[policy()]).contains("left out of the mesh: Pod is not Ready"));
        assert!(explain(&pods[0], &[policy()]).contains("1 links"));
        assert!(
            explain(&pods[0], &[policy()]).contains(
                "avoids b: a could not reach b (2 failures; may be planned again after 2026-12-07T10:00:00Z)"
            ),
            "{}",
            explain(&pods[0], &[policy()])
        );
        let mut standing = pods[0].clone();
        let annotations = standing.metadata.annotations.as_mut().unwrap();
        annotations.insert("agentmesh.dev/standbys".into(), r#"[{"nodeId":"dd","url":"ws://dd","for":"cc"}]"#.into());
        annotations.insert("agentmesh.dev/standby-accepts".into(), r#"["ee"]"#.into());
        let told = explain(&standing, &[policy()]);
        assert!(
            told.contains("standby → dd while cc is lost (rank 1)") && told.contains("standby for 1 peers"),
            "{told}"
        );
        let mut other = pods[0].clone();
        other.metadata.labels = None;
        assert!(explain(&other, &[policy()]).contains("not selected"));
        assert_eq!(graph(&policy(), &pods, GraphFormat::Dot).matches("->").count(), 1);
        assert!(graph(&policy(), &pods, GraphFormat::Mermaid).contains("a[a] --> c[c]"));
    }

    /// A node id, URL or reason with control characters (a terminal escape) is printed escaped, in the
    /// table, in explain and in the graph.
    #[test]
    fn control_characters_never_reach_the_terminal() {
        let evil = "\u{1b}]0;owned\u{7}\u{202e}\u{1b}[31m\"x";
        let pods = vec![pod("a", "aa", &[evil]), pod("c", &format!("{evil}c"), &[])];
        let rows: Vec<_> =
            status_rows(&policy(), &pods, &|_| None).into_iter().map(|r| ("ci".into(), "mesh".into(), r)).collect();
        let outputs = [
            status_table(&rows, Scope::Policy, true, true),
            explain(&pods[0], &[policy()]),
            graph(&policy(), &pods, GraphFormat::Dot),
            graph(&policy(), &pods, GraphFormat::Mermaid),
        ];
        for out in outputs {
            assert!(!out.chars().any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'), "{out:?}");
            assert!(out.contains("\\u{1b}"), "{out:?}");
        }
    }

    /// Columns fit their widest cell however long a Pod name is; a Pod without the zone label takes its
    /// Node's, as the operator does.
    #[test]
    fn tables_align_and_zones_fall_back_to_the_node() {
        let long = "a-pod-name-longer-than-any-column-width-before";
        let mut pods = vec![pod(long, "aa", &["cc"]), pod("c", "cc", &[])];
        pods[1].metadata.labels = Some([("app".to_string(), "agent".to_string())].into());
        pods[1].spec = Some(serde_json::from_value(json!({"nodeName": "n7", "containers": []})).unwrap());
        let zone = |node: &str| (node == "n7").then(|| "z7".to_string());
        let rows: Vec<_> = status_rows(&policy(), &pods, &zone)
            .into_iter()
            .map(|r| ("ci".to_string(), "mesh".to_string(), r))
            .collect();
        assert_eq!(rows[1].2.zone, "z7");
        let out = status_table(&rows, Scope::Policy, false, true);
        // The second column starts two spaces after the longest Pod name, on every line.
        let second = |l: &str| l.as_bytes()[long.len()..long.len() + 3].to_vec();
        assert!(out.lines().all(|l| second(l)[..2] == *b"  " && second(l)[2] != b' '), "{out}");
        let at = |l: &str| l.find(if l.starts_with("POD") { "ZONE" } else { "z" }).unwrap();
        assert!(out.lines().map(at).collect::<std::collections::BTreeSet<_>>().len() == 1, "{out}");
        assert_eq!(status_table(&rows, Scope::All, true, false).lines().count(), 2, "no header");
        assert!(status_table(&rows, Scope::All, true, true).starts_with("NAMESPACE  POLICY  POD"));
    }
}
