//! Presence, the reconcile's first step: when to read the rendezvous, what to keep between reads, and
//! which reads to trust. All polling state lives here, one [`PresenceState`] per policy.
//!
//! A rendezvous outage must never dismantle the mesh (docs/design.md §3.4 rule 2), and a rendezvous that is up
//! but forgetful (restarted empty, agents re-registering) is the subtle case. So:
//! * a failed read keeps the last good snapshot, frozen on its own clock (nothing ages out meanwhile);
//! * an agent absent from a successful read is carried over with its last heartbeat, so it stays until
//!   `heartbeatTimeout` after it was last seen, as a stale one would;
//! * a read that would still make a large share of the eligible agents ineligible at once is *suspect*:
//!   held and reported, not applied, until a read drops none of them or for at most `heartbeatTimeout`;
//! * the state belongs to one leadership term: a replica that leads again starts with no snapshot.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::core::SelectorExt;
use tracing::{debug, info, warn};

use super::Context;
use super::fleet::Fleet;
use super::membership::{self, Membership};
use super::policy::{Ca, ValidPolicy};
use crate::assignment::Name;
use crate::presence::{FetchError, Fetched, Request, Snapshot, unix_ms};
use crate::telemetry;

/// Ready Pods without presence get re-reads this often while they wait (see [`PresenceState::awaiting`]).
pub const PROMPT_FETCH_INTERVAL: Duration = Duration::from_millis(250);
/// A read is suspect when it would drop more than this share of the eligible agents at once (and at
/// least two).
const SUSPECT_SHARE: f64 = 0.1;

/// What one policy knows of presence between polls.
#[derive(Default)]
pub struct PresenceState {
    /// The leadership term this state was built in.
    pub term: u64,
    /// The last good snapshot; its clock advances only with reads that confirm it.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Local wall clock (ms) when `snapshot` was last confirmed.
    pub confirmed_ms: f64,
    pub etag: Option<String>,
    pub last_attempt: Option<Instant>,
    /// The last failure's reason and message while the rendezvous is unreachable.
    pub failure: Option<(String, String)>,
    /// Since when successful reads have been held as suspect, and why.
    pub suspect: Option<(Instant, String)>,
    /// Ready Pods without a presence entry, and when each was first seen so.
    pub waiting: HashMap<String, Instant>,
    pub long_poll: LongPoll,
    /// A read made but not taken in yet, for the next reconcile.
    pub unread: Option<Unread>,
}

/// A read the rendezvous holds until its list changes (`Prefer: wait`, docs/presence-api.md), made beside
/// the reconciles while Ready Pods wait for their entries: a new entry then arrives as soon as the
/// rendezvous has it, not at the next prompt poll. Its answer is left [`Unread`] for the next reconcile.
#[derive(Default)]
pub struct LongPoll {
    /// The rendezvous answered one without honouring the wait: prompt polls serve instead.
    pub refused: bool,
    pub in_flight: Option<InFlight>,
    started: u64,
}

pub struct InFlight {
    number: u64,
    source: Source,
    task: tokio::task::JoinHandle<()>,
}

/// A long poll no one waits for any more (replaced, or its policy forgotten) is stopped: its answer
/// would be dropped, and its metrics would bring back a forgotten policy's series. The task itself
/// clears its entry when it answers: that drop must not abort it.
impl Drop for InFlight {
    fn drop(&mut self) {
        if tokio::task::try_id() != Some(self.task.id()) {
            self.task.abort();
        }
    }
}

impl LongPoll {
    /// Whether one reading `source` is in flight: then its answer is this policy's next read. A task
    /// that ended without answering (it panicked) is not in flight, so reads go on.
    fn reading(&self, source: &Source) -> bool {
        self.in_flight.as_ref().is_some_and(|f| f.source == *source && !f.task.is_finished())
    }
}

/// Where a read comes from: the presence URL and where the CAs it is verified against come from.
type Source = (String, Option<Ca>);

fn source(policy: &ValidPolicy) -> Source {
    (policy.rendezvous.presence_url.clone(), policy.rendezvous.ca.clone())
}

/// A read not taken in yet: a long poll's answer, or a read whose reconcile ended before taking it in.
pub struct Unread {
    source: Source,
    /// The ETag sent with it: a 304 confirms only the snapshot that ETag names.
    sent: Option<String>,
    result: Result<Fetched, FetchError>,
}

