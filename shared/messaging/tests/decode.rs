//! A large randomized search through what the consumer does with a
//! delivery before any handler sees it (`inspect_delivery`: the same
//! checks and header reading the worker runs), on stable Rust, in every
//! `cargo test`.
//!
//! Inputs are built the way a broker could deliver them: properties with
//! any `message_id` and `type` (valid, nearly valid, garbage), header tables
//! of every AMQP value type (nested tables and arrays included) under the
//! names the consumer reads and others, and bodies taken from the golden
//! encodings of every event, then mutated (bit flips, truncations, splices,
//! random bytes). Some properties are parsed from mutated AMQP frames with
//! the parser lapin uses. Each outcome is checked against an oracle: the
//! dead-letter reason is the first check the input fails, and an accepted
//! delivery carries the metadata its headers say.
//!
//! `SHOP_FUZZ_ITERATIONS` (default 20 000) and `SHOP_FUZZ_SEED` (default:
//! random, printed) set the run; CI runs a longer one. The coverage-guided
//! target in `tests/fuzz` runs the same function with cargo-fuzz.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shop_messaging::wire::{self, DeadLetterReason};

/// The golden encodings: (type name, body).
fn golden() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no golden events in {}", dir.display());
    seeds
}

fn text(rng: &mut StdRng, max: usize) -> String {
    let length = rng.random_range(0..=max);
    match rng.random_range(0..3) {
        0 => (0..length).map(|_| rng.random_range(' '..='~')).collect(),
        1 => (0..length).map(|_| rng.random::<char>()).collect(),
        _ => String::from_utf8_lossy(&bytes(rng, length)).into_owned(),
    }
}

fn bytes(rng: &mut StdRng, length: usize) -> Vec<u8> {
    (0..length).map(|_| rng.random()).collect()
}

fn mutate(rng: &mut StdRng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(0..4) {
        match rng.random_range(0..5) {
            0 if !data.is_empty() => {
                let at = rng.random_range(0..data.len());
                data[at] ^= 1 << rng.random_range(0..8);
            }
            1 if !data.is_empty() => {
                let at = rng.random_range(0..data.len());
                data.truncate(at);
            }
            2 => {
                let at = rng.random_range(0..=data.len());
                let length = rng.random_range(1..16);
                let extra = bytes(rng, length);
                data.splice(at..at, extra);
            }
            3 if !data.is_empty() => {
                let at = rng.random_range(0..data.len());
                data[at] = [0x00, 0x7f, 0x80, 0xff][rng.random_range(0..4)];
            }
            _ => {
                let length = rng.random_range(0..64);
                data = bytes(rng, length);
            }
        }
    }
    data
}

fn value(rng: &mut StdRng, depth: u32) -> AMQPValue {
    let nested = depth < 3;
    match rng.random_range(0..if nested { 18 } else { 16 }) {
        0 => AMQPValue::Boolean(rng.random()),
        1 => AMQPValue::ShortShortInt(rng.random()),
        2 => AMQPValue::ShortShortUInt(rng.random()),
        3 => AMQPValue::ShortInt(rng.random()),
        4 => AMQPValue::ShortUInt(rng.random()),
        5 => AMQPValue::LongInt(rng.random()),
        6 => AMQPValue::LongUInt(rng.random()),
        7 => AMQPValue::LongLongInt(match rng.random_range(0..3) {
            0 => rng.random_range(-2..6),
            1 => [i64::MIN, i64::MAX, i64::from(u32::MAX) + 1][rng.random_range(0..3)],
            _ => rng.random(),
        }),
        8 => AMQPValue::Float(rng.random()),
        9 => AMQPValue::Double(rng.random()),
        10 => AMQPValue::DecimalValue(DecimalValue {
            scale: rng.random(),
            value: rng.random(),
        }),
        11 => AMQPValue::ShortString(ShortString::from(text(rng, 40))),
        12 => {
            let length = rng.random_range(0..40);
            AMQPValue::LongString(LongString::from(bytes(rng, length)))
        }
        13 => AMQPValue::LongString(LongString::from(text(rng, 60).into_bytes())),
        14 => AMQPValue::Timestamp(rng.random()),
        15 => AMQPValue::Void,
        16 => AMQPValue::FieldTable(table(rng, depth + 1)),
        _ => AMQPValue::FieldArray(FieldArray::from(
            (0..rng.random_range(0..4))
                .map(|_| value(rng, depth + 1))
                .collect::<Vec<_>>(),
        )),
    }
}

