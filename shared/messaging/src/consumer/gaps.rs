//! The gap policy (`CONSUMER_GAP_POLICY`), applied by the sweep to the
//! aggregates stuck behind a gap past `CONSUMER_GAP_TIMEOUT`: see
//! [`crate::sequence`], "The gap policy".

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::Channel;

use super::worker::Shared;
use crate::resync::{MAX_IDS, Requested};
use crate::sequence::{self, Aggregate, GapPolicy, StuckGap};
use crate::within;

/// Most stuck aggregates one sweep acts on.
const PER_SWEEP: i64 = MAX_IDS as i64;

/// Counts `count` actions of `policy` that ended with `outcome`
/// (`consumer_gap_actions_total{queue, policy, outcome}`).
fn count(shared: &Shared, policy: GapPolicy, outcome: &'static str, count: usize) {
    metrics::counter!(
        "consumer_gap_actions_total",
        "queue" => shared.config.queue.clone(),
        "policy" => policy.as_str(),
        "outcome" => outcome
    )
    .increment(count as u64);
}

/// The outcomes of each policy's actions.
fn outcomes(policy: GapPolicy) -> &'static [&'static str] {
    match policy {
        GapPolicy::Wait => &["waited"],
        GapPolicy::Resync => &["requested", "unknown", "unsupported", "failed"],
        GapPolicy::ApplyNext => &["applied", "not-state-carrying", "failed"],
    }
}

/// Exports `consumer_gap_actions_total` of the policy in force at 0, so
/// that an alert's `increase()` sees the first action.
pub(super) fn register(shared: &Shared) {
    for outcome in outcomes(shared.gap_policy) {
        count(shared, shared.gap_policy, outcome, 0);
    }
}

/// Claims the stuck gaps no action was taken on within the gap timeout and
/// acts on them by the policy; a failure is logged, and the next sweep
/// after the timeout tries again.
pub(super) async fn act(shared: &Arc<Shared>, channel: &Channel) {
    let policy = shared.gap_policy;
    // One resync request at a time: a sweep while one is under way claims
    // nothing (the claim is what limits each aggregate to one action per
    // timeout).
    if policy == GapPolicy::Resync && shared.resyncing.swap(true, Ordering::SeqCst) {
        return;
    }
    let queue = shared.config.queue.as_str();
    let timeout = shared.config.gap_timeout;
    let claimed = shared
        .pool
        .run(async |conn| {
            sequence::claim_stuck_gaps(conn, queue, timeout, policy.as_str(), PER_SWEEP)
                .await
                .map_err(shop_database::RunError::from)
        })
        .await;
    let stuck = match claimed {
        Ok(stuck) => stuck,
        Err(error) => {
            shared.resyncing.store(false, Ordering::SeqCst);
            tracing::debug!(%error, queue, "could not claim the stuck gaps; the next sweep tries again");
            return;
        }
    };
    if stuck.is_empty() {
        shared.resyncing.store(false, Ordering::SeqCst);
        return;
    }
    match policy {
        GapPolicy::Wait => {
            let aggregates: Vec<Aggregate> = stuck.iter().map(StuckGap::aggregate).collect();
            record(shared, &aggregates, "waited").await;
            count(shared, policy, "waited", aggregates.len());
        }
        GapPolicy::ApplyNext => apply_next(shared, channel, stuck).await,
        GapPolicy::Resync => {
            // Off the sweep: the producer may take a while, and the session
            // must go on beating meanwhile.
            let shared = shared.clone();
            tokio::spawn(async move {
                // Cleared however the request ends (a panic included).
                let _done = Resyncing(shared.resyncing.clone());
                resync(&shared, stuck).await;
            });
        }
    }
}