impl Unread {
    /// Whether this read is the policy's presence now: read from `source`, and if a 304, for `etag`.
    fn fits(&self, source: &Source, etag: &Option<String>) -> bool {
        let unmodified = matches!(self.result, Ok(Fetched::NotModified { .. }));
        self.source == *source && (!unmodified || self.sent == *etag)
    }
}

/// What a reconcile learns of presence.
pub struct Read {
    /// The snapshot to plan from: the last good one.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Local wall clock (ms) when it was last confirmed.
    pub confirmed_ms: f64,
    /// Why the rendezvous could not be read, while it cannot.
    pub failure: Option<(String, String)>,
    /// Why the latest successful read is held, while it is.
    pub suspect: Option<String>,
}

/// The agents a snapshot makes eligible, judged on the clock given: Pod → node id.
pub type Eligible<'a> = dyn Fn(&Arc<Snapshot>, f64) -> BTreeMap<String, String> + 'a;

/// The result of one read attempt, as [`PresenceState::take`] judges it.
pub struct Attempt {
    pub result: Result<Fetched, FetchError>,
    pub heartbeat_timeout: Duration,
}

impl PresenceState {
    /// How long a Ready Pod without presence is worth prompt re-reads; after that it is an agent that did
    /// not register, and the normal poll interval serves it.
    pub const PROMPT_WINDOW: Duration = Duration::from_secs(30);

    /// Starts over when the leadership term changed: a snapshot from an earlier term is not ours to trust.
    pub fn enter_term(&mut self, term: u64) {
        if self.term != term {
            *self = PresenceState { term, ..Default::default() };
        }
    }

    /// Records which Ready Pods lack presence now; whether any began waiting within [`Self::PROMPT_WINDOW`].
    pub fn awaiting(&mut self, unmatched: &HashSet<String>, now: Instant) -> bool {
        self.waiting.retain(|pod, _| unmatched.contains(pod));
        for pod in unmatched {
            self.waiting.entry(pod.clone()).or_insert(now);
        }
        self.prompt(now)
    }

    /// Whether a Pod began waiting for its presence entry within [`Self::PROMPT_WINDOW`].
    pub fn prompt(&self, now: Instant) -> bool {
        self.waiting.values().any(|&since| now.saturating_duration_since(since) < Self::PROMPT_WINDOW)
    }

    /// Whether a prompt read may be a long poll: the rendezvous has not refused one, and the last good read
    /// gave an ETag to hold against (a read after a failure or a suspect one is answered at once).
    fn may_long_poll(&self) -> bool {
        !self.long_poll.refused && self.etag.is_some() && self.failure.is_none() && self.suspect.is_none()
    }

    /// Whether a read is due `since` the last attempt.
    pub fn due(&self, poll_interval: Duration, prompt: bool, now: Instant) -> bool {
        match self.last_attempt.map(|t| now.saturating_duration_since(t)) {
            None => true,
            Some(s) => s + Duration::from_millis(50) >= poll_interval || (prompt && s >= PROMPT_FETCH_INTERVAL),
        }
    }

