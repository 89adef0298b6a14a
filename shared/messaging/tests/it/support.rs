//! A consumer over a test database, with a handler whose failures the test
//! controls, and a publisher of hand-made messages.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use lapin::BasicProperties;
use shop_contracts::Event;
use shop_contracts::user::{UserCreated, UserSnapshot, UserUpdated};
use shop_messaging::AmqpConfig;
use shop_messaging::consumer::{Consumer, ConsumerConfig, EventMeta, Handler, HandlerError};
use shop_testkit::{TestBroker, TestDatabase, TestPublisher};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("tests/migrations");

diesel::table! {
    applied (seq) {
        event_id -> Uuid,
        user_id -> Text,
        version -> BigInt,
        applied_at -> Timestamptz,
        seq -> BigInt,
        instance -> Text,
    }
}

/// How the test handler behaves.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Fail (transiently) this many more times.
    pub fail_times: AtomicU32,
    /// Fail transiently every time while set.
    pub always_fail: AtomicBool,
    /// Fail permanently every time while set.
    pub reject: AtomicBool,
    /// Fail transiently every time for this user id.
    pub fail_user: std::sync::Mutex<Option<String>>,
    /// Fail transiently on the first delivery (attempt 1) of each (user id,
    /// version) listed.
    pub fail_first_attempt: std::sync::Mutex<std::collections::HashSet<(String, i64)>>,
    /// Every call: (user id, version, attempt).
    pub attempts: std::sync::Mutex<Vec<(String, i64, u32)>>,
    /// Fail permanently for each (user id, version) listed, while listed.
    pub reject_versions: std::sync::Mutex<std::collections::HashSet<(String, i64)>>,
    /// Hold the first call for this user id, inside the transaction, until
    /// `release` is notified.
    pub hold_user: std::sync::Mutex<Option<String>>,
    /// Lets a held call go on.
    pub release: tokio::sync::Notify,
    /// Calls so far.
    pub calls: AtomicU32,
    /// The first call for this user id, after recording its attempt, waits
    /// inside the transaction for the advisory lock with this key (which
    /// the test holds): a handler whose statement is running.
    pub lock_user: std::sync::Mutex<Option<(String, i64)>>,
    /// What that statement ended with, if it failed.
    pub lock_error: std::sync::Mutex<Option<String>>,
    /// Every call: (user id, version, whether the broker said the delivery
    /// was a redelivery).
    pub deliveries: std::sync::Mutex<Vec<(String, i64, bool)>>,
    /// Every call for this user id never returns (inside the transaction):
    /// a message that takes its consumer down, once the test kills it.
    pub hang_user: std::sync::Mutex<Option<String>>,
}

/// Records each application in `applied`, failing as told.
#[derive(Debug, Clone)]
pub struct Recorder(pub Arc<Behavior>, pub String);

impl Recorder {
    async fn record(
        &self,
        conn: &mut AsyncPgConnection,
        user_id: &str,
        version: i64,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        self.0
            .deliveries
            .lock()
            .unwrap()
            .push((user_id.to_owned(), version, meta.redelivered));
        if self.0.hang_user.lock().unwrap().as_deref() == Some(user_id) {
            std::future::pending::<()>().await;
        }
        let hold = {
            let mut held = self.0.hold_user.lock().unwrap();
            let hold = held.as_deref() == Some(user_id);
            if hold {
                *held = None;
            }
            hold
        };
        if hold {
            self.0.release.notified().await;
        }
        let key = (user_id.to_owned(), version);
        if self.0.reject_versions.lock().unwrap().contains(&key) {
            return Err(HandlerError::permanent(anyhow::anyhow!(
                "rejected by the test: {user_id} v{version}"
            )));
        }
        self.0
            .attempts
            .lock()
            .unwrap()
            .push((user_id.to_owned(), version, meta.attempt));
        let lock = {
            let mut lock = self.0.lock_user.lock().unwrap();
            if lock.as_ref().is_some_and(|(user, _)| user == user_id) {
                lock.take().map(|(_, key)| key)
            } else {
                None
            }
        };
        if let Some(lock) = lock {
            let locked = diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<diesel::sql_types::BigInt, _>(lock)
                .execute(conn)
                .await;
            if let Err(error) = locked {
                *self.0.lock_error.lock().unwrap() = Some(error.to_string());
                return Err(error.into());
            }
        }
        if meta.attempt == 1 && self.0.fail_first_attempt.lock().unwrap().contains(&key) {
            return Err(HandlerError::transient(anyhow::anyhow!(
                "failing the first attempt on purpose: {user_id} v{version}"
            )));
        }
        if AtomicBool::load(&self.0.reject, Ordering::SeqCst) {
            return Err(HandlerError::permanent(anyhow::anyhow!("rejected by the test")));
        }
        if self.0.fail_user.lock().unwrap().as_deref() == Some(user_id) {
            return Err(HandlerError::transient(anyhow::anyhow!(
                "failing on purpose for {user_id}"
            )));
        }
        if AtomicBool::load(&self.0.always_fail, Ordering::SeqCst) {
            return Err(HandlerError::transient(anyhow::anyhow!("failing on purpose")));
        }
        if self
            .0
            .fail_times
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::transient(anyhow::anyhow!(
                "failing on purpose, for now"
            )));
        }
        diesel::insert_into(applied::table)
            .values((
                applied::event_id.eq(meta.event_id),
                applied::user_id.eq(user_id),
                applied::version.eq(version),
                applied::instance.eq(&self.1),
            ))
            .execute(conn)
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handler<UserCreated> for Recorder {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserCreated,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.record(conn, &event.user_id, event.version, meta).await
    }
}

