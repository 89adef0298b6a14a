//! The broker identities as shipped (`shared/messaging/broker/definitions.json`),
//! imported into a RabbitMQ node of the test's own (never the shared
//! broker): each part of the system does its work under exactly those
//! permissions (the relays, the consumer with its retries, dead letters,
//! released events and the move of a retired queue, `shop dlq` list, show,
//! replay, skip and purge), and the broker refuses everything else. The
//! order service's database roles are the test's own too: a migrator, the
//! runtime role and the dead-letter commands' role.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use assert_cmd::Command;
use diesel_async::AsyncPgConnection;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use prost::Message as _;
use shop_contracts::Event as _;
use shop_contracts::user::{UserCreated, UserUpdated};
use shop_database::DatabaseConfig;
use shop_messaging::AmqpConfig;
use shop_messaging::consumer::{Consumer, ConsumerConfig, EventMeta, Handler, HandlerError};
use shop_messaging::wire::{self, EventHeaders};
use shop_testkit::cluster::shipped_definitions;
use shop_testkit::{ClusterOptions, RabbitCluster, TestDatabase, TestPublisher, TestRoles};
use uuid::Uuid;

use crate::system::{Options, start_with};

const WAIT: Duration = Duration::from_secs(30);
const GROUP: &str = "order-service.user-events";
/// Every user the shipped definitions hold.
const USERS: [&str; 3] = ["user-service", "order-service", "shop-dlq"];

/// A node that loaded the shipped definitions, with a password per user.
struct Broker {
    node: RabbitCluster,
    passwords: Vec<(String, String)>,
}

impl Broker {
    async fn start() -> Self {
        let passwords: Vec<(String, String)> = USERS
            .iter()
            .map(|user| ((*user).to_owned(), Uuid::new_v4().simple().to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = passwords
            .iter()
            .map(|(user, password)| (user.as_str(), password.as_str()))
            .collect();
        let node = RabbitCluster::start_with(ClusterOptions {
            nodes: 1,
            definitions: Some(shipped_definitions(&pairs).unwrap()),
            ..ClusterOptions::default()
        })
        .await
        .unwrap();
        Self { node, passwords }
    }

    fn url(&self, user: &str) -> String {
        let password = self
            .passwords
            .iter()
            .find(|(name, _)| name == user)
            .map(|(_, password)| password.clone())
            .unwrap_or_default();
        self.node.amqp_url_as(1, user, &password)
    }

    fn amqp(&self, user: &str) -> AmqpConfig {
        AmqpConfig::new(self.url(user))
    }
}

/// What the broker answers when `user` publishes `properties` to
/// `exchange` with `routing_key`: the confirm, or the error that closed the
/// channel (`ACCESS_REFUSED`, `PRECONDITION_FAILED`, …).
async fn publish_as(
    broker: &Broker,
    user: &str,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
) -> Result<(), String> {
    let connection = Connection::connect(&broker.url(user), ConnectionProperties::default())
        .await
        .map_err(|error| error.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| error.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| error.to_string())?;
    let outcome = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                b"",
                properties,
            )
            .await?
            .await
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    match outcome {
        Ok(confirm) if confirm.is_ack() => Ok(()),
        Ok(confirm) => Err(format!("not confirmed: {confirm:?}")),
        Err(error) => Err(error.to_string()),
    }
}

/// What the broker answers when `user` declares exchange `name` (not
/// passively).
async fn declare_as(broker: &Broker, user: &str, name: &str) -> Result<(), String> {
    let connection = Connection::connect(&broker.url(user), ConnectionProperties::default())
        .await
        .map_err(|error| error.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| error.to_string())?;
    let outcome = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| error.to_string());
    let _ = connection.close(200, "done".into()).await;
    outcome
}

fn refused(outcome: Result<(), String>, code: &str, what: &str) {
    match outcome {
        Ok(()) => panic!("{what}: allowed"),
        Err(error) => assert!(error.contains(code), "{what}: refused otherwise: {error}"),
    }
}

