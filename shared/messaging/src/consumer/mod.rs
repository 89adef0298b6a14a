//! Typed consumers with an inbox, delayed retries and dead-lettering.
//!
//! ```no_run
//! # use shop_messaging::consumer::*;
//! # use shop_contracts::user::UserCreated;
//! # use diesel_async::AsyncPgConnection;
//! struct ApplyUserCreated;
//!
//! #[async_trait::async_trait]
//! impl Handler<UserCreated> for ApplyUserCreated {
//!     async fn handle(&self, conn: &mut AsyncPgConnection, event: UserCreated, meta: &EventMeta) -> Result<(), HandlerError> {
//!         // write the projection with `conn`: it is inside the transaction
//!         // that also moves the user's position (or records meta.event_id
//!         // in the inbox, for an event without a version)
//!         Ok(())
//!     }
//! }
//! # fn build(pool: shop_database::Pool, amqp: shop_messaging::AmqpConfig) {
//! let consumer = Consumer::new(ConsumerConfig::new("user.events", "order-service.user-events"), pool, amqp)
//!     .subscribe::<UserCreated, _>(ApplyUserCreated);
//! # }
//! ```
//!
//! # Where messages come from
//!
//! The consumer group (its queue name, shared by every replica) receives the
//! producer's events on [`ConsumerConfig::partitions`] partition queues,
//! routed by the `partition` header the relay sets from the aggregate id
//! ([`crate::topology`]). The replicas split the partitions between them
//! through a heartbeat table ([`crate::membership`]); each replica runs one
//! worker (one channel) per partition it owns, and each partition queue has
//! a single active consumer, so one aggregate's events are taken by one
//! worker at a time, in the order the relay published them.
//!
//! # What happens to a message
//!
//! 0. Before anything reads it ([`inspect_delivery`]): a body over
//!    [`ConsumerConfig::max_message_bytes`] is `too-large`; then the
//!    producer's signature is checked against
//!    [`ConsumerConfig::trusted_keys`] ([`crate::signing`]): unsigned (unless
//!    [`ConsumerConfig::accept_unsigned_until`] is still ahead), a key not
//!    trusted or a mismatch is `unauthenticated`. Neither is decoded,
//!    sequenced, retried or allowed to hold its aggregate's later events;
//!    both go to `<queue>.dlq` at once, counted
//!    (`consumer_unauthenticated_events_total{queue, cause}`). The
//!    bookkeeping headers (`attempt`, `original_*`, …) count only on a copy
//!    carrying this group's seal ([`crate::seal`]); on any other they are
//!    ignored and dropped from the copies made of it.
//! 1. The body is decoded by its AMQP `type` into the subscribed event type:
//!    the group's exchange is bound to exactly the subscribed routing keys,
//!    both names coming from [`shop_contracts::Event`]. The aggregate the
//!    body names ([`shop_contracts::Event::identity`]) must be the one the
//!    headers name, which the sequencing goes by; otherwise it is
//!    `rejected`.
//! 2. A message that can never succeed (no or malformed `message_id`, unknown
//!    `type`, undecodable body, a body that disagrees with its headers) is
//!    re-published to `<queue>.dlq` at once with the reason in its headers,
//!    and acknowledged.
//! 3. The others are applied in batches (up to
//!    [`ConsumerConfig::batch_size`] messages already delivered) in one
//!    transaction that decides each event against its aggregate's position
//!    ([`crate::sequence`]): the aggregate's next version is applied, an
//!    older one is a duplicate, a later one is parked until its turn. The
//!    positions are read with the aggregates locked, except where the
//!    position this replica committed last decides every event of the
//!    aggregate in the batch as the next version: then nothing is read,
//!    and the position moves only if it is still where it was remembered
//!    (if another replica moved it, the transaction rolls back before any
//!    handler runs, and the batch is decided again from positions read
//!    under their locks). The positions move before the handlers run, so
//!    their rows stay locked until the commit. A sequenced event needs no
//!    inbox row: its aggregate's position is its idempotency record (a
//!    version at or below it is a repeat). Events without an aggregate version are recorded in
//!    the inbox in one statement, which is what tells their repeats. The
//!    events applied are handed to the handlers, each run of consecutive
//!    events of one type in one [`Handler::handle_batch`] call, in delivery
//!    order, in the transaction that moved the positions. The messages are
//!    acknowledged (one `multiple` ack) only after the commit, and the
//!    parked events whose turn came are sent back to their partition. A
//!    batched handler's span belongs to the first message of its run; the
//!    transaction's span links to every message of the batch.
//! 4. If the batch fails, each message is applied alone to find the culprit.
//!    A [`HandlerError::Transient`] failure is re-published to the delay queue
//!    of its attempt (`<queue>.delay.<ms>ms`, dead-lettered back to its
//!    partition when the delay is over); after
//!    [`ConsumerConfig::max_attempts`], or at once for
//!    [`HandlerError::Permanent`], it goes to `<queue>.dlq`, and its
//!    aggregate's later events park behind it until it is replayed or
//!    skipped. Every re-publish waits for its publisher confirm before the
//!    original is acknowledged, so nothing is lost, and the worker carries on
//!    with the next messages meanwhile.
//! 5. When the database itself is unreachable the batch is held, unacked,
//!    and retried with backoff: an outage is not the message's fault and does
//!    not use up its attempts.
//! 6. A delivery the broker marks `redelivered` may be one that took the
//!    process down while it was handled (a crash writes no `attempt`
//!    header): its batch is applied one message per transaction, and the
//!    start of each redelivered one's handling is counted first, in a
//!    committed statement of its own (`inbox_crashes`). Past
//!    [`ConsumerConfig::max_attempts`] counted starts without an outcome,
//!    it is dead-lettered as `crashed`, holding its aggregate's later
//!    events. The broker's own delivery limit is set out of reach, since
//!    every hand-over's returns count towards it ([`crate::topology`]).
//!
//! With [`ConsumerConfig::ledger`], every application is also appended to
//! `inbox_ledger` in the same transaction: what the handlers were given, in
//! order, for audits (the chaos run reconciles against it).
//!
//! Metrics: `consumer_events_total{queue, outcome}` (outcome `applied`,
//! `duplicate` for events applied before, `parked`, `released`, `retried`,
//! `dead_lettered`), `consumer_dead_letters_total{queue, reason}`,
//! `consumer_parked_events{queue, reason}`,
//! `consumer_oldest_parked_seconds{queue}`, `consumer_stuck_gaps{queue}`,
//! `consumer_batch_size{queue}`, `consumer_apply_seconds{queue}`,
//! `consumer_remembered_positions{queue}`,
//! `consumer_position_conflicts_total{queue}`,
//! `consumer_version_conflicts_total{queue}` (an event at its aggregate's
//! last version with another id: see [`crate::sequence`]),
//! `consumer_gap_actions_total{queue, policy, outcome}` (the gap policy),
//! `consumer_unauthenticated_events_total{queue, cause}`,
//! `consumer_unsigned_events_total{queue}`, `consumer_connected{queue}`
//! and `consumer_fenced{queue}` (1 while this replica has given up its
//! partitions because its heartbeats failed for the member timeout).
//!
//! An event that would park while the group already holds
//! [`ConsumerConfig::max_parked_per_aggregate`] parked events of its
//! aggregate, or [`ConsumerConfig::max_parked`] in all, is dead-lettered as
//! `park-limit` instead ([`crate::sequence::ParkLimits`]).
//!
//! Dead letters carry the headers `dead_letter_reason`, `dead_letter_error`,
//! `dead_letter_attempts`, `original_exchange`, `original_routing_key`,
//! `original_queue` and `dead_lettered_at`, sealed, beside the event's own
//! (its signature included, unchanged); [`crate::dlq`] lists, shows,
//! replays and skips them.
//!
//! After the broker drops the connection (or restarts), the consumer
//! reconnects with backoff and declares its topology again; unacknowledged
//! messages are redelivered and the positions absorb the repeats.

