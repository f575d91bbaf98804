//! Admission: when new agents enter the plan. A join into a k-regular mesh must take k/2 links from agents
//! already in it, so every agent admitted on its own rewrites about k others. Newcomers admitted together
//! mostly link to each other instead, so a group as large as the fleet costs about one write per newcomer,
//! while one much smaller than the fleet costs as much together as one by one.
//!
//! So a burst (arrivals less than [`QUIET`] apart) is admitted as it comes while it is small next to the
//! fleet it joins; once it has brought [`BURST_SHARE`] of that fleet (a fleet scaled from 0 to 10,000 does
//! at its second agent), its newcomers wait until arrivals pause for [`QUIET`] (or the oldest has waited
//! [`MAX_HOLD`]) and join in one plan. A lone join, or a fleet growing steadily, is never held. Pure: the
//! clock is an argument.
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::assignment::Name;

/// Arrivals this close together make a burst; a pause this long ends it.
pub const QUIET: Duration = Duration::from_secs(1);
/// The longest a newcomer waits for a burst to end.
pub const MAX_HOLD: Duration = Duration::from_secs(90);
/// A burst this large next to the fleet it joins is held until it ends.
pub const BURST_SHARE: f64 = 0.25;

/// One policy's newcomers, between reconciles.
#[derive(Debug, Default)]
pub struct Admission {
    /// Newcomers held back, with when each was first seen eligible.
    waiting: BTreeMap<Name, Instant>,
    /// Agents in the last plan, sorted: not newcomers any more. Merged with every pass's agents, and the
    /// names are the Pod cache's, so the merge compares pointers rather than reading names.
    planned: Vec<Name>,
    /// The current burst: when its last newcomer arrived, how many have, and the fleet it began in.
    last_arrival: Option<Instant>,
    arrivals: usize,
    fleet: usize,
    /// Until when the Pod cache could not see arrivals (see [`Admission::cache_blind_until`]).
    blind_until: Option<Instant>,
}

impl Admission {
    /// The Pod cache saw no events until `t` (it was being listed, or still is: then `t` is now). Silence
    /// the cache could not hear is not a pause: without this, our own relist of a busy namespace, which
    /// stops Pod events for a second or more, would split a burst in two and rewire its first part.
    pub fn cache_blind_until(&mut self, t: Option<Instant>) {
        self.blind_until = t;
    }

    /// Of `eligible` (Pod names, sorted), the newcomers to hold back now, given which already carry an
    /// assignment (`carried`); and when to look again if any are held.
    pub fn hold(
        &mut self,
        eligible: &[&Name],
        carried: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> (BTreeSet<Name>, Option<Duration>) {
        debug_assert!(eligible.is_sorted(), "eligible agents in name order");
        // Those not in the plan, and of them the newcomers (not carrying one either).
        let unplanned = missing(eligible, &self.planned);
        let newcomers: BTreeSet<&Name> = unplanned.iter().copied().filter(|p| !carried(p)).collect();
        self.waiting.retain(|p, _| newcomers.contains(p));
        let arrived = newcomers.iter().filter(|p| !self.waiting.contains_key(**p)).count();
        if arrived > 0 {
            // The fleet a burst joins: the agents already in the plan or carrying an assignment (after a
            // restart, `planned` is empty but the fleet is not).
            if self.last_arrival.is_none_or(|t| now.saturating_duration_since(t) >= QUIET) {
                (self.arrivals, self.fleet) = (0, eligible.len() - newcomers.len());
            }
            self.arrivals += arrived;
            self.last_arrival = Some(now);
        }
        for p in newcomers {
            self.waiting.entry(p.clone()).or_insert(now);
        }
        let (Some(newest), Some(oldest)) = (self.waiting.values().max().copied(), self.waiting.values().min().copied())
        else {
            return self.admit(eligible, &unplanned);
        };
        let large = self.arrivals > 1 && self.arrivals as f64 >= BURST_SHARE * self.fleet as f64;
        let heard = self.blind_until.map_or(newest, |t| t.max(newest));
        let quiet = now.saturating_duration_since(heard) >= QUIET;
        let overdue = now.saturating_duration_since(oldest) >= MAX_HOLD;
        if !large || quiet || overdue {
            return self.admit(eligible, &unplanned);
        }
        let again = (heard + QUIET).min(oldest + MAX_HOLD).saturating_duration_since(now);
        let held: BTreeSet<Name> = self.waiting.keys().cloned().collect();
        let planned: Vec<&Name> = eligible.iter().copied().filter(|p| !held.contains(*p)).collect();
        self.planned = owned(&planned, std::mem::take(&mut self.planned));
        (held, Some(again))
    }

    /// Plans every agent of `eligible`, of which `unplanned` are not in the plan yet.
    fn admit(&mut self, eligible: &[&Name], unplanned: &[&Name]) -> (BTreeSet<Name>, Option<Duration>) {
        self.waiting.clear();
        // Every eligible agent is in the plan: the same list unless one joined or left.
        if !unplanned.is_empty() || self.planned.len() != eligible.len() {
            self.planned = owned(eligible, std::mem::take(&mut self.planned));
        }
        (BTreeSet::new(), None)
    }
}

/// `eligible` (sorted) as owned names, moving over those `planned` (sorted) holds: a join or leave then
/// touches the names that changed rather than every name's count.
fn owned(eligible: &[&Name], planned: Vec<Name>) -> Vec<Name> {
    along(eligible, planned).map(|(p, q)| q.unwrap_or_else(|| p.clone())).collect()
}

/// The names of `eligible` not in `planned` (both sorted).
fn missing<'a>(eligible: &[&'a Name], planned: &[Name]) -> Vec<&'a Name> {
    along(eligible, planned).filter(|(_, q)| q.is_none()).map(|(p, _)| p).collect()
}

