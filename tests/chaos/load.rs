//! The steady load of commands, and what the test knows of their outcome.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;
use rand::seq::SliceRandom as _;
use shop_client::{ClientConfig, Error, OrderClient, RetryPolicy, UserClient, UserUpdate};
use shop_testkit::Running;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::harness::Chaos;

#[derive(Debug, Clone)]
struct LiveUser {
    id: String,
    version: i64,
}

#[derive(Debug, Clone)]
struct PendingOrder {
    id: String,
    version: i64,
}

/// What the test knows: the users and orders it may act on, and every
/// acknowledged command.
#[derive(Debug, Default)]
struct Model {
    users: Vec<LiveUser>,
    created_users: usize,
    orders: Vec<PendingOrder>,
    outcome: Outcome,
}

/// The outcome of a load, for the reconciliation.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub sent: u64,
    pub acknowledged: u64,
    pub refused: u64,
    pub failed: u64,
    /// The failed commands by the code they ended with (after the client's
    /// retries): outages answer `Unavailable`, a process killed under a call
    /// `Unknown` or `Cancelled`; never `Internal`.
    pub failed_by_code: std::collections::BTreeMap<String, u64>,
    /// (user id, version) of every acknowledged user command.
    pub user_effects: Vec<(String, i64)>,
    /// Ids of acknowledged orders.
    pub orders: Vec<String>,
    /// Ids of acknowledged cancellations.
    pub cancelled: Vec<String>,
    /// CreateOrder calls whose outcome is unknown (they may have applied).
    pub unknown_order_creates: u64,
    /// When each command was sent, and how it was answered: the run tells
    /// the rate it achieved outside the faults, and the codes each fault
    /// caused (a command belongs to the window it was sent in).
    pub answers: Vec<(Instant, Answer)>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Acknowledged,
    /// Answered with a documented refusal (a stale version, a deleted
    /// user): the service did its work.
    Refused,
    /// Not answered by the service's work: the gRPC code it ended with.
    Failed(String),
}

/// What a replay of past events published.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    pub replayed: usize,
    /// Already in the consumer's ledger when replayed.
    pub applied: usize,
    /// Not applied yet when replayed: the copy may arrive before the
    /// original is applied.
    pub unapplied: usize,
}

/// The running load.
pub struct Load {
    running: Running,
    model: Arc<Mutex<Model>>,
    amqp: shop_messaging::AmqpConfig,
    sample_queue: String,
    user_exchange: String,
}

fn clients(chaos: &Chaos) -> (Vec<UserClient>, Vec<OrderClient>) {
    // No retries: every UNAVAILABLE a fault causes is an answer the run
    // counts, not one the client hides by trying again.
    let retry = RetryPolicy::none();
    let config = |addr: std::net::SocketAddr| {
        ClientConfig::new(format!("http://{addr}"))
            .with_token(shop_client::SecretString::from(
                shop_testkit::TestKeys::shared().service_token(),
            ))
            .with_retry(retry)
            .with_timeout(Duration::from_secs(5))
    };
    (
        chaos
            .user_nodes
            .iter()
            .map(|n| UserClient::connect(config(n.grpc)).unwrap())
            .collect(),
        chaos
            .order_nodes
            .iter()
            .map(|n| OrderClient::connect(config(n.grpc)).unwrap())
            .collect(),
    )
}