mod crashes;
mod gaps;
mod session;
mod worker;

use std::any::Any;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use shop_backoff::Backoff;
use shop_contracts::Event;
use shop_database::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::AmqpConfig;
use crate::topology::ConsumerTopology;

/// How a consumer consumes.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerConfig {
    /// The producer's topic exchange (set by the service).
    #[arg(skip)]
    pub exchange: String,
    /// This consumer's queue, shared by all its replicas (set by the
    /// service).
    #[arg(skip)]
    pub queue: String,
    /// Unacknowledged messages the broker may push to each partition's
    /// worker.
    #[arg(
        id = "consumer_prefetch",
        long = "consumer-prefetch",
        env = "CONSUMER_PREFETCH",
        value_name = "N",
        default_value_t = 200,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub prefetch: u16,
    /// Partition queues of the consumer group (1 to 32): the most replicas
    /// (and workers) that consume at once, one per partition. Change it
    /// with every replica stopped (see [`crate::topology`]).
    #[arg(
        id = "consumer_partitions",
        long = "consumer-partitions",
        env = "CONSUMER_PARTITIONS",
        value_name = "N",
        default_value_t = 4,
        value_parser = clap::value_parser!(u16).range(1..=32)
    )]
    pub partitions: u16,
    /// How long a replica may miss its heartbeats before the others take
    /// its partitions (it beats five times as often); a replica whose own
    /// heartbeats fail this long gives its partitions up.
    #[arg(
        id = "consumer_member_timeout",
        long = "consumer-member-timeout",
        env = "CONSUMER_MEMBER_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = shop_config::duration
    )]
    pub member_timeout: Duration,
    /// How long an event may wait for an earlier version of its aggregate
    /// before the gap counts as stuck (`consumer_stuck_gaps`, a warning,
    /// `shop dlq list`); keep it above the sum of the retry delays.
    #[arg(
        id = "consumer_gap_timeout",
        long = "consumer-gap-timeout",
        env = "CONSUMER_GAP_TIMEOUT",
        value_name = "DURATION",
        default_value = "5m",
        value_parser = shop_config::duration
    )]
    pub gap_timeout: Duration,
    /// What the sweep does about a gap older than `CONSUMER_GAP_TIMEOUT`,
    /// once per aggregate per timeout: `wait` (only count it), `resync`
    /// (ask the producer for a snapshot of the aggregate; needs a producer
    /// to ask, [`Consumer::resync`]) or `apply-next` (apply the first
    /// parked event past the gap when its type carries the whole state,
    /// otherwise wait). Unset: `resync` where the service has a producer to
    /// ask, else `wait`.
    #[arg(
        id = "consumer_gap_policy",
        long = "consumer-gap-policy",
        env = "CONSUMER_GAP_POLICY",
        value_name = "POLICY",
        value_enum
    )]
    pub gap_policy: Option<crate::sequence::GapPolicy>,
    /// Aggregates whose last committed position each replica remembers, so
    /// that their next versions are decided without reading the position
    /// (checked when it moves): between N and 2N recent aggregates, up to
    /// 1.6 MiB at the default. 0 reads every position.
    #[arg(
        id = "consumer_remembered_positions",
        long = "consumer-remembered-positions",
        env = "CONSUMER_REMEMBERED_POSITIONS",
        value_name = "N",
        default_value_t = 16_384
    )]
    pub remembered_positions: usize,
    /// Record every application in `inbox_ledger` (event, aggregate,
    /// version, in order), for audits and reconciliation.
    #[arg(
        id = "consumer_ledger",
        long = "consumer-ledger",
        env = "CONSUMER_LEDGER",
        value_name = "BOOL",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub ledger: bool,
    /// Most messages applied in one transaction.
    #[arg(
        id = "consumer_batch_size",
        long = "consumer-batch-size",
        env = "CONSUMER_BATCH_SIZE",
        value_name = "N",
        default_value_t = 100,
        value_parser = clap::value_parser!(u16).range(1..=10_000)
    )]
    pub batch_size: u16,
    /// Delay before each retry of a failed message, comma-separated; the
    /// number of entries is the number of delay queues.
    #[arg(
        id = "consumer_retry_delays",
        long = "consumer-retry-delays",
        env = "CONSUMER_RETRY_DELAYS",
        value_name = "DURATIONS",
        default_value = "1s,10s,60s",
        value_delimiter = ',',
        value_parser = shop_config::duration
    )]
    pub retry_delays: Vec<Duration>,
    /// Attempts before a failing message is dead-lettered (the first
    /// delivery counts).
    #[arg(
        id = "consumer_max_attempts",
        long = "consumer-max-attempts",
        env = "CONSUMER_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    pub max_attempts: u32,
    /// The public keys of the producer's signing keys (set by the service,
    /// e.g. from `USER_EVENTS_KEYS_FILE`): only events one of them signed are
    /// applied ([`crate::signing`]). A consumer that trusts none refuses to
    /// start (unless [`Self::accept_unsigned_until`] is set).
    #[arg(skip)]
    pub trusted_keys: crate::signing::TrustedKeys,
    /// Until this time (RFC 3339, at most 7 days ahead when the service
    /// starts), events without any signature are applied as before signing
    /// existed, counted in `consumer_unsigned_events_total`: for the rolling
    /// upgrade of a producer whose old relays do not sign yet. Unset, the
    /// default, refuses them. A bad signature or an unknown key is refused
    /// either way.
    #[arg(
        id = "consumer_accept_unsigned_until",
        long = "consumer-accept-unsigned-until",
        env = "CONSUMER_ACCEPT_UNSIGNED_UNTIL",
        value_name = "TIME",
        value_parser = unsigned_window
    )]
    pub accept_unsigned_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Largest message body applied; a larger one is dead-lettered as
    /// `too-large` before anything reads it. Keep it below the broker's
    /// `max_message_size` (the shipped broker configuration sets 128 KiB),
    /// which bounds what reaches the consumer at all.
    #[arg(
        id = "consumer_max_message_bytes",
        long = "consumer-max-message-bytes",
        env = "CONSUMER_MAX_MESSAGE_BYTES",
        value_name = "BYTES",
        default_value_t = 65_536,
        value_parser = clap::value_parser!(u32).range(256..=134_217_728)
    )]
    pub max_message_bytes: u32,
    /// Most events parked (ahead of their turn) for one aggregate; one more
    /// is dead-lettered as `park-limit` instead.
    #[arg(
        id = "consumer_max_parked_per_aggregate",
        long = "consumer-max-parked-per-aggregate",
        env = "CONSUMER_MAX_PARKED_PER_AGGREGATE",
        value_name = "N",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_parked_per_aggregate: u32,
    /// Most events parked for the whole consumer group; past it every event
    /// that would park is dead-lettered as `park-limit`.
    #[arg(
        id = "consumer_max_parked",
        long = "consumer-max-parked",
        env = "CONSUMER_MAX_PARKED",
        value_name = "N",
        default_value_t = 100_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_parked: u32,
    /// How long applied event ids are kept in the inbox (a duplicate arriving
    /// later is still harmless to projections that ignore stale versions).
    #[arg(
        long = "inbox-retention",
        env = "INBOX_RETENTION",
        value_name = "DURATION",
        default_value = "7days",
        value_parser = shop_config::duration
    )]
    pub inbox_retention: Duration,
    /// The database role of the dead-letter commands (`shop dlq`, which
    /// connect with `CONSUMER_DATABASE_URL`): granted at every start,
    /// after the migrations, only what they need on the consumer's tables
    /// ([`crate::dlq::DATABASE_GRANTS`]). Unset, no role is granted
    /// anything.
    #[arg(
        id = "dlq_database_role",
        long = "dlq-database-role",
        env = "DLQ_DATABASE_ROLE",
        value_name = "ROLE"
    )]
    pub dlq_database_role: Option<String>,
    /// Waits between reconnection attempts.
    #[arg(skip = Backoff::default())]
    pub backoff: Backoff,
    /// How often the sweep sends back released events that were not applied
    /// (and the next in line that no transaction released) and reports what
    /// is parked.
    #[arg(skip = Duration::from_secs(5))]
    pub sweep_interval: Duration,
}

