//! The user service's storage: every command is one transaction that changes
//! the `users` row and writes the event describing the change to the outbox.

use chrono::{DateTime, Utc};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable,
    SelectableHelper as _,
};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use shop_contracts::user as pb;
use shop_host::grpc::StaleVersion;
use uuid::Uuid;

use crate::error::Error;
use crate::schema::{create_user_requests, user_tombstones, users};

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = users)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct User {
    /// See `shop.user.v1.User`.
    pub id: Uuid,
    /// As given; unique case-insensitively.
    pub email: String,
    /// Trimmed display name.
    pub name: String,
    /// 1 after creation, +1 per change.
    pub version: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<User> for pb::User {
    fn from(user: User) -> Self {
        Self {
            id: user.id.to_string(),
            email: user.email,
            name: user.name,
            version: user.version,
            created_at: Some(timestamp(user.created_at)),
            updated_at: Some(timestamp(user.updated_at)),
        }
    }
}

/// The protobuf timestamp of a database time.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::from(time))
}

use shop_contracts::prost_types;

/// A validated `CreateUser`.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Checked email.
    pub email: String,
    /// Trimmed name.
    pub name: String,
    /// Idempotency key, when the client sent one.
    pub request_id: Option<Uuid>,
}

/// A validated `UpdateUser`.
#[derive(Debug, Clone)]
pub struct UserChange {
    /// The user.
    pub id: Uuid,
    /// The version the caller saw.
    pub expected_version: i64,
    /// New email, if it changes.
    pub email: Option<String>,
    /// New name, if it changes.
    pub name: Option<String>,
}

/// Creates a user and its `UserCreated` event, or returns the user a previous
/// call with the same request id created.
#[tracing::instrument(name = "db.create_user", skip_all, fields(db.system = "postgresql", user.id))]
pub async fn create_user(conn: &mut AsyncPgConnection, new: &NewUser) -> Result<User, Error> {
    conn.transaction(async |conn| {
        let id = Uuid::now_v7();
        if let Some(request_id) = new.request_id {
            let claimed = diesel::insert_into(create_user_requests::table)
                .values((
                    create_user_requests::request_id.eq(request_id),
                    create_user_requests::user_id.eq(id),
                    create_user_requests::email.eq(&new.email),
                    create_user_requests::name.eq(&new.name),
                ))
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            if claimed == 0 {
                return repeated_create(conn, request_id, new).await;
            }
        }
        let now = Utc::now();
        let event = pb::UserCreated {
            user_id: id.to_string(),
            version: 1,
            email: new.email.clone(),
            name: new.name.clone(),
            occurred_at: Some(timestamp(now)),
        };
        // The row and its event in one round trip: both statements are sent
        // before either answer is awaited, and run in that order.
        let insert = diesel::insert_into(users::table)
            .values((
                users::id.eq(id),
                users::email.eq(&new.email),
                users::name.eq(&new.name),
                users::version.eq(1),
                users::created_at.eq(now),
                users::updated_at.eq(now),
            ))
            .returning(User::as_returning())
            .get_result::<User>(&mut &*conn);
        let (user, enqueued) = futures::join!(insert, shop_outbox::enqueue(&*conn, &event));
        let user = user?;
        enqueued?;
        tracing::Span::current().record("user.id", tracing::field::display(user.id));
        Ok(user)
    })
    .await
}

/// The answer to a `CreateUser` whose request id was seen before.
async fn repeated_create(
    conn: &mut AsyncPgConnection,
    request_id: Uuid,
    new: &NewUser,
) -> Result<User, Error> {
    let (user_id, email, name): (Uuid, String, String) = create_user_requests::table
        .find(request_id)
        .select((
            create_user_requests::user_id,
            create_user_requests::email,
            create_user_requests::name,
        ))
        .first(conn)
        .await?;
    if email != new.email || name != new.name {
        return Err(Error::RequestIdReused(request_id));
    }
    find(conn, user_id)
        .await?
        .ok_or(Error::CreatedUserDeleted { request_id, user_id })
}

