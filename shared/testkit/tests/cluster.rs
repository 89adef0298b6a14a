//! A three-node cluster of the local RabbitMQ: a quorum queue keeps every
//! message through the loss of its leader, a partition and a crash, and the
//! lost node comes back as a replica. Needs the broker installed (not
//! running: the cluster's nodes are its own) and takes about half a minute
//! per test on two cores; the measured timings are printed (`--nocapture`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use shop_testkit::{RabbitCluster, eventually, init_test_log};

const QUEUE: &str = "orders";

/// Clusters take most of two cores to start: tests here take turns.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server on the PATH (.ci/install-tools); run: cargo test -p shop-testkit --test cluster -- --ignored"]
async fn a_quorum_queue_keeps_every_message_when_its_leader_stops_and_takes_the_node_back()
-> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    init_test_log();
    let started = Instant::now();
    let cluster = RabbitCluster::start().await?;
    eprintln!("3 nodes started and clustered in {:.1?}", started.elapsed());

    // A quorum queue with a single active consumer, declared through node 1,
    // has a replica on every node.
    let node_1 = connect(&cluster.amqp_url(1)).await?;
    declare_queue(&node_1.create_channel().await?, true).await?;
    assert_eq!(
        sorted(cluster.quorum_members(QUEUE).await?),
        sorted(cluster.node_names())
    );

    // Published with confirms through node 1, consumed through node 2; the
    // consumer on node 3 stands by.
    publish(&cluster.amqp_url(1), 0..100).await?;
    let (node_2, mut active) = consume(&cluster.amqp_url(2)).await?;
    let (_node_3, mut standby) = consume(&cluster.amqp_url(3)).await?;
    let mut received = BTreeMap::new();
    take(&mut active, 100, &mut received).await?;
    assert!(
        next_within(&mut standby, Duration::from_millis(500))
            .await
            .is_none(),
        "with a single active consumer, the second one gets nothing"
    );

    // The leader's node stops its broker.
    let leader = cluster
        .quorum_leader(QUEUE)
        .await?
        .context("the queue has no leader")?;
    let leader_index = cluster
        .index_of(&leader)
        .context("the leader is not a cluster node")?;
    let survivor = (1..=3).find(|&i| i != leader_index).context("no other node")?;
    drop(node_1);
    let stopping = Instant::now();
    cluster.stop_node(leader_index).await?;
    let stopped_after = stopping.elapsed();
    let new_leader = eventually("a new leader", Duration::from_secs(30), || async {
        cluster
            .quorum_leader(QUEUE)
            .await
            .ok()
            .flatten()
            .filter(|node| *node != leader)
    })
    .await;
    let elected_after = stopping.elapsed();
    let republished = publish(&cluster.amqp_url(survivor), 100..101).await?;
    eprintln!(
        "failover: stop_app on {leader} took {stopped_after:.1?}; {new_leader} reported leading after \
         {elected_after:.1?}; a publish through node {survivor} confirmed after {:.1?} ({republished} \
         refused and published again)",
        stopping.elapsed()
    );

    // Nothing is lost: what is published through a surviving node reaches
    // the active consumer, which kept its subscription through the
    // failover, and once it leaves, the standby (if the stopped node held
    // one of the two, the other takes everything).
    publish(&cluster.amqp_url(survivor), 101..200).await?;
    match leader_index {
        2 => take(&mut standby, 100, &mut received).await?,
        3 => take(&mut active, 100, &mut received).await?,
        _ => {
            take(&mut active, 50, &mut received).await?;
            node_2.close(200, "handing over".into()).await?;
            take(&mut standby, 50, &mut received).await?;
        }
    }
    assert_every_id_once(&received, 0..200);

    // The node's broker starts again and its replica catches up.
    cluster.start_node(leader_index).await?;
    let rejoined = Instant::now();
    await_caught_up(&cluster, &leader).await;
    eprintln!(
        "{leader} caught up {:.1?} after start_app returned",
        rejoined.elapsed()
    );
    assert_eq!(
        sorted(cluster.quorum_members(QUEUE).await?),
        sorted(cluster.node_names())
    );

    // A node's whole VM stopped cleanly and booted again rejoins by itself,
    // its replica included.
    let restarting = Instant::now();
    cluster.shutdown_node(leader_index).await?;
    let stopped_after = restarting.elapsed();
    cluster.boot_node(leader_index).await?;
    await_caught_up(&cluster, &leader).await;
    eprintln!(
        "{leader}: VM stopped in {stopped_after:.1?}, booted and caught up {:.1?} later",
        restarting.elapsed() - stopped_after
    );

    drop((active, standby));
    assert_nothing_left_after(cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rabbitmq-server on the PATH (.ci/install-tools); run: cargo test -p shop-testkit --test cluster -- --ignored"]
async fn a_node_cut_off_or_killed_loses_no_message_and_comes_back_as_a_replica() -> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    init_test_log();
    let started = Instant::now();
    let cluster = RabbitCluster::start().await?;
    eprintln!("3 nodes started and clustered in {:.1?}", started.elapsed());
    declare_queue(
        &connect(&cluster.amqp_url(1)).await?.create_channel().await?,
        false,
    )
    .await?;
    publish(&cluster.amqp_url(1), 0..50).await?;

    // The leader is cut off from the other two: they elect a leader among
    // themselves and keep taking messages; alone on its side, it pauses.
    let leader = cluster
        .quorum_leader(QUEUE)
        .await?
        .context("the queue has no leader")?;
    let cut_off = cluster
        .index_of(&leader)
        .context("the leader is not a cluster node")?;
    let survivor = (1..=3).find(|&i| i != cut_off).context("no other node")?;
    let partition = Instant::now();
    cluster.isolate_node(cut_off).await?;
    let new_leader = eventually(
        "a leader on the majority side",
        Duration::from_secs(30),
        || async {
            cluster
                .quorum_leader(QUEUE)
                .await
                .ok()
                .flatten()
                .filter(|node| *node != leader)
        },
    )
    .await;
    eprintln!(
        "partition: {new_leader} leads {:.1?} after {leader} was cut off",
        partition.elapsed()
    );
    let republished = publish(&cluster.amqp_url(survivor), 50..100).await?;
    eprintln!("partition: 50 messages confirmed through node {survivor} ({republished} published again)");
    eventually("the cut-off node to pause", Duration::from_secs(30), || async {
        connect(&cluster.amqp_url(cut_off)).await.is_err().then_some(())
    })
    .await;

    // Healed, it resumes and serves the queue again, all of it.
    let healing = Instant::now();
    cluster.heal_node(cut_off).await?;
    eprintln!(
        "healed: {leader} back in the cluster after {:.1?}",
        healing.elapsed()
    );
    let (_connection, mut consumer) = consume(&cluster.amqp_url(cut_off)).await?;
    let mut received = BTreeMap::new();
    take(&mut consumer, 100, &mut received).await?;
    assert_every_id_once(&received, 0..100);

    // A crash (SIGKILL) of another node: the two left keep the queue going,
    // and the node, booted again, rejoins as a replica by itself.
    let crashed = (1..=3).find(|&i| i != cut_off).context("no other node")?;
    let survivor = (1..=3).find(|&i| i != crashed).context("no other node")?;
    let crash = Instant::now();
    cluster.kill_node(crashed).await?;
    let republished = publish(&cluster.amqp_url(survivor), 100..150).await?;
    eprintln!(
        "crash: {} killed; 50 messages through node {survivor} confirmed {:.1?} later ({republished} \
         refused during the election and published again)",
        cluster.node_name(crashed),
        crash.elapsed()
    );
    take(&mut consumer, 50, &mut received).await?;
    let booting = Instant::now();
    cluster.boot_node(crashed).await?;
    eprintln!(
        "{} booted and rejoined in {:.1?}",
        cluster.node_name(crashed),
        booting.elapsed()
    );
    await_caught_up(&cluster, cluster.node_name(crashed)).await;
    assert_every_id_once(&received, 0..150);

    drop(consumer);
    assert_nothing_left_after(cluster);
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("failed to connect to {url}"))
}