/// The properties the relay sends an event with, as `user`.
fn event_properties(
    event_id: Uuid,
    type_name: &str,
    user: &str,
    version: i64,
    user_sent_by: &str,
) -> BasicProperties {
    let id = event_id.to_string();
    let trace = Default::default();
    let headers = EventHeaders {
        event_id: &id,
        type_name,
        app_id: "user-service",
        timestamp: 0,
        aggregate_type: "user",
        aggregate_id: user,
        aggregate_version: version,
        partition: wire::partition_of(user),
        trace: &trace,
    };
    wire::sent_by(headers.properties(), user_sent_by)
}

/// Applies user events, failing as the test says: the first attempt of
/// `flaky` transiently, the versions in `poisoned` for good.
#[derive(Clone, Default)]
struct Recorder {
    applied: Arc<Mutex<Vec<(String, i64, u32)>>>,
    flaky: Arc<Mutex<BTreeSet<String>>>,
    poisoned: Arc<Mutex<BTreeSet<(String, i64)>>>,
}

impl Recorder {
    fn apply(&self, user: &str, version: i64, meta: &EventMeta) -> Result<(), HandlerError> {
        if self
            .poisoned
            .lock()
            .unwrap()
            .contains(&(user.to_owned(), version))
        {
            return Err(HandlerError::permanent(anyhow::anyhow!("poisoned by the test")));
        }
        if meta.attempt == 1 && self.flaky.lock().unwrap().contains(user) {
            return Err(HandlerError::transient(anyhow::anyhow!(
                "failing once on purpose"
            )));
        }
        self.applied
            .lock()
            .unwrap()
            .push((user.to_owned(), version, meta.attempt));
        Ok(())
    }

    fn applied(&self, user: &str, version: i64) -> Option<u32> {
        self.applied
            .lock()
            .unwrap()
            .iter()
            .find(|(who, applied, _)| who == user && *applied == version)
            .map(|(_, _, attempt)| *attempt)
    }
}

#[async_trait::async_trait]
impl Handler<UserCreated> for Recorder {
    async fn handle(
        &self,
        _: &mut AsyncPgConnection,
        event: UserCreated,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.apply(&event.user_id, event.version, meta)
    }
}

#[async_trait::async_trait]
impl Handler<UserUpdated> for Recorder {
    async fn handle(
        &self,
        _: &mut AsyncPgConnection,
        event: UserUpdated,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.apply(&event.user_id, event.version, meta)
    }
}

fn created(user: &str) -> UserCreated {
    UserCreated {
        user_id: user.to_owned(),
        version: 1,
        email: format!("{user}@example.com"),
        name: user.to_owned(),
        occurred_at: None,
    }
}

fn updated(user: &str, version: i64) -> UserUpdated {
    UserUpdated {
        user_id: user.to_owned(),
        version,
        email: format!("{user}@example.com"),
        name: format!("{user} v{version}"),
        occurred_at: None,
    }
}

