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
//! the parser lapin uses. Some are well-formed events signed by the
//! producer's key (then sometimes changed after signing, or signed by a
//! stranger's key), some carry the consumer's seal over their bookkeeping
//! headers, some a forged one. Each outcome is checked against an oracle:
//! the dead-letter reason is the first check the input fails (the size, the
//! signature, which the oracle checks with its own canonical bytes and
//! `ring` directly, the id, the type, the body, the body against the
//! headers), and an accepted delivery carries the metadata its headers say,
//! its bookkeeping only when sealed.
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
use shop_messaging::consumer::DeliveryChecks;
use shop_messaging::seal::SealKey;
use shop_messaging::signing::{SigningKey, TrustedKeys};
use shop_messaging::wire::{self, DeadLetterReason};

/// What the search signs, trusts and seals with.
struct Keys {
    producer: SigningKey,
    stranger: SigningKey,
    seal: SealKey,
    checks: DeliveryChecks,
}

impl Keys {
    fn new() -> Self {
        let (producer, _) = SigningKey::generate("producer-1").unwrap();
        let (stranger, _) = SigningKey::generate("stranger-1").unwrap();
        let seal = SealKey::new(&[9; 32]);
        let checks = DeliveryChecks {
            trusted_keys: TrustedKeys::none().with_key(&producer),
            seal: Some(seal.clone()),
            max_message_bytes: 200,
            accept_unsigned_until: None,
        };
        Self {
            producer,
            stranger,
            seal,
            checks,
        }
    }
}

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
    const NAMES: [&str; 13] = [
        wire::ATTEMPT,
        wire::SIGNATURE,
        wire::SIGNATURE_KEY_ID,
        wire::SEAL,
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

/// A well-formed event of a golden type, its aggregate headers from its
/// body (sometimes one of them off), signed by the producer: the input
/// that reaches the deeper checks.
fn event(rng: &mut StdRng, golden: &[(String, Vec<u8>)], keys: &Keys) -> (BasicProperties, Vec<u8>) {
    let (kind, body) = golden[rng.random_range(0..golden.len())].clone();
    let identity = shop_contracts::identify_event(&kind, &body).unwrap().unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        wire::AGGREGATE_TYPE.into(),
        wire::long_string(identity.aggregate_type),
    );
    headers.insert(
        wire::AGGREGATE_ID.into(),
        wire::long_string(&identity.aggregate_id),
    );
    headers.insert(
        wire::AGGREGATE_VERSION.into(),
        AMQPValue::LongLongInt(identity.aggregate_version),
    );
    match rng.random_range(0..12) {
        0 => {
            headers.insert(wire::AGGREGATE_ID.into(), wire::long_string("someone-else"));
        }
        1 => {
            headers.insert(
                wire::AGGREGATE_VERSION.into(),
                AMQPValue::LongLongInt(identity.aggregate_version + 1),
            );
        }
        2 => {
            headers.insert(wire::AGGREGATE_TYPE.into(), wire::long_string("order"));
        }
        _ => {}
    }
    if rng.random_bool(0.3) {
        for name in [wire::ATTEMPT, wire::ORIGINAL_EXCHANGE, wire::ORIGINAL_ROUTING_KEY] {
            if rng.random_bool(0.5) {
                headers.insert(name.into(), value(rng, 0));
            }
        }
    }
    let id = if rng.random_bool(0.9) {
        uuid::Uuid::now_v7().to_string()
    } else {
        text(rng, 10)
    };
    let kind = if rng.random_bool(0.9) { kind } else { text(rng, 12) };
    let properties = BasicProperties::default()
        .with_message_id(ShortString::from(id))
        .with_type(ShortString::from(kind))
        .with_app_id("user-service".into())
        .with_headers(headers);
    let body = if rng.random_bool(0.1) {
        mutate(rng, body)
    } else {
        body
    };
    let signer = if rng.random_bool(0.9) {
        &keys.producer
    } else {
        &keys.stranger
    };
    let mut properties = signer.sign_properties(properties, &body).unwrap();
    match rng.random_range(0..10) {
        // Changed after signing: a body byte, the version, the producer.
        0 if !body.is_empty() => {
            let mut body = body;
            let at = rng.random_range(0..body.len());
            body[at] ^= 1;
            return (properties, body);
        }
        1 => {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(wire::AGGREGATE_VERSION.into(), AMQPValue::LongLongInt(i64::MAX));
            properties = properties.with_headers(headers);
        }
        2 => properties = properties.with_app_id("someone-else".into()),
        _ => {}
    }
    match rng.random_range(0..3) {
        // Sealed by the consumer (its bookkeeping believed).
        0 => {
            let mut headers = properties.headers().clone().unwrap_or_default();
            let id = properties.message_id().as_ref().map(|id| id.to_string());
            keys.seal.seal_into(id.as_deref(), &mut headers);
            properties = properties.with_headers(headers);
        }
        // A seal made up by a stranger.
        1 => {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(wire::SEAL.into(), wire::long_string("AAAA"));
            properties = properties.with_headers(headers);
        }
        _ => {}
    }
    (properties, body)
}

