//! What the consumer does with a delivery before any handler sees it, on
//! arbitrary bytes: the first byte is the length of an AMQP content header's
//! property list (parsed with the parser lapin runs on what the broker
//! sends), the rest is the body. `inspect_delivery` is the function the
//! consumer's worker calls on every delivery (checks, then the handler's
//! metadata from the headers, and the trace context); whatever arrives, it
//! accepts the delivery or names a dead-letter reason, and never panics.
//! `inspect_any` also tries the body as every event type. (Random bytes
//! do not carry a valid signature, so they meet the signature check; the
//! randomized search in `shared/messaging/tests/decode.rs` signs its inputs
//! to reach the checks behind it.)
#![no_main]

use std::sync::OnceLock;

use shop_messaging::consumer::DeliveryChecks;

/// The consumer's checks with a key of the target's own and a seal.
fn checks() -> &'static DeliveryChecks {
    static CHECKS: OnceLock<DeliveryChecks> = OnceLock::new();
    CHECKS.get_or_init(|| {
        let (key, _) = shop_messaging::signing::SigningKey::generate("fuzz").expect("a new key");
        DeliveryChecks {
            trusted_keys: shop_messaging::signing::TrustedKeys::none().with_key(&key),
            seal: Some(shop_messaging::seal::SealKey::new(&[7; 32])),
            max_message_bytes: 65_536,
            accept_unsigned_until: None,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&length, rest)) = data.split_first() else {
        return;
    };
    let (header, body) = rest.split_at(usize::from(length).min(rest.len()));
    let properties = lapin::protocol::basic::parse_properties(header)
        .map(|(_, properties)| properties)
        .unwrap_or_default();
    let _ = shop_messaging::consumer::inspect_delivery(checks(), &properties, "exchange", "routing.key", body);
    shop_messaging::consumer::inspect_any(body);
});