impl ConsumerConfig {
    /// What the consumer's migrator grants other roles: the dead-letter
    /// commands' role, when one is named.
    pub fn database_grants(&self) -> Vec<shop_database::Grant> {
        self.dlq_database_role
            .iter()
            .map(|role| shop_database::Grant::new(role.as_str(), crate::dlq::DATABASE_GRANTS))
            .collect()
    }

    /// The defaults for consuming `queue` from `exchange`: 4 partitions,
    /// prefetch 200, batches of up to 100, retries after 1 s, 10 s and 60 s,
    /// 4 attempts, inbox kept 7 days.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        let mut config: Self = shop_config::defaults();
        config.exchange = exchange.into();
        config.queue = queue.into();
        config
    }

    /// The exchanges and queues of a consumer with this configuration
    /// (without routing keys: those come from its subscriptions), for
    /// tooling and clean-up.
    pub fn topology(&self) -> ConsumerTopology {
        ConsumerTopology {
            exchange: self.exchange.clone(),
            queue: self.queue.clone(),
            routing_keys: Vec::new(),
            retry_delays: self.retry_delays.clone(),
            partitions: self.partitions,
        }
    }

    /// Every queue a consumer with this configuration declares (its
    /// partitions, the delay queues and the dead-letter queue), for tooling
    /// and clean-up.
    pub fn queue_names(&self) -> Vec<String> {
        self.topology().queue_names()
    }

    /// The checks of a delivery with these settings, sealed with `seal`.
    pub fn checks(&self, seal: Option<crate::seal::SealKey>) -> DeliveryChecks {
        DeliveryChecks {
            trusted_keys: self.trusted_keys.clone(),
            seal,
            max_message_bytes: self.max_message_bytes as usize,
            accept_unsigned_until: self.accept_unsigned_until,
        }
    }
}

