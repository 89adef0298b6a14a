//! The projection of users, fed by the user service's events.
//!
//! Every event carries the user's aggregate version; a row is only ever
//! moved to a higher version (`ON CONFLICT … DO UPDATE … WHERE version <
//! excluded.version`), so a repeated event, or one that arrives after a newer
//! one (an update before its create), changes nothing, and the final state
//! is the state of the highest version whatever the arrival order. A
//! deletion leaves a tombstone (`deleted = true`) so that a late create or
//! update cannot bring the user back.
//!
//! It keeps only what the order service decides by: that a user exists, at
//! which version, and whether it was deleted. The events' emails and names
//! are never stored (nothing here reads them), so a `UserDeleted` leaves no
//! personal data in the projection; the consumer's parked events of a user
//! are deleted as its position passes them, and its ledger holds ids only.

use diesel::ExpressionMethods as _;
use diesel::query_dsl::methods::FilterDsl as _;
use diesel::sql_types::{self, Array, BigInt};
use diesel::upsert::excluded;
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use shop_contracts::user::{UserCreated, UserDeleted, UserSnapshot, UserUpdated};
use shop_database::prepared;
use shop_messaging::consumer::{EventMeta, Handler, HandlerError};
use uuid::Uuid;

use crate::schema::known_users;

/// Applies `user.created`, `user.updated`, `user.deleted` and
/// `user.snapshot` to `known_users`.
///
/// Batches are applied with one statement per run of events: within a run
/// only the highest version of each user matters (the version guard would
/// discard the others anyway), which also keeps a multi-row upsert from
/// touching one row twice.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserProjection;

/// What a created or updated event changes in the projection.
struct UserState {
    id: Uuid,
    version: i64,
}

fn user_id(value: &str, version: i64) -> Result<Uuid, HandlerError> {
    if version < 1 {
        return Err(HandlerError::permanent(anyhow::anyhow!(
            "event version {version} is not positive"
        )));
    }
    Uuid::try_parse(value)
        .map_err(|_| HandlerError::permanent(anyhow::anyhow!("user_id {value:?} is not a UUID")))
}

/// The highest version of each user, in order of first appearance.
fn latest<T>(items: Vec<T>, key: impl Fn(&T) -> (Uuid, i64)) -> Vec<T> {
    let mut position: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    let mut kept: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        let (id, version) = key(&item);
        match position.get(&id) {
            Some(&at) if key(&kept[at]).1 >= version => {}
            Some(&at) => kept[at] = item,
            None => {
                position.insert(id, kept.len());
                kept.push(item);
            }
        }
    }
    kept
}

/// Moves each user to its version with its state, unless it is already
/// there or beyond; one statement.
#[tracing::instrument(name = "projection.upsert_user", skip_all, fields(db.system = "postgresql", users = states.len()))]
async fn upsert(conn: &mut AsyncPgConnection, states: Vec<UserState>) -> Result<(), HandlerError> {
    let states = latest(states, |state| (state.id, state.version));
    let ids: Vec<Uuid> = states.iter().map(|state| state.id).collect();
    let versions: Vec<i64> = states.iter().map(|state| state.version).collect();
    // Arrays rather than a list of rows: the statement's text is the same
    // for any batch, so the connection keeps it prepared.
    let applied = prepared(
        diesel::sql_query(
            "INSERT INTO known_users (user_id, version, deleted) \
             SELECT u.id, u.version, false \
             FROM unnest($1::uuid[], $2::bigint[]) AS u(id, version) \
             ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, updated_at = now() \
             WHERE known_users.version < excluded.version",
        )
        .bind::<Array<sql_types::Uuid>, _>(&ids)
        .bind::<Array<BigInt>, _>(&versions),
    )
    .execute(conn)
    .await?;
    if applied < states.len() {
        tracing::debug!(stale = states.len() - applied, "stale user events ignored");
    }
    Ok(())
}

fn states<E>(
    events: Vec<(E, EventMeta)>,
    parts: impl Fn(E) -> (String, i64),
) -> Result<Vec<UserState>, HandlerError> {
    events
        .into_iter()
        .map(|(event, _)| {
            let (id, version) = parts(event);
            Ok(UserState {
                id: user_id(&id, version)?,
                version,
            })
        })
        .collect()
}

