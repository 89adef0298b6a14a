//! The documented settings (docs/configuration.md) and metrics (the
//! README's table) against what the binaries read and export: every
//! variable either service reads is listed, nothing listed is unread, and
//! each listed default is the one the binary uses.

use std::collections::{BTreeMap, BTreeSet};

use clap::Command;
use order_service::OrderService;
use user_service::UserService;

/// Where the settings are documented.
const CONFIGURATION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");

/// Variable → default (empty when it has none), as `command` declares them.
fn declared(command: &Command) -> BTreeMap<String, String> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let variable = arg.get_env()?.to_string_lossy().into_owned();
            let default = arg
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(",");
            Some((variable, default))
        })
        .collect()
}

/// One row of the settings table.
#[derive(Debug)]
struct Row {
    variables: Vec<String>,
    default: String,
    read_by: String,
}

fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(CONFIGURATION).unwrap();
    let start = readme
        .find("<!-- settings:")
        .expect("the settings table's opening marker");
    let end = readme
        .find("<!-- end of settings -->")
        .expect("its closing marker");
    readme[start..end]
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            Row {
                variables: cells[0]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect(),
                default: cells[1].to_owned(),
                read_by: cells[2].to_owned(),
            }
        })
        .collect()
}

#[test]
fn the_readme_lists_every_setting_the_services_read_with_its_default() {
    let user = declared(&shop_host::cli::command::<UserService>());
    let order = declared(&shop_host::cli::command::<OrderService>());
    let rows = readme_rows();

    let listed: BTreeSet<&str> = rows
        .iter()
        .flat_map(|row| row.variables.iter().map(String::as_str))
        .collect();
    let read: BTreeSet<&str> = user.keys().chain(order.keys()).map(String::as_str).collect();
    assert_eq!(listed, read, "docs/configuration.md and the binaries disagree");

    for row in &rows {
        for variable in &row.variables {
            let readers: Vec<(&str, &BTreeMap<String, String>)> = [("user", &user), ("order", &order)]
                .into_iter()
                .filter(|(_, declared)| declared.contains_key(variable))
                .collect();
            let expected_reader = match readers.as_slice() {
                [_, _] => "both",
                [(name, _)] => name,
                _ => unreachable!(),
            };
            assert_eq!(row.read_by, expected_reader, "who reads {variable}");
            for (name, declared) in readers {
                let default = &declared[variable];
                if default.is_empty() {
                    assert_eq!(row.default, "unset", "{variable} has no default");
                } else {
                    assert!(
                        row.default.contains(&format!("`{default}`")),
                        "docs/configuration.md gives {variable} the default {:?}, the {name} service uses {default}",
                        row.default
                    );
                }
            }
        }
    }
}

/// The README's metric table: metric name → the label names it states.
fn readme_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- metrics:")
        .expect("the metric table's opening marker");
    let end = readme
        .find("<!-- end of metrics -->")
        .expect("its closing marker");
    let mut metrics = BTreeMap::new();
    for line in readme[start..end].lines().filter(|line| line.starts_with("| `")) {
        let first = line.trim_matches('|').split(" | ").next().unwrap_or_default();
        for series in first.split('`').skip(1).step_by(2) {
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let labels = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|label| !label.is_empty())
                .map(str::to_owned)
                .collect();
            metrics.insert(name.to_owned(), labels);
        }
    }
    assert!(!metrics.is_empty(), "no metric rows between the markers");
    metrics
}

/// A Prometheus text exposition: metric name (histogram series under their
/// base name) → the label names of its samples (`le` left out).
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut kinds = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                kinds.insert(name.to_owned(), kind.to_owned());
            }
        }
    }
    let mut metrics: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let mut name = &line[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && matches!(kinds.get(base).map(String::as_str), Some("histogram" | "summary"))
            {
                name = base;
            }
        }
        let labels = metrics.entry(name.to_owned()).or_default();
        if let Some(open) = line.find('{') {
            // key="value",… — values of these services hold no quotes.
            let close = line.rfind('}').unwrap_or(line.len());
            for pair in line[open + 1..close].split("\",") {
                if let Some((key, _)) = pair.split_once("=\"")
                    && key != "le"
                {
                    labels.insert(key.trim_start_matches(',').to_owned());
                }
            }
        }
    }
    metrics
}

