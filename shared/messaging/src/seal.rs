//! The consumer's seal: its own bookkeeping headers count only on copies it
//! made itself.
//!
//! A consumer writes headers for itself on the copies it publishes: the
//! `attempt` a retry is on, `released`, `last_error`, `original_*`, and the
//! `dead_letter_*` of a dead letter ([`wire::BOOKKEEPING`]). Anyone who can
//! publish to the producer's exchange, or to a partition queue through the
//! default exchange, could write them too (a forged `attempt=99` would
//! dead-letter an event at once and park its aggregate's later events
//! behind it). So every copy the consumer makes carries [`SEAL`]: an
//! HMAC-SHA256, under a key of the consumer group's own, over
//!
//! | # | field |
//! |---|---|
//! | 1 | the tag `shop.consumer-seal.v1` |
//! | 2 | the AMQP `message_id` (empty when there is none) |
//! | 3 | the `signature` header (empty when there is none): the seal belongs to one signed event |
//! | 4 | each name of [`wire::BOOKKEEPING`], in that order, with its value: absent, a text, an integer (whatever integer type carries it), a boolean, or another type |
//!
//! (fields as in [`crate::signing`]: a 4-byte big-endian length and the
//! bytes; an integer as 8 bytes big-endian). On a delivery whose seal does
//! not check out (none, another key's, a changed value), every bookkeeping
//! header is ignored (the delivery is a first attempt, its exchange and
//! routing key are its own) and left out of any copy the consumer makes of
//! it. Seals are compared in constant time (`ring::hmac::verify`).
//!
//! # The key: in the consumer's database
//!
//! One random 32-byte key per consumer group, made by the first replica that
//! starts and kept in `consumer_seal_keys` ([`load_or_create`]): every
//! replica reads the same one, and nothing has to be provisioned or
//! rotated by hand. It guards nothing anyone with that database could not
//! change directly anyway. A key that is lost (the row deleted) only makes
//! the copies in flight count as first attempts.
//!
//! A parked event keeps its headers (texts, integers and booleans) in the
//! database and goes back with them and `released`: its seal still holds
//! when its bookkeeping is what was sealed. A dead letter replayed by `shop
//! dlq replay` sheds its attempt and dead-letter headers, so its seal no
//! longer matches and it starts over as a first attempt, which is what a
//! replay means.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use diesel::sql_types::{Binary, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use ring::hmac;

pub use crate::wire::SEAL;
use crate::wire::{self, BOOKKEEPING};

/// The first field of every sealed message.
const DOMAIN: &[u8] = b"shop.consumer-seal.v1";

/// A consumer group's sealing key.
#[derive(Clone)]
pub struct SealKey(hmac::Key);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(***)")
    }
}

impl SealKey {
    /// A key from its bytes (the consumer reads them from its database).
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The seal of `headers` for the message with `message_id`.
    pub fn seal(&self, message_id: Option<&str>, headers: &FieldTable) -> String {
        let tag = hmac::sign(&self.0, &sealed_bytes(message_id, headers));
        STANDARD.encode(tag.as_ref())
    }

    /// Whether `properties` carry a seal that checks out (compared in
    /// constant time).
    pub fn verify(&self, properties: &BasicProperties) -> bool {
        let Some(headers) = properties.headers().as_ref() else {
            return false;
        };
        let Some(seal) = wire::header_str(headers, SEAL).and_then(|seal| STANDARD.decode(seal).ok()) else {
            return false;
        };
        let message_id = properties.message_id().as_ref().map(ShortString::as_str);
        hmac::verify(&self.0, &sealed_bytes(message_id, headers), &seal).is_ok()
    }

    /// Puts the seal of `headers` in them (replacing any).
    pub fn seal_into(&self, message_id: Option<&str>, headers: &mut FieldTable) {
        let seal = self.seal(message_id, headers);
        headers.insert(SEAL.into(), wire::long_string(&seal));
    }
}

/// Removes every bookkeeping header and the seal: what is left of a
/// delivery whose seal does not check out before the consumer copies it.
pub fn strip(headers: &mut FieldTable) {
    let kept: Vec<(ShortString, AMQPValue)> = headers
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != SEAL && !BOOKKEEPING.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let mut table = FieldTable::default();
    for (key, value) in kept {
        table.insert(key, value);
    }
    *headers = table;
}