/// Longest window `CONSUMER_ACCEPT_UNSIGNED_UNTIL` may open.
pub const MAX_UNSIGNED_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// clap's parser of `CONSUMER_ACCEPT_UNSIGNED_UNTIL`: an RFC 3339 time at
/// most [`MAX_UNSIGNED_WINDOW`] from now.
fn unsigned_window(value: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let until = chrono::DateTime::parse_from_rfc3339(value)
        .map_err(|error| format!("not an RFC 3339 time (2026-12-31T12:00:00Z): {error}"))?
        .with_timezone(&chrono::Utc);
    if until - chrono::Utc::now() > MAX_UNSIGNED_WINDOW {
        return Err("more than 7 days ahead: the window for unsigned events is a rolling upgrade's, not a setting to leave on".to_owned());
    }
    Ok(until)
}

/// What a delivery is checked against before any handler sees it: the
/// producer's keys, the consumer's seal, the size cap and the window for
/// unsigned events (see [`ConsumerConfig`]).
#[derive(Debug, Clone)]
pub struct DeliveryChecks {
    /// Whose signatures are accepted.
    pub trusted_keys: crate::signing::TrustedKeys,
    /// The consumer group's seal; without one, no bookkeeping header counts.
    pub seal: Option<crate::seal::SealKey>,
    /// Largest body.
    pub max_message_bytes: usize,
    /// Unsigned events are applied until then.
    pub accept_unsigned_until: Option<chrono::DateTime<chrono::Utc>>,
}

