//! Re-synchronisation: how a consumer asks the producer of the events it
//! misses to republish the state of their aggregates as snapshots.
//!
//! A consumer whose gap policy is `resync` (`CONSUMER_GAP_POLICY`; see
//! [`crate::sequence`], "The gap policy") calls its [`Resync`] from the
//! sweep with the ids of the aggregates of one type stuck behind a gap past
//! `CONSUMER_GAP_TIMEOUT`, at most [`MAX_IDS`] at a time and at most once
//! per aggregate per timeout. The producer writes a snapshot of each to its
//! outbox; the snapshot arrives like any event, above the position, and the
//! position jumps to it. The messaging library only defines the request:
//! the service that consumes implements it with the producer's client (the
//! order service calls `UserService/ResyncUsers` as its own principal), so
//! this crate stays free of any RPC stack.

/// Most aggregate ids in one request (`ResyncUsersRequest.users` takes up
/// to 1000).
pub const MAX_IDS: usize = 1000;

/// What a producer answered to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested {
    /// The snapshots are in the producer's outbox.
    Written {
        /// Snapshots written.
        written: i64,
        /// Ids the producer has never known (no snapshot will come).
        unknown_ids: Vec<String>,
    },
    /// The producer cannot resync aggregates of this type.
    Unsupported,
}

/// The producer's re-synchronisation call.
#[async_trait::async_trait]
pub trait Resync: Send + Sync + 'static {
    /// Asks the producer to republish the aggregates `ids` (at most
    /// [`MAX_IDS`]) of type `kind` as snapshots, and waits until it has
    /// written them; bounded by a deadline of the implementation's.
    async fn request(&self, kind: &str, ids: &[String]) -> anyhow::Result<Requested>;
}