#[async_trait::async_trait]
impl Handler<UserUpdated> for Recorder {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserUpdated,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.record(conn, &event.user_id, event.version, meta).await
    }
}

#[async_trait::async_trait]
impl Handler<UserSnapshot> for Recorder {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserSnapshot,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.record(conn, &event.user_id, event.version, meta).await
    }
}

pub struct Harness {
    pub behavior: Arc<Behavior>,
    pub exchange: String,
    pub queue: String,
    pub config: ConsumerConfig,
    pub publisher: TestPublisher,
    pub shutdown: CancellationToken,
    pub connected: tokio::sync::watch::Receiver<bool>,
    consumer: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The broker settings the consumer was started with.
    amqp: Option<AmqpConfig>,
    /// The test's own connections, for its assertions.
    pub pool: shop_database::Pool,
    /// The consumer's (through a proxy, when the test says so).
    pub consumer_pool: shop_database::Pool,
    pub broker: TestBroker,
    pub db: TestDatabase,
    /// The producer the consumer asks for snapshots (gap policy `resync`).
    pub resync: Option<Arc<dyn shop_messaging::resync::Resync>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(consumer) = self.consumer.take() {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
                });
            });
        }
    }
}

pub fn config(broker: &TestBroker) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(broker.exchange("user.events"), broker.queue("consumer"));
    config.retry_delays = vec![Duration::from_millis(200), Duration::from_millis(400)];
    config.max_attempts = 3;
    config.prefetch = 100;
    config.batch_size = 50;
    config.trusted_keys = shop_testkit::keys::trusted_keys();
    config
}

/// A consumer (not yet started) over a fresh database and namespace.
pub async fn harness() -> Harness {
    harness_with(|config, _| config).await
}

pub async fn harness_with(adjust: impl FnOnce(ConsumerConfig, &TestBroker) -> ConsumerConfig) -> Harness {
    shop_testkit::init_test_log();
    let db = TestDatabase::create(
        MIGRATIONS,
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/migrations")),
    )
    .await
    .unwrap();
    let broker = TestBroker::new();
    let config = adjust(config(&broker), &broker);
    let publisher = TestPublisher::connect(&config.exchange).await.unwrap();
    let pool = db.pool();
    let (connected_tx, connected) = tokio::sync::watch::channel(false);
    drop(connected_tx);
    Harness {
        behavior: Arc::new(Behavior::default()),
        exchange: config.exchange.clone(),
        queue: config.queue.clone(),
        config,
        publisher,
        shutdown: CancellationToken::new(),
        connected,
        consumer: None,
        amqp: None,
        consumer_pool: pool.clone(),
        pool,
        broker,
        db,
        resync: None,
    }
}

