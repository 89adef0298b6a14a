//! The monitoring as an operator runs it: a real Prometheus (Debian's
//! `prometheus` on the `PATH`, as `.ci/run` installs it) scraping both
//! services, run as processes, with `deploy/prometheus/rules.yml` loaded.
//! Every rule evaluates without error, every rule and dashboard query
//! returns data (except the few that only have data during an incident,
//! named below), and the outbox-age alert fires while the user service
//! cannot reach the broker and resolves once it can.
//!
//! To keep the test to about a minute and a half, the `for:` durations of
//! the rules are read as seconds instead of minutes, and Prometheus scrapes
//! and evaluates every second; the expressions and thresholds are the
//! file's own.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::Value;
use shop_contracts::Event as _;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_contracts::user::{self as pb, UserCreated};
use shop_testkit::{TcpProxy, TestPublisher, http_get};

/// Series that move only during an incident: a restarted task, a shed
/// call, an event no queue takes, a failed relay batch (exported at zero
/// until then).
const INCIDENT_ONLY: [&str; 4] = [
    "task_restarts_total",
    "grpc_server_shed_total",
    "outbox_events_unroutable_total",
    "outbox_batch_failures_total",
];

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A Prometheus server of the test's own, stopped with it.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new() -> Self {
            let path =
                std::env::temp_dir().join(format!("shop-prometheus-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job, admin address) with the
    /// project's rules, `for:` read in seconds.
    async fn start(targets: &[(&str, SocketAddr)]) -> Self {
        let dir = tempdir::Dir::new();
        let rules = std::fs::read_to_string(root().join("deploy/prometheus/rules.yml")).unwrap();
        let fast: String = rules
            .lines()
            .map(|line| match line.trim_start().strip_prefix("for: ") {
                Some(duration) if duration.ends_with('m') => {
                    line.replace(duration, &duration.replace('m', "s"))
                }
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.0.join("rules.yml"), fast).unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.0.join("prometheus.yml").display()
            ))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the `prometheus` binary (Debian's package `prometheus`; `.ci/run` installs it)");
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        shop_testkit::eventually("Prometheus ready", Duration::from_secs(30), || async {
            let (status, _) = http_get(addr, "/-/ready").await.ok()?;
            (status == 200).then_some(())
        })
        .await;
        prometheus
    }

    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["status"], "success", "{path}: {body}");
        value["data"].clone()
    }

    /// The result of an instant query.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let encoded: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        self.api(&format!("/api/v1/query?query={encoded}")).await["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The alerts firing now, by name.
    async fn firing(&self) -> BTreeSet<String> {
        self.api("/api/v1/alerts").await["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|alert| alert["state"] == "firing")
            .filter_map(|alert| alert["labels"]["alertname"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Every `targets[].expr` of the dashboards.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(panel["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            walk(
                dashboard["panels"].as_array().map_or(&[], Vec::as_slice),
                &mut queries,
            );
        }
    }
    assert!(!queries.is_empty(), "no dashboard queries found");
    queries
}

/// The series an expression reads: the services' metric names and the
/// recording rules' (`level:metric:operations`).
fn series_names(expr: &str) -> BTreeSet<String> {
    const PREFIXES: [&str; 7] = [
        "grpc_server_",
        "outbox_",
        "consumer_",
        "dead_letter_",
        "broker_",
        "task_",
        "dependency_",
    ];
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.contains(':') || PREFIXES.iter().any(|prefix| token.starts_with(prefix)))
        .map(str::to_owned)
        .collect()
}

fn uses_incident_only_series(expr: &str) -> bool {
    INCIDENT_ONLY.iter().any(|name| expr.contains(name))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs prometheus on the PATH (.ci/install-tools); run: cargo test -p system-tests --test system monitoring -- --ignored"]
async fn prometheus_scrapes_both_services_evaluates_every_rule_and_query_and_the_outbox_alert_fires_and_resolves()
 {
    // The user service reaches the broker through a proxy the test can shut.
    let proxy = TcpProxy::start(shop_testkit::amqp_addr().await).await.unwrap();
    let mut services = crate::processes::start(
        proxy.url_for(&shop_testkit::amqp_url()),
        &[
            ("CONSUMER_RETRY_DELAYS", "100ms".to_owned()),
            ("CONSUMER_MAX_ATTEMPTS", "1".to_owned()),
        ],
    )
    .await;
    let (users, orders) = (&services.users, &services.orders);
    let user_exchange = services.user_exchange.clone();
    let prometheus = Prometheus::start(&[
        (
            "user-service",
            users.admin_addr.expect("the user service's admin address"),
        ),
        (
            "order-service",
            orders.admin_addr.expect("the order service's admin address"),
        ),
    ])
    .await;

    // Traffic of every kind the rules and panels watch: commands (one
    // refused), events applied, a dead letter.
    let mut client = UserServiceClient::new(crate::system::with_service_token(
        tonic::transport::Endpoint::from_shared(format!("http://{}", users.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    ));
    let create = |n: usize| pb::CreateUserRequest {
        email: format!("watched{n}@example.com"),
        name: "Watched".to_owned(),
        request_id: String::new(),
    };
    // Server-side errors: a method the user service does not serve.
    let mut unserved = shop_contracts::order::order_service_client::OrderServiceClient::new(
        crate::system::with_service_token(
            tonic::transport::Endpoint::from_shared(format!("http://{}", users.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        ),
    );
    let get_order = || shop_contracts::order::GetOrderRequest {
        id: uuid::Uuid::now_v7().to_string(),
    };
    let status = unserved.get_order(get_order()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    for n in 0..5 {
        client.create_user(create(n)).await.unwrap();
    }
    // And a steady trickle from here to the end, so rates are not zero; it
    // goes on while the broker is away (the commands do not need it).
    let load = {
        let mut client = client.clone();
        let mut unserved = unserved.clone();
        tokio::spawn(async move {
            for n in 1000.. {
                let _ = client.create_user(create(n)).await;
                let _ = unserved.get_order(get_order()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let refused = client
        .create_user(pb::CreateUserRequest {
            email: "not an email".to_owned(),
            name: String::new(),
            request_id: String::new(),
        })
        .await;
    assert!(refused.is_err());
    TestPublisher::connect(&user_exchange)
        .await
        .unwrap()
        .publish_raw(
            &user_exchange,
            UserCreated::ROUTING_KEY,
            b"\xff",
            BasicProperties::default()
                .with_type(UserCreated::TYPE_NAME.into())
                .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into()),
        )
        .await
        .unwrap();

    // Every series a rule or panel reads has been scraped a few times, and
    // the recording rules over both services' rates have been evaluated
    // (on a busy machine a scrape or an evaluation can lag the other
    // service's by seconds).
    shop_testkit::eventually(
        "dead letters, applied events and request rates scraped",
        Duration::from_secs(60),
        || async {
            let dead = prometheus.query("dead_letter_queue_messages > 0").await;
            let applied = prometheus
                .query("sum(consumer_events_total{outcome=\"applied\"}) >= 5")
                .await;
            let rates = prometheus.query("queue:consumer_events_applied:rate5m > 0").await;
            let requests = prometheus
                .query("service_method:grpc_server_requests:rate5m > 0")
                .await;
            let errors = prometheus
                .query("service_method:grpc_server_error_ratio:rate5m")
                .await;
            let latency = prometheus
                .query("service_method:grpc_server_request_duration_seconds:p99_5m")
                .await;
            [dead, applied, rates, requests, errors, latency]
                .iter()
                .all(|result| !result.is_empty())
                .then_some(())
        },
    )
    .await;
    let targets = prometheus.query("up == 1").await;
    assert_eq!(targets.len(), 2, "both services scraped: {targets:?}");

    // Every rule evaluates without error, and returns data.
    let groups = prometheus.api("/api/v1/rules").await["groups"].clone();
    let mut rules = 0;
    let mut empty = Vec::new();
    for group in groups.as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            rules += 1;
            let name = rule["name"].as_str().unwrap_or_default();
            assert_eq!(rule["health"], "ok", "rule {name}: {}", rule["lastError"]);
            let expr = rule["query"].as_str().unwrap_or_default();
            // An alert's expression is a condition that holds only during an
            // incident: every series it reads must have data.
            let data = if rule["type"] == "alerting" {
                let mut all = true;
                for series in series_names(expr) {
                    if !INCIDENT_ONLY.contains(&series.as_str()) && prometheus.query(&series).await.is_empty()
                    {
                        empty.push(format!("{series} (read by alert {name})"));
                        all = false;
                    }
                }
                all
            } else {
                !prometheus.query(expr).await.is_empty()
            };
            if !data && !uses_incident_only_series(expr) {
                empty.push(format!("{name}: {expr}"));
            }
        }
    }
    assert!(rules > 20, "the rules were loaded ({rules})");

    // Every dashboard query evaluates and returns data.
    for (panel, expr) in dashboard_queries() {
        let result = prometheus.query(&expr).await;
        if result.is_empty() && !uses_incident_only_series(&expr) {
            empty.push(format!("panel {panel:?}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "no data for:\n  {}", empty.join("\n  "));
    assert!(
        !prometheus.firing().await.contains("OutboxEventsStuck"),
        "nothing stuck while the relay publishes"
    );

    // The user service loses the broker while commands go on: its events
    // wait in the outbox, and once the oldest is older than a minute the
    // alert fires.
    proxy.refuse(true);
    proxy.cut();
    let fired = shop_testkit::eventually("OutboxEventsStuck firing", Duration::from_secs(120), || async {
        let firing = prometheus.firing().await;
        firing.contains("OutboxEventsStuck").then_some(firing)
    })
    .await;
    assert!(
        fired.contains("DependencyDown"),
        "the relay's broker connection is down too: {fired:?}"
    );

    // The broker back: the relay publishes the backlog and the alert
    // resolves.
    proxy.refuse(false);
    shop_testkit::eventually("OutboxEventsStuck resolved", Duration::from_secs(60), || async {
        (!prometheus.firing().await.contains("OutboxEventsStuck")).then_some(())
    })
    .await;
    // The trickle goes on until here, so a sample of the gauge can catch
    // the one event just committed; with the trickle stopped, the whole
    // backlog must be gone by the next samples.
    load.abort();
    shop_testkit::eventually("the backlog published", Duration::from_secs(30), || async {
        let pending = prometheus
            .query("max(outbox_pending_events{job=\"user-service\"})")
            .await;
        pending
            .first()
            .is_some_and(|sample| sample["value"][1] == "0")
            .then_some(())
    })
    .await;

    services.terminate().await;
}