/// Each name of `eligible` with the entry of `planned` equal to it, if any (both sorted), in one merge.
fn along<'a, Q: Borrow<Name>>(
    eligible: &[&'a Name],
    planned: impl IntoIterator<Item = Q>,
) -> impl Iterator<Item = (&'a Name, Option<Q>)> {
    let mut planned = planned.into_iter().peekable();
    eligible.iter().map(move |&p| {
        while planned.next_if(|q| q.borrow() < p).is_some() {}
        (p, planned.next_if(|q| q.borrow() == p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: &dyn Fn(&str) -> bool = &|_| false;

    fn names(v: &BTreeSet<Name>) -> Vec<&str> {
        v.iter().map(Name::as_str).collect()
    }

    /// [`Admission::hold`] of `eligible` in any order, as the tests list them.
    fn hold(
        a: &mut Admission,
        eligible: &[&str],
        carried: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> (BTreeSet<Name>, Option<Duration>) {
        let mut eligible: Vec<Name> = eligible.iter().map(|&p| p.into()).collect();
        eligible.sort();
        a.hold(&eligible.iter().collect::<Vec<_>>(), carried, now)
    }

    #[test]
    fn a_lone_join_is_admitted_at_once() {
        let t0 = Instant::now();
        let mut a = Admission::default();
        assert_eq!(hold(&mut a, &["a", "b"], &|p| p == "a" || p == "b", t0).0.len(), 0, "the settled fleet");
        let (held, again) = hold(&mut a, &["a", "b", "c"], &|p| p != "c", t0 + Duration::from_secs(60));
        assert!(held.is_empty() && again.is_none());
    }

    #[test]
    fn a_burst_waits_for_a_pause_then_joins_at_once() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut a = Admission::default();
        assert!(hold(&mut a, &["a"], NONE, ms(0)).0.is_empty(), "the first arrival goes alone");
        let (held, again) = hold(&mut a, &["a", "b"], &|p| p == "a", ms(10));
        assert_eq!((names(&held), again), (vec!["b"], Some(QUIET)), "b came right after a");
        let (held, _) = hold(&mut a, &["a", "b", "c"], &|p| p == "a", ms(500));
        assert_eq!(names(&held), ["b", "c"]);
        let (held, again) = hold(&mut a, &["a", "b", "c"], &|p| p == "a", ms(1200));
        assert_eq!((names(&held), again), (vec!["b", "c"], Some(Duration::from_millis(300))), "c came at 500");
        let (held, again) = hold(&mut a, &["a", "b", "c"], &|p| p == "a", ms(1500));
        assert!(held.is_empty() && again.is_none(), "a pause: b and c join together");
        assert!(hold(&mut a, &["a", "b", "c"], &|p| p == "a", ms(1600)).0.is_empty(), "admitted stay admitted");
    }

    #[test]
    fn a_pause_the_pod_cache_could_not_see_does_not_end_a_burst() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut a = Admission::default();
        hold(&mut a, &["a"], NONE, ms(0));
        assert_eq!(names(&hold(&mut a, &["a", "b"], &|p| p == "a", ms(10)).0), ["b"]);
        a.cache_blind_until(Some(ms(1500)));
        let (held, again) = hold(&mut a, &["a", "b"], &|p| p == "a", ms(1500));
        assert_eq!((names(&held), again), (vec!["b"], Some(QUIET)), "listing until now: no pause yet");
        let (held, again) = hold(&mut a, &["a", "b"], &|p| p == "a", ms(2000));
        assert_eq!((names(&held), again), (vec!["b"], Some(Duration::from_millis(500))), "listed at 1500");
        assert!(hold(&mut a, &["a", "b"], &|p| p == "a", ms(2500)).0.is_empty(), "a pause after the list: b joins");
    }

    #[test]
    fn arrivals_into_a_large_fleet_are_held_only_once_they_are_a_quarter_of_it() {
        let t0 = Instant::now();
        let fleet: Vec<String> = (0..100).map(|i| format!("old{i}")).collect();
        let mut eligible: Vec<String> = fleet.clone();
        let mut a = Admission::default();
        let old = |p: &str| p.starts_with("old");
        assert!(hold(&mut a, &eligible.iter().map(String::as_str).collect::<Vec<_>>(), &old, t0).0.is_empty());
        let mut held_from = None;
        for i in 0..40u64 {
            eligible.push(format!("new{i}"));
            let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
            let (held, _) = hold(&mut a, &refs, &old, t0 + Duration::from_millis(10 * (i + 1)));
            if !held.is_empty() && held_from.is_none() {
                held_from = Some(i);
            }
        }
        assert_eq!(held_from, Some(24), "the 25th arrival makes the burst a quarter of the fleet of 100");
    }

    #[test]
    fn a_stream_that_never_pauses_is_admitted_after_the_longest_hold() {
        let t0 = Instant::now();
        let mut a = Admission::default();
        let mut eligible: Vec<String> = vec![];
        let mut admitted_at = vec![];
        for i in 0..400u64 {
            let now = t0 + Duration::from_millis(500 * i);
            eligible.push(format!("p{i}"));
            let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
            let (held, again) = hold(&mut a, &refs, NONE, now);
            assert!(again.is_none_or(|d| d <= MAX_HOLD));
            if held.is_empty() {
                admitted_at.push(i);
            }
        }
        assert_eq!(admitted_at[0], 0);
        let gaps: Vec<u64> = admitted_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|&g| g * 500 <= MAX_HOLD.as_millis() as u64 + 500), "{gaps:?}");
    }

    #[test]
    fn after_a_restart_the_fleet_is_what_carries_an_assignment() {
        let t0 = Instant::now();
        let mut eligible: Vec<String> = (0..100).map(|i| format!("old{i}")).collect();
        let mut a = Admission::default();
        for i in 0..10u64 {
            eligible.push(format!("new{i}"));
            let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
            let (held, _) = hold(&mut a, &refs, &|p| p.starts_with("old"), t0 + Duration::from_millis(300 * i));
            assert!(held.is_empty(), "a rolling update into 100 agents is not a burst, restart or not");
        }
    }

    #[test]
    fn an_agent_that_left_and_came_back_waits_like_any_newcomer() {
        let t0 = Instant::now();
        let mut a = Admission::default();
        hold(&mut a, &["a", "b"], NONE, t0);
        assert!(hold(&mut a, &["a"], &|_| true, t0 + Duration::from_secs(5)).0.is_empty());
        let (held, _) = hold(&mut a, &["a", "b", "c"], &|p| p == "a", t0 + Duration::from_secs(10));
        assert_eq!(names(&held), ["b", "c"]);
    }
}
