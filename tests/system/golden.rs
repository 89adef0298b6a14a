//! Golden encoded events: bytes produced by the released contract must decode
//! with today's code to the same values, and today's code must encode the
//! same values to the same bytes. Together with `buf breaking` against
//! `proto/baseline.binpb`, this catches a renumbered, retyped or removed
//! field before it reaches a consumer.
//!
//! A new event gets its golden file with `UPDATE_GOLDEN=1 cargo test -p
//! system-tests golden`, which writes only files that do not exist yet.
//! Existing files are never rewritten: changing one is a breaking change.

use std::path::PathBuf;

use system_tests::samples;

fn golden_path(type_name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{type_name}.binpb"))
}

#[test]
fn every_event_type_has_a_sample_and_a_golden_file() {
    let samples = samples::all();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for event in shop_contracts::all_event_types() {
        let sample = samples
            .iter()
            .find(|s| s.type_name == event.type_name)
            .unwrap_or_else(|| panic!("no sample for {} in tests/support/samples.rs", event.type_name));
        let path = golden_path(event.type_name);
        if !path.exists() && update {
            std::fs::write(&path, &sample.encoded).unwrap();
        }
        assert!(
            path.exists(),
            "missing golden file {}: run UPDATE_GOLDEN=1 cargo test -p system-tests golden and commit it",
            path.display()
        );
    }
}

#[test]
fn golden_events_decode_to_their_samples_and_encode_back_to_the_same_bytes() {
    for sample in samples::all() {
        let path = golden_path(sample.type_name);
        let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let decoded = (sample.decodes_to_sample)(&golden)
            .unwrap_or_else(|e| panic!("{} no longer decodes: {e}", sample.type_name));
        assert!(
            decoded,
            "{} decodes to other values than its sample",
            sample.type_name
        );
        assert_eq!(
            sample.encoded, golden,
            "{} encodes differently from its golden file",
            sample.type_name
        );
    }
}
