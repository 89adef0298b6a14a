//! Support for the cross-service tests in `system/`: sample events with
//! fixed values, shared by the golden-file check.
#![forbid(unsafe_code)]

pub mod samples;
