//! Database identities: each service migrates as the owner of its schema
//! (`DATABASE_MIGRATION_URL`) and serves as a runtime role that may only
//! read and write rows (`DATABASE_URL`); the dead-letter commands get a
//! role of their own. Every role and database is the test's own.

use shop_contracts::order as order_pb;
use shop_contracts::user as user_pb;
use shop_database::DatabaseConfig;
use shop_testkit::{TestDatabase, TestRoles};
use tokio_postgres::error::SqlState;

use crate::system::{Options, System, WAIT, start_with};

/// A client of `url` (a role of the test's).
async fn connect_as(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("connecting as a test role: {error}"));
    tokio::spawn(connection);
    client
}

/// The SQLSTATE `statement` fails with (panics when it succeeds).
async fn refused(client: &tokio_postgres::Client, statement: &str) -> SqlState {
    match client.batch_execute(statement).await {
        Ok(()) => panic!("{statement:?} was allowed"),
        Err(error) => error
            .code()
            .cloned()
            .unwrap_or_else(|| panic!("{statement:?}: {error}")),
    }
}

/// Settings whose runtime role is `runtime` and whose migrator is
/// `migrator`, both over `db`.
fn split(roles: &TestRoles, db: &TestDatabase, runtime: &str, migrator: &str) -> DatabaseConfig {
    let mut config = DatabaseConfig::new(roles.url(runtime, db));
    config.migration_url = Some(roles.url(migrator, db).into());
    config.pool_size = 8;
    config
}

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