impl DeliveryChecks {
    /// Whether an unsigned event is accepted now.
    fn unsigned_accepted(&self) -> bool {
        self.accept_unsigned_until
            .is_some_and(|until| chrono::Utc::now() < until)
    }
}

/// What a handler knows about the message besides the event.
#[derive(Debug, Clone)]
pub struct EventMeta {
    /// The AMQP `message_id`, also the inbox key.
    pub event_id: Uuid,
    /// The AMQP `type`.
    pub type_name: String,
    /// Exchange the event was first published to.
    pub exchange: String,
    /// Routing key it was first published with.
    pub routing_key: String,
    /// Aggregate type from the headers, when present.
    pub aggregate_type: Option<String>,
    /// Aggregate id from the headers, when present.
    pub aggregate_id: Option<String>,
    /// Aggregate version from the headers, when present.
    pub aggregate_version: Option<i64>,
    /// 1 on the first delivery, then one more per retry.
    pub attempt: u32,
    /// The broker delivered this copy before, to a consumer that did not
    /// acknowledge it (its channel closed or its connection dropped): its
    /// effect may or may not have been committed (the position or the
    /// inbox tells).
    pub redelivered: bool,
}

impl EventMeta {
    /// The aggregate and version the event is sequenced by (see
    /// [`crate::sequence`]): `None` without an aggregate id or a positive
    /// version.
    pub fn sequenced(&self) -> Option<(crate::sequence::Aggregate, i64)> {
        crate::sequence::Aggregate::sequenced(
            self.aggregate_type.as_deref(),
            self.aggregate_id.as_deref(),
            self.aggregate_version,
        )
    }
}

/// Why a handler could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might succeed later (a conflict, a dependency away): retried after a
    /// delay, dead-lettered after the last attempt.
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Can never succeed (the event breaks an invariant): dead-lettered at
    /// once.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        Self::Transient(error.into())
    }

    /// A failure not worth retrying.
    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        Self::Permanent(error.into())
    }
}

impl From<diesel::result::Error> for HandlerError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Transient(error.into())
    }
}

/// Applies events of type `E` inside the consumer's transaction.
#[async_trait::async_trait]
pub trait Handler<E: Event>: Send + Sync + 'static {
    /// Applies `event`. `conn` is inside the transaction that also records
    /// the event in the inbox; it commits only if every handler of the batch
    /// succeeds. What the handler writes through `conn` happens once; the
    /// call itself may be repeated when the transaction does not commit (a
    /// failing neighbour in the batch, a database fault), so an effect
    /// outside the database goes through an outbox written with `conn`, not
    /// straight out.
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: E,
        meta: &EventMeta,
    ) -> Result<(), HandlerError>;

    /// Applies consecutive events of this type (in delivery order) in the
    /// same transaction. The default calls [`Handler::handle`] for each; a
    /// handler that can apply many events in fewer statements (a projection
    /// upserting many rows at once) overrides it. If it fails, the consumer
    /// applies the events one at a time to find the one that fails.
    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(E, EventMeta)>,
    ) -> Result<(), HandlerError> {
        for (event, meta) in events {
            self.handle(conn, event, &meta).await?;
        }
        Ok(())
    }
}

type Decoded = Box<dyn Any + Send>;

/// The checks a message passes before any handler sees it: a UUID
/// `message_id` (the inbox key), a `type` some handler takes (`decode`
/// returns `None` for a type nobody handles), a body that decodes as that
/// type. Otherwise the reason it goes to the dead-letter queue at once, with
/// the error text.
pub(crate) fn classify<T>(
    message_id: Option<&str>,
    type_name: Option<&str>,
    body: &[u8],
    decode: impl FnOnce(&str, &[u8]) -> Option<Result<T, prost::DecodeError>>,
) -> Result<(Uuid, String, T), (crate::wire::DeadLetterReason, String)> {
    use crate::wire::DeadLetterReason;
    let Some(event_id) = message_id.and_then(|id| Uuid::try_parse(id).ok()) else {
        return Err((
            DeadLetterReason::MissingMessageId,
            format!("message_id {message_id:?} is not a UUID"),
        ));
    };
    let type_name = type_name.unwrap_or_default();
    match decode(type_name, body) {
        None => Err((
            DeadLetterReason::UnknownType,
            format!("no handler for type {type_name:?}"),
        )),
        Some(Err(error)) => Err((
            DeadLetterReason::Undecodable,
            format!("body is not a valid {type_name}: {error}"),
        )),
        Some(Ok(decoded)) => Ok((event_id, type_name.to_owned(), decoded)),
    }
}

