//! The consumer's decoding path on arbitrary bytes: whatever arrives, the
//! check a message goes through before any handler either accepts it or
//! names a dead-letter reason; it never panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shop_messaging::consumer::inspect_any(data);
});
