//! The processes, proxies and faults of a chaos run.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret as _;
use shop_messaging::AmqpConfig;
use shop_testkit::{ClusterOptions, RabbitCluster, ServiceProcess, TcpProxy, TestBroker, TestDatabase};
use tokio::time::Instant;

use crate::cluster::Outage;
use crate::load::Load;
use crate::reconcile::{Report, Taps};

/// What to run and what to break.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the load runs.
    pub duration: Duration,
    /// Commands per second.
    pub rate: u32,
    /// How many users the load creates and works on at most.
    pub users: usize,
    /// Instances of each service.
    pub instances: usize,
    /// Faults, injected in turn, evenly over the run.
    pub faults: Vec<Fault>,
    /// Run on a RabbitMQ cluster of three nodes of the test's own (the
    /// services given every node's URL) instead of the machine's broker
    /// behind a proxy.
    pub cluster: bool,
}

impl Options {
    /// `defaults` with `CHAOS_DURATION_SECS`, `CHAOS_RATE`, `CHAOS_USERS`.
    pub fn from_env(defaults: Self) -> Self {
        Self::from_env_with_prefix("CHAOS", defaults)
    }

    /// `defaults` with `<PREFIX>_DURATION_SECS`, `<PREFIX>_RATE`,
    /// `<PREFIX>_USERS`.
    pub fn from_env_with_prefix(prefix: &str, defaults: Self) -> Self {
        let var = |name: &str| {
            std::env::var(format!("{prefix}_{name}"))
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
        };
        // `<PREFIX>_FAULTS=ReadOnlyOrderDatabase,Duplicates`: only these of
        // the run's faults (to try one fault, or a change to one, quickly).
        let faults = match std::env::var(format!("{prefix}_FAULTS")) {
            Ok(names) => defaults
                .faults
                .iter()
                .copied()
                .filter(|fault| names.split(',').any(|name| name.trim() == format!("{fault:?}")))
                .collect(),
            Err(_) => defaults.faults.clone(),
        };
        Self {
            faults,
            duration: var("DURATION_SECS").map_or(defaults.duration, Duration::from_secs),
            rate: var("RATE").map_or(defaults.rate, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            users: var("USERS").map_or(defaults.users, |u| usize::try_from(u).unwrap_or(usize::MAX)),
            ..defaults
        }
    }
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Drop every connection between the services and RabbitMQ.
    CutBroker,
    /// `rabbitmqctl stop_app` then `start_app`.
    RestartBroker,
    /// `pg_terminate_backend` on every connection to the services'
    /// databases.
    KillDatabaseBackends,
    /// The database refuses connections (and drops the live ones) for three
    /// seconds.
    RefuseDatabase,
    /// SIGKILL a user service instance, and start it again.
    KillUserService,
    /// SIGKILL an order service instance, and start it again.
    KillOrderService,
    /// Publish again a sample of past user events, shuffled.
    Duplicates,
    /// Every open connection to PostgreSQL and RabbitMQ stops carrying
    /// bytes without being closed (a NAT or firewall forgot the flows);
    /// new connections work.
    FreezeConnections,
    /// Three faults overlapping: the order database alone turns read-only
    /// (a failover onto a standby) for longer than the consumer's whole
    /// retry schedule while user commands keep flowing, so user events pile
    /// up in the consumer's queues and must be held, not charged (no
    /// attempt, no dead letter, from the consumer's metrics); three seconds
    /// in, events not applied yet are replayed beside applied ones; then
    /// RabbitMQ raises a memory alarm until just before the database comes
    /// back: the user relay's publishes block (its `broker_blocked` gauge)
    /// while commands are still acknowledged, and the events written
    /// meanwhile go out only once it lifts (their `published_at`).
    ReadOnlyOrderDatabase,
    /// Two faults at once: the database refuses connections while the
    /// broker connections are cut and refused too; the broker comes back
    /// first.
    DatabaseAndBrokerAtOnce,
    /// Every instance of both services SIGKILLed at once, then started
    /// again.
    EveryInstanceDown,
    /// Cluster runs: `rabbitmqctl stop_app` on the node that leads most of
    /// the consumer's partition queues, and `start_app` some seconds later.
    StopLeaderNode,
    /// Cluster runs: the same on a node that leads as few of them as any.
    StopFollowerNode,
    /// Cluster runs: the node that leads most partition queues cut off from
    /// the other two (it pauses, being the minority), then healed.
    IsolateNode,
}

impl Fault {
    /// Whether the fault takes a cluster node away.
    pub fn is_cluster_fault(self) -> bool {
        matches!(
            self,
            Self::StopLeaderNode | Self::StopFollowerNode | Self::IsolateNode
        )
    }
}

/// A service instance: its process, and what it takes to start it again on
/// the same ports.
pub struct Node {
    pub service: &'static str,
    pub grpc: SocketAddr,
    envs: Vec<(&'static str, String)>,
    pub process: Option<ServiceProcess>,
}

impl Node {
    async fn start(&mut self) {
        let mut envs = self.envs.clone();
        envs.push(("GRPC_ADDR", self.grpc.to_string()));
        let process =
            ServiceProcess::start_with_args(env!("CARGO_BIN_EXE_shop-node"), &[self.service], &envs)
                .await
                .unwrap_or_else(|error| panic!("{} did not start: {error}", self.service));
        self.process = Some(process);
    }