impl Load {
    pub fn start(chaos: &Chaos) -> Self {
        let (users, orders) = clients(chaos);
        let model = Arc::new(Mutex::new(Model::default()));
        let rate = chaos.options.rate.max(1);
        let max_users = chaos.options.users.max(1);
        let driver_model = model.clone();
        let running = Running::spawn(move |stop| async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
            // A tick missed is skipped, not made up in a burst: the load
            // never offers more than its nominal rate.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let in_flight = Arc::new(Semaphore::new(64));
            while !stop.is_cancelled() {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    continue;
                };
                let users = users[rand::random_range(0..users.len())].clone();
                let orders = orders[rand::random_range(0..orders.len())].clone();
                let model = driver_model.clone();
                tokio::spawn(SENT.scope(Instant::now(), async move {
                    command(&users, &orders, &model, max_users).await;
                    drop(permit);
                }));
            }
            // Let the commands under way finish.
            let _ = tokio::time::timeout(Duration::from_secs(30), in_flight.acquire_many(64)).await;
            Ok(())
        });
        Self {
            running,
            model,
            amqp: chaos.amqp.clone(),
            sample_queue: chaos.taps.sample.clone(),
            user_exchange: chaos.user_exchange.clone(),
        }
    }

    /// Commands acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.model.lock().unwrap().outcome.acknowledged
    }

    pub async fn stop(mut self) -> Outcome {
        let _ = self.running.stop().await;
        self.model.lock().unwrap().outcome.clone()
    }

    /// Publishes again 30 past user events, shuffled: duplicates, out of
    /// order. Half are the oldest the sample tap still holds, half the
    /// newest: once the consumer is held back, those are events it has not
    /// applied yet, so a copy may come before its original. Takes every
    /// event the tap holds (the next replay samples newer ones) and tells,
    /// from the consumer's ledger, how many were applied already.
    pub async fn replay_sample(&self, order_db: &shop_testkit::TestDatabase) -> Replayed {
        use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
        let Ok(connection) = shop_messaging::connection::connect(&self.amqp, "chaos replay").await else {
            return Replayed::default();
        };
        let Ok(channel) = connection.create_channel().await else {
            return Replayed::default();
        };
        let _ = channel.confirm_select(ConfirmSelectOptions::default()).await;
        let mut held = Vec::new();
        while held.len() < 50_000 {
            match channel
                .basic_get(
                    self.sample_queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
            {
                Ok(Some(message)) => {
                    let _ = message.delivery.ack(BasicAckOptions::default()).await;
                    held.push(message.delivery);
                }
                _ => break,
            }
        }
        let newest = held.split_off(held.len().saturating_sub(15));
        held.truncate(15);
        let mut sample = held;
        sample.extend(newest);
        let ids: Vec<String> = sample
            .iter()
            .filter_map(|d| d.properties.message_id().as_ref().map(ToString::to_string))
            .collect();
        let applied = match tokio_postgres::connect(order_db.url(), tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                client
                    .query_one(
                        "SELECT count(DISTINCT event_id) FROM inbox_ledger WHERE event_id::text = ANY($1)",
                        &[&ids],
                    )
                    .await
                    .map_or(0, |row| usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
            }
            Err(_) => 0,
        };
        sample.shuffle(&mut rand::rng());
        for delivery in &sample {
            if let Ok(confirm) = channel
                .basic_publish(
                    self.user_exchange.as_str().into(),
                    delivery.routing_key.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    delivery.properties.clone(),
                )
                .await
            {
                let _ = confirm.await;
            }
        }
        println!(
            "chaos: republished {} user events, shuffled ({applied} already applied)",
            sample.len()
        );
        let _ = connection.close(200, "replayed".into()).await;
        Replayed {
            replayed: sample.len(),
            applied,
            unapplied: sample.len().saturating_sub(applied),
        }
    }
}

tokio::task_local! {
    /// When the command under way was sent.
    static SENT: Instant;
}

fn record(model: &Mutex<Model>, outcome: Result<(), &Error>) {
    let mut model = model.lock().unwrap();
    model.outcome.sent += 1;
    let answer = match outcome {
        Ok(()) => {
            model.outcome.acknowledged += 1;
            Answer::Acknowledged
        }
        Err(error @ (Error::Unavailable(_) | Error::DeadlineExceeded(_) | Error::Server { .. })) => {
            model.outcome.failed += 1;
            let code = format!("{:?}", error.code());
            *model.outcome.failed_by_code.entry(code.clone()).or_default() += 1;
            Answer::Failed(code)
        }
        Err(_) => {
            model.outcome.refused += 1;
            Answer::Refused
        }
    };
    let sent = SENT.try_with(|sent| *sent).unwrap_or_else(|_| Instant::now());
    model.outcome.answers.push((sent, answer));
}

