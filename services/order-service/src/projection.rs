//! The projection of users, fed by the user service's events.
//!
//! Every event carries the user's aggregate version; a row is only ever
//! moved to a higher version (`ON CONFLICT … DO UPDATE … WHERE version <
//! excluded.version`), so a repeated event, or one that arrives after a newer
//! one (an update before its create), changes nothing, and the final state
//! is the state of the highest version whatever the arrival order. A
//! deletion leaves a tombstone (`deleted = true`) so that a late create or
//! update cannot bring the user back.

use diesel::ExpressionMethods as _;
use diesel::query_dsl::methods::FilterDsl as _;
use diesel::upsert::excluded;
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use shop_contracts::user::{UserCreated, UserDeleted, UserUpdated};
use shop_messaging::consumer::{EventMeta, Handler, HandlerError};
use uuid::Uuid;

use crate::schema::known_users;

/// Applies `user.created`, `user.updated` and `user.deleted` to `known_users`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserProjection;

fn user_id(value: &str, version: i64) -> Result<Uuid, HandlerError> {
    if version < 1 {
        return Err(HandlerError::permanent(anyhow::anyhow!(
            "event version {version} is not positive"
        )));
    }
    Uuid::try_parse(value)
        .map_err(|_| HandlerError::permanent(anyhow::anyhow!("user_id {value:?} is not a UUID")))
}

/// Moves the user to `version` with this state, unless it is already there
/// or beyond.
#[tracing::instrument(name = "projection.upsert_user", skip_all, fields(db.system = "postgresql", user.id = %id, user.version = version))]
async fn upsert(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    version: i64,
    email: &str,
    name: &str,
) -> Result<(), HandlerError> {
    let applied = diesel::insert_into(known_users::table)
        .values((
            known_users::user_id.eq(id),
            known_users::email.eq(email),
            known_users::name.eq(name),
            known_users::version.eq(version),
            known_users::deleted.eq(false),
        ))
        .on_conflict(known_users::user_id)
        .do_update()
        .set((
            known_users::email.eq(excluded(known_users::email)),
            known_users::name.eq(excluded(known_users::name)),
            known_users::version.eq(excluded(known_users::version)),
            known_users::updated_at.eq(diesel::dsl::now),
        ))
        .filter(known_users::version.lt(excluded(known_users::version)))
        .execute(conn)
        .await?;
    if applied == 0 {
        tracing::debug!("stale user event ignored");
    }
    Ok(())
}

#[async_trait::async_trait]
impl Handler<UserCreated> for UserProjection {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserCreated,
        _: &EventMeta,
    ) -> Result<(), HandlerError> {
        let id = user_id(&event.user_id, event.version)?;
        upsert(conn, id, event.version, &event.email, &event.name).await
    }
}

#[async_trait::async_trait]
impl Handler<UserUpdated> for UserProjection {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserUpdated,
        _: &EventMeta,
    ) -> Result<(), HandlerError> {
        let id = user_id(&event.user_id, event.version)?;
        upsert(conn, id, event.version, &event.email, &event.name).await
    }
}

#[async_trait::async_trait]
impl Handler<UserDeleted> for UserProjection {
    #[tracing::instrument(name = "projection.delete_user", skip_all, fields(db.system = "postgresql", user.id = %event.user_id, user.version = event.version))]
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        event: UserDeleted,
        _: &EventMeta,
    ) -> Result<(), HandlerError> {
        let id = user_id(&event.user_id, event.version)?;
        diesel::insert_into(known_users::table)
            .values((
                known_users::user_id.eq(id),
                known_users::version.eq(event.version),
                known_users::deleted.eq(true),
            ))
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