/// The producer's signature checked from first principles: the canonical
/// bytes as the wire contract documents them, verified with `ring`.
fn signed_by_producer(properties: &BasicProperties, body: &[u8], keys: &Keys) -> bool {
    let Some(headers) = properties.headers().as_ref() else {
        return false;
    };
    let long = |key: &str| match headers.inner().get(&ShortString::from(key)) {
        Some(AMQPValue::LongString(value)) => std::str::from_utf8(value.as_bytes()).ok(),
        _ => None,
    };
    let (Some(signature), Some(kid)) = (long(wire::SIGNATURE), long(wire::SIGNATURE_KEY_ID)) else {
        return false;
    };
    if kid != keys.producer.id() {
        return false;
    }
    let property = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    let (Some(id), Some(kind), Some(app)) = (
        property(properties.message_id()),
        property(properties.kind()),
        property(properties.app_id()),
    ) else {
        return false;
    };
    let (Some(aggregate_type), Some(aggregate_id), Some(version)) = (
        wire::header_str(headers, wire::AGGREGATE_TYPE),
        wire::header_str(headers, wire::AGGREGATE_ID),
        wire::header_i64(headers, wire::AGGREGATE_VERSION),
    ) else {
        return false;
    };
    let mut signed = Vec::new();
    for part in [
        &b"shop.event-signature.v1"[..],
        kid.as_bytes(),
        id.as_bytes(),
        kind.as_bytes(),
        aggregate_type.as_bytes(),
        aggregate_id.as_bytes(),
    ] {
        signed.extend((part.len() as u32).to_be_bytes());
        signed.extend(part);
    }
    signed.extend(version.to_be_bytes());
    for part in [app.as_bytes(), body] {
        signed.extend((part.len() as u32).to_be_bytes());
        signed.extend(part);
    }
    use base64::Engine as _;
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(signature) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, keys.producer.public_key())
        .verify(&signed, &signature)
        .is_ok()
}

/// The reason the consumer must give, from first principles.
fn expected(properties: &BasicProperties, body: &[u8], keys: &Keys) -> Option<DeadLetterReason> {
    if body.len() > keys.checks.max_message_bytes {
        return Some(DeadLetterReason::TooLarge);
    }
    if !signed_by_producer(properties, body, keys) {
        return Some(DeadLetterReason::Unauthenticated);
    }
    let id = properties.message_id().as_ref().map(|id| id.as_str());
    if id.and_then(|id| uuid::Uuid::try_parse(id).ok()).is_none() {
        return Some(DeadLetterReason::MissingMessageId);
    }
    let kind = properties.kind().as_ref().map_or("", |kind| kind.as_str());
    let identity = match shop_contracts::identify_event(kind, body) {
        None => return Some(DeadLetterReason::UnknownType),
        Some(Err(_)) => return Some(DeadLetterReason::Undecodable),
        Some(Ok(identity)) => identity,
    };
    let headers = properties.headers().clone().unwrap_or_default();
    let agrees = wire::header_str(&headers, wire::AGGREGATE_TYPE) == Some(identity.aggregate_type)
        && wire::header_str(&headers, wire::AGGREGATE_ID) == Some(identity.aggregate_id.as_str())
        && wire::header_i64(&headers, wire::AGGREGATE_VERSION) == Some(identity.aggregate_version);
    if !agrees {
        return Some(DeadLetterReason::Rejected);
    }
    None
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
    let keys = Keys::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();

    for _ in 0..iterations {
        if rng.random_bool(0.4) {
            let (properties, body) = event(&mut rng, &golden, &keys);
            check(&keys, &properties, &body, &mut outcomes);
            continue;
        }
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

        let body = if rng.random_bool(0.02) {
            // Over the size cap.
            let length = rng.random_range(150..400);
            bytes(&mut rng, length)
        } else {
            body
        };
        let properties = if rng.random_bool(0.3) {
            // Signed as it is: past the signature, into the other checks.
            keys.producer
                .sign_properties(properties.clone(), &body)
                .unwrap_or(properties)
        } else {
            properties
        };
        check(&keys, &properties, &body, &mut outcomes);
    }
    println!("outcomes: {outcomes:?}");
    assert!(
        iterations < 1000 || outcomes.len() == 7,
        "every outcome reached: {outcomes:?}"
    );
}

/// Runs the consumer's checks on one delivery and compares the outcome with
/// the oracle's.
fn check(keys: &Keys, properties: &BasicProperties, body: &[u8], outcomes: &mut BTreeMap<String, u64>) {
    let outcome = shop_messaging::consumer::inspect_delivery(&keys.checks, properties, "ex", "rk", body);
    let expected = expected(properties, body, keys);
    match (&outcome, expected) {
        (Err(reason), Some(expected)) => assert_eq!(*reason, expected, "{properties:?}"),
        (Ok(meta), None) => {
            let headers = properties.headers().clone().unwrap_or_default();
            let sealed = keys.seal.verify(properties);
            let text = |key| {
                sealed
                    .then(|| wire::header_str(&headers, key).map(str::to_owned))
                    .flatten()
            };
            assert_eq!(
                meta.exchange,
                text(wire::ORIGINAL_EXCHANGE).unwrap_or_else(|| "ex".to_owned())
            );
            assert_eq!(
                meta.routing_key,
                text(wire::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| "rk".to_owned())
            );
            assert_eq!(
                meta.aggregate_id.as_deref(),
                wire::header_str(&headers, wire::AGGREGATE_ID)
            );
            assert_eq!(
                meta.aggregate_version,
                wire::header_i64(&headers, wire::AGGREGATE_VERSION)
            );
            if !sealed {
                assert_eq!(meta.attempt, 1, "an unsealed attempt header is ignored");
            }
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
