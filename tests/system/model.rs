//! Random sequences of user and order commands, valid and not, against both
//! services (the user service's events reaching the order service through
//! the outbox, RabbitMQ and the consumer), compared step by step with a
//! model of what each call must answer and what must then be readable:
//! every user and order through the APIs, and the order service's
//! projection of users. A failing sequence shrinks to the shortest that
//! still fails.
//!
//! All cases run against one pair of services; each case works on users
//! and orders of its own (emails carry the case's prefix).

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use shop_contracts::order as order_pb;
use shop_contracts::user as user_pb;
use tonic::Code;

use crate::system::{System, start};

/// One command; indexes pick among what the case created so far (past the
/// end: an id nobody created).
#[derive(Debug, Clone)]
enum Op {
    /// `email` picks one of three addresses (so some are taken), or an
    /// invalid one; `name` one of three names, or an empty one.
    CreateUser {
        email: u8,
        name: u8,
    },
    /// `stale`: one version off.
    UpdateUser {
        user: u8,
        name: u8,
        stale: bool,
    },
    DeleteUser {
        user: u8,
        stale: bool,
    },
    /// `quantity` 0 is invalid.
    CreateOrder {
        user: u8,
        quantity: i32,
    },
    CancelOrder {
        order: u8,
        stale: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..4u8, 0..4u8).prop_map(|(email, name)| Op::CreateUser { email, name }),
        2 => (0..4u8, 0..4u8, proptest::bool::weighted(0.2)).prop_map(|(user, name, stale)| Op::UpdateUser { user, name, stale }),
        1 => (0..3u8, proptest::bool::weighted(0.2)).prop_map(|(user, stale)| Op::DeleteUser { user, stale }),
        3 => (0..4u8, prop_oneof![4 => 1..=3i32, 1 => Just(0)]).prop_map(|(user, quantity)| Op::CreateOrder { user, quantity }),
        2 => (0..4u8, proptest::bool::weighted(0.2)).prop_map(|(order, stale)| Op::CancelOrder { order, stale }),
    ]
}

#[derive(Debug, Clone)]
struct ModelUser {
    id: String,
    email: String,
    name: String,
    version: i64,
    deleted: bool,
}

#[derive(Debug, Clone)]
struct ModelOrder {
    id: String,
    user: String,
    version: i64,
    cancelled: bool,
}

const NAMES: [&str; 4] = ["Ada", "Grace", "Edsger", ""];

/// A user id nobody created.
const NOBODY: &str = "00000000-0000-7000-8000-000000000000";

fn block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

fn code<T>(outcome: &Result<T, tonic::Status>) -> Code {
    outcome.as_ref().err().map_or(Code::Ok, tonic::Status::code)
}

