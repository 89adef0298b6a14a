//! Both services as processes (`shop-node`), each with its own metrics
//! recorder and admin port, wired to each other through this test's
//! exchanges, for the tests that scrape them.

use std::time::Duration;

use shop_testkit::{ServiceProcess, TestBroker, TestDatabase};

pub struct Processes {
    pub users: ServiceProcess,
    pub orders: ServiceProcess,
    /// Where the user service publishes and the order service consumes.
    pub user_exchange: String,
    // Dropped after the processes: their names and databases go last.
    pub broker: TestBroker,
    _user_db: TestDatabase,
    _order_db: TestDatabase,
}

/// Starts the order service (with `order_env` besides its database and
/// names), waits until its consumer serves (the user events' queue is
/// bound), then the user service on the broker at `user_amqp`.
pub async fn start(user_amqp: String, order_env: &[(&str, String)]) -> Processes {
    shop_testkit::init_test_log();
    let broker = TestBroker::new();
    let (user_db, order_db) = crate::system::databases().await;
    // Declared as deployments do: the consumer only looks its producer's
    // exchange up.
    let user_exchange = broker.event_exchange(&broker.config(), "user.events").await;
    let queue = broker.queue("order-service.user-events");
    broker.track_topology(
        &shop_messaging::consumer::ConsumerConfig::new(user_exchange.clone(), queue.clone()).topology(),
    );
    let node = env!("CARGO_BIN_EXE_shop-node");
    let mut env = vec![
        ("DATABASE_URL", order_db.url().to_owned()),
        ("AMQP_URL", shop_testkit::amqp_url()),
        ("USER_EVENTS_EXCHANGE", user_exchange.clone()),
        ("ORDER_EVENTS_EXCHANGE", broker.exchange("order.events")),
        ("USER_EVENTS_QUEUE", queue),
    ];
    env.extend(order_env.iter().cloned());
    env.extend(shop_testkit::TestKeys::shared().env());
    let orders = ServiceProcess::start_with_args(node, &["order"], &env)
        .await
        .unwrap();
    shop_testkit::eventually(
        "the order service's consumer to serve",
        Duration::from_secs(30),
        || async {
            shop_host::healthcheck::check_at(orders.addr, order_service::app::CONSUMER_HEALTH)
                .await
                .ok()
        },
    )
    .await;
    let users = ServiceProcess::start_with_args(
        node,
        &["user"],
        &[
            ("DATABASE_URL", user_db.url().to_owned()),
            ("AMQP_URL", user_amqp),
            ("USER_EVENTS_EXCHANGE", user_exchange.clone()),
        ]
        .into_iter()
        .chain(shop_testkit::TestKeys::shared().env())
        .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    Processes {
        users,
        orders,
        user_exchange,
        broker,
        _user_db: user_db,
        _order_db: order_db,
    }
}

impl Processes {
    /// Stops both with SIGTERM.
    pub async fn terminate(&mut self) {
        self.users.terminate().await.unwrap();
        self.orders.terminate().await.unwrap();
    }
}
