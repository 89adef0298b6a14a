//! RabbitMQ for the services, with lapin.
//!
//! - [`connection`]: connecting with a name, over TLS for `amqps://`
//!   ([`AmqpConfig`]).
//! - [`wire`]: the wire contract of an event (AMQP properties and headers),
//!   written by the outbox relay and read by consumers, and the trace context
//!   carried in the headers.
//! - [`signing`]: who may publish: the producer's Ed25519 signature of
//!   every event, made by the relay and checked by consumers before
//!   anything else; [`seal`]: the consumer's own bookkeeping headers count
//!   only on copies it sealed.
//! - [`topology`]: every exchange and queue the system declares, in one
//!   place, each option written out.
//! - [`consumer`]: typed subscriptions (`subscribe::<UserCreated>(handler)`)
//!   applied with an [`inbox`] in batches, delayed retries and dead letters,
//!   each aggregate's events once and in order ([`sequence`]), over
//!   partition queues the replicas share ([`membership`]); a gap past its
//!   timeout asks the producer for snapshots through [`resync`].
#![forbid(unsafe_code)]

pub mod connection;
pub mod consumer;
pub mod dlq;
pub mod inbox;
pub mod membership;
pub mod resync;
pub mod seal;
pub mod sequence;
pub mod signing;
pub mod topology;
pub mod wire;

pub use connection::{AmqpConfig, Timeout, within};