/// Clears the flag of a resync under way when dropped.
struct Resyncing(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Resyncing {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Records `outcome` as the last action's on `aggregates` (best effort: the
/// listing shows `started` otherwise).
async fn record(shared: &Shared, aggregates: &[Aggregate], outcome: &str) {
    let queue = shared.config.queue.as_str();
    let recorded = shared
        .pool
        .run(async |conn| {
            sequence::record_gap_outcome(conn, queue, aggregates, outcome)
                .await
                .map_err(shop_database::RunError::from)
        })
        .await;
    if let Err(error) = recorded {
        tracing::debug!(%error, queue, outcome, "could not record the gap policy's outcome");
    }
}

/// `apply-next`: each stuck aggregate whose first parked event carries the
/// whole state gives up the versions before it, as `shop dlq release`
/// does, and the event is sent back to be applied; the others wait.
async fn apply_next(shared: &Shared, channel: &Channel, stuck: Vec<StuckGap>) {
    let queue = shared.config.queue.as_str();
    let mut waiting = Vec::new();
    for gap in stuck {
        let aggregate = gap.aggregate();
        let state_carrying = shared
            .handlers
            .get(gap.first_type.as_str())
            .is_some_and(|handler| handler.state_carrying());
        if !state_carrying {
            waiting.push(aggregate);
            continue;
        }
        let through = gap.first_parked - 1;
        let released = shared
            .pool
            .run(async |conn| {
                sequence::release(conn, queue, &aggregate, through)
                    .await
                    .map_err(shop_database::RunError::from)
            })
            .await;
        let outcome = match released {
            Ok((before, events)) => {
                tracing::warn!(
                    queue,
                    %aggregate,
                    from_version = before.last_version,
                    through_version = through,
                    next = gap.first_parked,
                    "gap policy apply-next: gave up the missing versions; applying the state-carrying event past the gap"
                );
                send_back(shared, channel, &events).await;
                "applied"
            }
            Err(error) => {
                tracing::warn!(queue, %aggregate, %error, "gap policy apply-next failed; tried again after CONSUMER_GAP_TIMEOUT");
                "failed"
            }
        };
        record(shared, std::slice::from_ref(&aggregate), outcome).await;
        count(shared, GapPolicy::ApplyNext, outcome, 1);
    }
    if !waiting.is_empty() {
        record(shared, &waiting, "not-state-carrying").await;
        count(shared, GapPolicy::ApplyNext, "not-state-carrying", waiting.len());
    }
}

/// Sends released events back (the sweep sends them again if this fails).
async fn send_back(shared: &Shared, channel: &Channel, events: &[sequence::ParkedEvent]) {
    if events.is_empty() {
        return;
    }
    let router = shared.topology.router();
    match within(
        shared.broker_timeout,
        "sending parked events back",
        sequence::send_back(channel, &router, events),
    )
    .await
    {
        Ok(Ok(())) => super::worker::mark_sent(shared, events).await,
        Ok(Err(error)) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "could not send a released event back; the sweep sends it again"
            );
        }
        Err(error) => {
            tracing::warn!(%error, "could not send a released event back; the sweep sends it again")
        }
    }
}

/// `resync`: asks the producer for snapshots of the stuck aggregates, by
/// type, [`MAX_IDS`] at a time, each request within the gap timeout (and
/// the producer client's own deadline).
async fn resync(shared: &Shared, stuck: Vec<StuckGap>) {
    let queue = shared.config.queue.as_str();
    let mut by_kind: BTreeMap<String, Vec<Aggregate>> = BTreeMap::new();
    for gap in &stuck {
        by_kind
            .entry(gap.aggregate_type.clone())
            .or_default()
            .push(gap.aggregate());
    }
    let Some(producer) = shared.resync.clone() else {
        return;
    };
    let deadline = shared.config.gap_timeout.max(Duration::from_secs(1));
    for (kind, aggregates) in by_kind {
        for chunk in aggregates.chunks(MAX_IDS) {
            let ids: Vec<String> = chunk.iter().map(|aggregate| aggregate.id.clone()).collect();
            let requested = tokio::time::timeout(deadline, producer.request(&kind, &ids)).await;
            let outcome = match requested {
                Ok(Ok(Requested::Written { written, unknown_ids })) => {
                    tracing::info!(
                        queue,
                        kind,
                        aggregates = ids.len(),
                        written,
                        unknown = unknown_ids.len(),
                        "gap policy resync: the producer republished the stuck aggregates"
                    );
                    if !unknown_ids.is_empty() {
                        tracing::warn!(
                            queue,
                            kind,
                            ?unknown_ids,
                            "gap policy resync: the producer has never known these aggregates"
                        );
                        let unknown: Vec<Aggregate> = chunk
                            .iter()
                            .filter(|aggregate| unknown_ids.contains(&aggregate.id))
                            .cloned()
                            .collect();
                        record(shared, &unknown, "unknown").await;
                        count(shared, GapPolicy::Resync, "unknown", unknown.len());
                    }
                    let known: Vec<Aggregate> = chunk
                        .iter()
                        .filter(|aggregate| !unknown_ids.contains(&aggregate.id))
                        .cloned()
                        .collect();
                    record(shared, &known, "requested").await;
                    count(shared, GapPolicy::Resync, "requested", known.len());
                    continue;
                }
                Ok(Ok(Requested::Unsupported)) => {
                    tracing::warn!(
                        queue,
                        kind,
                        "gap policy resync: the producer cannot resync this aggregate type; waiting"
                    );
                    "unsupported"
                }
                Ok(Err(error)) => {
                    tracing::warn!(
                        queue,
                        kind,
                        aggregates = ids.len(),
                        error = format!("{error:#}"),
                        "gap policy resync failed; tried again after CONSUMER_GAP_TIMEOUT"
                    );
                    "failed"
                }
                Err(_) => {
                    tracing::warn!(
                        queue,
                        kind,
                        aggregates = ids.len(),
                        deadline_ms = deadline.as_millis() as u64,
                        "gap policy resync timed out; tried again after CONSUMER_GAP_TIMEOUT"
                    );
                    "failed"
                }
            };
            record(shared, chunk, outcome).await;
            count(shared, GapPolicy::Resync, outcome, chunk.len());
        }
    }
}