async fn command(users: &UserClient, orders: &OrderClient, model: &Mutex<Model>, max_users: usize) {
    let roll = rand::random_range(0..100);
    let (live, created, pending) = {
        let m = model.lock().unwrap();
        let live = (!m.users.is_empty()).then(|| m.users[rand::random_range(0..m.users.len())].clone());
        let pending = (!m.orders.is_empty()).then(|| m.orders[rand::random_range(0..m.orders.len())].clone());
        (live, m.created_users, pending)
    };
    match (roll, live, pending) {
        (0..40, _, _) | (_, None, _) if created < max_users => create_user(users, model).await,
        (0..40, Some(user), _) | (40..70, Some(user), _) => update_user(users, model, user).await,
        (70..75, Some(user), _) => {
            let live_users = model.lock().unwrap().users.len();
            if live_users > 3 {
                delete_user(users, model, user).await;
            } else {
                update_user(users, model, user).await;
            }
        }
        (75..95, Some(user), _) => create_order(orders, model, &user.id).await,
        (_, _, Some(order)) => cancel_order(orders, model, order).await,
        (_, Some(user), None) => create_order(orders, model, &user.id).await,
        _ => {}
    }
}

async fn create_user(users: &UserClient, model: &Mutex<Model>) {
    model.lock().unwrap().created_users += 1;
    let email = format!("chaos-{}@example.com", uuid::Uuid::new_v4().simple());
    let outcome = users.create_user(&email, "Chaos").await;
    record(model, outcome.as_ref().map(drop));
    if let Ok(user) = outcome {
        let mut m = model.lock().unwrap();
        m.outcome.user_effects.push((user.id.clone(), user.version));
        m.users.push(LiveUser {
            id: user.id,
            version: user.version,
        });
    }
}

async fn refresh(users: &UserClient, model: &Mutex<Model>, id: &str) {
    match users.get_user(id).await {
        Ok(user) => {
            let mut m = model.lock().unwrap();
            if let Some(live) = m.users.iter_mut().find(|u| u.id == id) {
                live.version = live.version.max(user.version);
            }
        }
        Err(Error::NotFound(_)) => model.lock().unwrap().users.retain(|u| u.id != id),
        Err(_) => {}
    }
}

async fn update_user(users: &UserClient, model: &Mutex<Model>, user: LiveUser) {
    let update = UserUpdate {
        name: Some(format!("Chaos {}", rand::rng().random::<u32>())),
        ..UserUpdate::default()
    };
    let outcome = users.update_user(&user.id, user.version, update).await;
    record(model, outcome.as_ref().map(drop));
    match outcome {
        Ok(updated) => {
            let mut m = model.lock().unwrap();
            m.outcome.user_effects.push((updated.id.clone(), updated.version));
            if let Some(live) = m.users.iter_mut().find(|u| u.id == updated.id) {
                live.version = live.version.max(updated.version);
            }
        }
        Err(_) => refresh(users, model, &user.id).await,
    }
}

async fn delete_user(users: &UserClient, model: &Mutex<Model>, user: LiveUser) {
    let outcome = users.delete_user(&user.id, user.version).await;
    record(model, outcome.as_ref().map(drop));
    match outcome {
        Ok(()) => {
            let mut m = model.lock().unwrap();
            m.outcome.user_effects.push((user.id.clone(), user.version + 1));
            m.users.retain(|u| u.id != user.id);
        }
        Err(_) => refresh(users, model, &user.id).await,
    }
}

async fn create_order(orders: &OrderClient, model: &Mutex<Model>, user_id: &str) {
    let items = [("sku-1", rand::random_range(1..=5)), ("sku-2", 1)];
    let outcome = orders.create_order(user_id, &items).await;
    record(model, outcome.as_ref().map(drop));
    let mut m = model.lock().unwrap();
    match outcome {
        Ok(order) => {
            m.outcome.orders.push(order.id.clone());
            m.orders.push(PendingOrder {
                id: order.id,
                version: order.version,
            });
        }
        Err(Error::Unavailable(_) | Error::DeadlineExceeded(_) | Error::Server { .. }) => {
            m.outcome.unknown_order_creates += 1;
        }
        Err(_) => {}
    }
}

async fn cancel_order(orders: &OrderClient, model: &Mutex<Model>, order: PendingOrder) {
    let outcome = orders.cancel_order(&order.id, order.version).await;
    record(model, outcome.as_ref().map(drop));
    let mut m = model.lock().unwrap();
    if outcome.is_ok() {
        m.outcome.cancelled.push(order.id.clone());
    }
    // Cancelled, or its outcome unknown: not a candidate any more.
    m.orders.retain(|o| o.id != order.id);
}
