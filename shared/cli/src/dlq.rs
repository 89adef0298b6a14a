//! `shop dlq`: the dead-letter queue of a consumer, and the events of its
//! aggregates parked behind dead letters and gaps (in the consumer's
//! database; see `shop_messaging::sequence`).

use diesel_async::AsyncPgConnection;
use serde_json::json;
use shop_database::DatabaseConfig;
use shop_messaging::dlq::{DeadLetter, DeadLetters, Released, Selection, Skipped, Summary};
use shop_messaging::sequence::{self, Aggregate, Held};

use crate::args::{Connection, DlqCommand};
use crate::output::Output;

/// Runs a dead-letter command and prints its outcome.
pub(crate) async fn run(connection: &Connection, command: DlqCommand, output: &Output) -> anyhow::Result<()> {
    let dead_letters = DeadLetters::connect(&connection.amqp(), &connection.queue).await?;
    let mut database = DatabaseConfig::new("");
    database.url = connection.consumer_database();
    let outcome = execute(&dead_letters, &database, &connection.queue, command, output).await;
    dead_letters.close().await;
    outcome
}

/// The consumer's database, for what is parked.
async fn consumer_database(database: &DatabaseConfig) -> anyhow::Result<AsyncPgConnection> {
    shop_database::establish(database)
        .await
        .map_err(|error| anyhow::anyhow!("the consumer's database (CONSUMER_DATABASE_URL): {error}"))
}

