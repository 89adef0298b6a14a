//! `shop dlq`: the dead-letter queue of a consumer.

use serde_json::json;
use shop_messaging::AmqpConfig;
use shop_messaging::dlq::{DeadLetter, DeadLetters, Selection};

use crate::args::{Connection, DlqCommand};
use crate::output::Output;

/// Runs a dead-letter command and prints its outcome.
pub(crate) async fn run(connection: &Connection, command: DlqCommand, output: &Output) -> anyhow::Result<()> {
    let mut amqp = AmqpConfig::new(connection.amqp_url.clone());
    amqp.ca_file.clone_from(&connection.amqp_ca_file);
    let dead_letters = DeadLetters::connect(&amqp, &connection.queue).await?;
    let outcome = execute(&dead_letters, command, output).await;
    dead_letters.close().await;
    outcome
}

async fn execute(dead_letters: &DeadLetters, command: DlqCommand, output: &Output) -> anyhow::Result<()> {
    match command {
        DlqCommand::List => {
            let summary = dead_letters.summary().await?;
            let mut text = format!("{}: {} dead letter(s)", dead_letters.name(), summary.count);
            for (reason, count) in &summary.by_reason {
                text.push_str(&format!("\n  reason {reason}: {count}"));
            }
            for (type_name, count) in &summary.by_type {
                text.push_str(&format!("\n  type {type_name}: {count}"));
            }
            output.value(
                json!({"queue": dead_letters.name(), "count": summary.count, "by_reason": summary.by_reason, "by_type": summary.by_type}),
                &text,
            );
        }
        DlqCommand::Show { message_id } => {
            let Some(letter) = dead_letters.show(&message_id).await? else {
                anyhow::bail!(
                    "no dead letter with message id {message_id} in {}",
                    dead_letters.name()
                );
            };
            output.value(letter_json(&letter), &describe(&letter));
        }
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
            output.value(
                json!({"replayed": outcome.replayed, "kept": outcome.kept}),
                &format!("replayed {}, kept {}", outcome.replayed, outcome.kept),
            );
        }
        DlqCommand::Purge { yes } => {
            anyhow::ensure!(yes, "purge deletes every dead letter; pass --yes to confirm");
            let purged = dead_letters.purge().await?;
            output.value(
                json!({"purged": purged}),
                &format!("purged {purged} dead letter(s) from {}", dead_letters.name()),
            );
        }
    }
    Ok(())
}

fn body_text(letter: &DeadLetter) -> String {
    match letter
        .type_name
        .as_deref()
        .and_then(|type_name| shop_contracts::describe_event(type_name, &letter.body))
    {
        Some(Ok(event)) => event,
        Some(Err(error)) => format!("({} bytes that do not decode: {error})", letter.body.len()),
        None => format!("({} bytes of an unknown type)", letter.body.len()),
    }
}

fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    json!({
        "message_id": letter.message_id,
        "type": letter.type_name,
        "reason": letter.reason,
        "error": letter.error,
        "attempts": letter.attempts,
        "original_exchange": letter.original_exchange,
        "original_routing_key": letter.original_routing_key,
        "dead_lettered_at": letter.dead_lettered_at,
        "headers": letter.headers,
        "body": body_text(letter),
    })
}

/// A dead letter as text: its headers, then its body decoded by type.
fn describe(letter: &DeadLetter) -> String {
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
    text.push_str("body:\n");
    text.push_str(&body_text(letter));
    text
}