/// `shop dlq <args>` as the dead-letter commands' broker user and database
/// role: (success, stdout, stderr).
fn dlq(broker: &Broker, database_url: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::cargo_bin("shop")
        .unwrap()
        .arg("dlq")
        .args(args)
        .env_remove("DATABASE_URL")
        .env("AMQP_URL", broker.url("shop-dlq"))
        .env("USER_EVENTS_QUEUE", GROUP)
        .env("CONSUMER_DATABASE_URL", database_url)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn wait_for<T>(what: &str, check: impl Fn() -> Option<T>) -> T {
    shop_testkit::eventually(what, WAIT, || {
        let found = check();
        async move { found }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_broker_identities_let_each_part_do_its_work_and_refuse_everything_else() {
    shop_testkit::init_test_log();
    let broker = Broker::start().await;

    // No administrator, no guest: the three identities and nobody else.
    let listed = broker
        .node
        .rabbitmqctl(1, &["list_users", "--formatter", "json"])
        .await
        .unwrap();
    let users: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let users = users.as_array().unwrap();
    let names: BTreeSet<&str> = users.iter().filter_map(|user| user["user"].as_str()).collect();
    assert_eq!(names, USERS.into_iter().collect(), "{listed}");
    for user in users {
        assert!(
            user["tags"].as_array().is_none_or(|tags| tags.is_empty()),
            "{user} has tags"
        );
    }

    // Only the user service publishes to user.events, only the order
    // service to order.events, each with its own user_id or none.
    refused(
        publish_as(
            &broker,
            "order-service",
            "user.events",
            "user.created",
            BasicProperties::default(),
        )
        .await,
        "ACCESS_REFUSED",
        "the order service publishing to user.events",
    );
    refused(
        publish_as(
            &broker,
            "shop-dlq",
            "user.events",
            "user.created",
            BasicProperties::default(),
        )
        .await,
        "ACCESS_REFUSED",
        "the dead-letter commands publishing to user.events",
    );
    refused(
        publish_as(
            &broker,
            "user-service",
            "user.events",
            "user.created",
            BasicProperties::default().with_user_id("order-service".into()),
        )
        .await,
        "PRECONDITION_FAILED",
        "a user_id that is not the connection's user",
    );
    publish_as(
        &broker,
        "user-service",
        "user.events",
        "user.created",
        BasicProperties::default().with_user_id("user-service".into()),
    )
    .await
    .expect("the user service publishing as itself");
    publish_as(
        &broker,
        "order-service",
        "order.events",
        "order.created",
        BasicProperties::default(),
    )
    .await
    .expect("the order service publishing to order.events");
    refused(
        publish_as(
            &broker,
            "order-service",
            "order.events",
            "user.created",
            BasicProperties::default(),
        )
        .await,
        "ACCESS_REFUSED",
        "a routing key outside the order service's topic permission",
    );
    refused(
        publish_as(
            &broker,
            "user-service",
            "order.events",
            "order.created",
            BasicProperties::default(),
        )
        .await,
        "ACCESS_REFUSED",
        "the user service publishing to order.events",
    );
    // Nobody writes to the default exchange, which reaches every queue.
    refused(
        publish_as(
            &broker,
            "order-service",
            "",
            &format!("{GROUP}.dlq"),
            BasicProperties::default(),
        )
        .await,
        "ACCESS_REFUSED",
        "the order service publishing to the default exchange",
    );
    // A consumer only looks its producer's exchange up.
    refused(
        declare_as(&broker, "order-service", "user.events").await,
        "ACCESS_REFUSED",
        "the order service declaring user.events",
    );
    refused(
        declare_as(&broker, "shop-dlq", &format!("{GROUP}.queues")).await,
        "ACCESS_REFUSED",
        "the dead-letter commands declaring an exchange",
    );

    // A queue of a retired layout holding an event, as an older release
    // left it: partition queue `<group>.p0`, dead-lettering through the
    // default exchange. Only an operator can make one now.
    let operator_password = Uuid::new_v4().simple().to_string();
    broker
        .node
        .rabbitmqctl(1, &["add_user", "shop-test-operator", &operator_password])
        .await
        .unwrap();
    broker
        .node
        .rabbitmqctl(
            1,
            &[
                "set_permissions",
                "-p",
                "/",
                "shop-test-operator",
                ".*",
                ".*",
                ".*",
            ],
        )
        .await
        .unwrap();
    let retired = format!("{GROUP}.p0");
    {
        let operator = Connection::connect(
            &broker
                .node
                .amqp_url_as(1, "shop-test-operator", &operator_password),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let channel = operator.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        channel
            .queue_declare(
                retired.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .unwrap();
        let body = created("migrated").encode_to_vec();
        // Signed by the producer, as the relay sent it before the layout
        // was retired.
        let properties = shop_testkit::keys::signing_key()
            .sign_properties(
                event_properties(
                    Uuid::now_v7(),
                    UserCreated::TYPE_NAME,
                    "migrated",
                    1,
                    "user-service",
                ),
                &body,
            )
            .unwrap()
            .with_user_id("shop-test-operator".into());
        let confirm = channel
            .basic_publish(
                "".into(),
                retired.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let _ = operator.close(200, "done".into()).await;
    }
    broker
        .node
        .rabbitmqctl(1, &["delete_user", "shop-test-operator"])
        .await
        .unwrap();

    // The order service's database: its migrator, its runtime role and the
    // dead-letter commands' role.
    let roles = TestRoles::create(&[("migrator", ""), ("runtime", ""), ("dlq", "")])
        .await
        .unwrap();
    let order_db = TestDatabase::empty_owned_by(&roles.name("migrator"))
        .await
        .unwrap();
    let mut order_database = DatabaseConfig::new(roles.url("runtime", &order_db));
    order_database.migration_url = Some(roles.url("migrator", &order_db).into());
    order_database.pool_size = 8;
    let dlq_database = roles.url("dlq", &order_db);
    let pool = shop_database::connect_granting(
        &order_database,
        order_service::app::MIGRATIONS,
        &[shop_database::Grant::new(
            roles.name("dlq"),
            shop_messaging::dlq::DATABASE_GRANTS,
        )],
    )
    .await
    .unwrap();

    // The consumer, as the order service's user, with retries and dead
    // letters of its own.
    let recorder = Recorder::default();
    recorder.flaky.lock().unwrap().insert("flaky".to_owned());
    for poisoned in [("broken", 1), ("replayed", 1), ("purged", 1)] {
        recorder
            .poisoned
            .lock()
            .unwrap()
            .insert((poisoned.0.to_owned(), poisoned.1));
    }
    let mut config = ConsumerConfig::new("user.events", GROUP);
    config.trusted_keys = shop_testkit::keys::trusted_keys();
    config.retry_delays = vec![Duration::from_millis(200)];
    config.max_attempts = 3;
    let consumer = Consumer::new(config, pool.clone(), broker.amqp("order-service"))
        .subscribe::<UserCreated, _>(recorder.clone())
        .subscribe::<UserUpdated, _>(recorder.clone());
    let mut connected = consumer.connected();
    let stop = shop_host::CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    tokio::time::timeout(WAIT, connected.wait_for(|up| *up))
        .await
        .expect("the consumer connects as order-service")
        .unwrap();

    // The retired queue's event moved to the partitions, as the consumer's
    // user, and the queue is gone.
    wait_for("the retired queue's event to be applied", || {
        recorder.applied("migrated", 1)
    })
    .await;
    let queues = broker
        .node
        .rabbitmqctl(1, &["list_queues", "name"])
        .await
        .unwrap();
    assert!(!queues.lines().any(|line| line.trim() == retired), "{queues}");

    // Events as the user service's relay sends them.
    let publisher = TestPublisher::connect_to(&broker.url("user-service"), "user.events")
        .await
        .unwrap();
    let send = |event_id: Uuid, type_name: &'static str, user: &str, version: i64, body: Vec<u8>| {
        let properties = event_properties(event_id, type_name, user, version, "user-service");
        let routing_key = if type_name == UserCreated::TYPE_NAME {
            UserCreated::ROUTING_KEY
        } else {
            UserUpdated::ROUTING_KEY
        };
        let publisher = &publisher;
        async move {
            publisher
                .publish_raw_signed("user.events", routing_key, &body, properties)
                .await
                .unwrap();
        }
    };
    let broken = Uuid::now_v7();
    let replayed = Uuid::now_v7();
    let send_created = |event_id: Uuid, user: &str| {
        send(
            event_id,
            UserCreated::TYPE_NAME,
            user,
            1,
            created(user).encode_to_vec(),
        )
    };
    send_created(Uuid::now_v7(), "flaky").await;
    send_created(broken, "broken").await;
    send(
        Uuid::now_v7(),
        UserUpdated::TYPE_NAME,
        "broken",
        2,
        updated("broken", 2).encode_to_vec(),
    )
    .await;
    send_created(replayed, "replayed").await;
    let purged = Uuid::now_v7();
    send_created(purged, "purged").await;

    // A retry goes through the group's own exchange to its delay queue and
    // back.
    let attempt = wait_for("flaky to be applied after its retry", || {
        recorder.applied("flaky", 1)
    })
    .await;
    assert_eq!(attempt, 2, "applied on its second attempt");

    // Three dead letters, one event parked behind the first.
    let listed = shop_testkit::eventually("three dead letters and one parked event", WAIT, || async {
        let (ok, listed, _) = dlq(&broker, &dlq_database, &["list"]);
        (ok && listed.contains(": 3 dead letter(s)") && listed.contains("parked: 1 aggregate(s), 1 event(s)"))
            .then_some(listed)
    })
    .await;
    assert!(listed.contains("reason rejected: 3"), "{listed}");
    let (ok, shown, stderr) = dlq(&broker, &dlq_database, &["show", &broken.to_string()]);
    assert!(ok, "{stderr}");
    assert!(shown.contains("parked behind it: user/broken"), "{shown}");

    // Skip releases what waited behind it.
    let (ok, skipped, stderr) = dlq(&broker, &dlq_database, &["skip", &broken.to_string()]);
    assert!(ok, "{stderr}");
    assert!(
        skipped.contains("removed 1 dead letter(s), released 1 parked event(s)"),
        "{skipped}"
    );
    wait_for("broken's version 2, released", || recorder.applied("broken", 2)).await;

    // Replay, once the handler takes it.
    recorder
        .poisoned
        .lock()
        .unwrap()
        .remove(&("replayed".to_owned(), 1));
    let (ok, replay, stderr) = dlq(
        &broker,
        &dlq_database,
        &["replay", "--message-id", &replayed.to_string()],
    );
    assert!(ok, "{stderr}");
    assert_eq!(replay.trim(), "replayed 1, kept 1");
    wait_for("the replayed event to be applied", || {
        recorder.applied("replayed", 1)
    })
    .await;

    // Purge: refused while user "purged" waits on its dead letter (purge
    // would strand it), then, once that letter is skipped, allowed.
    let (ok, _, stderr) = dlq(&broker, &dlq_database, &["purge", "--yes"]);
    assert!(
        !ok && stderr.contains("purge refused") && stderr.contains(&purged.to_string()),
        "{stderr}"
    );
    let (ok, skipped, stderr) = dlq(&broker, &dlq_database, &["skip", &purged.to_string()]);
    assert!(ok, "{stderr}");
    assert!(skipped.contains("skipped"), "{skipped}");
    let (ok, emptied, stderr) = dlq(&broker, &dlq_database, &["purge", "--yes"]);
    assert!(ok, "{stderr}");
    assert!(emptied.starts_with("purged 0"), "{emptied}");
    let (ok, listed, stderr) = dlq(&broker, &dlq_database, &["list"]);
    assert!(ok, "{stderr}");
    assert!(
        listed.contains(": 0 dead letter(s)") && listed.contains("parked: 0 aggregate(s), 0 event(s)"),
        "{listed}"
    );

    stop.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    pool.close();

    // Both services, each as its own broker user (and the order service as
    // its own database roles): the user's event reaches the order service.
    let user_db = TestDatabase::create(
        user_service::app::MIGRATIONS,
        std::path::Path::new(user_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let user_database = user_db.config();
    let system = start_with(Options {
        amqp: Some(broker.amqp("user-service")),
        order_amqp: Some(broker.amqp("order-service")),
        user_relay: true,
        databases: Some([(user_db, user_database), (order_db, order_database)]),
        deployed_names: true,
        dlq_database_role: Some(roles.name("dlq")),
        ..Options::default()
    })
    .await;
    let mut users = system.users.clone();
    let user = users
        .create_user(shop_contracts::user::CreateUserRequest {
            email: "identities@example.com".to_owned(),
            name: "Identities".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    shop_testkit::eventually("CreateOrder to succeed", WAIT, || {
        let mut orders = system.orders.clone();
        let request = shop_contracts::order::CreateOrderRequest {
            user_id: user.id.clone(),
            items: vec![shop_contracts::order::OrderItem {
                product_id: "sku-1".to_owned(),
                quantity: 1,
            }],
            request_id: String::new(),
        };
        async move { orders.create_order(request).await.ok() }
    })
    .await;
    drop(system);
    drop(roles);
}