    /// Takes in one read. `eligible` names the agents a snapshot makes eligible, judged on the clock it is
    /// given (Pod → node id); `assigned` the Pods that carry this policy's assignment now, the baseline of
    /// a first read. A read that would drop many of them at once is held.
    pub fn take(&mut self, attempt: Attempt, eligible: &Eligible, assigned: &BTreeSet<String>) {
        let now_ms = unix_ms();
        // What the last good snapshot makes eligible: the baseline both steps below judge by, computed once.
        let before = match attempt.result.is_ok() {
            true => self.snapshot.as_ref().map(|old| eligible(old, self.confirmed_ms)),
            false => None,
        };
        let candidate = match attempt.result {
            Ok(Fetched::New { snapshot, etag, .. }) => {
                let merged = match (&self.snapshot, &before) {
                    (Some(old), Some(before)) => {
                        let keep: HashSet<String> = before.values().cloned().collect();
                        carry_absent(old, snapshot, &keep, attempt.heartbeat_timeout, now_ms)
                    }
                    _ => snapshot,
                };
                (Arc::new(merged), etag)
            }
            // Unchanged body, later time: the heartbeats age by the time that passed.
            Ok(Fetched::NotModified { .. }) => match &self.snapshot {
                Some(old) => {
                    let mut aged = (**old).clone();
                    aged.now_ms = aged.now_ms.map(|t| t + (now_ms - self.confirmed_ms));
                    (Arc::new(aged), self.etag.clone())
                }
                None => return,
            },
            Err(e) => {
                // Said once when the outage starts (and in the status for as long as it lasts).
                match &self.failure {
                    None => warn!(reason = e.reason(), error = %e, "presence unavailable; keeping the last snapshot"),
                    Some(_) => debug!(reason = e.reason(), error = %e, "presence still unavailable"),
                }
                self.failure = Some((e.reason().to_owned(), e.to_string()));
                // A hold lasts heartbeatTimeout of successful reads: time the rendezvous was down is
                // not time it had to agree again.
                if let Some((since, _)) = self.suspect.as_mut() {
                    *since = Instant::now();
                }
                return;
            }
        };
        if self.failure.take().is_some() {
            info!("presence readable again");
        }
        let before: BTreeSet<String> = match before {
            Some(before) => before.into_keys().collect(),
            None => assigned.clone(),
        };
        if let Some(why) = self.suspicion(&candidate.0, now_ms, attempt.heartbeat_timeout, eligible, &before) {
            let since = self.suspect.as_ref().map_or_else(Instant::now, |(t, _)| *t);
            self.suspect = Some((since, why));
            return;
        }
        (self.snapshot, self.etag) = (Some(candidate.0), candidate.1);
        self.confirmed_ms = now_ms;
        self.suspect = None;
    }

    /// Why `next` should be held rather than applied, if it should: it would drop many of the agents
    /// `before` (eligible under the last good snapshot, or assigned before the first) at once.
    fn suspicion(
        &self,
        next: &Arc<Snapshot>,
        next_clock: f64,
        heartbeat_timeout: Duration,
        eligible: &Eligible,
        before: &BTreeSet<String>,
    ) -> Option<String> {
        if self.suspect.as_ref().is_some_and(|(since, _)| since.elapsed() >= heartbeat_timeout) {
            return None;
        }
        let after = eligible(next, next_clock);
        let lost = before.iter().filter(|pod| !after.contains_key(*pod)).count();
        // A hold, once entered, lasts until presence agrees again: agents re-registering one by one must
        // not be dropped one by one at the end.
        let suspect = match self.suspect {
            Some(_) => lost > 0,
            None => lost >= 2 && lost as f64 > SUSPECT_SHARE * before.len() as f64,
        };
        suspect.then(|| {
            format!(
                "a presence read would make {lost} of {} agents ineligible at once; holding the last good \
                 presence (for at most heartbeatTimeout) until the rendezvous agrees again",
                before.len()
            )
        })
    }

    pub fn read(&self) -> Read {
        Read {
            snapshot: self.snapshot.clone(),
            confirmed_ms: self.confirmed_ms,
            failure: self.failure.clone(),
            suspect: self.suspect.as_ref().map(|(_, why)| why.clone()),
        }
    }
}

/// `next` plus every node of `old` it does not list whose id is in `keep` (the agents eligible under `old`:
/// carrying more would let a rendezvous grow our memory with ids that match nothing), as `old` last saw it,
/// while that heartbeat is younger than `heartbeat_timeout` and not in the future on `next`'s clock (else
/// `fallback_now_ms`).
pub fn carry_absent(
    old: &Snapshot,
    mut next: Snapshot,
    keep: &HashSet<String>,
    heartbeat_timeout: Duration,
    fallback_now_ms: f64,
) -> Snapshot {
    // Only the kept ids are looked up: a set of every id listed would cost as much as the list.
    let listed: HashSet<&str> = next.nodes.iter().map(|n| &*n.node_id).filter(|id| keep.contains(*id)).collect();
    let now = next.now_ms.filter(|t| t.is_finite()).unwrap_or(fallback_now_ms);
    let limit = heartbeat_timeout.as_millis() as f64;
    let carried: Vec<_> = old
        .nodes
        .iter()
        .filter(|n| keep.contains(&*n.node_id) && !listed.contains(&*n.node_id))
        .filter(|n| n.heartbeat_ms().is_some_and(|seen| seen <= now && now - seen < limit))
        .cloned()
        .collect();
    if !carried.is_empty() {
        // Shared with other policies reading the same body: the carried entries are this policy's alone.
        Arc::make_mut(&mut next.nodes).extend(carried);
    }
    next
}

