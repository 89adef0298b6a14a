//! The whole flow: a user created through the user service reaches the
//! order service's projection through the outbox, RabbitMQ and the consumer,
//! and only then may order.

use shop_contracts::order as order_pb;
use shop_contracts::user as user_pb;
use tonic::Code;

use crate::system::{WAIT, start};

fn order_request(user_id: &str) -> order_pb::CreateOrderRequest {
    order_pb::CreateOrderRequest {
        user_id: user_id.to_owned(),
        items: vec![order_pb::OrderItem {
            product_id: "sku-1".to_owned(),
            quantity: 2,
        }],
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_created_over_grpc_can_order_once_its_event_reaches_the_order_service() {
    let system = start(false).await;
    let mut users = system.users.clone();
    let mut orders = system.orders.clone();

    let user = users
        .create_user(user_pb::CreateUserRequest {
            email: "flow@example.com".to_owned(),
            name: "Flow".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    // The event is committed in the user service's outbox but not published.
    let early = orders.create_order(order_request(&user.id)).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");

    let _relay = system.user_relay();
    let order = shop_testkit::eventually("CreateOrder to succeed", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move { orders.create_order(request).await.ok() }
    })
    .await
    .into_inner()
    .order
    .unwrap();

    assert_eq!(order.user_id, user.id);
    assert_eq!(order.status, order_pb::OrderStatus::Pending as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_user_in_the_user_service_stops_new_orders_in_the_order_service() {
    let system = start(true).await;
    let mut users = system.users.clone();
    let orders = system.orders.clone();
    let user = users
        .create_user(user_pb::CreateUserRequest {
            email: "leaving@example.com".to_owned(),
            name: "Leaving".to_owned(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    shop_testkit::eventually("the first order", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move { orders.create_order(request).await.ok() }
    })
    .await;

    users
        .delete_user(user_pb::DeleteUserRequest {
            id: user.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap();

    let refused = shop_testkit::eventually("orders to be refused", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move {
            match orders.create_order(request).await {
                Err(status) if status.message().contains("deleted") => Some(status),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_delete_user_the_order_database_holds_no_email_or_name_of_the_user() {
    let system = start(true).await;
    let mut users = system.users.clone();
    let orders = system.orders.clone();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (email, name, renamed) = (
        format!("forget-{tag}@example.com"),
        format!("Forget {tag}"),
        format!("Renamed {tag}"),
    );
    let user = users
        .create_user(user_pb::CreateUserRequest {
            email: email.clone(),
            name: name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    users
        .update_user(user_pb::UpdateUserRequest {
            id: user.id.clone(),
            expected_version: 1,
            name: Some(renamed.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    shop_testkit::eventually("an order", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move { orders.create_order(request).await.ok() }
    })
    .await;
    users
        .delete_user(user_pb::DeleteUserRequest {
            id: user.id.clone(),
            expected_version: 2,
        })
        .await
        .unwrap();
    shop_testkit::eventually("orders to be refused", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move { orders.create_order(request).await.err() }
    })
    .await;

    // Every row of every table of the order database, as text (binary
    // columns print as hex), searched for the user's email and names.
    let (database, connection) = tokio_postgres::connect(system.order_db_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tables: Vec<String> = database
        .query(
            "SELECT quote_ident(table_name) FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(tables.iter().any(|t| t == "known_users"), "{tables:?}");
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for table in &tables {
        for needle in [&email, &name, &renamed] {
            for form in [needle.to_lowercase(), hex(needle)] {
                let found: i64 = database
                    .query_one(
                        &format!("SELECT count(*) FROM {table} t WHERE lower(t::text) LIKE '%' || $1 || '%'"),
                        &[&form],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(found, 0, "{table} holds {needle:?} ({form})");
            }
        }
    }
}