async fn execute(
    dead_letters: &DeadLetters,
    database: &DatabaseConfig,
    queue: &str,
    command: DlqCommand,
    output: &Output,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::List => {
            let letters = dead_letters.browse().await?;
            let summary = Summary::of(&letters);
            let mut text = format!("{}: {} dead letter(s)", dead_letters.name(), summary.count);
            for (reason, count) in &summary.by_reason {
                text.push_str(&format!("\n  reason {reason}: {count}"));
            }
            for (type_name, count) in &summary.by_type {
                text.push_str(&format!("\n  type {type_name}: {count}"));
            }
            let (held, conflicts) = match consumer_database(database).await {
                Ok(mut conn) => (
                    Ok(sequence::held(&mut conn, queue).await?),
                    Ok(sequence::conflicts(&mut conn, queue).await?),
                ),
                Err(error) => (Err(anyhow::anyhow!("{error:#}")), Err(error)),
            };
            let parked_json = match &held {
                Ok(held) => {
                    let events: usize = held.iter().map(|h| h.parked.len()).sum();
                    text.push_str(&format!(
                        "\nparked: {} aggregate(s), {events} event(s)",
                        held.len()
                    ));
                    for held in held {
                        text.push_str(&format!("\n  {}", describe_held(held)));
                    }
                    json!(held.iter().map(held_json).collect::<Vec<_>>())
                }
                Err(error) => {
                    text.push_str(&format!("\nparked: unknown ({error:#})"));
                    json!(null)
                }
            };
            let conflicts_json = match &conflicts {
                Ok(conflicts) => {
                    text.push_str(&format!("\nversion conflicts: {}", conflicts.len()));
                    for conflict in conflicts {
                        text.push_str(&format!("\n  {}", describe_conflict(conflict)));
                    }
                    json!(conflicts.iter().map(conflict_json).collect::<Vec<_>>())
                }
                Err(error) => {
                    text.push_str(&format!("\nversion conflicts: unknown ({error:#})"));
                    json!(null)
                }
            };
            output.value(
                json!({
                    "queue": dead_letters.name(),
                    "count": summary.count,
                    "by_reason": summary.by_reason,
                    "by_type": summary.by_type,
                    "parked": parked_json,
                    "version_conflicts": conflicts_json,
                }),
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
            let mut text = describe(&letter);
            let mut value = letter_json(&letter);
            if let Some((aggregate, _)) = &letter.sequenced {
                match followers(database, queue, aggregate).await {
                    Ok(Some(held)) => {
                        text.push_str(&format!("\nparked behind it: {}", describe_held(&held)));
                        value["parked"] = held_json(&held);
                    }
                    Ok(None) => text.push_str("\nparked behind it: nothing"),
                    Err(error) => text.push_str(&format!("\nparked behind it: unknown ({error:#})")),
                }
            }
            output.value(value, &text);
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
        DlqCommand::Skip { message_id } => {
            let mut conn = consumer_database(database).await?;
            let Skipped { removed, released } = dead_letters.skip(&mut conn, &message_id).await?;
            output.value(
                json!({"skipped": message_id, "removed": removed, "released": released}),
                &format!("skipped {message_id}: removed {removed} dead letter(s), released {released} parked event(s)"),
            );
        }
        DlqCommand::Release { aggregate } => {
            let aggregate: Aggregate = aggregate.parse().map_err(anyhow::Error::msg)?;
            let mut conn = consumer_database(database).await?;
            let Released {
                from_version,
                through_version,
                released,
            } = dead_letters.release(&mut conn, &aggregate).await?;
            let text = if through_version > from_version {
                format!(
                    "{aggregate}: gave up on versions {} to {through_version}; released {released} parked event(s)",
                    from_version + 1,
                )
            } else {
                format!(
                    "{aggregate}: nothing to give up at version {from_version}; sent {released} parked event(s) again"
                )
            };
            output.value(
                json!({"aggregate": aggregate.to_string(), "from_version": from_version, "through_version": through_version, "released": released}),
                &text,
            );
        }
        DlqCommand::SetPosition { aggregate, version } => {
            let aggregate: Aggregate = aggregate.parse().map_err(anyhow::Error::msg)?;
            let mut conn = consumer_database(database).await?;
            let (before, released) = sequence::set_position(&mut conn, queue, &aggregate, version).await?;
            dead_letters.send_back(&released).await?;
            sequence::mark_sent(&mut conn, queue, &released).await?;
            output.value(
                json!({"aggregate": aggregate.to_string(), "from_version": before.last_version, "version": version, "released": released.len()}),
                &format!(
                    "{aggregate}: position set from version {} to {version}; released {} parked event(s)",
                    before.last_version,
                    released.len()
                ),
            );
        }
        DlqCommand::Purge { yes } => {
            anyhow::ensure!(yes, "purge deletes every dead letter; pass --yes to confirm");
            let mut conn = consumer_database(database).await?;
            let purged = dead_letters.purge_unless_held(&mut conn).await?;
            output.value(
                json!({"purged": purged}),
                &format!("purged {purged} dead letter(s) from {}", dead_letters.name()),
            );
        }
    }
    Ok(())
}

/// The parked events of `aggregate`, if any.
async fn followers(
    database: &DatabaseConfig,
    queue: &str,
    aggregate: &Aggregate,
) -> anyhow::Result<Option<Held>> {
    let mut conn = consumer_database(database).await?;
    Ok(sequence::held(&mut conn, queue)
        .await?
        .into_iter()
        .find(|held| held.aggregate == *aggregate))
}

/// One line: the aggregate, where it stands, what holds it, what waits.
fn describe_held(held: &Held) -> String {
    let versions: Vec<String> = held.parked.iter().map(|p| p.version.to_string()).collect();
    let since = held
        .parked
        .first()
        .map(|p| chrono::Utc::now() - p.parked_at)
        .map_or_else(String::new, |age| format!(" since {}s", age.num_seconds()));
    let holder = match held.position.dead_letter {
        Some((event, version)) => format!("behind dead letter {event} (version {version})"),
        None => format!("waiting for version {} (a gap)", held.position.last_version + 1),
    };
    let action = held.gap_action.as_ref().map_or_else(String::new, |action| {
        format!(
            "; gap policy {}: {} {}s ago",
            action.action,
            action.outcome.as_deref().unwrap_or("started"),
            (chrono::Utc::now() - action.at).num_seconds()
        )
    });
    format!(
        "{} at version {}, {holder}: version(s) {} parked{since}{action}",
        held.aggregate,
        held.position.last_version,
        versions.join(", ")
    )
}

/// One line: the aggregate, the version both events claim, which was
/// applied and which was not.
fn describe_conflict(conflict: &sequence::Conflict) -> String {
    format!(
        "{} version {}: {} {} not applied, {} was applied at that version ({}s ago)",
        conflict.aggregate,
        conflict.version,
        conflict.event_type,
        conflict.event_id,
        conflict.applied_event,
        (chrono::Utc::now() - conflict.seen_at).num_seconds()
    )
}

fn conflict_json(conflict: &sequence::Conflict) -> serde_json::Value {
    json!({
        "aggregate": conflict.aggregate.to_string(),
        "version": conflict.version,
        "message_id": conflict.event_id.to_string(),
        "type": conflict.event_type,
        "applied_message_id": conflict.applied_event.to_string(),
        "seen_at": conflict.seen_at.to_rfc3339(),
    })
}

fn held_json(held: &Held) -> serde_json::Value {
    json!({
        "aggregate": held.aggregate.to_string(),
        "last_version": held.position.last_version,
        "dead_letter": held.position.dead_letter.map(|(event, version)| json!({"message_id": event.to_string(), "version": version})),
        "gap_action": held.gap_action.as_ref().map(|action| json!({"policy": action.action, "outcome": action.outcome, "at": action.at.to_rfc3339()})),
        "parked": held.parked.iter().map(|p| json!({
            "version": p.version,
            "message_id": p.event_id.to_string(),
            "type": p.event_type,
            "parked_at": p.parked_at.to_rfc3339(),
            "released_at": p.released_at.map(|t| t.to_rfc3339()),
        })).collect::<Vec<_>>(),
    })
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
        "aggregate": letter.sequenced.as_ref().map(|(aggregate, _)| aggregate.to_string()),
        "version": letter.sequenced.as_ref().map(|(_, version)| version),
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
