//! What the consumer does with a delivery before any handler sees it, on
//! arbitrary bytes: the first byte is the length of an AMQP content header's
//! property list (parsed with the parser lapin runs on what the broker
//! sends), the rest is the body. `inspect_delivery` is the function the
//! consumer's worker calls on every delivery (checks, then the handler's
//! metadata from the headers, and the trace context); whatever arrives, it
//! accepts the delivery or names a dead-letter reason, and never panics.
//! `inspect_any` also tries the body as every event type.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&length, rest)) = data.split_first() else {
        return;
    };
    let (header, body) = rest.split_at(usize::from(length).min(rest.len()));
    let properties = lapin::protocol::basic::parse_properties(header)
        .map(|(_, properties)| properties)
        .unwrap_or_default();
    let _ = shop_messaging::consumer::inspect_delivery(&properties, "exchange", "routing.key", body);
    shop_messaging::consumer::inspect_any(body);
});