/// Reads presence when due: every poll interval, and promptly while a Ready Pod waits for its entry (then
/// as a long poll, where the rendezvous honours one). The read is taken in (see [`take`]) against the same
/// observation the reconcile decides on.
pub async fn fetch(ctx: &Arc<Context>, policy: &ValidPolicy) -> Option<Attempt> {
    let kept = ctx.policy_state(&policy.uid);
    let mut state = kept.presence.lock().await;
    state.enter_term(ctx.leadership.term());
    let now = Instant::now();
    let source = source(policy);
    if let Some(unread) = state.unread.take() {
        // Read from a rendezvous the policy no longer names, or a 304 for a snapshot no longer ours: not
        // this policy's presence now.
        if unread.fits(&source, &state.etag) {
            state.last_attempt = Some(now);
            return Some(Attempt { result: unread.result, heartbeat_timeout: policy.heartbeat_timeout });
        }
    }
    if state.long_poll.reading(&source) {
        return None;
    }
    let since = state.last_attempt.map(|t| now.saturating_duration_since(t));
    let fresh = since.is_some_and(|s| s >= FRESH_FETCH_INTERVAL)
        && state.snapshot.as_deref().is_some_and(|snap| newly_unmatched(ctx, policy, snap, &state.waiting));
    let prompt = state.prompt(now);
    if (fresh || prompt && since.is_none_or(|s| s >= PROMPT_FETCH_INTERVAL)) && state.may_long_poll() {
        state.last_attempt = Some(now);
        start_long_poll(ctx, policy, &kept, &mut state, source);
        return None;
    }
    if !(state.due(policy.rendezvous.poll_interval, prompt, now) || fresh) {
        return None;
    }
    state.last_attempt = Some(Instant::now());
    let started = Instant::now();
    let result = request(ctx, policy, state.etag.as_deref(), None).await;
    count(ctx, policy, &result, Some(started.elapsed()));
    Some(Attempt { result, heartbeat_timeout: policy.heartbeat_timeout })
}

/// Starts a long poll of `source` for the policy whose state `kept` is (`state`, locked).
fn start_long_poll(
    ctx: &Arc<Context>,
    policy: &ValidPolicy,
    kept: &Arc<super::PolicyState>,
    state: &mut PresenceState,
    source: Source,
) {
    state.long_poll.started += 1;
    let number = state.long_poll.started;
    let etag = state.etag.clone().unwrap_or_default();
    // The task finds its own entry under the lock, which is held until the entry is in place.
    let poll = long_poll(ctx.clone(), policy.clone(), Arc::downgrade(kept), etag, (state.term, number));
    let task = tokio::spawn(tracing::Instrument::in_current_span(poll));
    state.long_poll.in_flight = Some(InFlight { number, source, task });
}

/// One long poll (see [`LongPoll`]): its answer goes to the policy's next reconcile, which it wakes.
/// `started` names it: the leadership term and its number within it.
async fn long_poll(
    ctx: Arc<Context>,
    policy: ValidPolicy,
    kept: std::sync::Weak<super::PolicyState>,
    etag: String,
    started: (u64, u64),
) {
    // A held read also serves as the regular poll, so it waits no longer than one.
    let wait = policy.rendezvous.poll_interval.clamp(Duration::from_secs(1), PresenceState::PROMPT_WINDOW);
    let result = request(&ctx, &policy, Some(&etag), Some(wait)).await;
    // Held weakly, so a forgotten policy's state (and with it this task's `InFlight`, which aborts it)
    // goes when the controller drops it; an answer that comes anyway is not counted.
    let Some(kept) = kept.upgrade() else { return };
    count(&ctx, &policy, &result, None);
    let mut state = kept.presence.lock().await;
    // Another term's state, or a read the policy stopped waiting for (its rendezvous changed): not ours
    // to trust.
    if state.term != started.0 || state.long_poll.in_flight.as_ref().is_none_or(|f| f.number != started.1) {
        return;
    }
    state.long_poll.in_flight = None;
    let waits = matches!(result, Ok(Fetched::New { waits: true, .. } | Fetched::NotModified { waits: true }));
    state.long_poll.refused |= result.is_ok() && !waits;
    state.unread = Some(Unread { source: source(&policy), sent: Some(etag), result });
    drop(state);
    ctx.wake(&policy.name, &policy.namespace);
}

