//! Golden envelopes: one whole message per event type, as the producer
//! sends it (body, its canonical JSON, properties, and the header table with
//! each value's AMQP type letter, also as the encoded bytes RabbitMQ
//! delivers), in the contract bundle (`docs/contract/envelopes/`).
//!
//! An envelope is written once, when its event type is released
//! (`UPDATE_GOLDEN=1 cargo test -p system-tests --test system envelopes`
//! writes the missing ones), and never rewritten: today's code must still
//! produce everything a released envelope holds, with the same names, types
//! and values (headers and properties may be added, never renamed or
//! retyped). A second test publishes through the real relay to a real queue
//! and holds what arrives against the envelopes and the header table.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use prost_reflect::{DynamicMessage, Value as Reflected};
use serde_json::{Value, json};
use shop_contracts::{DECLARED_EVENTS, DeclaredEvent};
use shop_messaging::wire::{self, EventHeaders, FieldType, HeaderRole};
use system_tests::samples;

use crate::contract;

/// The event id of every golden envelope (a UUIDv7).
const EVENT_ID: &str = "0192f4c0-7d1e-7a3b-9c4d-5e6f708192a3";
/// The `timestamp` of every golden envelope.
const TIMESTAMP: u64 = 1_764_000_000;
/// The id of the key the golden envelopes are signed with.
const GOLDEN_KEY_ID: &str = "golden-envelopes";

/// The key the golden envelopes are signed with: a fixture made from a fixed
/// seed, so the (deterministic) Ed25519 signatures never change; its public
/// key is in every envelope, for consumers to check their verification.
fn golden_key() -> shop_messaging::signing::SigningKey {
    let seed = [0x5a_u8; 32];
    let key = shop_messaging::signing::PrivateKey::parse(&seed).unwrap();
    shop_messaging::signing::SigningKey::new(GOLDEN_KEY_ID, key).unwrap()
}

fn envelope_path(type_name: &str) -> PathBuf {
    contract::envelopes_dir().join(format!("{type_name}.json"))
}

fn declared(type_name: &str) -> &'static DeclaredEvent {
    DECLARED_EVENTS
        .iter()
        .find(|d| d.type_name == type_name)
        .unwrap_or_else(|| panic!("{type_name} is not declared"))
}

/// A header value as JSON: its AMQP type letter and its value.
pub fn header_json(value: &AMQPValue) -> Value {
    let letter = value.get_type().get_id().to_string();
    let value = match value {
        AMQPValue::LongString(v) => json!(String::from_utf8_lossy(v.as_bytes())),
        AMQPValue::ShortString(v) => json!(v.as_str()),
        AMQPValue::LongLongInt(v) => json!(v),
        AMQPValue::LongInt(v) => json!(v),
        AMQPValue::LongUInt(v) => json!(v),
        AMQPValue::ShortInt(v) => json!(v),
        AMQPValue::ShortUInt(v) => json!(v),
        AMQPValue::ShortShortInt(v) => json!(v),
        AMQPValue::ShortShortUInt(v) => json!(v),
        AMQPValue::Timestamp(v) => json!(v),
        AMQPValue::Boolean(v) => json!(v),
        AMQPValue::FieldArray(items) => Value::Array(items.as_slice().iter().map(header_json).collect()),
        other => json!(format!("{other:?}")),
    };
    json!({ "type": letter, "value": value })
}

/// A header table as JSON, by name.
pub fn headers_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), header_json(v)))
            .collect(),
    )
}

/// The properties of an event as JSON (the ones the contract names).
pub fn properties_json(properties: &BasicProperties) -> Value {
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| json!(s.as_str()));
    let mut out = serde_json::Map::new();
    for (name, value) in [
        ("content_type", text(properties.content_type())),
        ("type", text(properties.kind())),
        ("message_id", text(properties.message_id())),
        ("app_id", text(properties.app_id())),
        ("timestamp", properties.timestamp().map(|t| json!(t))),
        ("delivery_mode", properties.delivery_mode().map(|m| json!(m))),
        ("user_id", text(properties.user_id())),
    ] {
        if let Some(value) = value {
            out.insert(name.to_owned(), value);
        }
    }
    Value::Object(out)
}

/// The header table encoded as on the wire.
fn encoded_table(table: &FieldTable) -> Vec<u8> {
    cookie_factory::gen_simple(lapin::types::generation::gen_field_table(table), Vec::new())
        .expect("a header table encodes")
}

/// The aggregate id and version a body names, read through its declaration.
fn aggregate_of(body: &DynamicMessage, declared: &DeclaredEvent) -> (String, i64) {
    let id = match body.get_field_by_name(declared.aggregate_id_field).as_deref() {
        Some(Reflected::String(id)) => id.clone(),
        other => panic!("{}: no aggregate id ({other:?})", declared.type_name),
    };
    let version = match body
        .get_field_by_name(declared.aggregate_version_field)
        .as_deref()
    {
        Some(Reflected::I64(version)) => *version,
        other => panic!("{}: no aggregate version ({other:?})", declared.type_name),
    };
    (id, version)
}