/// The bytes a seal covers (see the module docs).
fn sealed_bytes(message_id: Option<&str>, headers: &FieldTable) -> Vec<u8> {
    use crate::signing::push_field;
    let mut out = Vec::with_capacity(256);
    push_field(&mut out, DOMAIN);
    push_field(&mut out, message_id.unwrap_or_default().as_bytes());
    let signature = match headers.inner().get(&ShortString::from(wire::SIGNATURE)) {
        Some(AMQPValue::LongString(value)) => value.as_bytes(),
        _ => &[],
    };
    push_field(&mut out, signature);
    for name in BOOKKEEPING {
        push_field(&mut out, name.as_bytes());
        match headers.inner().get(&ShortString::from(name)) {
            None => out.push(b'-'),
            Some(AMQPValue::LongString(text)) => {
                out.push(b's');
                push_field(&mut out, text.as_bytes());
            }
            Some(AMQPValue::ShortString(text)) => {
                out.push(b's');
                push_field(&mut out, text.as_str().as_bytes());
            }
            Some(AMQPValue::Boolean(flag)) => {
                out.push(b'b');
                out.push(u8::from(*flag));
            }
            Some(value) => match integer(value) {
                Some(number) => {
                    out.push(b'i');
                    out.extend_from_slice(&number.to_be_bytes());
                }
                None => out.push(b'x'),
            },
        }
    }
    out
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?,
        _ => return None,
    })
}

diesel::table! {
    /// Each consumer group's sealing key (see the module docs).
    consumer_seal_keys (consumer) {
        consumer -> Text,
        seal_key -> Binary,
        created_at -> Timestamptz,
    }
}

/// Consumer group `consumer`'s sealing key, made (32 random bytes) if it
/// has none yet; replicas starting together end up with the same one.
pub async fn load_or_create(conn: &mut AsyncPgConnection, consumer: &str) -> anyhow::Result<SealKey> {
    let mut fresh = secrecy::zeroize::Zeroizing::new([0_u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), fresh.as_mut())
        .map_err(|_| anyhow::anyhow!("no randomness for the consumer's sealing key"))?;
    diesel::sql_query(
        "INSERT INTO consumer_seal_keys (consumer, seal_key) VALUES ($1, $2) ON CONFLICT (consumer) DO NOTHING",
    )
    .bind::<Text, _>(consumer)
    .bind::<Binary, _>(fresh.as_slice())
    .execute(conn)
    .await?;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Binary)]
        seal_key: Vec<u8>,
    }
    let row: Row = diesel::sql_query("SELECT seal_key FROM consumer_seal_keys WHERE consumer = $1")
        .bind::<Text, _>(consumer)
        .get_result(conn)
        .await?;
    let key = secrecy::zeroize::Zeroizing::new(row.seal_key);
    anyhow::ensure!(
        key.len() >= 32,
        "the sealing key of {consumer} is shorter than 32 bytes"
    );
    Ok(SealKey::new(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(key: &SealKey, attempt: i64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(wire::SIGNATURE.into(), wire::long_string("sig"));
        headers.insert(wire::ATTEMPT.into(), AMQPValue::LongLongInt(attempt));
        headers.insert(wire::ORIGINAL_EXCHANGE.into(), wire::long_string("user.events"));
        key.seal_into(Some("id-1"), &mut headers);
        BasicProperties::default()
            .with_message_id("id-1".into())
            .with_headers(headers)
    }

    fn with_header(properties: &BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(name.into(), value);
        properties.clone().with_headers(headers)
    }

    #[test]
    fn a_seal_checks_out_only_on_the_values_and_the_message_it_was_made_for() {
        let key = SealKey::new(&[1; 32]);
        let properties = sealed(&key, 2);
        assert!(key.verify(&properties));
        // Other integer types of the same value (a parked copy) still check out.
        assert!(key.verify(&with_header(&properties, wire::ATTEMPT, AMQPValue::ShortInt(2))));
        assert!(!key.verify(&with_header(
            &properties,
            wire::ATTEMPT,
            AMQPValue::LongLongInt(99)
        )));
        assert!(!key.verify(&with_header(
            &properties,
            wire::RELEASED,
            AMQPValue::Boolean(true)
        )));
        assert!(!key.verify(&with_header(
            &properties,
            wire::SIGNATURE,
            wire::long_string("other")
        )));
        assert!(!key.verify(&properties.clone().with_message_id("id-2".into())));
        assert!(!SealKey::new(&[2; 32]).verify(&properties));
        // Headers outside the bookkeeping (trace context) may change.
        assert!(key.verify(&with_header(
            &properties,
            "traceparent",
            wire::long_string("00-…")
        )));
        assert!(!key.verify(&BasicProperties::default()));
    }

    #[test]
    fn strip_leaves_everything_but_the_bookkeeping_and_the_seal() {
        let key = SealKey::new(&[1; 32]);
        let properties = sealed(&key, 2);
        let mut headers = properties.headers().clone().unwrap();
        strip(&mut headers);
        let names: Vec<&str> = headers.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(names, [wire::SIGNATURE]);
    }
}