/// The durable quorum queue every test uses.
async fn declare_queue(channel: &Channel, single_active_consumer: bool) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    if single_active_consumer {
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(QUEUE.into(), options, arguments)
        .await
        .context("failed to declare the quorum queue")?;
    Ok(())
}

/// Publishes one persistent message per id (its decimal text) through
/// `url` and returns once the broker confirmed every one. A message it
/// refuses (a nack: it could not store it, as while the queue elects a
/// leader) is published again, as the outbox relay does, on a new channel:
/// in 3.10 a channel whose first publish to a quorum queue met a dead leader
/// keeps asking that node and refusing (its queue client starts from the
/// leader in the queue's record; rabbitmq-server#9241 changed that in
/// 3.11). Returns how many were published again.
async fn publish(url: &str, ids: Range<u32>) -> anyhow::Result<usize> {
    let connection = connect(url).await?;
    let mut pending: Vec<u32> = ids.collect();
    let mut republished = 0;
    for _attempt in 0..20 {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut confirms = Vec::new();
        for &id in &pending {
            let properties = BasicProperties::default().with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    id.to_string().as_bytes(),
                    properties,
                )
                .await
                .with_context(|| format!("failed to publish {id} through {url}"))?;
            confirms.push((id, confirm));
        }
        let mut refused = Vec::new();
        for (id, confirm) in confirms {
            let confirmation = tokio::time::timeout(Duration::from_secs(30), confirm)
                .await
                .with_context(|| format!("no confirm for {id} within 30 s"))??;
            if !confirmation.is_ack() {
                refused.push(id);
            }
        }
        let _ = channel.close(200, "published".into()).await;
        if refused.is_empty() {
            let _ = connection.close(200, "published".into()).await;
            return Ok(republished);
        }
        republished += refused.len();
        pending = refused;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("the broker kept refusing {pending:?}")
}

