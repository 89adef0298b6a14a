//! Fault injection: both services run as processes behind proxies the test
//! owns, under a steady load of commands, while the test cuts their broker
//! connections, freezes them (open but silent), restarts RabbitMQ, raises a
//! broker memory alarm, kills PostgreSQL backends, makes the database refuse
//! connections or turn read-only, SIGKILLs services and replays events out
//! of order. When the load stops and the system settles, it reconciles:
//! nothing lost, nothing applied twice, projections equal to the source.
//!
//! The cluster run does the same on a RabbitMQ cluster of three nodes of its
//! own: the node leading the consumer's partition queues stopped, a
//! follower stopped, a node cut off from the others.
//!
//! The short forms run in CI. A soak: `CHAOS_DURATION_SECS=1800 CHAOS_RATE=60
//! cargo test --release -p system-tests --test chaos -- --nocapture`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub,
    clippy::print_stdout
)]

mod cluster;
mod harness;
mod held;
mod load;
mod reconcile;

use harness::{Chaos, Fault, Options};

/// The runs share the broker (one restarts it): one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "restarts the broker with rabbitmqctl: needs the broker of TEST_AMQP_URL to be local; run: cargo test -p system-tests --test chaos under_faults -- --ignored"]
async fn under_faults_nothing_is_lost_nothing_is_applied_twice_and_projections_match() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let options = Options::from_env(Options {
        duration: std::time::Duration::from_secs(90),
        rate: 30,
        users: 40,
        instances: 1,
        faults: vec![
            Fault::CutBroker,
            Fault::KillDatabaseBackends,
            Fault::KillUserService,
            Fault::Duplicates,
            Fault::RefuseDatabase,
            Fault::FreezeConnections,
            Fault::KillOrderService,
            Fault::ReadOnlyOrderDatabase,
            Fault::RestartBroker,
            Fault::DatabaseAndBrokerAtOnce,
            Fault::EveryInstanceDown,
        ],
        cluster: false,
    });
    let report = Chaos::run(options).await;
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_of_each_service_keep_every_projection_right_and_per_user_order() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let options = Options::from_env_with_prefix(
        "REPLICAS",
        Options {
            duration: std::time::Duration::from_secs(40),
            rate: 40,
            users: 8,
            instances: 2,
            faults: vec![
                Fault::KillUserService,
                Fault::KillOrderService,
                Fault::EveryInstanceDown,
            ],
            cluster: false,
        },
    );
    let report = Chaos::run(options).await;
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs rabbitmq-server on the PATH (.ci/install-tools); run: cargo test -p system-tests --test chaos cluster -- --ignored"]
async fn on_a_three_node_cluster_losing_any_node_loses_duplicates_and_reorders_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let options = Options::from_env_with_prefix(
        "CLUSTER",
        Options {
            duration: std::time::Duration::from_secs(45),
            rate: 30,
            users: 20,
            instances: 2,
            faults: vec![Fault::StopLeaderNode, Fault::StopFollowerNode, Fault::IsolateNode],
            cluster: true,
        },
    );
    let report = Chaos::run(options).await;
    report.assert_clean();
}