/// Keeps a read that this reconcile made but will not take in, for the next one: dropped, its news (or
/// its failure) would wait a poll interval.
pub async fn unread(ctx: &Context, policy: &ValidPolicy, attempt: Attempt) {
    let kept = ctx.policy_state(&policy.uid);
    let mut state = kept.presence.lock().await;
    let sent = state.etag.clone();
    state.unread.get_or_insert(Unread { source: source(policy), sent, result: attempt.result });
}

async fn request(
    ctx: &Context,
    policy: &ValidPolicy,
    etag: Option<&str>,
    wait: Option<Duration>,
) -> Result<Fetched, FetchError> {
    ctx.references.retain(&ctx.policies.state());
    let rv = &policy.rendezvous;
    let token = match &rv.join_token {
        None => None,
        Some(r) => Some(ctx.references.token(&policy.namespace, r, &rv.base_url, rv.timeout).await?),
    };
    let ca = match &rv.ca {
        None => None,
        Some(Ca::Pem(pem)) => Some(std::borrow::Cow::Borrowed(pem.as_str())),
        Some(Ca::ConfigMap(r)) => Some(ctx.references.ca_bundle(&policy.namespace, r, rv.timeout).await?.into()),
    };
    let req = Request {
        url: &policy.rendezvous.presence_url,
        token: token.as_deref(),
        ca_bundle: ca.as_deref(),
        timeout: policy.rendezvous.timeout,
        etag,
        wait,
    };
    ctx.fetcher.fetch(&req).await
}

/// Takes in `attempt` (see [`PresenceState::take`] for what is kept and trusted) and returns what presence
/// says now, leaving the policy's view `fleet` judged on it (its [`Fleet::membership`]). The one place
/// membership is worked out: judging a read needs it, and the decision takes the one judged.
pub async fn take(ctx: &Context, policy: &ValidPolicy, fleet: &mut Fleet, attempt: Option<Attempt>) -> Read {
    let kept = ctx.policy_state(&policy.uid);
    let mut state = kept.presence.lock().await;
    state.enter_term(ctx.leadership.term());
    // The view keeps the verdicts of the snapshot it was last judged on: judged on it again, it costs nothing.
    let fleet = std::cell::RefCell::new(fleet);
    let judge =
        |snap: &Arc<Snapshot>, clock: f64| fleet.borrow_mut().judge(snap, &membership::Rules::of(policy, clock));
    if let Some(attempt) = attempt {
        let assigned: BTreeSet<String> = {
            let o = &fleet.borrow().observed;
            o.selected.keys().filter(|p| o.carried.contains_key(*p)).map(Name::to_string).collect()
        };
        let eligible = |snap: &Arc<Snapshot>, clock: f64| -> BTreeMap<String, String> {
            judge(snap, clock);
            let fleet = fleet.borrow();
            fleet.membership().agents.iter().map(|(pod, a)| (pod.to_string(), a.node_id.to_string())).collect()
        };
        state.take(attempt, &eligible, &assigned);
    }
    let read = state.read();
    if let Some(snap) = &read.snapshot {
        judge(snap, read.confirmed_ms);
    }
    read
}

/// Whether a Ready Pod without presence began waiting recently (worth a prompt re-read).
pub fn awaiting(ctx: &Context, policy: &ValidPolicy, m: &Membership) -> bool {
    let unmatched: HashSet<String> = m
        .excluded
        .iter()
        .filter(|(_, e)| **e == membership::Exclusion::NoPresence)
        .map(|(pod, _)| pod.to_string())
        .collect();
    match ctx.policy_state(&policy.uid).presence.try_lock() {
        // A long poll in flight wakes the policy when it is answered.
        Ok(mut state) => state.awaiting(&unmatched, Instant::now()) && !state.long_poll.reading(&source(policy)),
        Err(_) => false,
    }
}

/// A Pod that just became Ready without a presence entry gets a read at once (but no more often than
/// this): an agent usually registers before its readiness probe passes, so the entry is likely there.
const FRESH_FETCH_INTERVAL: Duration = Duration::from_millis(50);