fn table(rng: &mut StdRng, depth: u32) -> FieldTable {
    const NAMES: [&str; 10] = [
        wire::ATTEMPT,
        wire::AGGREGATE_ID,
        wire::AGGREGATE_VERSION,
        wire::AGGREGATE_TYPE,
        wire::ORIGINAL_EXCHANGE,
        wire::ORIGINAL_ROUTING_KEY,
        "traceparent",
        "tracestate",
        "baggage",
        "x-death",
    ];
    let mut table = FieldTable::default();
    for _ in 0..rng.random_range(0..6) {
        let name = if rng.random_bool(0.7) {
            NAMES[rng.random_range(0..NAMES.len())].to_owned()
        } else {
            text(rng, 20)
        };
        let value = match (name.as_str(), rng.random_range(0..3)) {
            ("traceparent", 0) => AMQPValue::LongString(LongString::from(
                format!(
                    "00-{:032x}-{:016x}-0{}",
                    rng.random::<u128>(),
                    rng.random::<u64>(),
                    rng.random_range(0..2)
                )
                .into_bytes(),
            )),
            (_, 1) => AMQPValue::LongString(LongString::from(text(rng, 40).into_bytes())),
            _ => value(rng, depth),
        };
        table.insert(ShortString::from(name), value);
    }
    if rng.random_bool(0.05) {
        // The byte-array type some clients send.
        table.insert("raw".into(), AMQPValue::ByteArray(ByteArray::from(bytes(rng, 8))));
    }
    table
}

/// Properties as any producer might set them.
fn properties(rng: &mut StdRng, golden: &[(String, Vec<u8>)]) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if rng.random_bool(0.9) {
        let id = match rng.random_range(0..4) {
            0 | 1 => uuid::Uuid::now_v7().to_string(),
            2 => {
                let mut id = uuid::Uuid::new_v4().to_string().into_bytes();
                let at = rng.random_range(0..id.len());
                id[at] = rng.random_range(b' '..=b'~');
                String::from_utf8_lossy(&id).into_owned()
            }
            _ => text(rng, 40),
        };
        properties = properties.with_message_id(ShortString::from(id));
    }
    if rng.random_bool(0.9) {
        let kind = match rng.random_range(0..4) {
            0..=1 => golden[rng.random_range(0..golden.len())].0.clone(),
            2 => {
                let mut kind = golden[rng.random_range(0..golden.len())].0.clone().into_bytes();
                kind = mutate(rng, kind);
                String::from_utf8_lossy(&kind).into_owned()
            }
            _ => text(rng, 30),
        };
        properties = properties.with_type(ShortString::from(kind));
    }
    if rng.random_bool(0.8) {
        properties = properties.with_headers(table(rng, 0));
    }
    properties
}

/// Properties parsed from a mutated AMQP content header (the parser lapin
/// runs on what the broker sends), when they still parse.
fn parsed(rng: &mut StdRng) -> Option<BasicProperties> {
    // Flags (headers, message_id, type), then their values in wire order:
    // a table with one `attempt`, two short strings.
    let mut frame = vec![0b0010_0000, 0b1010_0000];
    let mut entry = vec![7];
    entry.extend(b"attempt");
    entry.push(b'l');
    entry.extend(rng.random_range(-1i64..4).to_be_bytes());
    frame.extend(u32::try_from(entry.len()).unwrap_or(0).to_be_bytes());
    frame.extend(entry);
    for part in [uuid::Uuid::now_v7().to_string(), golden_type(rng)] {
        frame.push(u8::try_from(part.len()).unwrap_or(0));
        frame.extend(part.as_bytes());
    }
    let frame = mutate(rng, frame);
    let (_, parsed) = lapin::protocol::basic::parse_properties(frame.as_slice()).ok()?;
    Some(parsed)
}

