//! The command line of the `order-service` binary.

use clap::{Parser, Subcommand};
use shop_messaging::dlq::{DeadLetter, DeadLetters, Selection};

use crate::settings::Settings;

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
    /// Inspect and repair the dead-letter queue of the user events consumer.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count the dead letters, grouped by reason and by type.
    List,
    /// Print one dead letter: headers and decoded body.
    Show {
        /// Its message id (the event id).
        message_id: String,
    },
    /// Send dead letters back to the consumer's queue (all, or those matching every filter given).
    Replay {
        /// Only this reason: missing-message-id, unknown-type, undecodable, rejected, max-attempts.
        #[arg(long)]
        reason: Option<String>,
        /// Only this type, e.g. shop.user.v1.UserCreated.
        #[arg(long = "type")]
        type_name: Option<String>,
        /// Only this message id.
        #[arg(long)]
        message_id: Option<String>,
    },
    /// Delete every dead letter.
    Purge {
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs a dead-letter command and prints its outcome.
#[allow(clippy::print_stdout)] // a command-line report
pub async fn run_dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let dead_letters = DeadLetters::connect(&settings.amqp, &settings.consumer.queue).await?;
    let outcome = match command {
        DlqCommand::List => {
            let summary = dead_letters.summary().await?;
            println!("{}: {} dead letter(s)", dead_letters.name(), summary.count);
            for (reason, count) in &summary.by_reason {
                println!("  reason {reason}: {count}");
            }
            for (type_name, count) in &summary.by_type {
                println!("  type {type_name}: {count}");
            }
            Ok(())
        }
        DlqCommand::Show { message_id } => match dead_letters.show(&message_id).await? {
            Some(letter) => {
                println!("{}", describe(&letter));
                Ok(())
            }
            None => Err(anyhow::anyhow!(
                "no dead letter with message id {message_id} in {}",
                dead_letters.name()
            )),
        },
        DlqCommand::Replay {
            reason,
            type_name,
            message_id,
        } => {
            let outcome = dead_letters
                .replay(&Selection {
                    reason,
                    type_name,
                    message_id,
                })
                .await?;
            println!("replayed {}, kept {}", outcome.replayed, outcome.kept);
            Ok(())
        }
        DlqCommand::Purge { yes } => {
            if yes {
                let purged = dead_letters.purge().await?;
                println!("purged {purged} dead letter(s) from {}", dead_letters.name());
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "purge deletes every dead letter; pass --yes to confirm"
                ))
            }
        }
    };
    dead_letters.close().await;
    outcome
}

/// A dead letter as text: its headers, then its body decoded by type.
pub fn describe(letter: &DeadLetter) -> String {
    let mut text = format!(
        "message id: {}\ntype: {}\nreason: {}\n",
        letter.message_id.as_deref().unwrap_or("(none)"),
        letter.type_name.as_deref().unwrap_or("(none)"),
        letter.reason
    );
    text.push_str("headers:\n");
    for (key, value) in &letter.headers {
        text.push_str(&format!("  {key}: {value}\n"));
    }
    let body = match letter
        .type_name
        .as_deref()
        .and_then(|type_name| shop_contracts::describe_event(type_name, &letter.body))
    {
        Some(Ok(event)) => event,
        Some(Err(error)) => format!("({} bytes that do not decode: {error})", letter.body.len()),
        None => format!("({} bytes of an unknown type)", letter.body.len()),
    };
    text.push_str("body:\n");
    text.push_str(&body);
    text
}
