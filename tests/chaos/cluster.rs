//! The faults of a cluster run: a RabbitMQ node of the test's own cluster
//! stopped or cut off under load, and the quorum queue membership checked
//! before and after.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::harness::{Chaos, Fault};
use crate::load::Load;

/// How long a lost node stays away, at least.
const OUTAGE: Duration = Duration::from_secs(5);

/// How long the system may take to move again after a node went away.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

/// A cluster node taken away under load, and how long until the system
/// moved again, measured from the moment the node was gone (the command
/// that took it away had returned).
#[derive(Debug)]
pub struct Outage {
    pub fault: Fault,
    pub node: String,
    /// How long the command that took it away ran (`stop_app`, or the
    /// partition until the others counted the node out).
    pub command: Duration,
    /// Until the order service applied any event.
    pub any_applied: Option<Duration>,
    /// Until it applied an event created after the node went: the relay
    /// publishing again and the consumer consuming again, end to end.
    pub new_applied: Option<Duration>,
    /// Until a command was acknowledged.
    pub answered: Option<Duration>,
    /// The longest pause between two events applied from the command's
    /// start until the node was back: the stall the loss caused, wherever
    /// in the command the node went.
    pub longest_pause: Option<Duration>,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |d: Option<Duration>| {
            d.map_or_else(|| "never".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
        };
        write!(
            f,
            "{:?} ({}, command {:.1}s): an event applied {}, a new event applied {}, a command answered {}, longest pause in applied events {}",
            self.fault,
            self.node,
            self.command.as_secs_f64(),
            show(self.any_applied),
            show(self.new_applied),
            show(self.answered),
            show(self.longest_pause)
        )
    }
}

/// One partition queue as a node lists it.
#[derive(Debug)]
struct QueueState {
    name: String,
    leader: Option<String>,
    members: Vec<String>,
    online: Vec<String>,
}

impl QueueState {
    fn from_json(queue: &serde_json::Value) -> Self {
        let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
        let names = |key: &str| {
            queue[key]
                .as_array()
                .map(|names| names.iter().filter_map(text).collect())
                .unwrap_or_default()
        };
        Self {
            name: text(&queue["name"]).unwrap_or_default(),
            leader: text(&queue["leader"]).filter(|leader| !leader.is_empty()),
            members: names("members"),
            online: names("online"),
        }
    }
}

impl Chaos {
    fn rabbit_cluster(&self) -> &shop_testkit::RabbitCluster {
        self.cluster
            .as_ref()
            .expect("a cluster fault needs Options::cluster")
    }

    /// Every partition queue's leader, members and online members, as node
    /// `ask` lists them (`rabbitmqctl list_queues`, one call for all).
    async fn partition_states(&self, ask: usize) -> anyhow::Result<Vec<QueueState>> {
        let output = self
            .rabbit_cluster()
            .rabbitmqctl(
                ask,
                &[
                    "list_queues",
                    "-q",
                    "name",
                    "leader",
                    "members",
                    "online",
                    "--formatter",
                    "json",
                ],
            )
            .await?;
        let all: Vec<serde_json::Value> = serde_json::from_str(output.trim())?;
        Ok(all
            .iter()
            .map(QueueState::from_json)
            .filter(|queue| self.partition_queues.contains(&queue.name))
            .collect())
    }

    /// How many partition queues each node leads (by node number).
    fn leaders(&self, states: &[QueueState]) -> HashMap<usize, usize> {
        let cluster = self.rabbit_cluster();
        let mut led = HashMap::new();
        for state in states {
            if let Some(node) = state.leader.as_deref().and_then(|name| cluster.index_of(name)) {
                *led.entry(node).or_insert(0) += 1;
            }
        }
        led
    }