#[async_trait::async_trait]
impl Handler<UserCreated> for UserProjection {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserCreated,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.handle_batch(conn, vec![(event, meta.clone())]).await
    }

    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(UserCreated, EventMeta)>,
    ) -> Result<(), HandlerError> {
        let states = states(events, |e| (e.user_id, e.version))?;
        upsert(conn, states).await
    }
}

#[async_trait::async_trait]
impl Handler<UserUpdated> for UserProjection {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserUpdated,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.handle_batch(conn, vec![(event, meta.clone())]).await
    }

    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(UserUpdated, EventMeta)>,
    ) -> Result<(), HandlerError> {
        let states = states(events, |e| (e.user_id, e.version))?;
        upsert(conn, states).await
    }
}

#[async_trait::async_trait]
impl Handler<UserDeleted> for UserProjection {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserDeleted,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.handle_batch(conn, vec![(event, meta.clone())]).await
    }

    #[tracing::instrument(name = "projection.delete_user", skip_all, fields(db.system = "postgresql", users = events.len()))]
    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(UserDeleted, EventMeta)>,
    ) -> Result<(), HandlerError> {
        let deletions: Vec<(Uuid, i64)> = events
            .into_iter()
            .map(|(event, _)| Ok((user_id(&event.user_id, event.version)?, event.version)))
            .collect::<Result<_, HandlerError>>()?;
        let deletions = latest(deletions, |deletion| *deletion);
        let rows: Vec<_> = deletions
            .iter()
            .map(|(id, version)| {
                (
                    known_users::user_id.eq(*id),
                    known_users::version.eq(*version),
                    known_users::deleted.eq(true),
                )
            })
            .collect();
        diesel::insert_into(known_users::table)
            .values(rows)
            .on_conflict(known_users::user_id)
            .do_update()
            .set((
                known_users::version.eq(excluded(known_users::version)),
                known_users::deleted.eq(true),
                known_users::updated_at.eq(diesel::dsl::now),
            ))
            .filter(known_users::version.lt(excluded(known_users::version)))
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// A snapshot is the user's whole state at its version: the row moves to
/// it, deleted or not as the snapshot says (a snapshot the consumer takes
/// past a gap, or after missed events, sets what they would have). The
/// version guard keeps a lower snapshot from moving anything back.
#[async_trait::async_trait]
impl Handler<UserSnapshot> for UserProjection {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserSnapshot,
        meta: &EventMeta,
    ) -> Result<(), HandlerError> {
        self.handle_batch(conn, vec![(event, meta.clone())]).await
    }

    #[tracing::instrument(name = "projection.snapshot_user", skip_all, fields(db.system = "postgresql", users = events.len()))]
    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<(UserSnapshot, EventMeta)>,
    ) -> Result<(), HandlerError> {
        let snapshots: Vec<(Uuid, i64, bool)> = events
            .into_iter()
            .map(|(event, _)| {
                Ok((
                    user_id(&event.user_id, event.version)?,
                    event.version,
                    event.deleted,
                ))
            })
            .collect::<Result<_, HandlerError>>()?;
        let snapshots = latest(snapshots, |(id, version, _)| (*id, *version));
        let ids: Vec<Uuid> = snapshots.iter().map(|(id, _, _)| *id).collect();
        let versions: Vec<i64> = snapshots.iter().map(|(_, version, _)| *version).collect();
        let deleted: Vec<bool> = snapshots.iter().map(|(_, _, deleted)| *deleted).collect();
        prepared(
            diesel::sql_query(
                "INSERT INTO known_users (user_id, version, deleted) \
                 SELECT u.id, u.version, u.deleted \
                 FROM unnest($1::uuid[], $2::bigint[], $3::bool[]) AS u(id, version, deleted) \
                 ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, deleted = excluded.deleted, \
                   updated_at = now() \
                 WHERE known_users.version < excluded.version",
            )
            .bind::<Array<sql_types::Uuid>, _>(&ids)
            .bind::<Array<BigInt>, _>(&versions)
            .bind::<Array<sql_types::Bool>, _>(&deleted),
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::latest;
    use uuid::Uuid;

    #[test]
    fn latest_keeps_the_highest_version_of_each_user_in_first_seen_order() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let kept = latest(vec![(a, 1), (b, 3), (a, 3), (b, 2), (a, 2)], |item| *item);
        assert_eq!(kept, [(a, 3), (b, 3)]);
    }
}