/// A delivery the checks refused: why, the text for the dead letter, and
/// whether its producer's signature checked out (only then may it hold its
/// aggregate's later events behind it).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reason: crate::wire::DeadLetterReason,
    pub(crate) error: String,
    pub(crate) authenticated: bool,
    /// Why it is unauthenticated, for the metric.
    pub(crate) cause: Option<&'static str>,
}

/// A delivery that passed the checks.
#[derive(Debug)]
pub(crate) struct Inspected<T> {
    pub(crate) meta: EventMeta,
    pub(crate) decoded: T,
    /// Its bookkeeping headers carry the consumer's seal.
    pub(crate) sealed: bool,
    /// Accepted unsigned, inside `CONSUMER_ACCEPT_UNSIGNED_UNTIL`.
    pub(crate) unsigned: bool,
}

/// Everything the consumer does with a delivery before any handler sees it,
/// in this order:
///
/// 1. the size: a body over the cap is `too-large`, unread;
/// 2. the producer's signature ([`crate::signing`]): unsigned, an unknown
///    key or a mismatch is `unauthenticated`;
/// 3. [`classify`] on its `message_id`, `type` and body (`decode` returns
///    the decoded event and the aggregate its body names);
/// 4. the body against the headers the sequencing goes by: another
///    aggregate type, id or version is `rejected`;
/// 5. the handler's [`EventMeta`] from the headers, the bookkeeping
///    (attempt, original exchange and routing key) only under the
///    consumer's seal ([`crate::seal`]).
///
/// The worker calls it on every delivery; [`inspect_delivery`] calls it on
/// anything, for fuzzing.
pub(crate) fn inspect<T>(
    checks: &DeliveryChecks,
    properties: &lapin::BasicProperties,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    decode: impl FnOnce(&str, &[u8]) -> Option<Result<(T, shop_contracts::EventIdentity), prost::DecodeError>>,
) -> Result<Inspected<T>, Refusal> {
    use crate::signing::Unauthenticated;
    use crate::wire::{self, DeadLetterReason, header_i64, header_str};
    if body.len() > checks.max_message_bytes {
        return Err(Refusal {
            reason: DeadLetterReason::TooLarge,
            error: format!(
                "{} bytes, more than CONSUMER_MAX_MESSAGE_BYTES ({})",
                body.len(),
                checks.max_message_bytes
            ),
            authenticated: false,
            cause: None,
        });
    }
    let unsigned = match checks.trusted_keys.verify(properties, body) {
        Ok(_) => false,
        Err(Unauthenticated::Unsigned) if checks.unsigned_accepted() => true,
        Err(refused) => {
            return Err(Refusal {
                reason: DeadLetterReason::Unauthenticated,
                error: refused.to_string(),
                authenticated: false,
                cause: Some(refused.cause()),
            });
        }
    };
    let refusal = |(reason, error)| Refusal {
        reason,
        error,
        authenticated: !unsigned,
        cause: None,
    };
    let (event_id, type_name, (decoded, identity)) = classify(
        properties.message_id().as_ref().map(|id| id.as_str()),
        properties.kind().as_ref().map(|kind| kind.as_str()),
        body,
        decode,
    )
    .map_err(refusal)?;
    let headers = properties.headers().as_ref();
    let header = |key| headers.and_then(|h| header_str(h, key));
    let version = headers.and_then(|h| header_i64(h, wire::AGGREGATE_VERSION));
    let disagrees = header(wire::AGGREGATE_TYPE).is_some_and(|kind| kind != identity.aggregate_type)
        || header(wire::AGGREGATE_ID).is_some_and(|id| id != identity.aggregate_id)
        || version.is_some_and(|version| version != identity.aggregate_version);
    if disagrees {
        return Err(refusal((
            DeadLetterReason::Rejected,
            format!(
                "the body is about {}/{:?} version {}, the headers say {:?}/{:?} version {:?}",
                identity.aggregate_type,
                shown(&identity.aggregate_id),
                identity.aggregate_version,
                header(wire::AGGREGATE_TYPE).map(shown),
                header(wire::AGGREGATE_ID).map(shown),
                version,
            ),
        )));
    }
    let sealed = checks.seal.as_ref().is_some_and(|seal| seal.verify(properties));
    let bookkeeping = |key| if sealed { header(key) } else { None };
    let meta = EventMeta {
        event_id,
        type_name,
        exchange: bookkeeping(wire::ORIGINAL_EXCHANGE)
            .unwrap_or(exchange)
            .to_owned(),
        routing_key: bookkeeping(wire::ORIGINAL_ROUTING_KEY)
            .unwrap_or(routing_key)
            .to_owned(),
        aggregate_type: header(wire::AGGREGATE_TYPE).map(str::to_owned),
        aggregate_id: header(wire::AGGREGATE_ID).map(str::to_owned),
        aggregate_version: version,
        attempt: if sealed { attempt(properties) } else { 1 },
        // Known from the delivery, not the message: the worker sets it.
        redelivered: false,
    };
    Ok(Inspected {
        meta,
        decoded,
        sealed,
        unsigned,
    })
}