impl Harness {
    /// Starts the consumer with `amqp` (the broker itself, or a proxy) and
    /// waits until its queues exist.
    pub async fn start_with(&mut self, amqp: AmqpConfig) {
        self.amqp = Some(amqp.clone());
        let consumer = self.consumer("main", amqp);
        self.broker.track_topology(&consumer.topology());
        self.connected = consumer.connected();
        self.consumer = Some(tokio::spawn(consumer.run(self.shutdown.clone())));
        let mut connected = self.connected.clone();
        tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| *c))
            .await
            .unwrap()
            .unwrap();
    }

    /// A consumer of this harness's queue whose applications are recorded
    /// as `instance`.
    pub fn consumer(&self, instance: &str, amqp: AmqpConfig) -> Consumer {
        self.consumer_on(instance, self.consumer_pool.clone(), amqp)
    }

    /// [`Harness::consumer`] over `pool` (another replica's own database
    /// link).
    pub fn consumer_on(&self, instance: &str, pool: shop_database::Pool, amqp: AmqpConfig) -> Consumer {
        let consumer = Consumer::new(self.config.clone(), pool, amqp);
        let consumer = match &self.resync {
            Some(producer) => consumer.resync(producer.clone()),
            None => consumer,
        };
        consumer
            .subscribe::<UserCreated, _>(Recorder(self.behavior.clone(), instance.to_owned()))
            .subscribe::<UserUpdated, _>(Recorder(self.behavior.clone(), instance.to_owned()))
            .subscribe::<UserSnapshot, _>(Recorder(self.behavior.clone(), instance.to_owned()))
    }

    /// Another replica of the consumer, running until its token is
    /// cancelled or its task aborted (a crash: no clean-up, connections
    /// dropped).
    pub fn spawn_replica(
        &self,
        instance: &str,
    ) -> (tokio::task::JoinHandle<anyhow::Result<()>>, CancellationToken) {
        let stop = self.shutdown.child_token();
        let consumer = self.consumer(instance, self.broker.config());
        (tokio::spawn(consumer.run(stop.clone())), stop)
    }

    pub async fn start(&mut self) {
        self.start_with(self.broker.config()).await;
    }

    /// Publishes `event` as the relay would, with `event_id`.
    pub async fn publish<E: Event>(&self, event: &E, event_id: Uuid) {
        self.publisher
            .publish(&self.exchange, event, event_id)
            .await
            .unwrap();
    }

    /// Publishes any bytes with any properties to the exchange, signed as
    /// they are by the producer key the consumer trusts (so they meet the
    /// checks behind the signature's).
    pub async fn publish_raw_signed(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish_raw_signed(&self.exchange, routing_key, body, properties)
            .await
            .unwrap();
    }

    /// Publishes any bytes with any properties to the exchange.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish_raw(&self.exchange, routing_key, body, properties)
            .await
            .unwrap();
    }

    /// (event id, user id, version) of every application so far, in order.
    /// Tests that end the database's sessions also end the test's pooled
    /// ones: a query that meets such a corpse is tried again.
    pub async fn applied(&self) -> Vec<(Uuid, String, i64)> {
        let mut attempts = 0;
        loop {
            let mut conn = self.pool.get().await.unwrap();
            let rows = applied::table
                .order(applied::seq.asc())
                .select((applied::event_id, applied::user_id, applied::version))
                .load(&mut conn)
                .await;
            match rows {
                Ok(rows) => return rows,
                Err(_) if attempts < 20 => {
                    attempts += 1;
                    shop_database::Pool::discard(conn);
                }
                Err(error) => panic!("{error}"),
            }
        }
    }

    /// Waits until `count` applications are recorded, then makes sure no
    /// message is left that could add one, without waiting for a quiet
    /// spell: the consumer is stopped (it finishes its batch, and whatever
    /// it held unacknowledged goes back to its queue), its queue and delay
    /// queues are counted, and it is started again; until they are empty.
    /// Only then are the applications counted.
    pub async fn expect_applied(&mut self, count: usize) -> Vec<(Uuid, String, i64)> {
        shop_testkit::eventually(
            &format!("{count} applied events"),
            Duration::from_secs(20),
            || async { (self.applied().await.len() >= count).then_some(()) },
        )
        .await;
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            self.stop().await;
            let waiting = self.waiting().await;
            self.restart().await;
            if waiting == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{waiting} messages still waiting after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let applied = self.applied().await;
        assert_eq!(applied.len(), count, "{applied:?}");
        applied
    }

    /// Stops the consumer and waits until it has closed its connections.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(consumer) = self.consumer.take() {
            tokio::time::timeout(Duration::from_secs(20), consumer)
                .await
                .expect("the consumer stops")
                .unwrap()
                .unwrap();
        }
    }

    /// Ends the consumer as a killed process ends: its task is dropped
    /// wherever it waits (a handler inside its transaction included), no
    /// clean-up, nothing acknowledged or committed. (Its sockets close when
    /// the runtime drops them; a test that needs them gone at once cuts
    /// them at a proxy.)
    pub async fn crash(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer.abort();
            let ended = tokio::time::timeout(Duration::from_secs(10), consumer)
                .await
                .expect("the aborted consumer ends");
            assert!(
                ended.is_err_and(|error| error.is_cancelled()),
                "the consumer was killed, not stopped"
            );
        }
    }

    /// Sessions of the test's database inside a transaction, doing nothing
    /// (`idle in transaction`): a handler holding its transaction open.
    pub async fn sessions_in_transaction(&self) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.pool.get().await.unwrap();
        diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
    }

    /// Starts the consumer again, as it was started last.
    pub async fn restart(&mut self) {
        self.shutdown = CancellationToken::new();
        let amqp = self.amqp.clone().expect("started before");
        self.start_with(amqp).await;
    }

    /// Messages ready in the consumer's queue and delay queues (with the
    /// consumer stopped, none is held unacknowledged).
    pub async fn waiting(&self) -> u32 {
        let connection =
            lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let dead_letters = shop_messaging::topology::dead_letter_queue(&self.queue);
        let mut waiting = 0;
        for queue in self.config.queue_names() {
            if queue == dead_letters {
                continue;
            }
            let channel = connection.create_channel().await.unwrap();
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..lapin::options::QueueDeclareOptions::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .unwrap();
            waiting += declared.message_count();
        }
        let _ = connection.close(200, "counted".into()).await;
        waiting
    }

    /// Messages waiting in the dead-letter queue.
    pub async fn dead_letters(&self) -> Vec<shop_messaging::dlq::DeadLetter> {
        let dlq = shop_messaging::dlq::DeadLetters::connect(&self.broker.config(), &self.queue)
            .await
            .unwrap();
        let letters = dlq.browse().await.unwrap();
        dlq.close().await;
        letters
    }

    pub async fn expect_dead_letters(&self, count: usize) -> Vec<shop_messaging::dlq::DeadLetter> {
        shop_testkit::eventually(
            &format!("{count} dead letters"),
            Duration::from_secs(20),
            || async { (self.dead_letters().await.len() >= count).then_some(()) },
        )
        .await;
        let letters = self.dead_letters().await;
        assert_eq!(letters.len(), count);
        letters
    }
}

