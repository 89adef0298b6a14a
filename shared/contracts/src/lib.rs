//! The wire contracts of the system, generated from `proto/` at build time.
//!
//! This is the only crate that compiles protobuf: services, the client SDK and
//! the tests use the types from here, and [`tonic`] and [`prost`] are
//! re-exported so every crate speaks the same versions.
//!
//! - [`user`]: `shop.user.v1`, the user service and its events.
//! - [`order`]: `shop.order.v1`, the order service and its events.
//! - [`Event`]: binds each event message to its wire type name, its routing
//!   key and its aggregate, once, so no call site types those strings. The
//!   table is checked, as it compiles, against the `shop.options.v1.event`
//!   option each event message carries in its `.proto`
//!   ([`DECLARED_EVENTS`]): a routing key changed in one place only stops
//!   the build.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection.
#![forbid(unsafe_code)]

pub use prost;
pub use prost_types;
pub use tonic;

mod event;

pub use event::{
    DECLARED_EVENTS, DeclaredEvent, Event, EventIdentity, EventType, all_event_types, describe_event,
    identify_event,
};

/// Generated code, laid out by protobuf package.
pub mod shop {
    /// `shop.options.*`
    pub mod options {
        /// `shop.options.v1`: the custom options of the contracts
        /// (`EventOptions`, where an event message is published).
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shop.options.v1.rs"));
        }
    }

    /// `shop.order.*`
    pub mod order {
        /// `shop.order.v1`: the order service and the events it publishes.
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shop.order.v1.rs"));
        }
    }

    /// `shop.user.*`
    pub mod user {
        /// `shop.user.v1`: the user service and the events it publishes.
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/shop.user.v1.rs"));
        }
    }
}

pub use shop::order::v1 as order;
pub use shop::user::v1 as user;

/// Encoded `FileDescriptorSet` of every `.proto` in the system, with its
/// imports, comments and custom options, for `tonic-reflection`, for tools
/// that decode messages by name and for the contract bundle.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shop_descriptor");