/// The envelope today's code makes of the golden sample of `type_name`.
pub fn envelope(type_name: &str, body: &[u8]) -> Value {
    let declared = declared(type_name);
    let pool = contract::pool();
    let message = pool.get_message_by_name(type_name).unwrap();
    let decoded = DynamicMessage::decode(message.clone(), body).unwrap();
    let (aggregate_id, aggregate_version) = aggregate_of(&decoded, declared);
    let trace = HashMap::new();
    let headers = EventHeaders {
        event_id: EVENT_ID,
        type_name,
        app_id: contract::producer(message.package_name()),
        timestamp: TIMESTAMP,
        aggregate_type: declared.aggregate_type,
        aggregate_id: &aggregate_id,
        aggregate_version,
        partition: wire::partition_of(&aggregate_id),
        trace: &trace,
    };
    // The shipped broker definitions name each service's user after it.
    let key = golden_key();
    let properties = wire::sent_by(headers.signed_properties(body, &key), headers.app_id);
    let table = properties.headers().clone().unwrap_or_default();
    json!({
        "about": "A golden envelope of the shop event contract: one message as the producer publishes it. \
                  Released envelopes are never rewritten; they are signed with a fixture key whose public key is `signing_key`. `header_table` is the AMQP encoding of `headers` \
                  (RabbitMQ's field types), `body` the protobuf encoding, `body_json` its canonical proto3 JSON.",
        "type": type_name,
        "exchange": declared.default_exchange,
        "routing_key": declared.routing_key,
        "properties": properties_json(&properties),
        "headers": headers_json(&table),
        "header_table": STANDARD.encode(encoded_table(&table)),
        "body": STANDARD.encode(body),
        "body_json": serde_json::to_value(&decoded).unwrap(),
        "signing_key": {
            "key_id": GOLDEN_KEY_ID,
            "public_key": STANDARD.encode(key.public_key()),
        },
    })
}

/// The released envelope of `type_name`.
pub fn released(type_name: &str) -> Value {
    let path = envelope_path(type_name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where `current` lacks or changes something `released` holds, as
/// readable lines (empty when `current` keeps all of it).
fn lost(released: &Value, current: &Value, at: &str) -> Vec<String> {
    match (released, current) {
        (Value::Object(old), Value::Object(new)) => old
            .iter()
            .filter(|(key, _)| !at.is_empty() || key.as_str() != "header_table")
            .flat_map(|(key, value)| match new.get(key) {
                None => vec![format!("{at}/{key} is gone")],
                Some(now) => lost(value, now, &format!("{at}/{key}")),
            })
            .collect(),
        (old, new) if old == new => Vec::new(),
        (old, new) => vec![format!("{at} was {old}, is {new}")],
    }
}

#[test]
fn every_event_type_has_a_released_envelope_and_todays_code_still_produces_all_of_it() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let samples = samples::all();
    let mut problems = Vec::new();
    for declared in DECLARED_EVENTS {
        let sample = samples
            .iter()
            .find(|s| s.type_name == declared.type_name)
            .unwrap_or_else(|| panic!("no sample for {} in tests/support/samples.rs", declared.type_name));
        let current = envelope(declared.type_name, &sample.encoded);
        let path = envelope_path(declared.type_name);
        if !path.exists() && update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, serde_json::to_string_pretty(&current).unwrap() + "\n").unwrap();
        }
        assert!(
            path.exists(),
            "missing golden envelope {}: run UPDATE_GOLDEN=1 cargo test -p system-tests --test system envelopes and commit it",
            path.display()
        );
        problems.extend(
            lost(&released(declared.type_name), &current, "")
                .into_iter()
                .map(|line| format!("{}: {line}", declared.type_name)),
        );
    }
    assert!(
        problems.is_empty(),
        "today's code no longer sends what the released envelopes hold (a header renamed or retyped is a \
         breaking change):\n{}",
        problems.join("\n")
    );
}

#[test]
fn each_released_header_table_decodes_to_its_headers() {
    for declared in DECLARED_EVENTS {
        let envelope = released(declared.type_name);
        let bytes = STANDARD
            .decode(envelope["header_table"].as_str().unwrap())
            .unwrap();
        let (rest, table) = lapin::types::parsing::parse_field_table(bytes.as_slice()).unwrap();
        assert!(rest.is_empty(), "{}: bytes after the table", declared.type_name);
        assert_eq!(
            headers_json(&table),
            envelope["headers"],
            "{}",
            declared.type_name
        );
        let body = STANDARD.decode(envelope["body"].as_str().unwrap()).unwrap();
        let golden = std::fs::read(
            contract::repository()
                .join("tests/golden")
                .join(format!("{}.binpb", declared.type_name)),
        )
        .unwrap();
        assert_eq!(
            body, golden,
            "{}: the envelope's body is not the golden body",
            declared.type_name
        );
    }
}

