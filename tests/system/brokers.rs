//! Why every replica of one consumer group must consume on one broker (one
//! node or one cluster), and so why `deploy/compose/check` refuses a
//! configuration where services sharing a database use different brokers.
//!
//! The group's members split its partition queues through the membership
//! table of their common database (`shop_messaging::membership`), whatever
//! broker each one is connected to; each replica then consumes the
//! partitions it owns on its own broker. Two replicas on two brokers
//! therefore leave, on each broker, the partitions the other one owns with
//! no consumer at all: events published there wait for good (the stranding
//! the first compose cluster profile caused). With the foreign replica gone,
//! the one left owns every partition again and applies them.
//!
//! The second broker is a RabbitMQ node of the test's own (the local
//! installation's `rabbitmq-server`), so the shared broker is not touched
//! beyond the test's names.

use std::path::Path;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl as _;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use shop_contracts::user::UserCreated;
use shop_testkit::cluster::{ClusterOptions, RabbitCluster};
use shop_testkit::{Running, TestBroker, TestDatabase, TestPublisher, eventually};

const PARTITIONS: u16 = 4;
const USERS: usize = 40;

/// Ready messages and consumers of `queue` on the shared broker.
async fn depth(channel: &lapin::Channel, queue: &str) -> (u32, u32) {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (declared.message_count(), declared.consumer_count())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    let mut conn = db.pool().get().await.unwrap();
    let row: Count = diesel::sql_query(sql).get_result(&mut conn).await.unwrap();
    row.count
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs rabbitmq-server on the PATH (.ci/install-tools); run: cargo test -p system-tests --test system brokers -- --ignored"]
async fn replicas_of_one_consumer_group_on_two_brokers_strand_the_partitions_each_owns_on_the_other() {
    shop_testkit::init_test_log();
    let other = RabbitCluster::start_with(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let broker = TestBroker::new();
    let orders_db = TestDatabase::create(
        order_service::app::MIGRATIONS,
        Path::new(order_service::app::MIGRATIONS_DIR),
    )
    .await
    .unwrap();
    let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut settings = order_service::Config::defaults();
    settings.host.grpc.auth = shop_testkit::TestKeys::shared().auth_config();
    settings.host.database = orders_db.config();
    settings.host.amqp = broker.config();
    settings.host.grpc.addr = any_port;
    settings.host.admin_addr = any_port;
    settings.host.shutdown_grace = Duration::from_secs(5);
    settings.service.events_exchange = broker.exchange("order.events");
    // Declared on both brokers, as their definitions would: a consumer only
    // looks its producer's exchange up.
    settings.service.user_events_exchange = broker.event_exchange(&broker.config(), "user.events").await;
    broker
        .event_exchange(&shop_messaging::AmqpConfig::new(other.amqp_url(1)), "user.events")
        .await;
    settings.service.user_events_queue = broker.queue("order-service.user-events");
    settings.service.consumer.partitions = PARTITIONS;
    settings.service.consumer.member_timeout = Duration::from_secs(1);
    let topology = settings.service.consumer().topology();
    broker.track_topology(&topology);

    // Replica A on the shared broker, replica B of the same group (same
    // database, same queue names) on the other broker.
    let mut on_other = settings.clone();
    on_other.host.amqp = shop_messaging::AmqpConfig::new(other.amqp_url(1));
    let replica_a = order_service::Application::build(settings.clone()).await.unwrap();
    let replica_a = Running::spawn(|shutdown| replica_a.run(shutdown));
    let replica_b = order_service::Application::build(on_other).await.unwrap();
    let mut replica_b = Running::spawn(|shutdown| replica_b.run(shutdown));

    // Both are members, and on the shared broker A consumes only the
    // partitions the split gave it.
    let connection = lapin::Connection::connect(&shop_testkit::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    eventually("two members in the group", Duration::from_secs(60), || async {
        (count(&orders_db, "SELECT count(*) AS count FROM consumer_members").await == 2).then_some(())
    })
    .await;
    let unconsumed: Vec<String> = eventually(
        "replica A to consume half of the partitions on the shared broker",
        Duration::from_secs(30),
        || async {
            let mut unconsumed = Vec::new();
            for partition in 0..PARTITIONS {
                let queue = topology.partition_queue(partition);
                if depth(&channel, &queue).await.1 == 0 {
                    unconsumed.push(queue);
                }
            }
            (unconsumed.len() == usize::from(PARTITIONS / 2)).then_some(unconsumed)
        },
    )
    .await;

    // Users created on the shared broker, over every partition.
    let exchange = settings.service.user_events_exchange.clone();
    let publisher = TestPublisher::connect(&exchange).await.unwrap();
    for n in 0..USERS {
        let id = uuid::Uuid::now_v7();
        let event = UserCreated {
            user_id: id.to_string(),
            version: 1,
            email: format!("stranded{n}@example.com"),
            name: "Stranded".to_owned(),
            occurred_at: None,
        };
        publisher
            .publish(&exchange, &event, uuid::Uuid::now_v7())
            .await
            .unwrap();
    }

    // A applies what its partitions hold; the others' events wait on the
    // shared broker with nobody to take them, as long as B stays a member.
    let stranded = eventually(
        "replica A to apply its partitions' events",
        Duration::from_secs(30),
        || async {
            let mut stranded = 0;
            for queue in &unconsumed {
                stranded += depth(&channel, queue).await.0;
            }
            let applied = count(&orders_db, "SELECT count(*) AS count FROM known_users").await;
            (applied + i64::from(stranded) == USERS as i64).then_some(stranded)
        },
    )
    .await;
    assert!(
        stranded > 0,
        "some of {USERS} users land in the partitions replica B owns"
    );
    for queue in &unconsumed {
        assert_eq!(
            depth(&channel, queue).await.1,
            0,
            "{queue} has no consumer on the shared broker"
        );
    }
    let applied = count(&orders_db, "SELECT count(*) AS count FROM known_users").await;
    assert!(
        applied < USERS as i64,
        "events in the partitions of the replica on the other broker were applied: {applied} of {USERS}"
    );

    // The foreign replica gone, A owns every partition and applies the rest.
    replica_b.stop().await.unwrap();
    eventually(
        "every user applied once one broker is left",
        Duration::from_secs(30),
        || async {
            (count(&orders_db, "SELECT count(*) AS count FROM known_users").await == USERS as i64)
                .then_some(())
        },
    )
    .await;
    drop(replica_a);
}
