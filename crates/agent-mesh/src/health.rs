//! Link health, as an agent reports it to the rendezvous: the planned peers it has failed to reach for
//! longer than its grace period. One text frame on the rendezvous link, sent when the link opens and
//! whenever the list changes: `{"type":"health","unreachable":["<node id>", …]}`. The rendezvous lists
//! them in the agent's presence entry, and the operator plans around those pairs.
use serde::{Deserialize, Serialize};

/// The most peers one report lists: the planner's largest cap, so an honest agent never needs more.
pub const MAX_UNREACHABLE: usize = 64;
/// The longest node id a report may carry (a hex Ed25519 key is 64).
pub const MAX_NODE_ID: usize = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Node ids, sorted.
    pub unreachable: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    unreachable: Vec<String>,
}

impl Health {
    pub fn to_text(&self) -> String {
        let m = Message { kind: "health".into(), unreachable: self.unreachable.clone() };
        serde_json::to_string(&m).expect("a report serializes")
    }

    /// A report from a text frame, or why it is not one. A frame of another type (a heartbeat) is
    /// `Ok(None)`. A report over the bounds is refused whole, so a peer cannot make the reader hold more.
    pub fn parse(text: &str) -> Result<Option<Health>, String> {
        #[derive(Deserialize)]
        struct Kind {
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        if text.len() > 2 * MAX_UNREACHABLE * (MAX_NODE_ID + 4) {
            return Err(format!("a text frame of {} bytes", text.len()));
        }
        let kind: Kind = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if kind.kind.as_deref() != Some("health") {
            return Ok(None);
        }
        let m: Message = serde_json::from_str(text).map_err(|e| format!("a malformed health report: {e}"))?;
        if m.unreachable.len() > MAX_UNREACHABLE {
            return Err(format!("unreachable lists {} peers, over {MAX_UNREACHABLE}", m.unreachable.len()));
        }
        if let Some(id) = m.unreachable.iter().find(|id| id.is_empty() || id.len() > MAX_NODE_ID) {
            return Err(format!("unreachable lists a node id of {} bytes", id.len()));
        }
        let mut unreachable = m.unreachable;
        unreachable.sort();
        unreachable.dedup();
        Ok(Some(Health { unreachable }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reports_round_trip_and_heartbeats_are_not_reports() {
        let h = Health { unreachable: vec!["ab".into(), "cd".into()] };
        assert_eq!(Health::parse(&h.to_text()), Ok(Some(h)));
        assert_eq!(Health::parse(r#"{"type":"heartbeat"}"#), Ok(None));
    }

    #[test]
    fn reports_over_the_bounds_are_refused_whole() {
        let many = Health { unreachable: (0..65).map(|i| format!("{i:02}")).collect() };
        assert!(Health::parse(&many.to_text()).unwrap_err().contains("65 peers"));
        let long = Health { unreachable: vec!["a".repeat(257)] };
        assert!(Health::parse(&long.to_text()).unwrap_err().contains("257 bytes"));
        let empty = Health { unreachable: vec![String::new()] };
        assert!(Health::parse(&empty.to_text()).is_err());
        assert!(Health::parse(r#"{"type":"health","unreachable":[1]}"#).unwrap_err().contains("malformed"));
        assert!(Health::parse(&"x".repeat(40_000)).unwrap_err().contains("40000 bytes"));
    }

    proptest! {
        /// Whatever bytes arrive as a text frame, parsing answers without a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in ".{0,300}", ids in prop::collection::vec(".{0,80}", 0..80)) {
            let _ = Health::parse(&text);
            let _ = Health::parse(&serde_json::json!({"type": "health", "unreachable": ids}).to_string());
        }
    }
}