/// Every header of a delivery against the header table: a known header,
/// sent with its declared type; and every contract header there.
fn check_against_table(type_name: &str, table: &FieldTable, problems: &mut Vec<String>) {
    for (name, value) in table.inner() {
        let Some(spec) = wire::HEADERS.iter().find(|h| h.name == name.as_str()) else {
            problems.push(format!("{type_name}: header {name} is not in the contract"));
            continue;
        };
        if spec.role == HeaderRole::Internal {
            problems.push(format!(
                "{type_name}: internal header {name} on a producer's event"
            ));
        }
        if FieldType::of(value) != Some(spec.field_type) {
            problems.push(format!(
                "{type_name}: header {name} sent as `{}`, the contract says `{}`",
                value.get_type().get_id(),
                spec.field_type.letter()
            ));
        }
    }
    for spec in wire::HEADERS.iter().filter(|h| h.role == HeaderRole::Contract) {
        if !table.inner().contains_key(spec.name) {
            problems.push(format!("{type_name}: contract header {} missing", spec.name));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_sends_the_header_names_and_types_of_the_bundle() {
    for cloudevents in [false, true] {
        let system = crate::system::start(false).await;
        let mut settings = system.user_settings.clone();
        settings.host.relay.cloudevents = cloudevents;
        let mut probe = system
            .broker
            .probe(&settings.service.events_exchange, "#")
            .await
            .unwrap();
        let mut users = system.users.clone();
        let user = users
            .create_user(shop_contracts::user::CreateUserRequest {
                email: format!("envelope-{cloudevents}@example.com"),
                name: "Envelope".to_owned(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        users
            .update_user(shop_contracts::user::UpdateUserRequest {
                id: user.id.clone(),
                expected_version: 1,
                email: None,
                name: Some("Enveloped".to_owned()),
            })
            .await
            .unwrap();
        users
            .delete_user(shop_contracts::user::DeleteUserRequest {
                id: user.id.clone(),
                expected_version: 2,
            })
            .await
            .unwrap();
        // The real relay of the service, with the setting under test.
        let pool = shop_database::pool(&settings.host.database).unwrap();
        let relay = shop_host::relay(&settings, pool).unwrap();
        let mut running = shop_testkit::Running::spawn(|shutdown| relay.run(shutdown));
        let deliveries = probe.expect(3, Duration::from_secs(20)).await;
        running.stop().await.unwrap();

        let mut problems = Vec::new();
        let mut seen = BTreeMap::new();
        for delivery in &deliveries {
            let p = &delivery.properties;
            let type_name = p.kind().as_ref().unwrap().as_str().to_owned();
            let table = p.headers().clone().unwrap_or_default();
            check_against_table(&type_name, &table, &mut problems);
            let ce = wire::CLOUDEVENTS
                .iter()
                .filter(|name| table.inner().contains_key(**name))
                .count();
            assert_eq!(
                ce,
                if cloudevents { 6 } else { 0 },
                "{type_name}: ce-* headers with RELAY_CLOUDEVENTS={cloudevents}"
            );

            // Against the released envelope: the same properties (names and,
            // where fixed, values) and the same headers with the same types.
            let envelope = released(&type_name);
            let sent = properties_json(p);
            for (name, value) in envelope["properties"].as_object().unwrap() {
                match (name.as_str(), sent.get(name)) {
                    (_, None) => problems.push(format!("{type_name}: property {name} missing")),
                    ("content_type" | "type" | "app_id" | "delivery_mode", Some(now)) if now != value => {
                        problems.push(format!(
                            "{type_name}: property {name} is {now}, the envelope says {value}"
                        ));
                    }
                    _ => {}
                }
            }
            let sent_headers = headers_json(&table);
            for (name, value) in envelope["headers"].as_object().unwrap() {
                match sent_headers.get(name) {
                    None => problems.push(format!("{type_name}: header {name} of the envelope missing")),
                    Some(now) if now["type"] != value["type"] => problems.push(format!(
                        "{type_name}: header {name} sent as {}, the envelope has {}",
                        now["type"], value["type"]
                    )),
                    Some(_) => {}
                }
            }
            assert_eq!(
                delivery.routing_key.as_str(),
                envelope["routing_key"].as_str().unwrap()
            );
            seen.insert(type_name, sent_headers);
        }
        assert!(
            problems.is_empty(),
            "the relay's messages break the bundle:\n{}",
            problems.join("\n")
        );
        assert_eq!(seen.len(), 3, "one of each user event: {seen:?}");
        eprintln!(
            "RELAY_CLOUDEVENTS={cloudevents}: {}",
            serde_json::to_string(&seen).unwrap()
        );
    }
}