fn golden_type(rng: &mut StdRng) -> String {
    const TYPES: [&str; 3] = [
        "shop.user.v1.UserCreated",
        "shop.user.v1.UserUpdated",
        "shop.order.v1.OrderCreated",
    ];
    TYPES[rng.random_range(0..TYPES.len())].to_owned()
}

/// The reason the consumer must give, from first principles.
fn expected(properties: &BasicProperties, body: &[u8]) -> Option<DeadLetterReason> {
    let id = properties.message_id().as_ref().map(|id| id.as_str());
    if id.and_then(|id| uuid::Uuid::try_parse(id).ok()).is_none() {
        return Some(DeadLetterReason::MissingMessageId);
    }
    let kind = properties.kind().as_ref().map_or("", |kind| kind.as_str());
    match shop_contracts::describe_event(kind, body) {
        None => Some(DeadLetterReason::UnknownType),
        Some(Err(_)) => Some(DeadLetterReason::Undecodable),
        Some(Ok(_)) => None,
    }
}

#[test]
fn every_delivery_is_accepted_with_its_headers_or_given_the_reason_of_its_first_fault() {
    let iterations: u64 = std::env::var("SHOP_FUZZ_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("SHOP_FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(rand::random);
    println!("randomized search: {iterations} deliveries, SHOP_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let golden = golden();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();

    for _ in 0..iterations {
        let properties = if rng.random_bool(0.1) {
            parsed(&mut rng).unwrap_or_else(|| properties(&mut rng, &golden))
        } else {
            properties(&mut rng, &golden)
        };
        let body = if rng.random_bool(0.5) {
            // The body of the type the message claims, when there is one.
            let kind = properties.kind().as_ref().map(|k| k.to_string());
            golden
                .iter()
                .find(|(name, _)| Some(name) == kind.as_ref())
                .map(|(_, body)| body.clone())
                .unwrap_or_default()
        } else {
            golden[rng.random_range(0..golden.len())].1.clone()
        };
        let body = if rng.random_bool(0.6) {
            mutate(&mut rng, body)
        } else {
            body
        };

        let outcome = shop_messaging::consumer::inspect_delivery(&properties, "ex", "rk", &body);

        let expected = expected(&properties, &body);
        match (&outcome, expected) {
            (Err(reason), Some(expected)) => assert_eq!(*reason, expected, "{properties:?}"),
            (Ok(meta), None) => {
                let headers = properties.headers().clone().unwrap_or_default();
                let text = |key| wire::header_str(&headers, key).map(str::to_owned);
                assert_eq!(
                    meta.exchange,
                    text(wire::ORIGINAL_EXCHANGE).unwrap_or_else(|| "ex".to_owned())
                );
                assert_eq!(
                    meta.routing_key,
                    text(wire::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| "rk".to_owned())
                );
                assert_eq!(meta.aggregate_id, text(wire::AGGREGATE_ID));
                assert_eq!(
                    meta.aggregate_version,
                    wire::header_i64(&headers, wire::AGGREGATE_VERSION)
                );
                assert!(meta.attempt >= 1);
                let id = properties.message_id().as_ref().map(|id| id.to_string());
                assert_eq!(
                    id.and_then(|id| uuid::Uuid::try_parse(&id).ok()),
                    Some(meta.event_id)
                );
            }
            (outcome, expected) => panic!("got {outcome:?}, expected {expected:?} for {properties:?}"),
        }
        let key = match &outcome {
            Ok(_) => "accepted".to_owned(),
            Err(reason) => reason.to_string(),
        };
        *outcomes.entry(key).or_default() += 1;
    }
    println!("outcomes: {outcomes:?}");
    assert!(
        iterations < 1000 || outcomes.len() == 4,
        "every outcome reached: {outcomes:?}"
    );
}