/// Text from a message, cut to 200 characters for an error.
fn shown(text: &str) -> String {
    text.chars().take(200).collect()
}

/// The attempt a delivery's `attempt` header says it is on, 1 without it:
/// to be believed only on a sealed delivery.
pub(crate) fn attempt(properties: &lapin::BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| crate::wire::header_i64(headers, crate::wire::ATTEMPT))
        .and_then(|attempt| u32::try_from(attempt).ok())
        .unwrap_or(1)
        .max(1)
}

/// The checks the consumer runs on a delivery, with every event type of
/// the system as a subscription, plus the trace context the consumer's
/// span continues: for fuzzing and randomized tests, which feed it
/// properties parsed from arbitrary AMQP frames. Returns the metadata, or
/// the dead-letter reason; it must never panic.
pub fn inspect_delivery(
    checks: &DeliveryChecks,
    properties: &lapin::BasicProperties,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> Result<EventMeta, crate::wire::DeadLetterReason> {
    let _trace = crate::wire::extract_trace(properties.headers().as_ref());
    let known = |type_name: &str, body: &[u8]| {
        shop_contracts::identify_event(type_name, body)
            .map(|identity| identity.map(|identity| ((), identity)))
    };
    inspect(checks, properties, exchange, routing_key, body, known)
        .map(|inspected| inspected.meta)
        .map_err(|refusal| refusal.reason)
}

/// The checks of a message on arbitrary bytes, for fuzzing: the input is
/// split into a message id, a type name and a body (two length bytes, then the parts), a
/// body alone also tried as every event type of the system. Returns the
/// dead-letter reasons it met; it must never panic.
pub fn inspect_any(data: &[u8]) -> Vec<crate::wire::DeadLetterReason> {
    let mut reasons = Vec::new();
    let known = |type_name: &str, body: &[u8]| {
        shop_contracts::describe_event(type_name, body).map(|decoded| decoded.map(drop))
    };
    for event in shop_contracts::all_event_types() {
        let id = Uuid::nil().to_string();
        if let Err((reason, _)) = classify(Some(&id), Some(event.type_name), data, known) {
            reasons.push(reason);
        }
    }
    if let [id_len, type_len, rest @ ..] = data {
        let (id, rest) = rest.split_at((*id_len as usize).min(rest.len()));
        let (kind, body) = rest.split_at((*type_len as usize).min(rest.len()));
        let id = String::from_utf8_lossy(id);
        let kind = String::from_utf8_lossy(kind);
        if let Err((reason, _)) = classify(Some(&id), Some(&kind), body, known) {
            reasons.push(reason);
        }
    }
    reasons
}

/// A handler with its event type erased, so one consumer dispatches several
/// types by name.
#[async_trait::async_trait]
trait ErasedHandler: Send + Sync {
    /// The event type is a snapshot ([`Event::SNAPSHOT`]).
    fn snapshot(&self) -> bool;
    /// The event type carries the whole state ([`Event::STATE_CARRYING`]).
    fn state_carrying(&self) -> bool;
    fn decode(&self, body: &[u8]) -> Result<(Decoded, shop_contracts::EventIdentity), prost::DecodeError>;
    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(Decoded, EventMeta)>,
    ) -> Result<(), HandlerError>;
}

struct Typed<E, H> {
    handler: H,
    event: PhantomData<fn() -> E>,
}

#[async_trait::async_trait]
impl<E: Event, H: Handler<E>> ErasedHandler for Typed<E, H> {
    fn snapshot(&self) -> bool {
        E::SNAPSHOT
    }

    fn state_carrying(&self) -> bool {
        E::STATE_CARRYING || E::SNAPSHOT
    }

    fn decode(&self, body: &[u8]) -> Result<(Decoded, shop_contracts::EventIdentity), prost::DecodeError> {
        let event = E::decode(body)?;
        let identity = event.identity();
        Ok((Box::new(event), identity))
    }

    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(Decoded, EventMeta)>,
    ) -> Result<(), HandlerError> {
        let mut typed = Vec::with_capacity(events.len());
        for (event, meta) in events {
            match event.downcast::<E>() {
                Ok(event) => typed.push((*event, meta)),
                Err(_) => {
                    return Err(HandlerError::permanent(anyhow::anyhow!(
                        "decoded event is not a {}",
                        E::TYPE_NAME
                    )));
                }
            }
        }
        self.handler.handle_batch(conn, typed).await
    }
}