/// Changes a user's email and/or name and writes `UserUpdated`; a change that
/// changes nothing returns the user as it is, with no new version or event.
#[tracing::instrument(name = "db.update_user", skip_all, fields(db.system = "postgresql", user.id = %change.id))]
pub async fn update_user(conn: &mut AsyncPgConnection, change: &UserChange) -> Result<User, Error> {
    conn.transaction(async |conn| {
        let current = lock(conn, change.id, change.expected_version).await?;
        let email = change.email.clone().unwrap_or_else(|| current.email.clone());
        let name = change.name.clone().unwrap_or_else(|| current.name.clone());
        if email == current.email && name == current.name {
            return Ok(current);
        }
        let now = Utc::now();
        let event = pb::UserUpdated {
            user_id: change.id.to_string(),
            version: current.version + 1,
            email: email.clone(),
            name: name.clone(),
            occurred_at: Some(timestamp(now)),
        };
        // The row is locked (see `lock`), so sending the event with the
        // update keeps outbox order equal to commit order.
        let update = diesel::update(users::table.find(change.id))
            .set((
                users::email.eq(&email),
                users::name.eq(&name),
                users::version.eq(current.version + 1),
                users::updated_at.eq(now),
            ))
            .returning(User::as_returning())
            .get_result::<User>(&mut &*conn);
        let (user, enqueued) = futures::join!(update, shop_outbox::enqueue(&*conn, &event));
        let user = user?;
        enqueued?;
        Ok(user)
    })
    .await
}

/// Deletes a user, keeps its tombstone (id, version, when) and writes
/// `UserDeleted` (at the version after the last change).
#[tracing::instrument(name = "db.delete_user", skip_all, fields(db.system = "postgresql", user.id = %id))]
pub async fn delete_user(conn: &mut AsyncPgConnection, id: Uuid, expected_version: i64) -> Result<(), Error> {
    conn.transaction(async |conn| {
        let current = lock(conn, id, expected_version).await?;
        let now = Utc::now();
        let event = pb::UserDeleted {
            user_id: id.to_string(),
            version: current.version + 1,
            occurred_at: Some(timestamp(now)),
        };
        // The tombstone keeps the version the deletion has, so that a
        // resync can still tell a consumer that missed `UserDeleted`.
        let delete = diesel::delete(users::table.find(id)).execute(&mut &*conn);
        let tombstone = diesel::insert_into(user_tombstones::table)
            .values((
                user_tombstones::id.eq(id),
                user_tombstones::version.eq(event.version),
                user_tombstones::deleted_at.eq(now),
            ))
            .execute(&mut &*conn);
        let (deleted, buried, enqueued) =
            futures::join!(delete, tombstone, shop_outbox::enqueue(&*conn, &event));
        deleted?;
        buried?;
        enqueued?;
        Ok(())
    })
    .await
}