#[test]
fn exported_reads_names_labels_and_histograms_under_their_base_name() {
    let text = "# TYPE a counter\na{x=\"1\",y=\"2\"} 3\n# TYPE h histogram\nh_bucket{q=\"z\",le=\"0.1\"} 1\nh_sum{q=\"z\"} 1\nh_count{q=\"z\"} 1\n# TYPE plain gauge\nplain 0\n";
    let metrics = exported(text);
    assert_eq!(
        metrics.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "h", "plain"]
    );
    assert_eq!(metrics["a"], BTreeSet::from(["x".to_owned(), "y".to_owned()]));
    assert_eq!(metrics["h"], BTreeSet::from(["q".to_owned()]));
    assert!(metrics["plain"].is_empty());
}

/// Both services run as processes (each has its own metrics recorder), with
/// traffic that makes every kind of series appear: a command on each
/// service, events published and applied, a dead letter. Counters of rare
/// events are exported at zero from the start, and the consumer samples
/// its queues and parked events on its sweep.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_lists_every_metric_both_services_export_with_its_labels() {
    use shop_contracts::Event as _;
    use shop_testkit::{ServiceProcess, TestPublisher, http_get};
    use std::time::Duration;

    let mut services = crate::processes::start(shop_testkit::amqp_url(), &[]).await;
    let (users, orders) = (&services.users, &services.orders);
    let user_exchange = services.user_exchange.clone();

    // A user, applied by the order service, then an order for them.
    let config = |addr| {
        shop_client::ClientConfig::new(format!("http://{addr}"))
            .with_token(shop_testkit::TestKeys::shared().service_token().into())
    };
    let user_client = shop_client::UserClient::connect(config(users.addr)).unwrap();
    let order_client = shop_client::OrderClient::connect(config(orders.addr)).unwrap();
    let user = user_client
        .create_user("metered@example.com", "Metered")
        .await
        .unwrap();
    shop_testkit::eventually("the order accepted", Duration::from_secs(30), || async {
        order_client.create_order(&user.id, &[("sku-1", 1)]).await.ok()
    })
    .await;
    // A call refused for want of credentials.
    let stranger =
        shop_client::UserClient::connect(shop_client::ClientConfig::new(format!("http://{}", users.addr)))
            .unwrap();
    assert!(matches!(
        stranger.list_users(Some(10), "").await,
        Err(shop_client::Error::Unauthenticated(_))
    ));
    // A dead letter: a body that does not decode.
    TestPublisher::connect(&user_exchange)
        .await
        .unwrap()
        .publish_raw(
            &user_exchange,
            shop_contracts::user::UserCreated::ROUTING_KEY,
            b"\xff",
            lapin::BasicProperties::default()
                .with_type(shop_contracts::user::UserCreated::TYPE_NAME.into())
                .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into()),
        )
        .await
        .unwrap();

    let table = readme_metrics();
    let scrape = |process: &ServiceProcess| {
        let admin = process.admin_addr.expect("the admin address");
        async move {
            let (status, body) = http_get(admin, "/metrics").await.ok()?;
            (status == 200).then(|| exported(&body))
        }
    };
    // Every documented series appears once its event has happened (the
    // sweep samples the queues every few seconds); then both sides must
    // agree exactly.
    let both = shop_testkit::eventually(
        "every metric of the README's table scraped",
        Duration::from_secs(60),
        || async {
            let mut both = scrape(users).await?;
            for (name, labels) in scrape(orders).await? {
                both.entry(name).or_default().extend(labels);
            }
            table.keys().all(|name| both.contains_key(name)).then_some(both)
        },
    )
    .await;
    let undocumented: Vec<&String> = both.keys().filter(|name| !table.contains_key(*name)).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in the README's metric table: {undocumented:?}"
    );
    for (name, labels) in &table {
        assert_eq!(&both[name], labels, "the labels of {name}");
    }
    services.terminate().await;
}

#[test]
fn every_setting_has_the_flag_the_readme_says() {
    // Its text with the line breaks of its paragraphs undone.
    let readme = std::fs::read_to_string(CONFIGURATION)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut exceptions = BTreeSet::new();
    for command in [
        shop_host::cli::command::<UserService>(),
        shop_host::cli::command::<OrderService>(),
    ] {
        for arg in command.get_arguments() {
            let (Some(variable), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            let variable = variable.to_string_lossy();
            if long != variable.to_lowercase().replace('_', "-") {
                exceptions.insert(format!("`{variable}`, whose flag is `--{long}`"));
            }
        }
    }
    for exception in &exceptions {
        assert!(
            readme.contains(exception.as_str()),
            "docs/configuration.md must say {exception}"
        );
    }
    assert_eq!(
        readme.matches(", whose flag is `--").count(),
        exceptions.len(),
        "docs/configuration.md names flags that do not differ: {exceptions:?}"
    );
}
