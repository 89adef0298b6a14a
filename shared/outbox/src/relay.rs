//! The relay: publishes stored events with publisher confirms, then marks
//! them. See the crate docs for the claiming and ordering rules.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Integer};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use futures::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use shop_backoff::Backoff;
use shop_database::{DatabaseConfig, Pool};
use shop_messaging::signing::SigningKey;
use shop_messaging::wire::EventHeaders;
use shop_messaging::{AmqpConfig, within};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

use crate::PARTITIONS;
use crate::wake::{Counts, Wake, lane_mask, woken};

/// Namespace (first key) of the relay's advisory locks; the second key is the
/// partition.
const LOCK_NAMESPACE: i32 = 0x6f75_7462; // "outb"

/// How a relay publishes.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Topic exchange the events go to (set by the service: `user.events`).
    #[arg(skip)]
    pub exchange: String,
    /// AMQP `app_id` of every event: the producing service (set by the
    /// service).
    #[arg(skip)]
    pub app_id: String,
    /// Most rows read per batch (one transaction; it also ends at
    /// `RELAY_BATCH_TIME`).
    #[arg(
        id = "relay_batch_size",
        long = "relay-batch-size",
        env = "RELAY_BATCH_SIZE",
        value_name = "N",
        default_value_t = 2000,
        value_parser = clap::value_parser!(i64).range(1..=100_000)
    )]
    pub batch_size: i64,
    /// How long a batch keeps sending: past it, no further wave starts; the
    /// batch waits for the confirms in flight (at most
    /// `RELAY_CONFIRM_TIMEOUT`), marks what the broker confirmed, commits,
    /// and the next batch goes on at once. So a batch's transaction ends
    /// well inside its deadline even when one aggregate's backlog goes out
    /// one confirm at a time.
    #[arg(
        id = "relay_batch_time",
        long = "relay-batch-time",
        env = "RELAY_BATCH_TIME",
        value_name = "DURATION",
        default_value = "2s",
        value_parser = shop_config::duration
    )]
    pub batch_time: Duration,
    /// How long to wait without a wake-up before looking anyway: how late
    /// an event written by a process that announces nothing (another
    /// writer of the outbox, a lost announcement) is published at most.
    #[arg(
        id = "relay_poll_interval",
        long = "relay-poll-interval",
        env = "RELAY_POLL_INTERVAL",
        value_name = "DURATION",
        default_value = "1s",
        value_parser = shop_config::duration
    )]
    pub poll_interval: Duration,
    /// How often at most a process that commits events announces them to
    /// the relays of other processes (one `NOTIFY outbox` naming the
    /// partitions committed since the last; see [`crate::Wake`]); `0s`
    /// announces nothing, for a single process whose own relay is woken
    /// in memory.
    #[arg(
        id = "outbox_notify_interval",
        long = "outbox-notify-interval",
        env = "OUTBOX_NOTIFY_INTERVAL",
        value_name = "DURATION",
        default_value = "10ms",
        value_parser = shop_config::duration
    )]
    pub notify_interval: Duration,
    /// How long a broker confirm may take before the batch counts as failed.
    #[arg(
        id = "relay_confirm_timeout",
        long = "relay-confirm-timeout",
        env = "RELAY_CONFIRM_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = shop_config::duration
    )]
    pub confirm_timeout: Duration,
    /// Published rows older than this are deleted (by the service host's
    /// retention sweep).
    #[arg(
        id = "outbox_retention",
        long = "outbox-retention",
        env = "OUTBOX_RETENTION",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = shop_config::duration
    )]
    pub retention: Duration,
    /// What happens to an event no queue is bound to receive: `wait` keeps
    /// it in the outbox, unpublished, and tries again (nothing is lost when a
    /// consumer declares its queue after the producer started); `drop` lets
    /// the broker drop it, for an exchange nobody consumes.
    #[arg(
        id = "relay_unroutable",
        long = "relay-unroutable",
        env = "RELAY_UNROUTABLE",
        value_name = "POLICY",
        default_value = "wait"
    )]
    pub unroutable: Unroutable,
    /// Waits between attempts while the broker or the database is away.
    #[arg(skip = Backoff::default())]
    pub backoff: Backoff,
    /// Lanes of one relay: each claims its own share of the partitions (lane
    /// `i` of `n` tries partitions `i`, `i + n`, …) and runs its own batches
    /// on its own connections, so one lane's database work overlaps another's
    /// wait for the broker.
    /// The producer's signing key: every event is signed with it as it is
    /// published (see `shop_messaging::signing`).
    #[command(flatten)]
    pub signing: shop_messaging::signing::SigningConfig,
    #[arg(
        id = "relay_lanes",
        long = "relay-lanes",
        env = "RELAY_LANES",
        value_name = "N",
        default_value_t = 2,
        value_parser = clap::value_parser!(u16).range(1..=32)
    )]
    pub lanes: u16,
    /// Also write the CloudEvents binary-mode headers (`ce-specversion`,
    /// `ce-id`, `ce-source`, `ce-type`, `ce-time`, `ce-subject`) on every
    /// event, mirroring its properties, for consumers that route and
    /// deduplicate by them ([`shop_messaging::wire::CLOUDEVENTS`]).
    #[arg(
        id = "relay_cloudevents",
        long = "relay-cloudevents",
        env = "RELAY_CLOUDEVENTS",
        value_name = "BOOL",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub cloudevents: bool,
}