/// A consumer of one queue: typed subscriptions, inbox, retries, dead
/// letters. See the module docs.
pub struct Consumer {
    config: ConsumerConfig,
    pool: Pool,
    amqp: AmqpConfig,
    handlers: HashMap<&'static str, Arc<dyn ErasedHandler>>,
    routing_keys: Vec<String>,
    connected: watch::Sender<bool>,
    resync: Option<Arc<dyn crate::resync::Resync>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .field("types", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A consumer with no subscriptions yet.
    pub fn new(config: ConsumerConfig, pool: Pool, amqp: AmqpConfig) -> Self {
        Self {
            config,
            pool,
            amqp,
            handlers: HashMap::new(),
            routing_keys: Vec::new(),
            connected: watch::Sender::new(false),
            resync: None,
        }
    }

    /// Asks `producer` for snapshots of the aggregates stuck behind a gap
    /// (gap policy `resync`, the default once set; see
    /// [`crate::resync`]).
    #[must_use]
    pub fn resync(mut self, producer: Arc<dyn crate::resync::Resync>) -> Self {
        self.resync = Some(producer);
        self
    }

    /// The gap policy in force: the setting, else `resync` with a producer
    /// to ask and `wait` without.
    pub fn gap_policy(&self) -> crate::sequence::GapPolicy {
        use crate::sequence::GapPolicy;
        self.config.gap_policy.unwrap_or(if self.resync.is_some() {
            GapPolicy::Resync
        } else {
            GapPolicy::Wait
        })
    }

    /// Routes events of type `E` (by AMQP `type`) to `handler` and binds the
    /// queue to `E`'s routing key.
    #[must_use]
    pub fn subscribe<E: Event, H: Handler<E>>(mut self, handler: H) -> Self {
        self.handlers.insert(
            E::TYPE_NAME,
            Arc::new(Typed {
                handler,
                event: PhantomData::<fn() -> E>,
            }),
        );
        if !self.routing_keys.iter().any(|key| key == E::ROUTING_KEY) {
            self.routing_keys.push(E::ROUTING_KEY.to_owned());
        }
        self
    }

    /// The exchange, queues and bindings this consumer declares.
    pub fn topology(&self) -> ConsumerTopology {
        ConsumerTopology {
            routing_keys: self.routing_keys.clone(),
            ..self.config.topology()
        }
    }

    /// Whether the consumer is connected and consuming right now (for health
    /// reporting: the service host shows it on `/health` and in
    /// `dependency_up`).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Consumes until `shutdown`, reconnecting whenever the broker goes away.
    /// The batch under way when shutdown comes is finished and acknowledged.
    ///
    /// A consumer that trusts no producer key (and has no window for
    /// unsigned events) does not start: it would refuse every event.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.config.trusted_keys.is_empty() || self.config.accept_unsigned_until.is_some(),
            "the consumer of {} trusts no producer key: every event would be refused as unauthenticated",
            self.config.queue
        );
        anyhow::ensure!(
            self.gap_policy() != crate::sequence::GapPolicy::Resync || self.resync.is_some(),
            "the consumer of {}: CONSUMER_GAP_POLICY=resync needs a producer to ask (CONSUMER_RESYNC_URL)",
            self.config.queue
        );
        session::run(self, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DeadLetterReason;

    #[test]
    fn every_golden_event_passes_the_checks_as_its_own_type() {
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
        for event in shop_contracts::all_event_types() {
            let body = std::fs::read(golden.join(format!("{}.binpb", event.type_name))).unwrap();
            let known = |type_name: &str, body: &[u8]| shop_contracts::describe_event(type_name, body);
            let id = Uuid::now_v7().to_string();
            let checked = classify(Some(&id), Some(event.type_name), &body, known);
            assert!(checked.is_ok(), "{}: {checked:?}", event.type_name);
        }
    }

    #[test]
    fn classify_names_the_reason_of_a_message_that_can_never_succeed() {
        let known = |type_name: &str, body: &[u8]| shop_contracts::describe_event(type_name, body);
        let id = Uuid::now_v7().to_string();
        let reason = |id: Option<&str>, kind: Option<&str>, body: &[u8]| {
            classify(id, kind, body, known).map(drop).unwrap_err().0
        };
        assert_eq!(
            reason(None, Some("shop.user.v1.UserCreated"), b""),
            DeadLetterReason::MissingMessageId
        );
        assert_eq!(
            reason(Some("nope"), Some("shop.user.v1.UserCreated"), b""),
            DeadLetterReason::MissingMessageId
        );
        assert_eq!(reason(Some(&id), None, b""), DeadLetterReason::UnknownType);
        assert_eq!(
            reason(Some(&id), Some("shop.user.v1.Nope"), b""),
            DeadLetterReason::UnknownType
        );
        assert_eq!(
            reason(Some(&id), Some("shop.user.v1.UserCreated"), b"\xff\xff"),
            DeadLetterReason::Undecodable
        );
    }

    #[test]
    fn inspect_any_survives_arbitrary_bytes() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for length in 0..2000 {
            let bytes: Vec<u8> = (0..length % 300)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            inspect_any(&bytes);
        }
    }
}