/// Whether a selected, Ready Pod without an assignment, not yet known to wait, has no entry in `snap`.
fn newly_unmatched(ctx: &Context, policy: &ValidPolicy, snap: &Snapshot, waiting: &HashMap<String, Instant>) -> bool {
    // Pods an older policy owns are never this one's agents: they must not read presence again and again.
    let older = policy.older_selectors(&ctx.policies.state());
    let candidates: Vec<Arc<super::pods::CachedPod>> = ctx
        .pods
        .namespace(&policy.namespace)
        .into_iter()
        .filter(|p| p.ready && !p.terminating && p.keys.exact().is_none())
        .filter(|p| !waiting.contains_key(&*p.name))
        .filter(|p| policy.selects(p.labels()) && !older.iter().any(|o| o.matches(p.labels())))
        .collect();
    if candidates.is_empty() {
        return false;
    }
    // Pods matched by hostname or IP instead are left to the prompt reads.
    let mut unmatched: HashSet<&str> =
        candidates.iter().filter_map(|p| p.annotation(&policy.node_id_annotation).map(|id| &**id)).collect();
    for node in snap.nodes.iter() {
        unmatched.remove(&*node.node_id);
    }
    !unmatched.is_empty()
}

/// Counts a fetch under its policy. A long poll's time is how long the rendezvous held it, not how long
/// a read takes, so its duration is not observed.
fn count(ctx: &Context, policy: &ValidPolicy, result: &Result<Fetched, FetchError>, took: Option<Duration>) {
    // Only the leader exports a policy's series (see `Metrics::forget_policies`).
    if !ctx.leadership.may_write() {
        return;
    }
    let m = &ctx.metrics;
    let label = telemetry::PolicyLabel::new(&policy.namespace, &policy.name);
    if let Some(took) = took {
        m.presence_duration.get_or_create(&label).observe(took.as_secs_f64());
    }
    match result {
        Ok(Fetched::New { bytes, .. }) => {
            m.presence_bytes.get_or_create(&label).inc_by(*bytes as u64);
            m.presence_fetches.get_or_create(&label.with("ok")).inc();
        }
        Ok(Fetched::NotModified { .. }) => {
            m.presence_fetches.get_or_create(&label.with("not_modified")).inc();
        }
        Err(e) => {
            m.presence_fetches.get_or_create(&label.with("error")).inc();
            m.presence_errors.get_or_create(&label.with(e.reason())).inc();
        }
    }
    // Leadership lost meanwhile: its series were dropped then, and must stay so.
    if !ctx.leadership.may_write() {
        m.forget_policy(&label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unread read serves the next reconcile only as the presence of the rendezvous the policy names
    /// now; a 304 only for the ETag the policy holds now.
    #[test]
    fn an_unread_read_serves_only_the_rendezvous_and_snapshot_it_was_made_for() {
        let (a, b) = (("http://a/presence".to_string(), None), ("http://b/presence".to_string(), None));
        let ca = ("http://a/presence".to_string(), Some(Ca::Pem("pem".to_string())));
        let unread = |result, sent: &str| Unread { source: a.clone(), sent: Some(sent.into()), result };
        let body = || Ok(Fetched::New { snapshot: Snapshot::default(), etag: None, bytes: 0, waits: true });
        let etag = Some("e1".to_string());
        assert!(unread(body(), "e0").fits(&a, &etag), "a new body stands on its own");
        assert!(!unread(body(), "e1").fits(&b, &etag), "another URL");
        assert!(!unread(body(), "e1").fits(&ca, &etag), "another CA bundle");
        assert!(unread(Ok(Fetched::NotModified { waits: true }), "e1").fits(&a, &etag));
        assert!(!unread(Ok(Fetched::NotModified { waits: true }), "e0").fits(&a, &etag), "a 304 for another body");
    }

    /// A long poll whose task ended without answering (it panicked) does not stop the policy's reads.
    #[tokio::test]
    async fn a_long_poll_that_died_is_not_in_flight() {
        let source = ("http://a/presence".to_string(), None);
        let task = tokio::spawn(async { panic!("a long poll that dies") });
        let poll =
            LongPoll { in_flight: Some(InFlight { number: 1, source: source.clone(), task }), ..Default::default() };
        while poll.in_flight.as_ref().is_some_and(|f| !f.task.is_finished()) {
            tokio::task::yield_now().await;
        }
        assert!(!poll.reading(&source));
        let alive = tokio::spawn(std::future::pending::<()>());
        let poll = LongPoll {
            in_flight: Some(InFlight { number: 2, source: source.clone(), task: alive }),
            ..Default::default()
        };
        assert!(poll.reading(&source) && !poll.reading(&("http://b/presence".to_string(), None)));
    }
    use crate::presence::Node;

    fn node(id: &str, seen_ms: f64) -> Node {
        Node {
            node_id: id.into(),
            address: "ws://0.0.0.0:1/".into(),
            alive: true,
            last_seen_ms: Some(seen_ms),
            hostname: None,
            unreachable: Default::default(),
        }
    }

    fn snap(now: f64, ids: &[&str]) -> Snapshot {
        Snapshot {
            now_ms: Some(now),
            nodes: Arc::new(ids.iter().map(|id| node(id, now - 1_000.0)).collect()),
            ..Default::default()
        }
    }

    /// Eligible = live on the given clock, with a 60 s timeout; each node its own Pod.
    fn eligible(s: &Arc<Snapshot>, fallback: f64) -> BTreeMap<String, String> {
        let live = s.nodes.iter().filter(|n| s.is_live(n, Duration::from_secs(60), fallback));
        live.map(|n| (n.node_id.to_string(), n.node_id.to_string())).collect()
    }

    fn take(st: &mut PresenceState, a: Attempt) {
        st.take(a, &eligible, &BTreeSet::new());
    }

    fn ok(s: Snapshot) -> Attempt {
        Attempt {
            result: Ok(Fetched::New { snapshot: s, etag: None, bytes: 0, waits: false }),
            heartbeat_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_rendezvous_that_restarts_empty_keeps_every_agent() {
        let mut st = PresenceState::default();
        take(&mut st, ok(snap(1e9, &["a", "b", "c", "d"])));
        take(&mut st, ok(snap(1e9 + 5_000.0, &[])));
        let read = st.read();
        assert_eq!(eligible(read.snapshot.as_ref().unwrap(), 0.0).len(), 4, "absent agents are carried");
        assert!(read.suspect.is_none());
        // Past heartbeatTimeout with nobody back, most agents would go at once: held as suspect.
        take(&mut st, ok(snap(1e9 + 70_000.0, &["a"])));
        let read = st.read();
        assert!(read.suspect.as_deref().unwrap().contains("3 of 4"), "{:?}", read.suspect);
        assert_eq!(eligible(read.snapshot.as_ref().unwrap(), 0.0).len(), 4, "the last good presence stands");
    }

    #[test]
    fn a_hold_lasts_until_the_last_agent_is_back() {
        let mut st = PresenceState::default();
        take(&mut st, ok(snap(1e9, &["a", "b", "c", "d", "e"])));
        take(&mut st, ok(snap(1e9 + 70_000.0, &["a", "b"])));
        assert!(st.read().suspect.is_some());
        take(&mut st, ok(snap(1e9 + 72_000.0, &["a", "b", "c", "d"])));
        assert!(st.read().suspect.is_some(), "one agent still missing: the hold goes on");
        assert_eq!(eligible(st.read().snapshot.as_ref().unwrap(), 0.0).len(), 5);
        take(&mut st, ok(snap(1e9 + 74_000.0, &["a", "b", "c", "d", "e"])));
        assert!(st.read().suspect.is_none());
        assert_eq!(eligible(st.read().snapshot.as_ref().unwrap(), 0.0).len(), 5);
    }

    #[test]
    fn agents_reregistering_are_applied_and_single_leaves_are_not_suspect() {
        let mut st = PresenceState::default();
        take(&mut st, ok(snap(1e9, &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"])));
        let mut dead = snap(1e9 + 2_000.0, &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]);
        Arc::make_mut(&mut dead.nodes)[0].alive = false;
        take(&mut st, ok(dead));
        let read = st.read();
        assert!(read.suspect.is_none(), "one agent going is news, not suspicion");
        assert_eq!(eligible(read.snapshot.as_ref().unwrap(), 0.0).len(), 11);
    }

    #[test]
    fn a_suspect_read_is_applied_after_heartbeat_timeout_of_holding() {
        let mut st = PresenceState::default();
        take(&mut st, ok(snap(1e9, &["a", "b", "c"])));
        let mut all_dead = snap(1e9 + 1_000.0, &["a", "b", "c"]);
        Arc::make_mut(&mut all_dead.nodes).iter_mut().for_each(|n| n.alive = false);
        take(&mut st, ok(all_dead.clone()));
        assert!(st.read().suspect.is_some());
        st.suspect.as_mut().unwrap().0 -= Duration::from_secs(61);
        take(&mut st, ok(all_dead));
        assert!(st.read().suspect.is_none());
        assert!(eligible(st.read().snapshot.as_ref().unwrap(), 0.0).is_empty());
    }

    #[test]
    fn a_first_read_is_judged_against_what_the_pods_carry() {
        let mut st = PresenceState::default();
        let assigned: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        st.take(ok(snap(1e9, &["a"])), &eligible, &assigned);
        assert!(st.read().suspect.is_some(), "a new term's first read would drop 3 of 4 carried assignments");
        assert!(st.read().snapshot.is_none(), "held: the Pods keep what they carry");
        st.take(ok(snap(1e9 + 1_000.0, &["a", "b", "c", "d"])), &eligible, &assigned);
        assert!(st.read().suspect.is_none() && st.read().snapshot.is_some());
    }

    #[test]
    fn a_not_modified_answer_that_ages_out_everyone_is_held() {
        let mut st = PresenceState::default();
        take(&mut st, ok(snap(1e9, &["a", "b", "c"])));
        st.confirmed_ms -= 120_000.0; // two heartbeat timeouts pass with the body unchanged
        take(
            &mut st,
            Attempt { result: Ok(Fetched::NotModified { waits: false }), heartbeat_timeout: Duration::from_secs(60) },
        );
        assert!(st.read().suspect.is_some());
        assert_eq!(eligible(st.read().snapshot.as_ref().unwrap(), 0.0).len(), 3);
    }

    #[test]
    fn only_eligible_agents_are_carried_and_never_from_the_future() {
        let old = snap(1e9, &["a", "b", "c"]);
        let mut future = old.clone();
        Arc::make_mut(&mut future.nodes)[2].last_seen_ms = Some(2e9);
        let keep: HashSet<String> = ["a".to_string(), "c".to_string()].into();
        let merged = carry_absent(&future, snap(1e9 + 1.0, &[]), &keep, Duration::from_secs(60), 0.0);
        let ids: Vec<&str> = merged.nodes.iter().map(|n| &*n.node_id).collect();
        assert_eq!(ids, vec!["a"], "b matched no Pod; c claims a heartbeat from the future");
    }

    #[test]
    fn failures_freeze_and_a_new_term_forgets() {
        let mut st = PresenceState::default();
        st.enter_term(1);
        take(&mut st, ok(snap(1e9, &["a"])));
        take(&mut st, Attempt { result: Err(FetchError::Status(500)), heartbeat_timeout: Duration::from_secs(60) });
        let read = st.read();
        assert_eq!(read.failure.as_ref().unwrap().0, "HTTPStatus");
        assert_eq!(read.snapshot.unwrap().now_ms, Some(1e9), "the snapshot's clock does not move in an outage");
        st.enter_term(1);
        assert!(st.snapshot.is_some());
        st.enter_term(2);
        assert!(st.snapshot.is_none(), "a replica that leads again does not trust its old snapshot");
    }

    #[test]
    fn prompt_reads_only_for_pods_that_began_waiting_recently() {
        let set = |pods: &[&str]| pods.iter().map(|p| p.to_string()).collect::<HashSet<_>>();
        let t0 = Instant::now();
        let mut state = PresenceState::default();
        assert!(!state.awaiting(&set(&[]), t0));
        assert!(state.awaiting(&set(&["a"]), t0));
        let later = t0 + PresenceState::PROMPT_WINDOW;
        assert!(!state.awaiting(&set(&["a"]), later), "a never registered: the poll interval serves it");
        assert!(state.awaiting(&set(&["a", "b"]), later), "b just turned Ready");
        assert!(!state.awaiting(&set(&["a"]), later), "b found its entry");
        assert!(state.awaiting(&set(&["b"]), later), "b waits again: a fresh window");
        assert_eq!(state.waiting.len(), 1);
    }
}