/// Runs `ops` against the services and the model, checking every answer
/// and then everything readable.
fn run_case(system: &System, projection: &tokio_postgres::Client, ops: &[Op]) -> Result<(), TestCaseError> {
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    let mut users: Vec<ModelUser> = Vec::new();
    let mut orders: Vec<ModelOrder> = Vec::new();
    let mut user_client = system.users.clone();
    let mut order_client = system.orders.clone();
    let user_id = |users: &[ModelUser], index: u8| {
        users
            .get(usize::from(index))
            .map_or(NOBODY.to_owned(), |user| user.id.clone())
    };

    for op in ops {
        match *op {
            Op::CreateUser { email, name } => {
                let address = if email == 3 {
                    "not-an-email".to_owned()
                } else {
                    format!("{prefix}-{email}@example.com")
                };
                let name = NAMES[usize::from(name)];
                let outcome = block(user_client.create_user(user_pb::CreateUserRequest {
                    email: address.clone(),
                    name: name.to_owned(),
                    request_id: String::new(),
                }));
                let taken = users.iter().any(|u| !u.deleted && u.email == address);
                let expected = if email == 3 || name.is_empty() {
                    Code::InvalidArgument
                } else if taken {
                    Code::AlreadyExists
                } else {
                    Code::Ok
                };
                prop_assert_eq!(code(&outcome), expected, "{:?}: {:?}", op, outcome);
                if let Ok(response) = outcome {
                    let user = response.into_inner().user.unwrap();
                    prop_assert_eq!((user.version, user.name.as_str()), (1, name));
                    users.push(ModelUser {
                        id: user.id,
                        email: address,
                        name: name.to_owned(),
                        version: 1,
                        deleted: false,
                    });
                }
            }
            Op::UpdateUser { user, name, stale } => {
                let id = user_id(&users, user);
                let current = users.iter().position(|u| u.id == id);
                let version = current.map_or(1, |at| users[at].version) + i64::from(stale);
                let name = NAMES[usize::from(name)];
                let outcome = block(user_client.update_user(user_pb::UpdateUserRequest {
                    id: id.clone(),
                    expected_version: version,
                    email: None,
                    name: Some(name.to_owned()),
                }));
                let expected = match current.map(|at| &users[at]) {
                    _ if name.is_empty() => Code::InvalidArgument,
                    None => Code::NotFound,
                    Some(u) if u.deleted => Code::NotFound,
                    Some(_) if stale => Code::Aborted,
                    Some(_) => Code::Ok,
                };
                prop_assert_eq!(code(&outcome), expected, "{:?}: {:?}", op, outcome);
                if let (Ok(_), Some(at)) = (&outcome, current) {
                    let model = &mut users[at];
                    if model.name != name {
                        model.name = name.to_owned();
                        model.version += 1;
                    }
                }
            }
            Op::DeleteUser { user, stale } => {
                let id = user_id(&users, user);
                let current = users.iter().position(|u| u.id == id);
                let version = current.map_or(1, |at| users[at].version) + i64::from(stale);
                let outcome = block(user_client.delete_user(user_pb::DeleteUserRequest {
                    id: id.clone(),
                    expected_version: version,
                }));
                let expected = match current.map(|at| &users[at]) {
                    None => Code::NotFound,
                    Some(u) if u.deleted => Code::NotFound,
                    Some(_) if stale => Code::Aborted,
                    Some(_) => Code::Ok,
                };
                prop_assert_eq!(code(&outcome), expected, "{:?}: {:?}", op, outcome);
                if let (Ok(_), Some(at)) = (&outcome, current) {
                    users[at].deleted = true;
                    users[at].version += 1;
                }
            }
            Op::CreateOrder { user, quantity } => {
                let id = user_id(&users, user);
                let outcome = block(order_client.create_order(order_pb::CreateOrderRequest {
                    user_id: id.clone(),
                    items: vec![order_pb::OrderItem {
                        product_id: "sku-1".to_owned(),
                        quantity,
                    }],
                    request_id: String::new(),
                }));
                let known = users.iter().find(|u| u.id == id);
                let expected = match known {
                    _ if quantity == 0 => Code::InvalidArgument,
                    Some(u) if !u.deleted => Code::Ok,
                    _ => Code::FailedPrecondition,
                };
                prop_assert_eq!(code(&outcome), expected, "{:?}: {:?}", op, outcome);
                if let Ok(response) = outcome {
                    let order = response.into_inner().order.unwrap();
                    orders.push(ModelOrder {
                        id: order.id,
                        user: id,
                        version: 1,
                        cancelled: false,
                    });
                }
            }
            Op::CancelOrder { order, stale } => {
                let current = usize::from(order) < orders.len();
                let id = orders
                    .get(usize::from(order))
                    .map_or(NOBODY.to_owned(), |o| o.id.clone());
                let version = orders.get(usize::from(order)).map_or(1, |o| o.version) + i64::from(stale);
                let outcome = block(order_client.cancel_order(order_pb::CancelOrderRequest {
                    id,
                    expected_version: version,
                }));
                let expected = match orders.get(usize::from(order)) {
                    None => Code::NotFound,
                    Some(o) if o.cancelled => Code::FailedPrecondition,
                    Some(_) if stale => Code::Aborted,
                    Some(_) => Code::Ok,
                };
                prop_assert_eq!(code(&outcome), expected, "{:?}: {:?}", op, outcome);
                if outcome.is_ok() && current {
                    let model = &mut orders[usize::from(order)];
                    model.cancelled = true;
                    model.version += 1;
                }
            }
        }
        check_readable(system, projection, &users, &orders)?;
    }
    Ok(())
}

/// Every user and order of the case reads as the model says, and the order
/// service's projection has caught up with every user's last event (waited
/// for: the events travel through the relay, RabbitMQ and the consumer).
fn check_readable(
    system: &System,
    projection: &tokio_postgres::Client,
    users: &[ModelUser],
    orders: &[ModelOrder],
) -> Result<(), TestCaseError> {
    let mut user_client = system.users.clone();
    let mut order_client = system.orders.clone();
    for user in users {
        let read = block(user_client.get_user(user_pb::GetUserRequest { id: user.id.clone() }));
        if user.deleted {
            prop_assert_eq!(
                code(&read),
                Code::NotFound,
                "deleted user {} still readable",
                user.id
            );
        } else {
            let read = read.map_err(|status| TestCaseError::fail(format!("{status:?}")))?;
            let read = read.into_inner().user.unwrap();
            prop_assert_eq!(
                (read.email.as_str(), read.name.as_str(), read.version),
                (user.email.as_str(), user.name.as_str(), user.version)
            );
        }
        let id: uuid::Uuid = user.id.parse().unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(15);
        let seen = loop {
            let row = block(projection.query_opt(
                "SELECT version, deleted FROM known_users WHERE user_id = $1",
                &[&id],
            ))
            .unwrap();
            let seen = row.map(|row| (row.get::<_, i64>(0), row.get::<_, bool>(1)));
            if seen
                .as_ref()
                .is_some_and(|(version, ..)| *version >= user.version)
                || std::time::Instant::now() > until
            {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        prop_assert_eq!(
            seen,
            Some((user.version, user.deleted)),
            "the order service's projection of {}",
            user.id
        );
    }
    for order in orders {
        let read = block(order_client.get_order(order_pb::GetOrderRequest { id: order.id.clone() }))
            .map_err(|status| TestCaseError::fail(format!("{status:?}")))?
            .into_inner()
            .order
            .unwrap();
        let status = if order.cancelled {
            order_pb::OrderStatus::Cancelled
        } else {
            order_pb::OrderStatus::Pending
        };
        prop_assert_eq!(
            (read.user_id.as_str(), read.version, read.status),
            (order.user.as_str(), order.version, status as i32)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn random_command_sequences_answer_and_read_as_the_model_says() {
    let system = start(true).await;
    let (projection, connection) = tokio_postgres::connect(system.order_db_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&proptest::collection::vec(op(), 1..12), |ops| {
        run_case(&system, &projection, &ops)
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}