/// Waits until no row of `db`'s outbox is unpublished (read as the test
/// identity).
async fn outbox_drained(db_url: &str) {
    let client = connect_as(db_url).await;
    shop_testkit::eventually("the outbox to be published", WAIT, || async {
        let row = client
            .query_one("SELECT count(*) FROM outbox WHERE published_at IS NULL", &[])
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
}

/// Every RPC of both services, the relays and the consumer, as the runtime
/// roles.
async fn exercise(system: &System) {
    let mut users = system.users.clone();
    let mut orders = system.orders.clone();
    let user = users
        .create_user(user_pb::CreateUserRequest {
            email: "least@example.com".to_owned(),
            name: "Least Privilege".to_owned(),
            request_id: "7b0e4a38-1c1f-4d6e-9a0e-5d1a2f3b4c5d".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    users
        .get_user(user_pb::GetUserRequest { id: user.id.clone() })
        .await
        .unwrap();
    let listed = users
        .list_users(user_pb::ListUsersRequest {
            page_size: Some(10),
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.users.len(), 1);
    let updated = users
        .update_user(user_pb::UpdateUserRequest {
            id: user.id.clone(),
            expected_version: 1,
            email: None,
            name: Some("Least Privilege, updated".to_owned()),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    // The relay published it and the consumer applied it: the order
    // service knows the user.
    let order = shop_testkit::eventually("CreateOrder to succeed", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move { orders.create_order(request).await.ok() }
    })
    .await
    .into_inner()
    .order
    .unwrap();
    orders
        .get_order(order_pb::GetOrderRequest { id: order.id.clone() })
        .await
        .unwrap();
    let mine = orders
        .list_orders(order_pb::ListOrdersRequest {
            user_id: user.id.clone(),
            page_size: Some(10),
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.orders.len(), 1);
    orders
        .cancel_order(order_pb::CancelOrderRequest {
            id: order.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap();
    users
        .delete_user(user_pb::DeleteUserRequest {
            id: user.id.clone(),
            expected_version: updated.version,
        })
        .await
        .unwrap();
    shop_testkit::eventually("the deletion to reach the order service", WAIT, || {
        let mut orders = orders.clone();
        let request = order_request(&user.id);
        async move {
            match orders.create_order(request).await {
                Err(status) if status.message().contains("deleted") => Some(()),
                _ => None,
            }
        }
    })
    .await;
    outbox_drained(system.user_db_url()).await;
    outbox_drained(system.order_db_url()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_roles_may_only_read_and_write_rows_and_every_rpc_the_relays_and_the_consumer_still_work() {
    let roles = TestRoles::create(&[
        ("user_migrator", ""),
        ("user_runtime", ""),
        ("order_migrator", ""),
        ("order_runtime", ""),
        ("dlq", ""),
    ])
    .await
    .unwrap();
    let user_db = TestDatabase::empty_owned_by(&roles.name("user_migrator"))
        .await
        .unwrap();
    let order_db = TestDatabase::empty_owned_by(&roles.name("order_migrator"))
        .await
        .unwrap();
    let user_database = split(&roles, &user_db, "user_runtime", "user_migrator");
    let order_database = split(&roles, &order_db, "order_runtime", "order_migrator");
    let (user_runtime, order_runtime) = (
        roles.url("user_runtime", &user_db),
        roles.url("order_runtime", &order_db),
    );
    let (user_migrator, dlq) = (roles.url("user_migrator", &user_db), roles.url("dlq", &order_db));
    let system = start_with(Options {
        user_relay: true,
        databases: Some([(user_db, user_database), (order_db, order_database)]),
        dlq_database_role: Some(roles.name("dlq")),
        ..Options::default()
    })
    .await;

    exercise(&system).await;

    let runtime = connect_as(&user_runtime).await;
    assert_eq!(
        refused(&runtime, "DROP TABLE users").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    assert_eq!(
        refused(&runtime, "CREATE DATABASE x").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    assert_eq!(
        refused(&runtime, "CREATE TABLE mine (x int)").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    assert_eq!(
        refused(&runtime, "TRUNCATE outbox").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    assert_eq!(
        refused(&runtime, "DELETE FROM __diesel_schema_migrations").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    let orders = connect_as(&order_runtime).await;
    assert_eq!(
        refused(&orders, "DROP TABLE orders").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );
    assert_eq!(
        refused(&orders, "ALTER TABLE known_users ADD COLUMN x int").await,
        SqlState::INSUFFICIENT_PRIVILEGE
    );

    // A table a later migration creates is reachable at once (default
    // privileges), without another start.
    let migrator = connect_as(&user_migrator).await;
    migrator
        .batch_execute("CREATE TABLE added_later (x int)")
        .await
        .unwrap();
    runtime
        .batch_execute("INSERT INTO added_later VALUES (1); DELETE FROM added_later")
        .await
        .unwrap();

    // The dead-letter commands' role reads and moves positions and parked
    // events, and nothing else.
    let dead_letters = connect_as(&dlq).await;
    dead_letters
        .batch_execute(
            "SELECT count(*) FROM inbox_parked; SELECT count(*) FROM inbox_sequence; \
             UPDATE inbox_sequence SET updated_at = now() WHERE false",
        )
        .await
        .unwrap();
    for statement in [
        "SELECT * FROM known_users",
        "SELECT * FROM orders",
        "DELETE FROM inbox_sequence",
        "SELECT * FROM outbox",
    ] {
        assert_eq!(
            refused(&dead_letters, statement).await,
            SqlState::INSUFFICIENT_PRIVILEGE,
            "{statement}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_migrator_set_a_missing_database_stops_the_start_and_nothing_creates_it() {
    // The migrator could create it: the service must not.
    let roles = TestRoles::create(&[("migrator", "CREATEDB"), ("runtime", "")])
        .await
        .unwrap();
    let missing = TestDatabase::missing();
    let mut settings = user_service::Config::defaults();
    settings.host.grpc.auth = shop_testkit::TestKeys::shared().auth_config();
    settings.host.database = split(&roles, &missing, "runtime", "migrator");
    settings.host.grpc.addr = ([127, 0, 0, 1], 0).into();
    settings.host.admin_addr = ([127, 0, 0, 1], 0).into();

    settings.host.relay.signing =
        shop_messaging::signing::SigningConfig::of(shop_testkit::keys::signing_key());
    let error = user_service::Application::build(settings).await.unwrap_err();

    let text = format!("{error:#}");
    assert!(
        text.contains(missing.name())
            && text.contains("does not exist")
            && text.contains("DATABASE_MIGRATION_URL"),
        "{text}"
    );
    assert!(!text.contains("postgres://"), "{text}");
    assert!(!missing.exists().await.unwrap(), "the database was created");
}