impl RelayConfig {
    /// The defaults, for publishing to `exchange` as `app_id`.
    pub fn new(exchange: impl Into<String>, app_id: impl Into<String>) -> Self {
        let mut config: Self = shop_config::defaults();
        config.exchange = exchange.into();
        config.app_id = app_id.into();
        config
    }
}

/// What the relay does with an event that no queue is bound to receive
/// ([`RelayConfig::unroutable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unroutable {
    /// Published `mandatory`: the broker returns it, the row stays
    /// unpublished (as do the aggregate's later events) and the lane tries
    /// again after a growing pause, counted in
    /// `outbox_events_unroutable_total` and logged.
    Wait,
    /// Published without `mandatory`: the broker drops it and the row is
    /// marked published.
    Drop,
}

/// Why a batch did not publish everything it claimed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed or is unreachable.
    #[error("database error")]
    Database(#[from] diesel::result::Error),
    /// No pooled connection could be had.
    #[error("database unavailable")]
    Pool(#[from] shop_database::PoolError),
    /// The database did not answer in time; the connection was discarded.
    #[error("database unavailable")]
    Timeout(#[from] shop_database::Timeout),
    /// The database takes no writes (a standby after a failover, or
    /// `default_transaction_read_only`): nothing was published, since the
    /// rows could not be marked.
    #[error("the database is read-only; nothing published until it takes writes")]
    ReadOnly,
    /// The broker is unreachable, closed the channel, nacked a publish or did
    /// not confirm in time.
    #[error("broker error")]
    Broker(#[source] BrokerError),
}

/// What went wrong on the broker's side.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting (or declaring the exchange) failed.
    #[error("failed to connect to the broker")]
    Connect(#[source] anyhow::Error),
    /// The connection or channel failed.
    #[error("broker connection failed")]
    Connection(#[from] lapin::Error),
    /// The broker refused a publish.
    #[error("the broker rejected the publish (nack)")]
    Nack,
    /// No confirm came back in time.
    #[error("no confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// The broker blocks publishing (a memory or disk alarm): not a failure
    /// of the connection, which is kept; publishing resumes when the alarm
    /// clears.
    #[error("the broker blocks publishing (a memory or disk alarm)")]
    Blocked,
}

impl From<BrokerError> for RelayError {
    fn from(error: BrokerError) -> Self {
        Self::Broker(error)
    }
}

impl From<lapin::Error> for RelayError {
    fn from(error: lapin::Error) -> Self {
        Self::Broker(BrokerError::Connection(error))
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Unpublished rows read (0 when another relay holds every partition
    /// with work, or there is none).
    pub claimed: usize,
    /// Rows confirmed by the broker and marked published.
    pub published: usize,
    /// Rows the broker returned because no queue is bound to receive them
    /// (with [`Unroutable::Wait`]); they stay unpublished.
    pub unroutable: usize,
    /// The batch ended at `RELAY_BATCH_TIME` with rows it read still to
    /// send: they go out in the next batch, at once.
    pub cut_short: bool,
}

/// One outbox row, as the relay reads it.
#[derive(Debug, QueryableByName)]
#[diesel(table_name = crate::schema::outbox)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct PendingEvent {
    seq: i64,
    event_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    aggregate_version: i64,
    event_type: String,
    routing_key: String,
    partition_key: i16,
    payload: Vec<u8>,
    trace_context: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// A confirm-mode channel on its own connection.
struct Publisher {
    connection: Connection,
    channel: Channel,
    /// The connection's broker user, the `user_id` of every event (the
    /// broker refuses any other).
    user: String,
}

/// Publishes a service's outbox; see the crate docs.
pub struct Relay {
    pool: Pool,
    /// What every event is signed with.
    key: SigningKey,
    database: DatabaseConfig,
    amqp: AmqpConfig,
    config: RelayConfig,
    publisher: Option<Publisher>,
    /// Wakes the lanes when events are committed (in this process, or
    /// announced by another).
    wake: Wake,
    connected: std::sync::Arc<watch::Sender<bool>>,
    /// This relay's lane: (index, count); (0, 1) covers every partition.
    lane: (usize, usize),
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .field("connected", &self.publisher.is_some())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay over the outbox in `pool`'s database, signing every event
    /// with `key`. `database` is the same database, for the dedicated
    /// `LISTEN` connection. It has a [`Wake`] of its own; [`Relay::waking`]
    /// gives it the one the process's commands call.
    pub fn new(
        pool: Pool,
        database: DatabaseConfig,
        amqp: AmqpConfig,
        config: RelayConfig,
        key: SigningKey,
    ) -> Self {
        Self {
            pool,
            key,
            database,
            amqp,
            config,
            publisher: None,
            wake: Wake::new(),
            connected: std::sync::Arc::new(watch::Sender::new(false)),
            lane: (0, 1),
        }
    }

    /// The relay woken by `wake`: the one the commands of this process call
    /// [`Wake::committed`] on.
    #[must_use]
    pub fn waking(mut self, wake: Wake) -> Self {
        self.wake = wake;
        self
    }

    /// Whether the relay's last batch reached the broker (for health
    /// reporting: the service host shows it on `/health` and in
    /// `dependency_up`).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Publishes one batch: claims the free partitions, publishes their oldest
    /// unpublished rows (at most `batch_size`, for at most `batch_time`),
    /// waits for the confirms and marks the confirmed rows, all in one
    /// transaction.
    ///
    /// Rows confirmed before a failure are marked even when it returns an
    /// error.
    pub async fn run_once(&mut self) -> Result<BatchOutcome, RelayError> {
        if self.publisher.is_none() {
            self.publisher = Some(self.open_publisher().await?);
        }
        if self.blocked() {
            // Publishing now would only fill the socket; nothing is claimed.
            return Err(BrokerError::Blocked.into());
        }
        let result = {
            let Some(publisher) = self.publisher.as_ref() else {
                return Err(BrokerError::Connection(lapin::Error::from(
                    lapin::ErrorKind::InvalidChannelState(
                        lapin::ChannelState::Closed,
                        "relay has no channel",
                    ),
                ))
                .into());
            };
            let config = &self.config;
            let key = &self.key;
            let lane = self.lane;
            // The batch's transaction also sends for up to the batch time
            // and then waits for the last wave's confirms.
            let deadline = self.pool.deadline() + config.batch_time + config.confirm_timeout;
            self.pool
                .run_within(deadline, async |conn| {
                    conn.transaction(async |conn| publish_batch(conn, publisher, config, key, lane).await)
                        .await
                })
                .await
        };
        match result {
            Ok((outcome, None)) => Ok(outcome),
            // A blocked connection is alive: it is kept for when the alarm
            // clears (a new one would be blocked at its first publish).
            Ok((_, Some(error @ RelayError::Broker(BrokerError::Blocked))))
            | Err(error @ RelayError::Broker(BrokerError::Blocked)) => Err(error),
            // A silent database may be a silent network: the broker
            // connection is replaced too.
            Ok((_, Some(error))) | Err(error @ (RelayError::Broker(_) | RelayError::Timeout(_))) => {
                self.drop_publisher().await;
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Whether the broker blocks this relay's publishing connection (a
    /// memory or disk alarm), reported as `broker_blocked{connection}`.
    fn blocked(&self) -> bool {
        let blocked = self
            .publisher
            .as_ref()
            .is_some_and(|publisher| publisher.connection.status().blocked());
        metrics::gauge!("broker_blocked", "connection" => format!("{} outbox relay", self.config.app_id))
            .set(if blocked { 1.0 } else { 0.0 });
        blocked
    }

    /// Waits (up to `limit`) until the broker stops blocking the publishing
    /// connection, or it is gone.
    async fn wait_until_unblocked(&self, limit: Duration, shutdown: &CancellationToken) {
        let until = tokio::time::Instant::now() + limit;
        while self.blocked() && tokio::time::Instant::now() < until {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Runs until `shutdown`: publishes whenever rows are committed (or
    /// the poll interval passes), reconnects with backoff while the broker or
    /// the database is away, and deletes published rows past retention. A
    /// batch under way when shutdown comes is finished first.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let listener = tokio::spawn(
            listen(self.database.clone(), self.wake.clone(), shutdown.clone())
                .instrument(tracing::info_span!("outbox.listen")),
        );
        let depth = tokio::spawn(watch_depth(
            self.pool.clone(),
            self.config.exchange.clone(),
            shutdown.clone(),
        ));
        tracing::info!(exchange = %self.config.exchange, lanes = self.config.lanes, "outbox relay started");
        // Counters of events that may never happen, exported from the start
        // at zero: their first increase is then seen by `increase()` and
        // `rate()`, and a scrape lists every series the README documents.
        for counter in ["outbox_batch_failures_total", "outbox_events_unroutable_total"] {
            metrics::counter!(counter, "exchange" => self.config.exchange.clone()).increment(0);
        }
        metrics::counter!("task_restarts_total", "task" => "outbox relay lane").increment(0);
        let lanes = usize::from(self.config.lanes).clamp(1, PARTITIONS as usize);
        let lane = |index| Relay {
            pool: self.pool.clone(),
            key: self.key.clone(),
            database: self.database.clone(),
            amqp: self.amqp.clone(),
            config: self.config.clone(),
            publisher: None,
            wake: self.wake.clone(),
            connected: self.connected.clone(),
            lane: (index, lanes),
        };
        // Every lane owns a share of the partitions: one that ended (a
        // panic, a bug) would leave its aggregates unpublished for good, so
        // it is started again, after a backoff, and counted.
        let mut running = tokio::task::JoinSet::new();
        let mut lane_of = std::collections::HashMap::new();
        for index in 0..lanes {
            let handle = running.spawn(lane(index).run_lane(shutdown.clone()));
            lane_of.insert(handle.id(), index);
        }
        let mut restarts = self.config.backoff.start();
        while let Some(ended) = running.join_next_with_id().await {
            if shutdown.is_cancelled() {
                continue;
            }
            let (id, cause) = match ended {
                Ok((id, ())) => (id, "it returned".to_owned()),
                Err(error) => (error.id(), error.to_string()),
            };
            let Some(index) = lane_of.remove(&id) else {
                continue;
            };
            let delay = restarts.next_delay();
            metrics::counter!("task_restarts_total", "task" => "outbox relay lane").increment(1);
            tracing::error!(
                lane = index,
                cause,
                restart_in_ms = delay.as_millis() as u64,
                "outbox relay lane ended; restarting it"
            );
            let lane = lane(index);
            let shutdown = shutdown.clone();
            let handle = running.spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(delay) => lane.run_lane(shutdown).await,
                }
            });
            lane_of.insert(handle.id(), index);
        }
        listener.abort();
        depth.abort();
        tracing::info!("outbox relay stopped");
        Ok(())
    }

    /// The loop of one lane (see [`RelayConfig::lanes`]).
    async fn run_lane(mut self, shutdown: CancellationToken) {
        let mut backoff = self.config.backoff.start();
        let mut unroutable = Backoff::new(Duration::from_millis(200), Duration::from_secs(30)).start();
        let mut blocked_reported = false;
        let owned = lane_mask(self.lane);
        let mut wakes = self.wake.subscribe();
        while !shutdown.is_cancelled() {
            // A fault point for the tests: a lane that dies.
            fail::fail_point!("relay-lane");
            // Taken before the batch reads: a commit woken after this is
            // looked for again, one before it is seen by the read.
            let seen: Counts = *wakes.borrow_and_update();
            let result = self.run_once().await;
            self.connected.send_replace(self.publisher.is_some());
            let wait = match result {
                Ok(outcome) => {
                    if backoff.failures() > 0 {
                        tracing::info!(
                            failures = backoff.failures(),
                            lane = self.lane.0,
                            "outbox relay recovered"
                        );
                    }
                    backoff.reset();
                    if outcome.claimed > 0 {
                        tracing::debug!(
                            published = outcome.published,
                            lane = self.lane.0,
                            "published batch"
                        );
                    }
                    if outcome.unroutable > 0 && outcome.published == 0 {
                        // Nothing but events no queue takes: try again after
                        // a growing pause (a consumer may declare its queue
                        // any time), not in a tight loop.
                        let delay = unroutable.next_delay();
                        if unroutable.worth_logging() {
                            tracing::warn!(
                                unroutable = outcome.unroutable,
                                exchange = %self.config.exchange,
                                lane = self.lane.0,
                                retry_in_ms = delay.as_millis() as u64,
                                "events no queue is bound to receive wait in the outbox (RELAY_UNROUTABLE=wait)"
                            );
                        }
                        Some(delay)
                    } else {
                        if outcome.unroutable == 0 {
                            unroutable.reset();
                        }
                        if outcome.claimed as i64 >= self.config.batch_size || outcome.cut_short {
                            continue;
                        }
                        None
                    }
                }
                Err(RelayError::Broker(BrokerError::Blocked)) => {
                    if !blocked_reported {
                        tracing::warn!(
                            lane = self.lane.0,
                            "the broker blocks publishing (memory or disk alarm); the outbox waits"
                        );
                        blocked_reported = true;
                    }
                    self.wait_until_unblocked(self.config.poll_interval, &shutdown)
                        .await;
                    if !self.blocked() {
                        tracing::info!(lane = self.lane.0, "the broker accepts publishing again");
                        blocked_reported = false;
                    }
                    continue;
                }
                Err(error) => {
                    metrics::counter!("outbox_batch_failures_total", "exchange" => self.config.exchange.clone())
                        .increment(1);
                    let delay = backoff.next_delay();
                    // First failure, then sparsely: a broker that is down for
                    // an hour does not flood the log.
                    if backoff.worth_logging() {
                        tracing::warn!(error = %shop_telemetry::error_chain(&error), failures = backoff.failures(), lane = self.lane.0, retry_in_ms = delay.as_millis() as u64, "outbox relay batch failed");
                    }
                    Some(delay)
                }
            };
            let sleep = wait.unwrap_or(self.config.poll_interval);
            // Woken only for a partition this lane owns; the sender lives
            // in `self.wake`, so the wait ends only by a wake-up.
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = wakes.wait_for(|now| woken(owned, &seen, now)), if wait.is_none() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
        self.drop_publisher().await;
    }

    async fn open_publisher(&self) -> Result<Publisher, RelayError> {
        let connection =
            shop_messaging::connection::connect(&self.amqp, &format!("{} outbox relay", self.config.app_id))
                .await
                .map_err(BrokerError::Connect)?;
        let deadline = self.amqp.timeout;
        let timed_out = |error: shop_messaging::Timeout| BrokerError::Connect(error.into());
        let channel = within(deadline, "opening a channel", connection.create_channel())
            .await
            .map_err(timed_out)??;
        within(
            deadline,
            "declaring the exchange",
            shop_messaging::topology::declare_event_exchange(&channel, &self.config.exchange),
        )
        .await
        .map_err(timed_out)??;
        within(
            deadline,
            "turning on publisher confirms",
            channel.confirm_select(ConfirmSelectOptions { nowait: false }),
        )
        .await
        .map_err(timed_out)??;
        tracing::info!(exchange = %self.config.exchange, "outbox relay connected to the broker");
        Ok(Publisher {
            connection,
            channel,
            user: self.amqp.user(),
        })
    }

    async fn drop_publisher(&mut self) {
        if let Some(publisher) = self.publisher.take() {
            let _ = within(
                self.amqp.timeout,
                "closing the connection",
                publisher
                    .connection
                    .close(200, "relay reconnecting or stopping".into()),
            )
            .await;
        }
    }
}

/// The body of a batch transaction. Returns the outcome and, when the broker
/// failed part-way, the error (the rows confirmed before it are marked).
async fn publish_batch(
    conn: &mut AsyncPgConnection,
    publisher: &Publisher,
    config: &RelayConfig,
    key: &SigningKey,
    (lane, lanes): (usize, usize),
) -> Result<(BatchOutcome, Option<RelayError>), RelayError> {
    // Claim and read in one round trip: `outbox_claim` (migration
    // `wake_relays_without_a_trigger`) takes the lane's free partitions,
    // then reads their oldest unpublished rows with a snapshot taken after
    // its locks (a statement of its own inside the function: a single
    // statement would read with a snapshot from before its locks, and a
    // partition freed by a relay committing in between would be read as it
    // was and its rows published a second time). It refuses a read-only
    // session (rows published there could not be marked) and turns off
    // the wait for the WAL flush at this transaction's commit: a mark lost
    // in a crash of the database server only publishes those events again.
    let rows: Vec<PendingEvent> = shop_database::prepared(
        diesel::sql_query(
            "SELECT seq, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, \
             routing_key, partition_key, payload, trace_context, created_at \
             FROM outbox_claim($1, $2, $3, $4, $5)",
        )
        .bind::<Integer, _>(i32::try_from(lane).unwrap_or(0))
        .bind::<Integer, _>(i32::try_from(lanes).unwrap_or(1).max(1))
        .bind::<Integer, _>(i32::from(PARTITIONS))
        .bind::<Integer, _>(LOCK_NAMESPACE)
        .bind::<BigInt, _>(config.batch_size),
    )
    .load(conn)
    .await
    .map_err(|error| {
        if is_read_only(&error) {
            RelayError::ReadOnly
        } else {
            RelayError::Database(error)
        }
    })?;
    let mut outcome = BatchOutcome {
        claimed: rows.len(),
        ..BatchOutcome::default()
    };
    if rows.is_empty() {
        return Ok((outcome, None));
    }
    let Published {
        confirmed,
        unroutable,
        failure,
        cut_short,
    } = publish_in_order(publisher, config, key, &rows).await;
    // A fault point for the tests: the process dies between the broker's
    // confirms and the commit that marks the rows (they go out again).
    fail::fail_point!("relay-after-confirm", |_| std::process::abort());
    if !confirmed.is_empty() {
        // Raw and prepared: diesel's `eq_any` update is not cached, so it
        // was parsed again for every batch.
        shop_database::prepared(
            diesel::sql_query("UPDATE outbox SET published_at = now() WHERE seq = ANY($1)")
                .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&confirmed),
        )
        .execute(conn)
        .await?;
    }
    outcome.published = confirmed.len();
    outcome.unroutable = unroutable;
    outcome.cut_short = cut_short;
    Ok((outcome, failure))
}

/// Whether `error` is the refusal of a read-only session (`25006`: raised
/// by `outbox_claim`, or by a write).
fn is_read_only(error: &diesel::result::Error) -> bool {
    match error {
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::ReadOnlyTransaction, _) => {
            true
        }
        diesel::result::Error::DatabaseError(_, info) => info.message().contains("read-only transaction"),
        _ => false,
    }
}

/// What [`publish_in_order`] did.
struct Published {
    /// `seq` of the rows the broker confirmed, to be marked.
    confirmed: Vec<i64>,
    /// Rows the broker returned as unroutable.
    unroutable: usize,
    /// The broker failure that stopped publishing early.
    failure: Option<RelayError>,
    /// Stopped at the batch time with rows left to send.
    cut_short: bool,
}

/// Publishes `rows` (in `seq` order) in waves: each wave holds the next
/// unpublished row of every aggregate that has one, is sent pipelined, and
/// all its confirms are awaited before the next wave goes out. So there is
/// never more than one unconfirmed publish per aggregate: a later event of
/// an aggregate is sent only once the broker confirmed the earlier one was
/// routed to every queue bound for it. An aggregate whose row is nacked,
/// returned, not confirmed in time or lost with the connection stops there
/// for this batch (its later rows are not sent, so none can overtake it);
/// the other aggregates go on.
///
/// No wave starts once `RELAY_BATCH_TIME` has passed, and a wave's confirms
/// are awaited together for at most `RELAY_CONFIRM_TIMEOUT`: so publishing
/// ends within their sum, and the batch commits what the broker confirmed
/// (an aggregate with N rows costs N waves: a deep backlog of one aggregate
/// spans several batches instead of outliving its transaction).
async fn publish_in_order(
    publisher: &Publisher,
    config: &RelayConfig,
    key: &SigningKey,
    rows: &[PendingEvent],
) -> Published {
    let channel = &publisher.channel;
    let mut published = Published {
        confirmed: Vec::with_capacity(rows.len()),
        unroutable: 0,
        failure: None,
        cut_short: false,
    };
    let started = tokio::time::Instant::now();
    let mut waves = 0_usize;
    let confirm_seconds =
        metrics::histogram!("outbox_confirm_seconds", "exchange" => config.exchange.clone());
    let options = BasicPublishOptions {
        mandatory: config.unroutable == Unroutable::Wait,
        immediate: false,
    };
    let mut stopped: HashSet<(&str, &str)> = HashSet::new();
    let mut remaining: Vec<&PendingEvent> = rows.iter().collect();
    while !remaining.is_empty() && published.failure.is_none() {
        // At least one wave per batch, whatever the batch time.
        if waves > 0 && started.elapsed() >= config.batch_time {
            published.cut_short = true;
            break;
        }
        let mut in_wave = HashSet::new();
        let mut later = Vec::new();
        let mut wave = Vec::new();
        for row in remaining {
            let aggregate = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
            if stopped.contains(&aggregate) {
                continue;
            }
            if in_wave.insert(aggregate) {
                wave.push(row);
            } else {
                later.push(row);
            }
        }
        remaining = later;
        waves += 1;

        let mut pending = Vec::with_capacity(wave.len());
        for row in wave {
            let span = publish_span(config, row);
            let trace = if span.is_none() {
                HashMap::new()
            } else {
                shop_telemetry::propagation::inject_map(&span.context())
            };
            let event_id = row.event_id.to_string();
            let headers = EventHeaders {
                event_id: &event_id,
                type_name: &row.event_type,
                app_id: &config.app_id,
                timestamp: unix_seconds(row.created_at),
                aggregate_type: &row.aggregate_type,
                aggregate_id: &row.aggregate_id,
                aggregate_version: row.aggregate_version,
                partition: row.partition_key,
                trace: &trace,
            };
            // The CloudEvents headers go on after the signature: it covers
            // fixed fields, not the header table.
            let mut properties =
                shop_messaging::wire::sent_by(headers.signed_properties(&row.payload, key), &publisher.user);
            if config.cloudevents {
                properties = headers.with_cloudevents(properties, row.created_at);
            }
            let sent = channel
                .basic_publish(
                    config.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    options,
                    &row.payload,
                    properties,
                )
                .await;
            match sent {
                Ok(confirm) => pending.push((row, confirm, span, std::time::Instant::now())),
                Err(error) => {
                    published.failure = Some(RelayError::from(error));
                    break;
                }
            }
        }
        // One deadline for the whole wave: a silent broker costs the
        // confirm timeout once, not once per row. A confirm that came in
        // time is still taken after it passed (the confirm is polled before
        // the deadline is checked).
        let wave_deadline = tokio::time::Instant::now() + config.confirm_timeout;
        for (row, confirm, span, sent_at) in pending {
            let aggregate = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
            let outcome = match tokio::time::timeout_at(wave_deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(true),
                // Returned: no queue is bound for it (only with `mandatory`).
                Ok(Ok(Confirmation::Ack(Some(_)))) => Ok(false),
                Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Nack),
                Ok(Err(error)) => Err(BrokerError::Connection(error)),
                // A blocked connection is not a silent one: the batch ends and
                // waits for the alarm to clear, on this connection.
                Err(_) if publisher.connection.status().blocked() => Err(BrokerError::Blocked),
                Err(_) => Err(BrokerError::ConfirmTimeout(config.confirm_timeout)),
            };
            match outcome {
                Ok(true) => {
                    confirm_seconds.record(sent_at.elapsed().as_secs_f64());
                    published.confirmed.push(row.seq);
                }
                Ok(false) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", "unroutable");
                    published.unroutable += 1;
                    stopped.insert(aggregate);
                }
                Err(error) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", error.to_string());
                    // The rest of the wave is still awaited: what the broker
                    // confirms is marked, so it is not published twice.
                    published.failure.get_or_insert(RelayError::Broker(error));
                    stopped.insert(aggregate);
                }
            }
        }
    }
    metrics::counter!("outbox_events_published_total", "exchange" => config.exchange.clone())
        .increment(published.confirmed.len() as u64);
    if published.unroutable > 0 {
        metrics::counter!("outbox_events_unroutable_total", "exchange" => config.exchange.clone())
            .increment(published.unroutable as u64);
    }
    published
}

/// Every five seconds, `outbox_pending_events` (rows not yet published) and
/// `outbox_oldest_pending_seconds` (age of the oldest one; 0 when none).
async fn watch_depth(pool: Pool, exchange: String, shutdown: CancellationToken) {
    #[derive(QueryableByName)]
    struct Depth {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        pending: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        oldest_seconds: f64,
    }
    let pending = metrics::gauge!("outbox_pending_events", "exchange" => exchange.clone());
    let oldest = metrics::gauge!("outbox_oldest_pending_seconds", "exchange" => exchange);
    loop {
        let depth = pool
            .run(async |conn| {
                diesel::sql_query(
                    "SELECT count(*) AS pending, \
                     COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest_seconds \
                     FROM outbox WHERE published_at IS NULL",
                )
                .get_result::<Depth>(conn)
                .await
                .map_err(RelayError::from)
            })
            .await;
        if let Ok(depth) = depth {
            // The age first: a scrape between the two sets sees a depth
            // with the age of its own sample, never a fresh depth beside
            // the age of an empty outbox.
            oldest.set(depth.oldest_seconds);
            pending.set(depth.pending as f64);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The producer span of one publish, a child of the command that wrote the
/// row (so one call is one trace); `Span::none()` for rows without a stored
/// context, which saves the span's cost on bulk loads.
fn publish_span(config: &RelayConfig, row: &PendingEvent) -> tracing::Span {
    let fields: HashMap<String, String> =
        serde_json::from_value(row.trace_context.clone()).unwrap_or_default();
    if !fields.contains_key("traceparent") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "outbox.publish",
        otel.name = %format_args!("{} publish", config.exchange),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %config.exchange,
        messaging.rabbitmq.destination.routing_key = %row.routing_key,
        messaging.message.id = %row.event_id,
        messaging.message.body.size = row.payload.len(),
    );
    let _ = span.set_parent(shop_telemetry::propagation::extract_map(&fields));
    span
}

fn unix_seconds(time: chrono::DateTime<chrono::Utc>) -> u64 {
    SystemTime::from(time)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How long the `LISTEN` session may stay quiet before it is pinged.
const LISTEN_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps a `LISTEN outbox` connection open and turns each announcement of
/// another process into a wake-up of the lanes owning its partitions;
/// reconnects with backoff when it drops.
async fn listen(database: DatabaseConfig, wake: Wake, shutdown: CancellationToken) {
    let mut backoff = Backoff::default().start();
    while !shutdown.is_cancelled() {
        match listen_once(&database, &wake, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::debug!(%error, retry_in_ms = delay.as_millis() as u64, "outbox listener disconnected");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn listen_once(
    database: &DatabaseConfig,
    wake: &Wake,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = database.statement_timeout;
    let mut conn = shop_database::establish(database).await?;
    tokio::time::timeout(deadline, diesel::sql_query("LISTEN outbox").execute(&mut conn))
        .await
        .map_err(|_| shop_database::Timeout(deadline))??;
    // Rows may have been committed while nobody listened.
    wake.wake_all();
    loop {
        {
            // A session that only listens sends nothing: a silent connection
            // would go unnoticed, and the relay would fall back on polling
            // for good. Pinged after a quiet spell, within the deadline.
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            let quiet = tokio::time::sleep(LISTEN_PING_INTERVAL);
            tokio::pin!(quiet);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = &mut quiet => break,
                    next = notifications.next() => match next {
                        Some(Ok(notification)) => {
                            wake.heard(&notification.payload);
                            quiet.as_mut().reset(tokio::time::Instant::now() + LISTEN_PING_INTERVAL);
                        }
                        Some(Err(error)) => return Err(error.into()),
                        None => anyhow::bail!("notification stream ended"),
                    },
                }
            }
        }
        tokio::time::timeout(deadline, diesel::sql_query("SELECT 1").execute(&mut conn))
            .await
            .map_err(|_| shop_database::Timeout(deadline))??;
    }
}
