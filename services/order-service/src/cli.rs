//! The command line of the `order-service` binary. The dead-letter
//! commands are in the `shop` command line (`shop dlq …`).

use clap::{Parser, Subcommand};

/// The order service. Without a command it serves (gRPC, user events
/// consumer, outbox relay). Settings come from the environment (see the
/// README).
#[derive(Debug, Parser)]
#[command(name = "order-service", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server, the user events consumer and the outbox relay (the default).
    Serve,
    /// Run only the outbox relay (with RELAY_ENABLED=false on the servers).
    Relay,
    /// Exit 0 if the server at GRPC_ADDR reports SERVING (container health check).
    Healthcheck,
}
