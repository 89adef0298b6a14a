//! Consumer-driven checks of meaning: every consumer of the user events
//! declares what it reads from each of them and what it needs of each value
//! (`services/<consumer>/contract/*.json`, e.g. the order service's
//! `user-events.json`: `user_id` a UUID, `version` ≥ 1 and equal to its
//! header, `email` present, versions consecutive per user). The events the
//! user service's real command path publishes must satisfy every
//! declaration; a failure names the consumer whose declaration broke.
//!
//! `buf breaking` and the golden files guard the shape of the events; this
//! guards what they mean to the teams that read them. (Pact message pacts
//! with its protobuf plugin would be the ecosystem's tool; the plugin
//! installs from outside the package registries, so the declarations are a
//! small JSON format of this repository's own, read here.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost_reflect::{DescriptorPool, DynamicMessage, Value as Reflected};
use serde_json::Value;
use shop_contracts::user as pb;
use shop_messaging::wire::{header_i64, header_str};

use crate::helpers::spawn_app;

/// One consumer's declaration file.
struct Declaration {
    consumer: String,
    path: PathBuf,
    document: Value,
}

/// Every declaration under `services/*/contract/`.
fn declarations() -> Vec<Declaration> {
    let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    for service in std::fs::read_dir(&services).unwrap() {
        let folder = service.unwrap().path().join("contract");
        let Ok(files) = std::fs::read_dir(&folder) else {
            continue;
        };
        for file in files {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let document: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let consumer = document["consumer"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: no consumer", path.display()))
                    .to_owned();
                let path = Path::new("services").join(path.strip_prefix(&services).unwrap());
                found.push(Declaration {
                    consumer,
                    path,
                    document,
                });
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// One published event, as the checks read it.
struct Published {
    type_name: String,
    body: DynamicMessage,
    headers: lapin::types::FieldTable,
}

fn header_value(event: &Published, name: &str) -> Option<Value> {
    header_str(&event.headers, name)
        .map(|s| Value::from(s.to_owned()))
        .or_else(|| header_i64(&event.headers, name).map(Value::from))
}

fn field_value(value: &Reflected) -> Value {
    match value {
        Reflected::String(s) => Value::from(s.clone()),
        Reflected::I64(n) => Value::from(*n),
        Reflected::I32(n) => Value::from(*n),
        Reflected::U64(n) => Value::from(*n),
        Reflected::U32(n) => Value::from(*n),
        Reflected::Bool(b) => Value::from(*b),
        other => Value::from(format!("{other:?}")),
    }
}

/// What `rules` say of `value` that is not so, as readable lines.
fn broken(rules: &Value, value: &Reflected, event: &Published) -> Vec<String> {
    let json = field_value(value);
    let mut out = Vec::new();
    for (rule, expected) in rules.as_object().unwrap() {
        let holds = match rule.as_str() {
            "uuid" => json.as_str().is_some_and(|s| uuid::Uuid::try_parse(s).is_ok()),
            "present" => match value {
                Reflected::String(s) => !s.is_empty(),
                Reflected::I64(n) => *n != 0,
                Reflected::I32(n) => *n != 0,
                Reflected::Message(_) => true,
                _ => json != Value::Null,
            },
            "min" => json
                .as_i64()
                .zip(expected.as_i64())
                .is_some_and(|(v, min)| v >= min),
            "equals" => json == *expected,
            "header" => header_value(event, expected.as_str().unwrap()) == Some(json.clone()),
            other => panic!("unknown rule {other:?}"),
        };
        if !holds {
            out.push(format!("must be {rule} {expected}, was {json}"));
        }
    }
    out
}

/// Every way `events` break `declaration`.
fn violations(declaration: &Declaration, pool: &DescriptorPool, events: &[Published]) -> Vec<String> {
    let mut out = Vec::new();
    let declared = declaration.document["events"].as_object().unwrap();
    for (type_name, fields) in declared {
        let Some(message) = pool.get_message_by_name(type_name) else {
            out.push(format!(
                "reads {type_name}, which is not an event of the contracts"
            ));
            continue;
        };
        for field in fields.as_object().unwrap().keys() {
            if message.get_field_by_name(field).is_none() {
                out.push(format!(
                    "reads {type_name}.{field}, which the message does not have"
                ));
            }
        }
    }
    let mut versions: BTreeMap<String, i64> = BTreeMap::new();
    for event in events {
        let Some(fields) = declared.get(&event.type_name) else {
            continue;
        };
        for (field, rules) in fields.as_object().unwrap() {
            let Some(value) = event.body.get_field_by_name(field) else {
                continue;
            };
            for problem in broken(rules, &value, event) {
                out.push(format!("{}.{field} {problem}", event.type_name));
            }
        }
        if declaration.document["sequence"] == "consecutive-from-1" {
            let id = header_str(&event.headers, "aggregate_id")
                .unwrap_or_default()
                .to_owned();
            let version = header_i64(&event.headers, "aggregate_version").unwrap_or_default();
            let last = versions.entry(id.clone()).or_insert(0);
            if version != *last + 1 {
                out.push(format!(
                    "{} of {id} has version {version} after {}: versions must be consecutive from 1",
                    event.type_name, last
                ));
            }
            *last = version;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_events_of_real_commands_satisfy_every_consumers_declaration() {
    let declarations = declarations();
    assert!(
        declarations.iter().any(|d| d.consumer == "order-service"),
        "the order service's declaration (services/order-service/contract/user-events.json) is missing"
    );
    let mut app = spawn_app().await;
    let mut probe = app.broker.probe(&app.exchange, "#").await.unwrap();
    let mut client = app.client.clone();

    // The real command path: every command that publishes, through gRPC.
    let ada = app.create_user("meaning-ada@example.com", "Ada").await;
    let grace = app.create_user("meaning-grace@example.com", "Grace").await;
    client
        .update_user(pb::UpdateUserRequest {
            id: ada.id.clone(),
            expected_version: 1,
            email: Some("meaning-ada@example.org".to_owned()),
            name: None,
        })
        .await
        .unwrap();
    client
        .update_user(pb::UpdateUserRequest {
            id: ada.id.clone(),
            expected_version: 2,
            email: None,
            name: Some("Ada Lovelace".to_owned()),
        })
        .await
        .unwrap();
    client
        .delete_user(pb::DeleteUserRequest {
            id: grace.id.clone(),
            expected_version: 1,
        })
        .await
        .unwrap();
    client
        .delete_user(pb::DeleteUserRequest {
            id: ada.id.clone(),
            expected_version: 3,
        })
        .await
        .unwrap();
    let deliveries = probe.expect(6, std::time::Duration::from_secs(15)).await;
    app.running.stop().await.unwrap();

    let pool = DescriptorPool::decode(shop_contracts::FILE_DESCRIPTOR_SET).unwrap();
    let events: Vec<Published> = deliveries
        .iter()
        .map(|d| {
            let type_name = d.properties.kind().as_ref().unwrap().as_str().to_owned();
            let message = pool.get_message_by_name(&type_name).unwrap();
            Published {
                body: DynamicMessage::decode(message, &*d.data).unwrap(),
                headers: d.properties.headers().clone().unwrap_or_default(),
                type_name,
            }
        })
        .collect();
    let mut failures = Vec::new();
    for declaration in &declarations {
        for problem in violations(declaration, &pool, &events) {
            failures.push(format!(
                "the {} declares ({}): {problem}",
                declaration.consumer,
                declaration.path.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "the user service's events break what their consumers read:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_declaration_whose_rules_an_event_breaks_is_reported_with_its_consumer() {
    // The check itself, on events made by hand: an update with version 0 and
    // an id that is not a UUID breaks the order service's declaration.
    let pool = DescriptorPool::decode(shop_contracts::FILE_DESCRIPTOR_SET).unwrap();
    let declaration = declarations()
        .into_iter()
        .find(|d| d.consumer == "order-service")
        .unwrap();
    let message = pool.get_message_by_name("shop.user.v1.UserUpdated").unwrap();
    let bad = pb::UserUpdated {
        user_id: "not-a-uuid".to_owned(),
        version: 0,
        email: "a@example.com".to_owned(),
        name: "A".to_owned(),
        occurred_at: None,
    };
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "aggregate_id".into(),
        shop_messaging::wire::long_string("not-a-uuid"),
    );
    headers.insert(
        "aggregate_version".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    let event = Published {
        type_name: "shop.user.v1.UserUpdated".to_owned(),
        body: DynamicMessage::decode(message, prost::Message::encode_to_vec(&bad).as_slice()).unwrap(),
        headers,
    };
    let problems = violations(&declaration, &pool, &[event]);
    assert!(
        problems.iter().any(|p| p.contains("user_id must be uuid")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("version must be min 1, was 0")),
        "{problems:?}"
    );
    assert!(problems.iter().any(|p| p.contains("consecutive")), "{problems:?}");
}