    async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await.unwrap();
        }
    }

    pub fn resident_bytes(&self) -> u64 {
        self.process
            .as_ref()
            .and_then(ServiceProcess::resident_bytes)
            .unwrap_or(0)
    }
}

/// Waits (up to 30 s) until health name `service` of the server at `addr`
/// reports SERVING.
async fn wait_until_serving(addr: SocketAddr, service: &'static str) {
    shop_testkit::eventually(
        &format!("{service:?} to serve"),
        Duration::from_secs(30),
        || async move { shop_host::healthcheck::check_at(addr, service).await.ok() },
    )
    .await;
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The operator identity of a cluster run (taps, dead letters), beside the
/// shipped ones the services use.
const OPERATOR: &str = "shop-chaos-operator";

/// The passwords of a cluster run's broker users.
struct Identities {
    passwords: Vec<(String, String)>,
}

impl Identities {
    fn new() -> Self {
        let passwords = ["user-service", "order-service", "shop-dlq", OPERATOR]
            .iter()
            .map(|user| ((*user).to_owned(), uuid::Uuid::new_v4().simple().to_string()))
            .collect();
        Self { passwords }
    }

    fn password(&self, user: &str) -> &str {
        self.passwords
            .iter()
            .find(|(name, _)| name == user)
            .map(|(_, password)| password.as_str())
            .unwrap_or_default()
    }

    /// The shipped definitions with these passwords.
    fn definitions(&self) -> String {
        let pairs: Vec<(&str, &str)> = self
            .passwords
            .iter()
            .map(|(user, password)| (user.as_str(), password.as_str()))
            .collect();
        shop_testkit::cluster::shipped_definitions(&pairs).unwrap()
    }

    /// The run's operator: every permission on `/`, no tag.
    async fn add_operator(&self, cluster: &RabbitCluster) {
        cluster
            .rabbitmqctl(1, &["add_user", OPERATOR, self.password(OPERATOR)])
            .await
            .unwrap();
        cluster
            .rabbitmqctl(1, &["set_permissions", "-p", "/", OPERATOR, ".*", ".*", ".*"])
            .await
            .unwrap();
    }

    /// Every node's URL as `user`, separated by commas.
    fn urls(&self, cluster: &RabbitCluster, user: &str) -> String {
        (1..=cluster.len())
            .map(|i| cluster.amqp_url_as(i, user, self.password(user)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Everything a run owns.
pub struct Chaos {
    pub options: Options,
    pub user_nodes: Vec<Node>,
    pub order_nodes: Vec<Node>,
    /// Between the services and the machine's broker (`None` on a
    /// cluster: the services connect to its nodes directly).
    pub amqp_proxy: Option<TcpProxy>,
    pub pg_proxy: TcpProxy,
    /// The cluster of a cluster run.
    pub cluster: Option<RabbitCluster>,
    /// The broker, as the test itself reaches it (taps, dead letters,
    /// replays).
    pub amqp: AmqpConfig,
    pub taps: Taps,
    pub user_exchange: String,
    pub consumer_queue: String,
    /// The consumer group's partition queues.
    pub partition_queues: Vec<String>,
    /// Each cluster node taken away, and how long until the system moved
    /// again, measured from the moment it went.
    pub outages: Vec<Outage>,
    /// Each fault, how long injecting it took, and how long after it ended
    /// the first event was applied by the order service.
    pub faults_injected: Vec<(Fault, Duration, Option<Duration>)>,
    /// What each fault was seen to do (backends killed, reconnections,
    /// duplicates replayed, commands acknowledged after it).
    pub evidence: Vec<String>,
    /// A fault that did not happen, or after which nothing moved again.
    pub fault_problems: Vec<String>,
    /// Each fault's window: from its injection until commands were
    /// acknowledged again after it, and two seconds more.
    pub fault_windows: Vec<(Fault, Instant, Instant)>,
    /// The codes of the commands that failed in each fault's window, and
    /// between faults (no client retries hide them).
    pub failures_by_fault: Vec<String>,
    /// The consumer's whole retry schedule: the sum of its delays over
    /// every attempt; an outage held longer would dead-letter every event
    /// it held if it were charged to them.
    pub retry_budget: Duration,
    /// The run's names; deletes its queues and exchanges when dropped.
    _broker: TestBroker,
    pub user_db: TestDatabase,
    pub order_db: TestDatabase,
    /// The event signing key's files: the user services sign with it, the
    /// order services trust it (signing on, as in production).
    _keys: shop_testkit::keys::KeyFiles,
}

impl Chaos {
    /// Runs the load with the faults, lets the system settle and reconciles.
    pub async fn run(options: Options) -> Report {
        shop_testkit::init_test_log();
        let mut chaos = Self::start(options).await;
        if chaos.cluster.is_some() {
            chaos.check_quorum_membership("before the load").await;
            chaos.check_identities().await;
        }
        let load = Load::start(&chaos);
        let started = Instant::now();
        let idle_memory = chaos.memory();
        let faults = chaos.options.faults.clone();
        let spacing = chaos.options.duration / u32::try_from(faults.len() + 1).unwrap_or(1);
        for (index, fault) in faults.iter().enumerate() {
            let at = spacing * u32::try_from(index + 1).unwrap_or(1);
            tokio::time::sleep_until(started + at).await;
            let began = Instant::now();
            chaos.inject(*fault, &load).await;
            let took = began.elapsed();
            let acknowledged = load.acknowledged();
            let ended = Instant::now();
            let recovered = chaos.first_applied_after(chrono::Utc::now(), false).await;
            let answered = {
                let mut answered = None;
                while ended.elapsed() < Duration::from_secs(60) {
                    if load.acknowledged() > acknowledged {
                        answered = Some(ended.elapsed());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answered
            };
            let window_end = ended + answered.unwrap_or_default() + Duration::from_secs(2);
            chaos.fault_windows.push((*fault, began, window_end));
            match answered {
                Some(after) => chaos.evidence.push(format!(
                    "{fault:?}: commands acknowledged again {after:.1?} after it"
                )),
                None => chaos
                    .fault_problems
                    .push(format!("{fault:?}: no command acknowledged within 60 s after it")),
            }
            // A fault after which the consumer never applied another event
            // within a minute did not heal: the run fails rather than print
            // a missing recovery time.
            if recovered.is_none() {
                chaos
                    .fault_problems
                    .push(format!("{fault:?}: no event applied within 60 s after it ended"));
            }
            chaos.faults_injected.push((*fault, took, recovered));
            println!(
                "chaos: {fault:?} at {:?} took {took:?}; first event applied {recovered:?} after it ended",
                started.elapsed(),
            );
        }
        tokio::time::sleep_until(started + chaos.options.duration).await;
        let loaded_memory = chaos.memory();
        let stopped = Instant::now();
        let outcome = load.stop().await;
        chaos.judge_the_load(&outcome, started, stopped);
        chaos.restore().await;
        if chaos.cluster.is_some() {
            chaos.check_quorum_membership("after the faults").await;
        }
        crate::reconcile::settle_and_reconcile(&chaos, outcome, started.elapsed(), idle_memory, loaded_memory)
            .await
    }

    async fn start(options: Options) -> Self {
        let user_db = TestDatabase::create(
            user_service::app::MIGRATIONS,
            Path::new(user_service::app::MIGRATIONS_DIR),
        )
        .await
        .unwrap();
        let order_db = TestDatabase::create(
            order_service::app::MIGRATIONS,
            Path::new(order_service::app::MIGRATIONS_DIR),
        )
        .await
        .unwrap();
        let broker = TestBroker::new();
        // A cluster of the run's own loads the shipped broker definitions:
        // each service connects as its own least-privileged user, and the
        // run itself (taps, dead letters) as an operator of its own.
        let identities = Identities::new();
        let cluster = if options.cluster {
            let cluster = RabbitCluster::start_with(ClusterOptions {
                definitions: Some(identities.definitions()),
                ..ClusterOptions::default()
            })
            .await
            .unwrap();
            identities.add_operator(&cluster).await;
            Some(cluster)
        } else {
            None
        };
        let amqp_proxy = if options.cluster {
            None
        } else {
            Some(TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap())
        };
        let amqp = match &cluster {
            Some(cluster) => AmqpConfig::new(identities.urls(cluster, OPERATOR)),
            None => broker.config(),
        };
        let pg_addr = tokio::net::lookup_host(("127.0.0.1", 5432))
            .await
            .unwrap()
            .next()
            .unwrap();
        let pg_proxy = TcpProxy::start(pg_addr).await.unwrap();
        // On the machine's broker, the run's own names; on its own cluster,
        // the deployed names the definitions grant (never registered for
        // deletion: the machine's broker is not theirs).
        let (user_exchange, order_exchange, consumer_queue) = if options.cluster {
            (
                "user.events".to_owned(),
                "order.events".to_owned(),
                "order-service.user-events".to_owned(),
            )
        } else {
            (
                broker.exchange("user.events"),
                broker.exchange("order.events"),
                broker.queue("order-service.user-events"),
            )
        };
        let consumer = {
            let mut config =
                shop_messaging::consumer::ConsumerConfig::new(user_exchange.clone(), consumer_queue.clone());
            config.retry_delays = vec![
                Duration::from_millis(200),
                Duration::from_millis(1000),
                Duration::from_millis(3000),
            ];
            config
        };
        let max_attempts = 6;
        let retry_budget: Duration = (0..max_attempts - 1)
            .map(|step| consumer.retry_delays[step.min(consumer.retry_delays.len() - 1)])
            .sum();
        let topology = consumer.topology();
        let partition_queues = (0..topology.partition_count())
            .map(|index| topology.partition_queue(index))
            .collect();
        if !options.cluster {
            broker.track_topology(&topology);
        }
        let taps = Taps::declare(&broker, &amqp, &user_exchange, &order_exchange).await;
        // The services reach the machine's broker through the proxy, and a
        // cluster through the list of its nodes, each as its own user.
        let amqp_url = |service: &str| match (&amqp_proxy, &cluster) {
            (Some(proxy), _) => proxy.url_for(amqp.url.expose_secret()),
            (None, Some(cluster)) => identities.urls(cluster, service),
            (None, None) => amqp.url.expose_secret().to_owned(),
        };
        let delays = consumer
            .retry_delays
            .iter()
            .map(|d| format!("{}ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(",");
        let keys = shop_testkit::keys::KeyFiles::write().unwrap();
        let common = |db: &TestDatabase, service: &str| {
            let mut envs = vec![
                ("DATABASE_URL", pg_proxy.url_for(db.url())),
                ("AMQP_URL", amqp_url(service)),
                ("USER_EVENTS_EXCHANGE", user_exchange.clone()),
                ("ORDER_EVENTS_EXCHANGE", order_exchange.clone()),
                ("USER_EVENTS_QUEUE", consumer_queue.clone()),
                ("CONSUMER_RETRY_DELAYS", delays.clone()),
                ("CONSUMER_MAX_ATTEMPTS", max_attempts.to_string()),
                // Every application recorded, in order, for the
                // reconciliation.
                ("CONSUMER_LEDGER", "true".to_owned()),
                ("RELAY_POLL_INTERVAL", "500ms".to_owned()),
                ("DATABASE_ACQUIRE_TIMEOUT", "2s".to_owned()),
                ("SHUTDOWN_GRACE", "3s".to_owned()),
                // The "… service started" line is how the test learns it is up.
                ("RUST_LOG", "warn,shop_host=info".to_owned()),
            ];
            // With authentication on, as deployed: the load calls with a
            // token of the test's keys; and every event signed.
            envs.extend(shop_testkit::TestKeys::shared().env());
            envs.extend(keys.envs());
            envs
        };
        let nodes = |service: &'static str, db: &TestDatabase| -> Vec<Node> {
            (0..options.instances.max(1))
                .map(|_| Node {
                    service,
                    grpc: free_port(),
                    envs: common(db, &format!("{service}-service")),
                    process: None,
                })
                .collect()
        };
        let mut user_nodes = nodes("user", &user_db);
        let mut order_nodes = nodes("order", &order_db);
        // The consumer's queue must exist before the first event is
        // published (a topic exchange drops what no queue is bound to): the
        // consumer reports SERVING once it has declared it.
        for node in order_nodes.iter_mut() {
            node.start().await;
            wait_until_serving(node.grpc, order_service::app::CONSUMER_HEALTH).await;
        }
        for node in user_nodes.iter_mut() {
            node.start().await;
        }
        Self {
            options,
            user_nodes,
            order_nodes,
            amqp_proxy,
            pg_proxy,
            cluster,
            amqp,
            taps,
            user_exchange,
            consumer_queue,
            partition_queues,
            outages: Vec::new(),
            faults_injected: Vec::new(),
            evidence: Vec::new(),
            fault_problems: Vec::new(),
            fault_windows: Vec::new(),
            failures_by_fault: Vec::new(),
            retry_budget,
            _broker: broker,
            user_db,
            order_db,
            _keys: keys,
        }
    }

    /// On a cluster of the run's own: the services are connected as their
    /// own users of the shipped definitions, and nobody as guest.
    async fn check_identities(&mut self) {
        let Some(cluster) = &self.cluster else { return };
        let mut users = std::collections::BTreeSet::new();
        for node in 1..=cluster.len() {
            let listed = cluster
                .rabbitmqctl(node, &["list_connections", "-q", "--no-table-headers", "user"])
                .await
                .unwrap_or_default();
            users.extend(
                listed
                    .lines()
                    .map(|line| line.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
        }
        let expected: std::collections::BTreeSet<String> = ["user-service", "order-service"]
            .iter()
            .map(|user| (*user).to_owned())
            .collect();
        if users
            .iter()
            .all(|user| expected.contains(user) || user == OPERATOR)
            && expected.is_subset(&users)
        {
            self.evidence.push(format!(
                "broker connections as {users:?}: each service as its own user"
            ));
        } else {
            self.fault_problems.push(format!(
                "the services are not connected as their own users: {users:?}"
            ));
        }
    }

    fn memory(&self) -> Vec<(String, u64)> {
        let named = |nodes: &[Node]| {
            nodes
                .iter()
                .enumerate()
                .map(|(i, node)| (format!("{}-{i}", node.service), node.resident_bytes()))
                .collect::<Vec<_>>()
        };
        let mut memory = named(&self.user_nodes);
        memory.extend(named(&self.order_nodes));
        memory
    }

    /// The proxy to the machine's broker, which the faults on it need.
    fn broker_proxy(&self) -> &TcpProxy {
        self.amqp_proxy
            .as_ref()
            .expect("this fault needs the machine's broker, not a cluster")
    }

    async fn inject(&mut self, fault: Fault, load: &Load) {
        if fault.is_cluster_fault() {
            self.lose_node(fault, load).await;
            return;
        }
        let connections = self.broker_proxy().accepted();
        match fault {
            Fault::CutBroker => self.broker_proxy().cut(),
            Fault::RestartBroker => {
                rabbitmqctl(&["stop_app"]).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                rabbitmqctl(&["start_app"]).await;
                rabbitmqctl(&["await_startup"]).await;
            }
            Fault::KillDatabaseBackends => {
                let killed = self.kill_database_backends().await;
                println!("chaos: terminated {killed} backends");
                self.expect(
                    fault,
                    killed > 0,
                    format!("{killed} database backends terminated"),
                );
            }
            Fault::RefuseDatabase => {
                self.pg_proxy.refuse(true);
                self.pg_proxy.cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.pg_proxy.refuse(false);
            }
            Fault::KillUserService => {
                let node = &mut self.user_nodes[0];
                node.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                node.start().await;
            }
            Fault::KillOrderService => {
                let node = &mut self.order_nodes[0];
                node.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                node.start().await;
            }
            Fault::Duplicates => {
                let replay = load.replay_sample(&self.order_db).await;
                self.expect(
                    fault,
                    replay.applied > 0,
                    format!(
                        "{} past events published again, {} of them applied already",
                        replay.replayed, replay.applied
                    ),
                );
            }
            Fault::FreezeConnections => {
                let frozen = self.pg_proxy.freeze() + self.broker_proxy().freeze();
                println!("chaos: froze {frozen} connections");
                self.expect(fault, frozen > 0, format!("{frozen} connections frozen"));
            }
            Fault::ReadOnlyOrderDatabase => self.read_only_order_database_under_alarm(fault, load).await,
            Fault::DatabaseAndBrokerAtOnce => {
                self.pg_proxy.refuse(true);
                self.pg_proxy.cut();
                self.broker_proxy().refuse(true);
                self.broker_proxy().cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.broker_proxy().refuse(false);
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.pg_proxy.refuse(false);
            }
            Fault::EveryInstanceDown => {
                for node in self.user_nodes.iter_mut().chain(self.order_nodes.iter_mut()) {
                    node.kill().await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                for node in self.order_nodes.iter_mut().chain(self.user_nodes.iter_mut()) {
                    node.start().await;
                }
            }
            Fault::StopLeaderNode | Fault::StopFollowerNode | Fault::IsolateNode => {
                unreachable!("taken away above")
            }
        }
        if matches!(
            fault,
            Fault::CutBroker
                | Fault::RestartBroker
                | Fault::FreezeConnections
                | Fault::DatabaseAndBrokerAtOnce
        ) {
            // The services' broker connections were lost: they must come
            // back through the proxy.
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.broker_proxy().accepted() <= connections && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let reconnections = self.broker_proxy().accepted().saturating_sub(connections);
            self.expect(
                fault,
                reconnections > 0,
                format!("{reconnections} broker connections opened again"),
            );
        }
    }

    /// Records what a fault was seen to do, or a problem when it was not.
    pub(crate) fn expect(&mut self, fault: Fault, happened: bool, what: String) {
        if happened {
            self.evidence.push(format!("{fault:?}: {what}"));
        } else {
            self.fault_problems
                .push(format!("{fault:?} did not happen: {what}"));
        }
    }

    /// `pg_terminate_backend` on every session of both databases; how many.
    async fn kill_database_backends(&self) -> usize {
        let (client, connection) = tokio_postgres::connect(
            &std::env::var("TEST_DATABASE_URL")
                .unwrap_or_else(|_| shop_testkit::DEFAULT_TEST_DATABASE_URL.to_owned()),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
                &[&vec![
                    self.user_db.name().to_owned(),
                    self.order_db.name().to_owned(),
                ]],
            )
            .await
            .unwrap()
            .len()
    }

    /// How long after `since` the order service applied its first event
    /// (`created_after`: its first event created after `since`, told by the
    /// time in the event's UUIDv7 id), within a minute (`None` past
    /// it): how long the system took to move again after a fault.
    pub async fn first_applied_after(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        created_after: bool,
    ) -> Option<Duration> {
        #[derive(diesel::QueryableByName)]
        struct First {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
            at: Option<chrono::DateTime<chrono::Utc>>,
        }
        use diesel_async::RunQueryDsl as _;
        // The smallest UUIDv7 of the millisecond `since` (or the nil id):
        // the first 48 bits of one are its creation time in milliseconds.
        let lowest = if created_after {
            let millis = u64::try_from(since.timestamp_millis()).unwrap_or(0);
            let mut bytes = [0_u8; 16];
            bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
            uuid::Uuid::from_bytes(bytes)
        } else {
            uuid::Uuid::nil()
        };
        let pool = self.order_db.pool();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(mut conn) = pool.get().await {
                let first = diesel::sql_query(
                    "SELECT min(applied_at) AS at FROM inbox_ledger WHERE applied_at > $1 AND event_id >= $2",
                )
                .bind::<diesel::sql_types::Timestamptz, _>(since)
                .bind::<diesel::sql_types::Uuid, _>(lowest)
                .get_result::<First>(&mut conn)
                .await;
                if let Ok(First { at: Some(at) }) = first {
                    return (at - since).to_std().ok();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Every fault undone: proxies open, every instance running.
    async fn restore(&mut self) {
        self.pg_proxy.refuse(false);
        if let Some(proxy) = &self.amqp_proxy {
            proxy.refuse(false);
        }
        for node in self.user_nodes.iter_mut().chain(self.order_nodes.iter_mut()) {
            if node.process.is_none() {
                node.start().await;
            }
        }
    }
}

/// A memory alarm on the shared broker, lifted when dropped, even when the
/// run fails (the watermark goes back to RabbitMQ's default, 0.4).
pub(crate) struct MemoryAlarm;

impl MemoryAlarm {
    pub(crate) async fn raise() -> Self {
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1000000"]).await;
        Self
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn rabbitmqctl(args: &[&str]) {
    let status = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

impl Drop for Chaos {
    fn drop(&mut self) {
        // SIGKILL is fine here: the run is over.
        for node in self.user_nodes.iter_mut().chain(self.order_nodes.iter_mut()) {
            if let Some(process) = node.process.as_mut() {
                let _ = process.pid().map(|pid| {
                    std::process::Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .status()
                });
            }
        }
    }
}
