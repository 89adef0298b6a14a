//! One client call is one trace: spans exported over OTLP by both services
//! (in this process) to a collector inside the test, then checked for their
//! names, kinds, attributes and parents.
//!
//! This binary installs the process-wide telemetry once, with an exporter
//! to the collector, and runs every test on one shared runtime (the
//! exporter lives on it).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub, dead_code)]

#[path = "../system/system.rs"]
mod system;

mod collector;
mod flows;