pub fn created(user_id: &str, version: i64) -> UserCreated {
    UserCreated {
        user_id: user_id.to_owned(),
        version,
        email: format!("{user_id}@example.com"),
        name: "Test".to_owned(),
        occurred_at: None,
    }
}

pub fn updated(user_id: &str, version: i64) -> UserUpdated {
    UserUpdated {
        user_id: user_id.to_owned(),
        version,
        email: format!("{user_id}@example.com"),
        name: format!("Version {version}"),
        occurred_at: None,
    }
}

pub fn snapshot(user_id: &str, version: i64) -> UserSnapshot {
    UserSnapshot {
        user_id: user_id.to_owned(),
        version,
        email: format!("{user_id}@example.com"),
        name: format!("Snapshot {version}"),
        deleted: false,
        occurred_at: None,
    }
}

/// Each user's versions in the order the handlers saw them.
pub fn seen_by_user(applied: &[(Uuid, String, i64)]) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut seen: std::collections::BTreeMap<String, Vec<i64>> = std::collections::BTreeMap::new();
    for (_, user, version) in applied {
        seen.entry(user.clone()).or_default().push(*version);
    }
    seen
}

/// See [`TestPublisher::signable`].
pub fn signable(kind: &str, id: &str, user: &str, version: i64) -> BasicProperties {
    TestPublisher::signable(kind, id, user, version)
}

/// Messages ready in `queue`, `None` when it does not exist.
pub async fn depth(queue: &str) -> Option<u32> {
    let connection =
        lapin::Connection::connect(&shop_testkit::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = connection.close(200, "counted".into()).await;
    declared.ok().map(|queue| queue.message_count())
}
