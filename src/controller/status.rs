//! MeshPolicy status and conditions, built purely from what a reconcile found. Kubernetes conventions:
//! one condition per type, `lastTransitionTime` moves only when `status` changes, `observedGeneration` set.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const RENDEZVOUS_REACHABLE: &str = "RendezvousReachable";
pub const DEGRADED: &str = "Degraded";
pub const CONFLICT: &str = "Conflict";

/// A condition as a reconcile decides it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into() }
    }
}

/// The conditions to publish: each verdict, keeping the previous `lastTransitionTime` of a condition whose
/// status did not change.
pub fn conditions(verdicts: &[Verdict], previous: &[Condition], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.status { "True" } else { "False" }.to_string();
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.to_string(),
                status,
                reason: v.reason.clone(),
                message: truncate(&v.message, 1024),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// `s` cut to at most `max` bytes (on a character boundary) plus an ellipsis: presence and Pods are not
/// ours, and what they say (long lists of Pods, huge addresses) must not grow a condition, the status or an
/// Event past what the API server accepts.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let first = conditions(&[Verdict::new(READY, true, "Planned", "ok")], &[], Some(1), &at(100));
        assert_eq!(first[0].last_transition_time, at(100));
        let same = conditions(&[Verdict::new(READY, true, "Planned", "other message")], &first, Some(2), &at(200));
        assert_eq!(same[0].last_transition_time, at(100), "same status keeps its transition time");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = conditions(&[Verdict::new(READY, false, "Invalid", "x")], &same, Some(2), &at(300));
        assert_eq!(flipped[0].last_transition_time, at(300));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let c = conditions(&[Verdict::new(DEGRADED, true, "R", long)], &[], None, &at(1));
        assert!(c[0].message.len() <= 1024 + "…".len());
        assert!(c[0].message.ends_with('…'));
    }
}
