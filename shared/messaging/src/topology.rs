//! Every exchange and queue the system declares, in one place.
//!
//! Declarations are idempotent: each service declares what it publishes to
//! and consumes from at start-up and after every reconnect, so a fresh
//! broker (or one that lost its definitions) is set up without a separate
//! step. The options are the same everywhere a name is declared; declaring an
//! existing name with other options is a channel error, which is why they
//! live here only.

use lapin::Channel;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;

/// Declares the topic exchange a service publishes its events to
/// (`user.events`, `order.events`).
pub async fn declare_event_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                // Only check that it exists: no, create it when missing.
                passive: false,
                // Survives a broker restart.
                durable: true,
                // Stays when no queue is bound: events of a producer without
                // consumers are dropped by the broker, not an error.
                auto_delete: false,
                // Publishers use it directly.
                internal: false,
                // Wait for declare-ok so errors surface here.
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
}