    /// Checks that every partition queue has a member on every node, and,
    /// `online`, that every member is up: a queue replicated on fewer
    /// nodes would not survive the loss of one of them.
    pub async fn check_quorum_membership(&mut self, when: &str) {
        let cluster = self.rabbit_cluster();
        let nodes = cluster.node_names();
        let expected = self.partition_queues.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        let problem = loop {
            let problem = match self.partition_states(1).await {
                Ok(states) if states.len() != expected => {
                    Some(format!("{} of {expected} partition queues listed", states.len()))
                }
                Ok(states) => states.iter().find_map(|queue| {
                    let missing: Vec<&String> = nodes
                        .iter()
                        .filter(|node| !queue.members.contains(node) || !queue.online.contains(node))
                        .collect();
                    (!missing.is_empty()).then(|| format!("{} has no member up on {missing:?}", queue.name))
                }),
                Err(error) => Some(format!("listing the queues failed: {error:#}")),
            };
            if problem.is_none() || Instant::now() > deadline {
                break problem;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        match problem {
            None => self.evidence.push(format!(
                "quorum membership {when}: each of the {expected} partition queues has a member up on all {} nodes",
                nodes.len()
            )),
            Some(problem) => self
                .fault_problems
                .push(format!("quorum membership {when}: {problem}")),
        }
    }

    /// Takes a node away under load (stopped, or cut off from the others),
    /// measures how long until the system moves again, waits until every
    /// partition queue leads from another node, and brings the node back.
    pub async fn lose_node(&mut self, fault: Fault, load: &Load) {
        let cluster_len = self.rabbit_cluster().len();
        let before = self.partition_states(1).await.unwrap_or_default();
        let led = self.leaders(&before);
        let count = |node: &usize| led.get(node).copied().unwrap_or(0);
        let node = match fault {
            Fault::StopFollowerNode => (1..=cluster_len).min_by_key(count),
            _ => (1..=cluster_len).max_by_key(count),
        }
        .expect("the cluster has nodes");
        let name = self.rabbit_cluster().node_name(node).to_owned();
        let survivor = (1..=cluster_len)
            .find(|other| *other != node)
            .expect("three nodes");
        let connections_before = self.connections_per_node(survivor).await;

        let stopping = Instant::now();
        let stopping_at = chrono::Utc::now();
        let acknowledged = load.acknowledged();
        match fault {
            Fault::IsolateNode => self.rabbit_cluster().isolate_node(node).await.unwrap(),
            _ => self.rabbit_cluster().stop_node(node).await.unwrap(),
        }
        // Measured from here: the node is surely gone (its clients were
        // disconnected somewhere within the command, which takes a second
        // or two).
        let since = chrono::Utc::now();
        let began = Instant::now();
        let command = stopping.elapsed();
        println!(
            "chaos: {fault:?}: {name} ({} of {} partition queues led there) gone, the command took {:.1?}",
            count(&node),
            self.partition_queues.len(),
            command
        );
        let (any_applied, new_applied, answered) = tokio::join!(
            self.first_applied_after(since, false),
            self.first_applied_after(since, true),
            async {
                while began.elapsed() < FAILOVER_DEADLINE {
                    if load.acknowledged() > acknowledged {
                        return Some(began.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None
            }
        );

        // Every partition queue leads from a node still there, and the
        // services' connections are on the nodes still there.
        let mut moved = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while moved.is_none() && Instant::now() < deadline {
            if let Ok(states) = self.partition_states(survivor).await {
                let led = self.leaders(&states);
                let everywhere: usize = led.values().sum();
                if everywhere == self.partition_queues.len() && !led.contains_key(&node) {
                    moved = Some(led);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A relay lane with nothing to publish connects only when it has
        // something, so the count after may be lower than before; none is
        // left on the lost node.
        let mut connections_after = BTreeMap::new();
        let reconnected =
            |after: &BTreeMap<String, usize>| after.values().sum::<usize>() > 0 && !after.contains_key(&name);
        while !reconnected(&connections_after) && Instant::now() < deadline {
            connections_after = self.connections_per_node(survivor).await;
        }
        self.expect(
            fault,
            moved.is_some(),
            format!("{name} lost; partition queue leaders by node {moved:?}"),
        );
        self.expect(
            fault,
            reconnected(&connections_after),
            format!("service connections by node before {connections_before:?}, after {connections_after:?}"),
        );
        self.expect(
            fault,
            new_applied.is_some(),
            format!("an event created after {name} went was applied {new_applied:.1?} after"),
        );

        tokio::time::sleep_until(began + OUTAGE).await;
        match fault {
            Fault::IsolateNode => self.rabbit_cluster().heal_node(node).await.unwrap(),
            _ => self.rabbit_cluster().start_node(node).await.unwrap(),
        }
        let longest_pause = self.longest_pause(stopping_at, chrono::Utc::now()).await;
        let outage = Outage {
            fault,
            node: name,
            command,
            longest_pause,
            any_applied,
            new_applied,
            answered,
        };
        println!("chaos: {outage}; back after {:.1?}", began.elapsed());
        self.outages.push(outage);
    }

    /// How many of the services' connections (relay lanes, consumers and
    /// their publishers) each node holds, as node `ask` lists them (the
    /// listing covers the cluster; a connection's process id names its
    /// node).
    async fn connections_per_node(&self, ask: usize) -> BTreeMap<String, usize> {
        let mut per_node = BTreeMap::new();
        let Ok(output) = self
            .rabbit_cluster()
            .rabbitmqctl(ask, &["list_connections", "-q", "pid", "client_properties"])
            .await
        else {
            return per_node;
        };
        // One line per connection: `<node.n.n.n>` and its properties, where
        // the service's connection names end so (a capability such as
        // "consumer_cancel_notify" does not).
        for line in output.lines() {
            let is_service = ["outbox relay\"", " consumer\"", " consumer publisher\""]
                .iter()
                .any(|end| line.contains(end));
            let node = line
                .trim_start()
                .strip_prefix('<')
                .and_then(|pid| pid.split_once('@'))
                .map(|(name, rest)| format!("{name}@{}", rest.split('.').next().unwrap_or(rest)));
            if let (true, Some(node)) = (is_service, node) {
                *per_node.entry(node).or_insert(0) += 1;
            }
        }
        per_node
    }

    /// The longest time between two events applied from `from` to `to`
    /// (the ends included).
    async fn longest_pause(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> Option<Duration> {
        #[derive(diesel::QueryableByName)]
        struct Pause {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
            seconds: Option<f64>,
        }
        use diesel_async::RunQueryDsl as _;
        let mut conn = self.order_db.pool().get().await.ok()?;
        let pause = diesel::sql_query(
            "SELECT max(extract(epoch FROM at - previous))::float8 AS seconds FROM ( \
                 SELECT at, lag(at) OVER (ORDER BY at) AS previous FROM ( \
                     SELECT $1 AS at UNION ALL SELECT $2 \
                     UNION ALL SELECT applied_at FROM inbox_ledger WHERE applied_at BETWEEN $1 AND $2 \
                 ) points \
             ) gaps",
        )
        .bind::<diesel::sql_types::Timestamptz, _>(from)
        .bind::<diesel::sql_types::Timestamptz, _>(to)
        .get_result::<Pause>(&mut conn)
        .await
        .ok()?;
        pause.seconds.map(Duration::from_secs_f64)
    }
}