/// A consumer (prefetch 50, manual acks) on the queue through `url`.
async fn consume(url: &str) -> anyhow::Result<(Connection, Consumer)> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(50, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume through {url}"))?;
    Ok((connection, consumer))
}

async fn next_within(consumer: &mut Consumer, deadline: Duration) -> Option<Delivery> {
    tokio::time::timeout(deadline, consumer.next()).await.ok()??.ok()
}

/// Receives and acknowledges `count` messages not seen before, counting
/// every delivery by id in `received` (a message may come twice: an ack
/// lost with its leader, or a publish refused, republished, and stored
/// after all; at least once is the promise).
async fn take(
    consumer: &mut Consumer,
    count: usize,
    received: &mut BTreeMap<u32, usize>,
) -> anyhow::Result<()> {
    let mut new = 0;
    while new < count {
        let delivery = next_within(consumer, Duration::from_secs(30))
            .await
            .with_context(|| format!("only {new} of {count} messages arrived within 30 s"))?;
        let id: u32 = std::str::from_utf8(&delivery.data)?.parse()?;
        let seen = received.entry(id).or_default();
        if *seen == 0 {
            new += 1;
        }
        *seen += 1;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// Waits until `node`'s replica of the queue is online and has committed
/// everything the leader has.
async fn await_caught_up(cluster: &RabbitCluster, node: &str) {
    eventually(
        &format!("{node}'s replica to catch up"),
        Duration::from_secs(30),
        || async {
            let members = cluster.quorum_status(QUEUE).await.ok()?;
            let leader_commit = members.iter().find(|m| m.raft_state == "leader")?.commit_index;
            let member = members.iter().find(|m| m.node == node)?;
            (member.is_online() && member.commit_index == leader_commit).then_some(())
        },
    )
    .await;
}

fn assert_every_id_once(received: &BTreeMap<u32, usize>, ids: Range<u32>) {
    let repeated = received.values().filter(|&&times| times > 1).count();
    if repeated > 0 {
        eprintln!(
            "{repeated} messages were delivered more than once (acks still in flight when a consumer \
             left, or refused publishes stored after all: at least once is the promise)"
        );
    }
    let missing: Vec<u32> = ids.clone().filter(|id| !received.contains_key(id)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let unexpected: Vec<u32> = received.keys().copied().filter(|id| !ids.contains(id)).collect();
    assert!(unexpected.is_empty(), "never published: {unexpected:?}");
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

/// Drops the cluster and checks, with `ps`, that none of its processes is
/// left, and that its directory is gone.
fn assert_nothing_left_after(cluster: RabbitCluster) {
    let dir = cluster.dir().to_owned();
    let names = cluster.node_names();
    drop(cluster);
    let ps = Command::new("ps")
        .args(["-eo", "pid,stat,args"])
        .output()
        .expect("ps runs");
    let listing = String::from_utf8_lossy(&ps.stdout);
    let left: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(&*dir.to_string_lossy()) || names.iter().any(|name| line.contains(name)))
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    assert!(!dir.exists(), "{} is still there", dir.display());
}
