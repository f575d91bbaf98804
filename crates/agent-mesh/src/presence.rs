//! Presence as the rendezvous writes it into the shared document (the `nodes` map: node id → entry), and
//! the seed's way of choosing peers from it, reproduced for side-by-side runs.
use serde::{Deserialize, Serialize};
use yrs::{Map, Transact};

/// The document map the rendezvous writes presence into.
pub const NODES: &str = "nodes";
/// The seed ignores entries older than this.
pub const SEED_FRESHNESS_MS: f64 = 600_000.0;

/// One presence entry (the fields of the rendezvous' presence API), plus the order the rendezvous first saw
/// the node in: the seed reads the list in that order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub node_id: String,
    pub address: String,
    pub alive: bool,
    pub last_seen_ms: f64,
    #[serde(default)]
    pub hostname: Option<String>,
    pub order: u64,
}

/// Every entry in the document, in the rendezvous' order; entries that do not parse are skipped.
pub fn entries(doc: &yrs::Doc) -> Vec<Entry> {
    let map = doc.get_or_insert_map(NODES);
    let txn = doc.transact();
    let mut out: Vec<Entry> = map
        .iter(&txn)
        .filter_map(|(_, v)| v.to_string(&txn).parse::<serde_json::Value>().ok())
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    out.sort_by_key(|e| e.order);
    out
}

/// The seed's candidates: alive, with an address, not itself, seen within ten minutes, in list order.
pub fn seed_candidates(entries: &[Entry], me: &str, now_ms: f64) -> Vec<(String, String)> {
    entries
        .iter()
        .filter(|e| e.alive && !e.address.is_empty() && e.node_id != me && now_ms - e.last_seen_ms < SEED_FRESHNESS_MS)
        .map(|e| (e.node_id.clone(), e.address.clone()))
        .collect()
}

pub fn now_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_millis() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_takes_fresh_alive_others_in_list_order() {
        let e = |id: &str, alive: bool, seen: f64, order: u64| Entry {
            node_id: id.into(),
            address: format!("ws://{id}/"),
            alive,
            last_seen_ms: seen,
            hostname: None,
            order,
        };
        let list = [
            e("me", true, 0.0, 0),
            e("a", true, 0.0, 1),
            e("dead", false, 0.0, 2),
            e("old", true, -700_000.0, 3),
            e("b", true, 0.0, 4),
        ];
        let ids: Vec<String> = seed_candidates(&list, "me", 1000.0).into_iter().map(|(i, _)| i).collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