/// The user, locked for the rest of the transaction, if it is at
/// `expected_version`. Taking the row lock before writing the event is what
/// makes outbox order per user equal to commit order.
async fn lock(conn: &mut AsyncPgConnection, id: Uuid, expected_version: i64) -> Result<User, Error> {
    let current: User = users::table
        .find(id)
        .select(User::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?
        .ok_or(Error::NotFound(id))?;
    StaleVersion::check("user", id, expected_version, current.version)?;
    Ok(current)
}

/// One user, if it exists.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<User>, Error> {
    Ok(users::table
        .find(id)
        .select(User::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Up to `limit` users created after `after` (ids are UUIDv7, so id order is
/// creation order).
pub async fn list(conn: &mut AsyncPgConnection, after: Option<Uuid>, limit: i64) -> Result<Vec<User>, Error> {
    let mut query = users::table
        .select(User::as_select())
        .order(users::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(users::id.gt(after));
    }
    Ok(query.load(conn).await?)
}

/// Which users a resync republishes (a validated
/// `shop.user.v1.ResyncUsersRequest` selection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These ids, sorted, without duplicates.
    Ids(Vec<Uuid>),
    /// Users (live or deleted) whose last change is at or after this time.
    ChangedSince(DateTime<Utc>),
    /// Every user the service has known, deleted ones included.
    All,
}

/// The ids of `ids` the service knows, as a user or a tombstone, in id
/// order.
pub async fn known(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, Error> {
    let mut known: Vec<Uuid> = users::table
        .filter(users::id.eq_any(ids))
        .select(users::id)
        .load(conn)
        .await?;
    let buried: Vec<Uuid> = user_tombstones::table
        .filter(user_tombstones::id.eq_any(ids))
        .select(user_tombstones::id)
        .load(conn)
        .await?;
    known.extend(buried);
    known.sort_unstable();
    Ok(known)
}

/// How many users (live ones created by `created_by`, and tombstones)
/// changed at or after `since` (`None`: every one).
pub async fn count_changed(
    conn: &mut AsyncPgConnection,
    since: Option<DateTime<Utc>>,
    created_by: DateTime<Utc>,
) -> Result<i64, Error> {
    let mut live = users::table
        .filter(users::created_at.le(created_by))
        .count()
        .into_boxed();
    let mut buried = user_tombstones::table.count().into_boxed();
    if let Some(since) = since {
        live = live.filter(users::updated_at.ge(since));
        buried = buried.filter(user_tombstones::deleted_at.ge(since));
    }
    let live: i64 = live.get_result(conn).await?;
    let buried: i64 = buried.get_result(conn).await?;
    Ok(live + buried)
}

/// Up to `limit` ids, after `after` in id order, of the users (live ones
/// created by `created_by`, and tombstones) changed at or after `since`
/// (`None`: every one). Keyset pagination: each page is an index range
/// scan of both tables, however far the resync has come.
pub async fn changed_ids(
    conn: &mut AsyncPgConnection,
    since: Option<DateTime<Utc>>,
    created_by: DateTime<Utc>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Uuid>, Error> {
    let mut live = users::table
        .select(users::id)
        .filter(users::created_at.le(created_by))
        .order(users::id.asc())
        .limit(limit)
        .into_boxed();
    let mut buried = user_tombstones::table
        .select(user_tombstones::id)
        .order(user_tombstones::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(since) = since {
        live = live.filter(users::updated_at.ge(since));
        buried = buried.filter(user_tombstones::deleted_at.ge(since));
    }
    if let Some(after) = after {
        live = live.filter(users::id.gt(after));
        buried = buried.filter(user_tombstones::id.gt(after));
    }
    // The first `limit` of the union are among the first `limit` of each.
    let mut ids: Vec<Uuid> = live.load(conn).await?;
    ids.extend(buried.load::<Uuid>(conn).await?);
    ids.sort_unstable();
    ids.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(ids)
}

/// Writes one `UserSnapshot` per user of `ids` to the outbox, in one
/// transaction: a live user's whole state at its version, a deleted user's
/// tombstone as `deleted` at the version of its deletion. Returns how many
/// it wrote (an id that is neither, it skips).
///
/// The users' rows are locked (`FOR SHARE`) before their snapshots are
/// written, and read under that lock: an `UpdateUser` or `DeleteUser`
/// running meanwhile either committed before (its event is in the outbox
/// first, the snapshot has its version) or waits for this transaction (its
/// event follows the snapshot, at the next version). So the outbox keeps
/// each user's events in version order. A user deleted while the lock was
/// awaited has its tombstone by the time the tombstones are read.
#[tracing::instrument(name = "db.write_snapshots", skip_all, fields(db.system = "postgresql", users = ids.len()))]
pub async fn write_snapshots(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<u64, Error> {
    conn.transaction(async |conn| {
        let live: Vec<User> = users::table
            .filter(users::id.eq_any(ids))
            .select(User::as_select())
            .order(users::id.asc())
            .for_share()
            .load(conn)
            .await?;
        let buried: Vec<(Uuid, i64)> = user_tombstones::table
            .filter(user_tombstones::id.eq_any(ids))
            .select((user_tombstones::id, user_tombstones::version))
            .load(conn)
            .await?;
        let taken_at = Some(timestamp(Utc::now()));
        let snapshots: Vec<pb::UserSnapshot> = live
            .into_iter()
            .map(|user| pb::UserSnapshot {
                user_id: user.id.to_string(),
                version: user.version,
                email: user.email,
                name: user.name,
                deleted: false,
                occurred_at: taken_at,
            })
            .chain(buried.into_iter().map(|(id, version)| pb::UserSnapshot {
                user_id: id.to_string(),
                version,
                deleted: true,
                occurred_at: taken_at,
                ..pb::UserSnapshot::default()
            }))
            .collect();
        // Sent together, answered together: one round trip for the batch.
        futures::future::try_join_all(
            snapshots
                .iter()
                .map(|snapshot| shop_outbox::enqueue(&*conn, snapshot)),
        )
        .await?;
        Ok(snapshots.len() as u64)
    })
    .await
}
