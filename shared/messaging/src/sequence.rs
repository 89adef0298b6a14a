//! Ordered consumption: each aggregate's events reach the handlers once, in
//! version order, with no gaps, however the broker delivers them.
//!
//! Every event with an aggregate id and a version (`aggregate_version`
//! counts each aggregate's events 1, 2, 3, …) is sequenced in the
//! consumer's transaction, against a row per aggregate that holds the last
//! version applied (`inbox_sequence`; no row is position 0), read with the
//! aggregate locked for the transaction by an advisory lock ([`lock`]), or
//! taken from the positions the consumer committed last ([`Remembered`]:
//! only for events that then apply, and checked as the position moves; an
//! aggregate first seen at version 1 is taken to be new, checked the same
//! way):
//!
//! - version `last + 1`: applied, and `last` moves on in the same
//!   transaction as the handler's effect;
//! - at or below `last`: a duplicate, acknowledged without effect (the
//!   position is the idempotency record of sequenced events: they write no
//!   inbox row);
//! - above `last + 1`: **parked** in `inbox_parked` (not applied, not lost,
//!   acknowledged on the broker) until the versions before it are applied.
//!   The transaction that applies version `n` marks the parked `n + 1` as
//!   released, and after the commit the consumer sends it back through the
//!   group's exchange to its partition queue, where it is applied like any
//!   delivery (retries and dead-lettering included), which releases `n + 2`,
//!   and so on.
//!
//! When an aggregate's next event is dead-lettered, its row records the dead
//! letter (`dead_letter_event`), and the aggregate's later events park
//! behind it while other aggregates flow: **sequenced dead letters**.
//! Replaying the dead letter applies it and releases the followers in order;
//! skipping it ([`release`]) moves `last` past it and releases them too.
//! A gap that is not a dead letter (an event lost upstream, or a retry still
//! waiting out its delay) holds its followers the same way; past
//! `CONSUMER_GAP_TIMEOUT` it is counted as stuck
//! (`consumer_stuck_gaps{queue}`), logged, and shown by `shop dlq list`,
//! where [`release`] gives up on the missing versions.
//!
//! Events without an aggregate id or with no (or a non-positive) version
//! are not sequenced: the inbox alone keeps them from being applied twice,
//! in whatever order they arrive.
//!
//! # Snapshots
//!
//! A subscribed type whose contract marks it a snapshot
//! (`shop_contracts::Event::SNAPSHOT`: the aggregate's whole state at its
//! version, republished on request) is decided by
//! [`Position::decide_event`]: above the position it is applied and the
//! position **jumps** to its version, whatever lies between, in the same
//! statement that forgets the events parked at or below it (they are never
//! applied: a released copy on its way back arrives as a duplicate),
//! clears a dead letter at or below it and releases the parked next
//! version; at or below the position it is a duplicate. A snapshot never
//! parks. A dead letter always holds the version right after the position
//! ([`mark_dead_letter`]), so a snapshot above the position is never behind
//! one: it passes it, and the letter, replayed later, is a duplicate. The
//! move keeps its condition on the version decided from (`WHERE
//! last_version = from`): replicas racing over the aggregate are caught as
//! for any move.
//!
//! # Version conflicts
//!
//! Each position records the event id that made its last version
//! (`last_event`; none when an operator moved it). An event at exactly the
//! last version with another id, not a snapshot, means the producer used
//! the version twice (a restore from a backup): it is not applied, but
//! counted (`consumer_version_conflicts_total{queue}`), logged and recorded
//! in `inbox_conflicts` ([`conflicts`]; kept `INBOX_RETENTION`), which
//! `shop dlq list` shows. The check reads `last_event` only for a batch
//! holding a repeat of some last version (redeliveries), with the
//! aggregates locked. What it cannot see: a reused version below the
//! position (no id is kept for it: a duplicate), and the first reused
//! version above it (applied). The way out is to set the position back
//! ([`set_position`], `shop dlq set-position`) and resync the aggregate:
//! its snapshot applies above the position.
//!
//! # The gap policy
//!
//! Past `CONSUMER_GAP_TIMEOUT`, the sweep claims the aggregates stuck
//! behind a gap ([`claim_stuck_gaps`]: parked longer than the timeout, the
//! next version not parked, no dead letter, no action taken within the
//! timeout), recording the action and its time on the position, and acts
//! by [`GapPolicy`]: `wait` only counts; `resync` asks the producer for
//! snapshots of those aggregates ([`crate::resync`]); `apply-next` gives
//! up the missing versions ([`release`]) when the first parked event is
//! state-carrying, which then applies, and waits otherwise. Each action is
//! counted in `consumer_gap_actions_total{queue, policy, outcome}` and its
//! outcome recorded ([`gap_action`]) for `shop dlq list`.
//!
//! A sweep, every few seconds, sends again what was released but never
//! confirmed sent back (the process died between its commit and the
//! publish, or the publish failed; `inbox_parked.sent_at` records each
//! confirmed send), never an event whose aggregate a dead letter holds, nor
//! one that is waiting in its queue behind a backlog, and reports
//! `consumer_parked_events{queue, reason}`,
//! `consumer_oldest_parked_seconds{queue}` and `consumer_stuck_gaps{queue}`.
//!
//! The tables and the function (each consuming service's migrations create
//! them; see `migrations/order-service/…_sequence_consumption`,
//! `…_lock_positions_in_one_round_trip`, `…_leave_room_for_hot_updates`,
//! `…_mark_positions_with_parked_events`,
//! `…_record_parked_events_sent_back` and `…_resync_and_version_conflicts`):
//!
//! ```sql
//! CREATE TABLE inbox_sequence (consumer TEXT, aggregate_type TEXT, aggregate_id TEXT,
//!     last_version BIGINT NOT NULL DEFAULT 0, dead_letter_event UUID, dead_letter_version BIGINT,
//!     updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
//!     parked_until BIGINT, -- the highest version parked behind the position, if any
//!     last_event UUID, -- the event that made last_version (version conflicts)
//!     gap_action TEXT, gap_action_outcome TEXT, gap_action_at TIMESTAMPTZ, -- the gap policy
//!     PRIMARY KEY (consumer, aggregate_type, aggregate_id));
//! CREATE TABLE inbox_conflicts (consumer TEXT, event_id UUID, aggregate_type TEXT,
//!     aggregate_id TEXT, aggregate_version BIGINT, applied_event UUID, event_type TEXT,
//!     seen_at TIMESTAMPTZ, PRIMARY KEY (consumer, event_id));
//! CREATE TABLE inbox_parked (consumer TEXT, aggregate_type TEXT, aggregate_id TEXT,
//!     aggregate_version BIGINT, event_id UUID NOT NULL, event_type TEXT NOT NULL,
//!     payload BYTEA NOT NULL, properties JSONB NOT NULL,
//!     parked_at TIMESTAMPTZ NOT NULL DEFAULT now(), released_at TIMESTAMPTZ,
//!     sent_at TIMESTAMPTZ, -- the last send back the broker confirmed
//!     PRIMARY KEY (consumer, aggregate_type, aggregate_id, aggregate_version));
//! -- Locks the aggregates (in key order), then reads their positions with a
//! -- snapshot taken after the locks: one round trip.
//! CREATE FUNCTION inbox_sequence_lock(consumer_name TEXT, types TEXT[], ids TEXT[])
//!     RETURNS TABLE (aggregate_type TEXT, aggregate_id TEXT, last_version BIGINT,
//!     dead_letter_event UUID, dead_letter_version BIGINT) LANGUAGE plpgsql VOLATILE …;
//! -- Positions are updated in place batch after batch: room for HOT updates.
//! ALTER TABLE inbox_sequence SET (fillfactor = 70);
//! ```
//!
//! A consumer added to an existing projection seeds `inbox_sequence` with
//! the versions the projection already holds (the order service's migration
//! does), or the first event it sees of each aggregate would wait for
//! versions it will never receive. `inbox_sequence` has one row per
//! aggregate, like the projection: it is not swept.

use std::collections::{BTreeMap, HashMap};

use diesel::sql_types::{Array, BigInt, Double, Nullable, Text};
use diesel::{ExpressionMethods as _, QueryDsl as _, QueryResult, QueryableByName};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use shop_database::prepared;
use uuid::Uuid;

use crate::wire;

diesel::table! {
    /// The last version applied per aggregate and consumer.
    inbox_sequence (consumer, aggregate_type, aggregate_id) {
        consumer -> Text,
        aggregate_type -> Text,
        aggregate_id -> Text,
        last_version -> BigInt,
        dead_letter_event -> Nullable<Uuid>,
        dead_letter_version -> Nullable<BigInt>,
        updated_at -> Timestamptz,
        parked_until -> Nullable<BigInt>,
        last_event -> Nullable<Uuid>,
        gap_action -> Nullable<Text>,
        gap_action_outcome -> Nullable<Text>,
        gap_action_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    /// Events that arrived at their aggregate's last version with another
    /// event id than the one applied there: version conflicts.
    inbox_conflicts (consumer, event_id) {
        consumer -> Text,
        event_id -> Uuid,
        aggregate_type -> Text,
        aggregate_id -> Text,
        aggregate_version -> BigInt,
        applied_event -> Uuid,
        event_type -> Text,
        seen_at -> Timestamptz,
    }
}

diesel::table! {
    /// Events held until the versions before them are applied.
    inbox_parked (consumer, aggregate_type, aggregate_id, aggregate_version) {
        consumer -> Text,
        aggregate_type -> Text,
        aggregate_id -> Text,
        aggregate_version -> BigInt,
        event_id -> Uuid,
        event_type -> Text,
        payload -> Binary,
        properties -> Jsonb,
        parked_at -> Timestamptz,
        released_at -> Nullable<Timestamptz>,
        sent_at -> Nullable<Timestamptz>,
    }
}

/// An aggregate: its type (`user`) and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Aggregate {
    /// The `aggregate_type` header (empty when missing).
    pub kind: String,
    /// The `aggregate_id` header.
    pub id: String,
}

impl Aggregate {
    /// The aggregate and version an event is sequenced by: an id and a
    /// positive version; otherwise it is not sequenced.
    pub fn sequenced(kind: Option<&str>, id: Option<&str>, version: Option<i64>) -> Option<(Self, i64)> {
        let version = version.filter(|version| *version > 0)?;
        Some((
            Self {
                kind: kind.unwrap_or_default().to_owned(),
                id: id?.to_owned(),
            },
            version,
        ))
    }
}

/// [`Aggregate::sequenced`] from an event's AMQP headers.
pub fn sequenced_by(headers: &FieldTable) -> Option<(Aggregate, i64)> {
    Aggregate::sequenced(
        wire::header_str(headers, wire::AGGREGATE_TYPE),
        wire::header_str(headers, wire::AGGREGATE_ID),
        wire::header_i64(headers, wire::AGGREGATE_VERSION),
    )
}

impl std::fmt::Display for Aggregate {
    /// `type/id`, with control characters, quotes and backslashes escaped:
    /// the id comes from a message, and is printed in logs and listings.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind.escape_debug(), self.id.escape_debug())
    }
}

impl std::str::FromStr for Aggregate {
    type Err = String;

    /// `type/id`, as printed.
    fn from_str(value: &str) -> Result<Self, String> {
        let (kind, id) = value
            .split_once('/')
            .ok_or_else(|| format!("{value:?} is not TYPE/ID (e.g. user/3f2504e0-…)"))?;
        Ok(Self {
            kind: kind.to_owned(),
            id: id.to_owned(),
        })
    }
}

/// Where an aggregate stands for a consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The last version applied (0: none yet).
    pub last_version: i64,
    /// The dead letter that holds the next version: (event id, version).
    pub dead_letter: Option<(Uuid, i64)>,
}

/// What to do with a sequenced event, given its aggregate's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The next version: apply it.
    Apply,
    /// At or below the last version: applied before.
    Duplicate,
    /// Ahead of the next version: park it.
    Park(ParkReason),
}

/// Why an event is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkReason {
    /// An earlier version has not arrived (yet).
    Gap,
    /// An earlier version is in the dead-letter queue.
    BehindDeadLetter,
}

impl ParkReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gap => "gap",
            Self::BehindDeadLetter => "behind-dead-letter",
        }
    }
}

impl Position {
    /// What to do with version `version` of a change; an applied one moves
    /// the position.
    pub fn decide(&mut self, version: i64) -> Decision {
        self.decide_event(version, false)
    }

    /// What to do with version `version` of an event, a `snapshot` or not:
    /// a snapshot above the position applies whatever lies between (the
    /// position jumps to it, past a gap or a dead letter); at or below it,
    /// it is a duplicate like any event.
    pub fn decide_event(&mut self, version: i64, snapshot: bool) -> Decision {
        if version <= self.last_version {
            Decision::Duplicate
        } else if version == self.last_version + 1 || snapshot {
            self.last_version = version;
            self.dead_letter = self.dead_letter.filter(|(_, held)| *held > version);
            Decision::Apply
        } else if self.dead_letter.is_some() {
            Decision::Park(ParkReason::BehindDeadLetter)
        } else {
            Decision::Park(ParkReason::Gap)
        }
    }
}

/// Where a position's row is in its table (`ctid`: block and line), as
/// the statement that last moved it returned it. Moving a row by its
/// `ctid` skips the index lookup, a third of an update's cost; a row moved
/// by anyone else since has another `ctid`, so the stale one matches no row
/// and the move is refused like any stale position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowId {
    block: u32,
    line: u16,
}

impl RowId {
    /// From PostgreSQL's text form, `(block,line)`.
    fn parse(text: &str) -> Option<Self> {
        let (block, line) = text.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
        Some(Self {
            block: block.parse().ok()?,
            line: line.parse().ok()?,
        })
    }
}

impl std::fmt::Display for RowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({},{})", self.block, self.line)
    }
}

/// The positions a consumer process committed last, remembered so that the
/// next versions of an aggregate it keeps seeing are decided without reading
/// (and without locking) its position: the read is most of what ordering
/// costs a batch.
///
/// Only what [`Position::decide`] would apply is decided from memory. The
/// transaction then moves each such position with a condition on the
/// version remembered ([`advance`]), by the row's remembered [`RowId`] when
/// it has one; if another replica moved it meanwhile (the partition was
/// handed over and back, an operator skipped a dead letter), nothing moves,
/// the transaction rolls back and the batch is decided again from positions
/// read under their locks. A duplicate, a parked event or a dead letter is
/// always decided from a fresh read.
///
/// Keys are 64-bit hashes of the aggregate: a collision can only make a
/// remembered version wrong, which the condition catches like any stale one.
/// Two generations bound the memory: when the newer holds `capacity`
/// aggregates it becomes the older and the older is dropped; a hit in the
/// older moves to the newer. So between `capacity` and twice as many recent
/// aggregates are remembered, 25 bytes each (about 50 with the hash
/// tables' room: 1.6 MiB for twice 16384).
#[derive(Debug)]
pub(crate) struct Remembered {
    newer: HashMap<u64, (i64, Option<RowId>)>,
    older: HashMap<u64, (i64, Option<RowId>)>,
    capacity: usize,
}

impl Remembered {
    /// Remembers up to `capacity` aggregates per generation (0: none).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            newer: HashMap::new(),
            older: HashMap::new(),
            capacity,
        }
    }

    fn key(aggregate: &Aggregate) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        aggregate.hash(&mut hasher);
        hasher.finish()
    }

    /// The last version this process committed for `aggregate`, and where
    /// its row is if known, if remembered.
    pub(crate) fn get(&mut self, aggregate: &Aggregate) -> Option<(i64, Option<RowId>)> {
        let key = Self::key(aggregate);
        if let Some(known) = self.newer.get(&key) {
            return Some(*known);
        }
        let known = self.older.remove(&key)?;
        self.insert(key, known);
        Some(known)
    }

    /// Remembers `aggregate`'s committed position (and its row, if known);
    /// one held by a dead letter is forgotten (it is always read).
    pub(crate) fn set(&mut self, aggregate: &Aggregate, position: &Position, row: Option<RowId>) {
        if position.dead_letter.is_some() || self.capacity == 0 {
            self.forget(aggregate);
        } else {
            self.insert(Self::key(aggregate), (position.last_version, row));
        }
    }

    /// Forgets `aggregate`.
    pub(crate) fn forget(&mut self, aggregate: &Aggregate) {
        let key = Self::key(aggregate);
        self.newer.remove(&key);
        self.older.remove(&key);
    }

    fn insert(&mut self, key: u64, known: (i64, Option<RowId>)) {
        if self.capacity == 0 {
            return;
        }
        if self.newer.len() >= self.capacity && !self.newer.contains_key(&key) {
            self.older = std::mem::take(&mut self.newer);
            self.older.remove(&key);
        }
        self.newer.insert(key, known);
    }

    /// Forgets every aggregate.
    pub(crate) fn clear(&mut self) {
        self.newer = HashMap::new();
        self.older = HashMap::new();
    }

    /// How many aggregates are remembered.
    pub(crate) fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }
}

/// The aggregates of a batch decided from memory: the position each is
/// decided from, and where its row is, when known.
pub(crate) type Recalled = HashMap<Aggregate, (Position, Option<RowId>)>;

/// Splits a batch's sequenced events into the aggregates whose every event
/// in the batch `remembered` decides as applied (with the position it
/// decides from) and the aggregates to read. An aggregate not remembered
/// whose first event in the batch is version 1 is taken to be at 0 (an
/// aggregate's first event is its creation); like a remembered position,
/// that is checked as the position moves.
pub(crate) fn from_memory<'a>(
    remembered: &mut Remembered,
    events: impl IntoIterator<Item = (&'a Aggregate, i64)>,
) -> (Recalled, Vec<&'a Aggregate>) {
    /// Where an aggregate was remembered (version and row), and the last
    /// of its versions in the batch so far.
    type Walk = (i64, Option<RowId>, i64);
    // Each aggregate's walk along its events; None once one of them is not
    // the next version.
    let mut walked: HashMap<&'a Aggregate, Option<Walk>> = HashMap::new();
    for (aggregate, version) in events {
        // An aggregate first seen at version 1 is taken to be new: at 0.
        let walk = walked.entry(aggregate).or_insert_with(|| {
            remembered
                .get(aggregate)
                .or((version == 1).then_some((0, None)))
                .map(|(last, row)| (last, row, last))
        });
        *walk = walk
            .filter(|(_, _, last)| version == last + 1)
            .map(|(from, row, _)| (from, row, version));
    }
    let mut recalled = HashMap::new();
    let mut to_read = Vec::new();
    for (aggregate, walk) in walked {
        match walk {
            Some((from, row, _)) => {
                recalled.insert(
                    aggregate.clone(),
                    (
                        Position {
                            last_version: from,
                            dead_letter: None,
                        },
                        row,
                    ),
                );
            }
            None => to_read.push(aggregate),
        }
    }
    (recalled, to_read)
}

#[derive(QueryableByName)]
struct PositionRow {
    #[diesel(sql_type = Text)]
    aggregate_type: String,
    #[diesel(sql_type = Text)]
    aggregate_id: String,
    #[diesel(sql_type = BigInt)]
    last_version: i64,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    dead_letter_event: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    dead_letter_version: Option<i64>,
}

impl PositionRow {
    fn into_pair(self) -> (Aggregate, Position) {
        (
            Aggregate {
                kind: self.aggregate_type,
                id: self.aggregate_id,
            },
            Position {
                last_version: self.last_version,
                dead_letter: self.dead_letter_event.zip(self.dead_letter_version),
            },
        )
    }
}

fn columns<'a>(aggregates: &[&'a Aggregate]) -> (Vec<&'a str>, Vec<&'a str>) {
    aggregates
        .iter()
        .map(|a| (a.kind.as_str(), a.id.as_str()))
        .unzip()
}

/// The positions of `aggregates` for `consumer`, each aggregate locked
/// until the transaction ends: a transaction-scoped advisory lock on a hash
/// of (consumer, aggregate), taken in key order so two transactions over the
/// same aggregates do not deadlock. An advisory lock writes nothing (a row
/// lock would dirty every position read) and holds for an aggregate that
/// has no row yet, so the read that follows sees the position the previous
/// holder committed. An aggregate without a row is at position 0; its row
/// is created by [`advance`].
pub(crate) async fn lock(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregates: &[&Aggregate],
) -> QueryResult<HashMap<Aggregate, Position>> {
    let mut sorted = aggregates.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return Ok(HashMap::new());
    }
    let (kinds, ids) = columns(&sorted);
    // Locks and reads in one round trip: see the function in the
    // `lock_positions_in_one_round_trip` migration.
    let rows: Vec<PositionRow> = prepared(
        diesel::sql_query(
            "SELECT aggregate_type, aggregate_id, last_version, dead_letter_event, dead_letter_version \
             FROM inbox_sequence_lock($1, $2::text[], $3::text[])",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&ids),
    )
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(PositionRow::into_pair).collect())
}

/// An event held in `inbox_parked`.
#[derive(Debug, Clone, QueryableByName)]
pub struct ParkedEvent {
    /// `aggregate_type`.
    #[diesel(sql_type = Text)]
    pub aggregate_type: String,
    /// `aggregate_id`.
    #[diesel(sql_type = Text)]
    pub aggregate_id: String,
    /// `aggregate_version`.
    #[diesel(sql_type = BigInt)]
    pub aggregate_version: i64,
    /// The AMQP `message_id`.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub event_id: Uuid,
    /// The AMQP `type`.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// The body.
    #[diesel(sql_type = diesel::sql_types::Binary)]
    pub payload: Vec<u8>,
    /// `app_id`, `timestamp` and the headers, as JSON.
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    pub properties: serde_json::Value,
}

impl ParkedEvent {
    /// The event as it arrived, to be parked.
    pub(crate) fn new(
        aggregate: &Aggregate,
        version: i64,
        event_id: Uuid,
        event_type: &str,
        payload: &[u8],
        properties: &BasicProperties,
    ) -> Self {
        Self {
            aggregate_type: aggregate.kind.clone(),
            aggregate_id: aggregate.id.clone(),
            aggregate_version: version,
            event_id,
            event_type: event_type.to_owned(),
            payload: payload.to_vec(),
            properties: properties_to_json(properties),
        }
    }

    /// The AMQP properties to send it back with: those it arrived with,
    /// marked as released.
    pub fn amqp_properties(&self) -> BasicProperties {
        let mut properties = properties_from_json(&self.properties)
            .with_message_id(self.event_id.to_string().into())
            .with_type(self.event_type.as_str().into());
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(wire::RELEASED.into(), AMQPValue::Boolean(true));
        properties = properties.with_headers(headers);
        properties
    }
}

/// Headers worth keeping (strings and integers) with `app_id` and
/// `timestamp`, as JSON.
fn properties_to_json(properties: &BasicProperties) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    if let Some(table) = properties.headers() {
        for (key, value) in table.inner() {
            let key = key.as_str();
            if key.starts_with("x-") || key == wire::RELEASED {
                continue;
            }
            if let Some(text) = wire::header_str(table, key) {
                headers.insert(key.to_owned(), serde_json::Value::from(text));
            } else if let Some(number) = wire::header_i64(table, key) {
                headers.insert(key.to_owned(), serde_json::Value::from(number));
            } else if let AMQPValue::Boolean(flag) = value {
                headers.insert(key.to_owned(), serde_json::Value::from(*flag));
            }
        }
    }
    serde_json::json!({
        "app_id": properties.app_id().as_ref().map(|id| id.as_str()),
        "timestamp": properties.timestamp(),
        "content_type": properties.content_type().as_ref().map(|c| c.as_str()),
        "headers": headers,
    })
}

fn properties_from_json(json: &serde_json::Value) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(wire::PERSISTENT)
        .with_content_type(json["content_type"].as_str().unwrap_or(wire::CONTENT_TYPE).into());
    if let Some(app_id) = json["app_id"].as_str() {
        properties = properties.with_app_id(app_id.into());
    }
    if let Some(timestamp) = json["timestamp"].as_u64() {
        properties = properties.with_timestamp(timestamp);
    }
    let mut headers = FieldTable::default();
    if let Some(map) = json["headers"].as_object() {
        for (key, value) in map {
            let value = match value {
                serde_json::Value::String(text) => wire::long_string(text),
                serde_json::Value::Bool(flag) => AMQPValue::Boolean(*flag),
                serde_json::Value::Number(number) => match number.as_i64() {
                    Some(number) => AMQPValue::LongLongInt(number),
                    None => continue,
                },
                _ => continue,
            };
            headers.insert(key.as_str().into(), value);
        }
    }
    properties.with_headers(headers)
}

/// Parks `events` (an event parked before stays as it is), and marks their
/// aggregates' positions with the highest version parked behind them
/// (`parked_until`, creating a position at 0 where there is none), so that
/// the positions are moved by the statement that also forgets and releases
/// parked events ([`advance`]) until they pass it.
pub(crate) async fn park(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    events: &[ParkedEvent],
) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = events
        .iter()
        .map(|event| {
            (
                inbox_parked::consumer.eq(consumer),
                inbox_parked::aggregate_type.eq(&event.aggregate_type),
                inbox_parked::aggregate_id.eq(&event.aggregate_id),
                inbox_parked::aggregate_version.eq(event.aggregate_version),
                inbox_parked::event_id.eq(event.event_id),
                inbox_parked::event_type.eq(&event.event_type),
                inbox_parked::payload.eq(&event.payload),
                inbox_parked::properties.eq(&event.properties),
            )
        })
        .collect();
    diesel::insert_into(inbox_parked::table)
        .values(rows)
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    let versions: Vec<i64> = events.iter().map(|e| e.aggregate_version).collect();
    prepared(
        diesel::sql_query(
            "INSERT INTO inbox_sequence AS s (consumer, aggregate_type, aggregate_id, parked_until) \
             SELECT $1, e.t, e.i, max(e.v) FROM unnest($2::text[], $3::text[], $4::bigint[]) AS e(t, i, v) \
             GROUP BY e.t, e.i \
             ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE \
             SET parked_until = greatest(s.parked_until, excluded.parked_until)",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&versions),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// How many events a consumer may hold parked: past either limit, an event
/// that would park is dead-lettered (`park-limit`) instead, so a producer
/// far ahead of a gap (or a flood of far-future versions) cannot grow
/// `inbox_parked` without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkLimits {
    /// Most parked events of one aggregate (`CONSUMER_MAX_PARKED_PER_AGGREGATE`).
    pub per_aggregate: u32,
    /// Most parked events in all (`CONSUMER_MAX_PARKED`).
    pub total: u32,
}

/// Which of `events` (about to be parked, in order) fit within `limits`,
/// counting what is parked already. The counts stop at the limits, so a
/// full table is not counted to the end. Transactions that park take a
/// lock of the consumer's for it (until they commit) before they count, so
/// workers and replicas parking at once never pass a limit together; the
/// common batch parks nothing and never takes it.
pub(crate) async fn admit(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    events: &[ParkedEvent],
    limits: &ParkLimits,
) -> QueryResult<Vec<bool>> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = Text)]
        id: String,
        #[diesel(sql_type = BigInt)]
        parked: i64,
    }
    prepared(
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/parking', 1))")
            .bind::<Text, _>(consumer),
    )
    .execute(conn)
    .await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    // The total first (as kind '', id ''), then each aggregate's.
    let counts: Vec<Count> = prepared(
        diesel::sql_query(
            "SELECT '' AS kind, '' AS id, (SELECT count(*) FROM                (SELECT 1 FROM inbox_parked WHERE consumer = $1 LIMIT $4) AS t) AS parked              UNION ALL              SELECT a.t, a.i, (SELECT count(*) FROM (SELECT 1 FROM inbox_parked p                WHERE p.consumer = $1 AND p.aggregate_type = a.t AND p.aggregate_id = a.i LIMIT $5) AS x)              FROM (SELECT DISTINCT t, i FROM unnest($2::text[], $3::text[]) AS u(t, i)) AS a",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&ids)
        .bind::<BigInt, _>(i64::from(limits.total))
        .bind::<BigInt, _>(i64::from(limits.per_aggregate)),
    )
    .load(conn)
    .await?;
    let mut counts = counts.into_iter();
    let mut total = counts.next().map_or(0, |count| count.parked);
    let mut per_aggregate: HashMap<(String, String), i64> = counts
        .map(|count| ((count.kind, count.id), count.parked))
        .collect();
    Ok(events
        .iter()
        .map(|event| {
            let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
            let parked = per_aggregate.entry(key).or_default();
            let admitted = total < i64::from(limits.total) && *parked < i64::from(limits.per_aggregate);
            if admitted {
                total += 1;
                *parked += 1;
            }
            admitted
        })
        .collect())
}

const RELEASED_COLUMNS: &str = "p.aggregate_type, p.aggregate_id, p.aggregate_version, p.event_id, \
     p.event_type, p.payload, p.properties";

/// An aggregate's position to move: from the last version the transaction
/// decided on (`from`, 0 for none) to `to`, by its row if known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Move<'a> {
    pub(crate) aggregate: &'a Aggregate,
    pub(crate) from: i64,
    pub(crate) to: i64,
    pub(crate) row: Option<RowId>,
    /// The event applied at `to` (recorded as the position's `last_event`,
    /// to tell a version conflict); none when an operator moves it.
    pub(crate) event: Option<Uuid>,
}

/// What [`advance`] did.
#[derive(Debug, Default)]
pub(crate) struct Advanced {
    /// The positions that were where the moves expected them, and moved,
    /// with where their rows are now.
    pub(crate) moved: Vec<(Aggregate, Option<RowId>)>,
    /// Parked events next in line, marked released.
    pub(crate) released: Vec<ParkedEvent>,
}

/// One row of [`advance`]: a moved position (with its row id) or a released
/// event.
#[derive(QueryableByName)]
struct AdvanceRow {
    #[diesel(sql_type = Text)]
    aggregate_type: String,
    #[diesel(sql_type = Text)]
    aggregate_id: String,
    #[diesel(sql_type = Nullable<Text>)]
    row_id: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    aggregate_version: Option<i64>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    event_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    event_type: Option<String>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Binary>)]
    payload: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Jsonb>)]
    properties: Option<serde_json::Value>,
}

/// How a moved position's row is updated: the same in each of [`advance`]'s
/// updates.
const MOVE_SET: &str = "last_version = a.v, last_event = a.e, \
     dead_letter_event = CASE WHEN s.dead_letter_version <= a.v THEN NULL ELSE s.dead_letter_event END, \
     dead_letter_version = CASE WHEN s.dead_letter_version <= a.v THEN NULL ELSE s.dead_letter_version END, \
     parked_until = CASE WHEN s.parked_until <= a.v THEN NULL ELSE s.parked_until END, \
     updated_at = now()";

/// Moves each aggregate from `from` to `to`, only where its position is
/// still `from` (a position another transaction moved is left alone and not
/// returned: the caller compares [`Advanced::moved`] with its moves and
/// rolls back on a difference); creates the rows of aggregates at 0, clears
/// a dead letter an aggregate got past, forgets parked events at or below
/// the new position, and returns the parked events that are next in line,
/// marked released: the caller sends them back after the commit.
///
/// Most batches move positions with nothing behind them (no dead letter,
/// no parked event: `parked_until` is NULL), all by their rows or all
/// created: one short statement does that ([`move_by_row`], [`create`]),
/// and whatever it left (a position with something behind it, a stale row
/// id, a position moved meanwhile) goes to the full statement, which also
/// forgets and releases parked events. Other batches take the full
/// statement alone. In the ordered drain of the benchmark the short
/// `UPDATE` of 100 positions took 0.54 ms at the median, the full
/// statement 0.8–1 ms: each of its five data-modifying parts costs its
/// planning and start-up even when it touches no row.
///
/// The condition is what makes a position remembered by the consumer
/// ([`Remembered`]) safe to decide by without reading it: moving from a
/// version the row no longer holds moves nothing. An `UPDATE` that waits
/// for another transaction's row lock checks the condition again against
/// the row that transaction committed. A move with a [`RowId`] finds its
/// row by it, checking the key too; one without, by the key.
pub(crate) async fn advance(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    moves: &[Move<'_>],
) -> QueryResult<Advanced> {
    if moves.is_empty() {
        return Ok(Advanced::default());
    }
    let moved = if moves.iter().all(|m| m.row.is_some() && m.from > 0) {
        move_by_row(conn, consumer, moves).await?
    } else if moves.iter().all(|m| m.from == 0) {
        create(conn, consumer, moves).await?
    } else {
        return advance_all(conn, consumer, moves).await;
    };
    let index: HashMap<(&str, &str), usize> = moves
        .iter()
        .enumerate()
        .map(|(index, m)| ((m.aggregate.kind.as_str(), m.aggregate.id.as_str()), index))
        .collect();
    let mut advanced = Advanced::default();
    let mut left = vec![true; moves.len()];
    for row in &moved {
        let key = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
        if let Some((&index, row_id)) = index.get(&key).zip(RowId::parse(&row.row_id)) {
            left[index] = false;
            advanced
                .moved
                .push((moves[index].aggregate.clone(), Some(row_id)));
        }
    }
    // What the short statement left: a position with something behind it,
    // a row id gone stale, or a position someone else moved (which the full
    // statement leaves too).
    let rest: Vec<Move<'_>> = moves
        .iter()
        .zip(&left)
        .filter(|(_, left)| **left)
        .map(|(m, _)| Move { row: None, ..*m })
        .collect();
    let more = advance_all(conn, consumer, &rest).await?;
    advanced.moved.extend(more.moved);
    advanced.released = more.released;
    Ok(advanced)
}

/// The moves as the array parameters of [`advance`]'s statements.
struct MoveColumns<'a> {
    kinds: Vec<&'a str>,
    ids: Vec<&'a str>,
    from: Vec<i64>,
    to: Vec<i64>,
    events: Vec<Option<Uuid>>,
}

impl<'a> MoveColumns<'a> {
    fn of(moves: &[Move<'a>]) -> Self {
        let aggregates: Vec<&Aggregate> = moves.iter().map(|m| m.aggregate).collect();
        let (kinds, ids) = columns(&aggregates);
        Self {
            kinds,
            ids,
            from: moves.iter().map(|m| m.from).collect(),
            to: moves.iter().map(|m| m.to).collect(),
            events: moves.iter().map(|m| m.event).collect(),
        }
    }
}

/// A position a short statement moved, and where its row is now.
#[derive(QueryableByName)]
struct ShortMoved {
    #[diesel(sql_type = Text)]
    aggregate_type: String,
    #[diesel(sql_type = Text)]
    aggregate_id: String,
    #[diesel(sql_type = Text)]
    row_id: String,
}

/// The common move, in one short statement: each position by its row, on
/// condition of its key and of the version decided from, where nothing
/// waits behind it (no dead letter, nothing parked: nothing to forget or
/// release).
async fn move_by_row(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    moves: &[Move<'_>],
) -> QueryResult<Vec<ShortMoved>> {
    let MoveColumns {
        kinds,
        ids,
        from,
        to,
        events,
    } = MoveColumns::of(moves);
    let rows: Vec<String> = moves
        .iter()
        .map(|m| m.row.map(|row| row.to_string()).unwrap_or_default())
        .collect();
    prepared(
        diesel::sql_query(
            "UPDATE inbox_sequence s SET last_version = a.v, last_event = a.e, updated_at = now() \
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::uuid[]) AS a(t, i, f, v, r, e) \
             WHERE s.ctid = a.r::tid AND s.consumer = $1 AND s.aggregate_type = a.t AND s.aggregate_id = a.i \
               AND s.last_version = a.f AND a.v > a.f AND s.dead_letter_version IS NULL AND s.parked_until IS NULL \
             RETURNING s.aggregate_type, s.aggregate_id, s.ctid::text AS row_id",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&from)
        .bind::<Array<BigInt>, _>(&to)
        .bind::<Array<Text>, _>(&rows)
        .bind::<Array<Nullable<diesel::sql_types::Uuid>>, _>(&events),
    )
    .load(conn)
    .await
}

/// New aggregates, in one short statement: each position created, or
/// moved where it is at 0 with nothing behind it.
async fn create(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    moves: &[Move<'_>],
) -> QueryResult<Vec<ShortMoved>> {
    let MoveColumns {
        kinds,
        ids,
        to,
        events,
        ..
    } = MoveColumns::of(moves);
    prepared(
        diesel::sql_query(
            "INSERT INTO inbox_sequence AS s (consumer, aggregate_type, aggregate_id, last_version, last_event) \
             SELECT $1, a.t, a.i, a.v, a.e FROM unnest($2::text[], $3::text[], $4::bigint[], $5::uuid[]) AS a(t, i, v, e) WHERE a.v > 0 \
             ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE \
             SET last_version = excluded.last_version, last_event = excluded.last_event, updated_at = now() \
             WHERE s.last_version = 0 AND s.dead_letter_version IS NULL AND s.parked_until IS NULL \
             RETURNING s.aggregate_type, s.aggregate_id, s.ctid::text AS row_id",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&to)
        .bind::<Array<Nullable<diesel::sql_types::Uuid>>, _>(&events),
    )
    .load(conn)
    .await
}

/// [`advance`] in full: by row, by key and created, forgetting and
/// releasing parked events, in one statement.
async fn advance_all(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    moves: &[Move<'_>],
) -> QueryResult<Advanced> {
    if moves.is_empty() {
        return Ok(Advanced::default());
    }
    let MoveColumns {
        kinds,
        ids,
        from,
        to,
        events,
    } = MoveColumns::of(moves);
    let rows: Vec<Option<String>> = moves.iter().map(|m| m.row.map(|row| row.to_string())).collect();
    const MOVES: &str = "unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::uuid[]) AS a(t, i, f, v, r, e)";
    const KEY: &str = "s.consumer = $1 AND s.aggregate_type = a.t AND s.aggregate_id = a.i";
    let found: Vec<AdvanceRow> = prepared(diesel::sql_query(format!(
        "WITH by_row AS ( \
           UPDATE inbox_sequence s SET {MOVE_SET} FROM {MOVES} \
           WHERE a.r IS NOT NULL AND a.f > 0 AND a.v > a.f AND s.ctid = a.r::tid AND {KEY} AND s.last_version = a.f \
           RETURNING s.aggregate_type, s.aggregate_id, s.last_version, s.ctid::text AS row_id), \
         by_key AS ( \
           UPDATE inbox_sequence s SET {MOVE_SET} FROM {MOVES} \
           WHERE a.r IS NULL AND a.f > 0 AND a.v > a.f AND {KEY} AND s.last_version = a.f \
           RETURNING s.aggregate_type, s.aggregate_id, s.last_version, s.ctid::text AS row_id), \
         created AS ( \
           INSERT INTO inbox_sequence AS s (consumer, aggregate_type, aggregate_id, last_version, last_event) \
           SELECT $1, a.t, a.i, a.v, a.e FROM {MOVES} WHERE a.f = 0 AND a.v > 0 \
           ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET \
             last_version = excluded.last_version, last_event = excluded.last_event, \
             dead_letter_event = CASE WHEN s.dead_letter_version <= excluded.last_version THEN NULL ELSE s.dead_letter_event END, \
             dead_letter_version = CASE WHEN s.dead_letter_version <= excluded.last_version THEN NULL ELSE s.dead_letter_version END, \
             parked_until = CASE WHEN s.parked_until <= excluded.last_version THEN NULL ELSE s.parked_until END, \
             updated_at = now() \
           WHERE s.last_version = 0 \
           RETURNING s.aggregate_type, s.aggregate_id, s.last_version, s.ctid::text AS row_id), \
         advanced AS (SELECT * FROM by_row UNION ALL SELECT * FROM by_key UNION ALL SELECT * FROM created), \
         applied AS ( \
           DELETE FROM inbox_parked p USING advanced a \
           WHERE p.consumer = $1 AND p.aggregate_type = a.aggregate_type AND p.aggregate_id = a.aggregate_id \
             AND p.aggregate_version <= a.last_version), \
         released AS ( \
           UPDATE inbox_parked p SET released_at = now() FROM advanced a \
           WHERE p.consumer = $1 AND p.aggregate_type = a.aggregate_type AND p.aggregate_id = a.aggregate_id \
             AND p.aggregate_version = a.last_version + 1 \
           RETURNING {RELEASED_COLUMNS}) \
         SELECT aggregate_type, aggregate_id, row_id, NULL::bigint AS aggregate_version, NULL::uuid AS event_id, \
           NULL::text AS event_type, NULL::bytea AS payload, NULL::jsonb AS properties FROM advanced \
         UNION ALL \
         SELECT aggregate_type, aggregate_id, NULL, aggregate_version, event_id, event_type, payload, properties FROM released"
    ))
    .bind::<Text, _>(consumer)
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<Text>, _>(&ids)
    .bind::<Array<BigInt>, _>(&from)
    .bind::<Array<BigInt>, _>(&to)
    .bind::<Array<Nullable<Text>>, _>(&rows)
    .bind::<Array<Nullable<diesel::sql_types::Uuid>>, _>(&events))
    .load(conn)
    .await?;
    let mut advanced = Advanced::default();
    for row in found {
        match (
            row.aggregate_version,
            row.event_id,
            row.event_type,
            row.payload,
            row.properties,
        ) {
            (Some(aggregate_version), Some(event_id), Some(event_type), Some(payload), Some(properties)) => {
                advanced.released.push(ParkedEvent {
                    aggregate_type: row.aggregate_type,
                    aggregate_id: row.aggregate_id,
                    aggregate_version,
                    event_id,
                    event_type,
                    payload,
                    properties,
                });
            }
            _ => advanced.moved.push((
                Aggregate {
                    kind: row.aggregate_type,
                    id: row.aggregate_id,
                },
                row.row_id.as_deref().and_then(RowId::parse),
            )),
        }
    }
    Ok(advanced)
}

/// Records that the event at `aggregate`'s next version, `version`, went
/// to the dead-letter queue: its followers park behind it, by that name.
/// Nothing changes when `version` is not the next one.
pub(crate) async fn mark_dead_letter(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
    version: i64,
    event_id: Uuid,
) -> QueryResult<()> {
    lock(conn, consumer, &[aggregate]).await?;
    diesel::sql_query(
        "INSERT INTO inbox_sequence (consumer, aggregate_type, aggregate_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(&aggregate.kind)
    .bind::<Text, _>(&aggregate.id)
    .execute(conn)
    .await?;
    diesel::update(
        inbox_sequence::table
            .filter(inbox_sequence::consumer.eq(consumer))
            .filter(inbox_sequence::aggregate_type.eq(&aggregate.kind))
            .filter(inbox_sequence::aggregate_id.eq(&aggregate.id))
            .filter(inbox_sequence::last_version.eq(version - 1)),
    )
    .set((
        inbox_sequence::dead_letter_event.eq(event_id),
        inbox_sequence::dead_letter_version.eq(version),
        inbox_sequence::updated_at.eq(diesel::dsl::now),
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives up on `aggregate`'s versions up to `through`, in a transaction of
/// its own: they count as applied (a dead letter among them is skipped,
/// parked events among them are forgotten), and the parked event at
/// `through + 1`, if any, is released: returned (marked) for the caller to
/// [`send_back`]; the consumer's sweep sends it if the caller does not.
/// Returns the position before, and the released events.
pub async fn release(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
    through: i64,
) -> QueryResult<(Position, Vec<ParkedEvent>)> {
    use diesel_async::AsyncConnection as _;
    conn.transaction(async |conn| {
        let before = lock(conn, consumer, &[aggregate])
            .await?
            .remove(aggregate)
            .unwrap_or_default();
        if through <= before.last_version {
            return Ok((before, Vec::new()));
        }
        let advanced = advance(
            conn,
            consumer,
            &[Move {
                aggregate,
                from: before.last_version,
                to: through,
                row: None,
                event: None,
            }],
        )
        .await?;
        if advanced.moved.len() != 1 {
            // A consumer deciding from a remembered position holds no
            // advisory lock; it moved the position meanwhile.
            return Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::SerializationFailure,
                Box::new(format!("the position of {aggregate} moved meanwhile; try again")),
            ));
        }
        Ok((before, advanced.released))
    })
    .await
}

/// An aggregate's row of `inbox_sequence`, as [`position`] and
/// [`gap_action`] read it.
type SequenceRow = (
    i64,
    Option<Uuid>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<Timestamp>,
);

/// `aggregate`'s row for `consumer`, if it has one.
async fn sequence_row(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
) -> QueryResult<Option<SequenceRow>> {
    inbox_sequence::table
        .filter(inbox_sequence::consumer.eq(consumer))
        .filter(inbox_sequence::aggregate_type.eq(&aggregate.kind))
        .filter(inbox_sequence::aggregate_id.eq(&aggregate.id))
        .select((
            inbox_sequence::last_version,
            inbox_sequence::dead_letter_event,
            inbox_sequence::dead_letter_version,
            inbox_sequence::gap_action,
            inbox_sequence::gap_action_outcome,
            inbox_sequence::gap_action_at,
        ))
        .first(conn)
        .await
        .map(Some)
        .or_else(|error| match error {
            diesel::result::Error::NotFound => Ok(None),
            other => Err(other),
        })
}

/// The position of `aggregate` for `consumer` (none yet: 0).
pub async fn position(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
) -> QueryResult<Position> {
    let row = sequence_row(conn, consumer, aggregate).await?;
    Ok(
        row.map_or_else(Position::default, |(last_version, event, version, ..)| Position {
            last_version,
            dead_letter: event.zip(version),
        }),
    )
}

/// The aggregate whose position dead letter `event_id` holds, and its
/// version, if one does: how `shop dlq skip` finds the aggregate of a dead
/// letter that is no longer in the queue.
pub async fn held_by_dead_letter(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    event_id: Uuid,
) -> QueryResult<Option<(Aggregate, i64)>> {
    let rows: Vec<(String, String, Option<i64>)> = inbox_sequence::table
        .filter(inbox_sequence::consumer.eq(consumer))
        .filter(inbox_sequence::dead_letter_event.eq(event_id))
        .select((
            inbox_sequence::aggregate_type,
            inbox_sequence::aggregate_id,
            inbox_sequence::dead_letter_version,
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .find_map(|(kind, id, version)| version.map(|version| (Aggregate { kind, id }, version))))
}

/// Every aggregate a dead letter holds: (aggregate, dead letter's event
/// id, its version), by aggregate.
pub async fn dead_letter_holds(
    conn: &mut AsyncPgConnection,
    consumer: &str,
) -> QueryResult<Vec<(Aggregate, Uuid, i64)>> {
    let rows: Vec<(String, String, Option<Uuid>, Option<i64>)> = inbox_sequence::table
        .filter(inbox_sequence::consumer.eq(consumer))
        .filter(inbox_sequence::dead_letter_event.is_not_null())
        .order((inbox_sequence::aggregate_type, inbox_sequence::aggregate_id))
        .select((
            inbox_sequence::aggregate_type,
            inbox_sequence::aggregate_id,
            inbox_sequence::dead_letter_event,
            inbox_sequence::dead_letter_version,
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(kind, id, event, version)| Some((Aggregate { kind, id }, event?, version?)))
        .collect())
}

/// Parked events that are next in line but were not sent back (released
/// more than `grace` ago and no send confirmed since, or never released):
/// marked released again and returned, at most `limit`, skipping rows
/// another replica's sweep holds.
///
/// Two kinds of next-in-line events are left alone:
/// - one whose aggregate a dead letter holds: it was sent back and failed
///   (its dead letter is that event, or an earlier one's); sending it again
///   would only start a new retry chain and add a copy to the dead-letter
///   queue, every sweep, for good;
/// - one whose send the broker confirmed ([`mark_sent`]) after its last
///   release: it is in its partition queue, perhaps behind a backlog
///   slower than `grace`, and a second copy would be a duplicate. If that
///   copy is lost all the same (the queue purged or deleted), the aggregate
///   shows as a stuck gap, and `shop dlq release` sends it again
///   ([`release_next`]).
pub(crate) async fn take_ready(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    grace: std::time::Duration,
    limit: i64,
) -> QueryResult<Vec<ParkedEvent>> {
    diesel::sql_query(format!(
        "UPDATE inbox_parked p SET released_at = now() \
         WHERE (p.consumer, p.aggregate_type, p.aggregate_id, p.aggregate_version) IN ( \
           SELECT q.consumer, q.aggregate_type, q.aggregate_id, q.aggregate_version \
           FROM inbox_parked q JOIN inbox_sequence s \
             ON s.consumer = q.consumer AND s.aggregate_type = q.aggregate_type AND s.aggregate_id = q.aggregate_id \
           WHERE q.consumer = $1 AND q.aggregate_version = s.last_version + 1 \
             AND s.dead_letter_version IS NULL \
             AND (q.released_at IS NULL OR (q.released_at < now() - make_interval(secs => $2) \
               AND (q.sent_at IS NULL OR q.sent_at < q.released_at))) \
           ORDER BY q.aggregate_version LIMIT $3 FOR UPDATE OF q SKIP LOCKED) \
         RETURNING {RELEASED_COLUMNS}"
    ))
    .bind::<Text, _>(consumer)
    .bind::<Double, _>(grace.as_secs_f64())
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await
}

/// Records that `events` (released) were sent back and the broker
/// confirmed it, so the sweep does not send them again ([`take_ready`]).
/// Events applied and forgotten meanwhile are no longer there: nothing to
/// record.
pub async fn mark_sent(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    events: &[ParkedEvent],
) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    let versions: Vec<i64> = events.iter().map(|e| e.aggregate_version).collect();
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    prepared(
        diesel::sql_query(
            "UPDATE inbox_parked p SET sent_at = now() \
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::uuid[]) AS e(t, i, v, id) \
             WHERE p.consumer = $1 AND p.aggregate_type = e.t AND p.aggregate_id = e.i \
               AND p.aggregate_version = e.v AND p.event_id = e.id",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<Text>, _>(&kinds)
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<BigInt>, _>(&versions)
        .bind::<Array<diesel::sql_types::Uuid>, _>(&event_ids),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks `aggregate`'s parked event that is next in line released again
/// and returns it (none when there is none), for the caller to send back:
/// the way out when a copy that was sent and confirmed never came back
/// (its queue purged or deleted).
pub async fn release_next(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
) -> QueryResult<Vec<ParkedEvent>> {
    diesel::sql_query(format!(
        "UPDATE inbox_parked p SET released_at = now() FROM inbox_sequence s \
         WHERE p.consumer = $1 AND p.aggregate_type = $2 AND p.aggregate_id = $3 \
           AND s.consumer = p.consumer AND s.aggregate_type = p.aggregate_type AND s.aggregate_id = p.aggregate_id \
           AND p.aggregate_version = s.last_version + 1 AND s.dead_letter_version IS NULL \
         RETURNING {RELEASED_COLUMNS}"
    ))
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(&aggregate.kind)
    .bind::<Text, _>(&aggregate.id)
    .load(conn)
    .await
}

/// Deletes parked events at or below their aggregate's last version
/// (applied or skipped meanwhile); returns how many.
pub(crate) async fn forget_applied(conn: &mut AsyncPgConnection, consumer: &str) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM inbox_parked p USING inbox_sequence s \
         WHERE p.consumer = $1 AND s.consumer = p.consumer AND s.aggregate_type = p.aggregate_type \
           AND s.aggregate_id = p.aggregate_id AND p.aggregate_version <= s.last_version",
    )
    .bind::<Text, _>(consumer)
    .execute(conn)
    .await
}

/// Sends released parked events back through consumer group `router`
/// exchange (their `partition` header takes each to its partition queue),
/// on `channel` (in confirm mode), waiting for every confirm.
pub async fn send_back(channel: &lapin::Channel, router: &str, events: &[ParkedEvent]) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(events.len());
    for event in events {
        let confirm = channel
            .basic_publish(
                router.into(),
                "".into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &event.payload,
                event.amqp_properties(),
            )
            .await?;
        confirms.push((event, confirm));
    }
    for (event, confirm) in confirms {
        match confirm.await? {
            lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => {}
            lapin::Confirmation::Ack(Some(_)) => {
                anyhow::bail!("no queue is bound to {router} for event {}", event.event_id)
            }
            lapin::Confirmation::Nack(_) => {
                anyhow::bail!("the broker refused event {} on {router}", event.event_id)
            }
        }
    }
    Ok(())
}

/// What is parked for a consumer, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, QueryableByName)]
pub struct ParkedStats {
    /// Events parked behind a gap.
    #[diesel(sql_type = BigInt)]
    pub gaps: i64,
    /// Events parked behind a dead letter.
    #[diesel(sql_type = BigInt)]
    pub behind_dead_letters: i64,
    /// Gap-parked events older than the gap timeout.
    #[diesel(sql_type = BigInt)]
    pub stuck: i64,
    /// Age of the oldest parked event (0 when none).
    #[diesel(sql_type = Double)]
    pub oldest_seconds: f64,
}

/// Counts of what `consumer` has parked; a gap older than `gap_timeout` is
/// stuck.
pub(crate) async fn stats(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    gap_timeout: std::time::Duration,
) -> QueryResult<ParkedStats> {
    diesel::sql_query(
        "SELECT count(*) FILTER (WHERE s.dead_letter_event IS NULL) AS gaps, \
           count(*) FILTER (WHERE s.dead_letter_event IS NOT NULL) AS behind_dead_letters, \
           count(*) FILTER (WHERE s.dead_letter_event IS NULL \
             AND p.parked_at < now() - make_interval(secs => $2)) AS stuck, \
           COALESCE(EXTRACT(EPOCH FROM now() - min(p.parked_at)), 0)::float8 AS oldest_seconds \
         FROM inbox_parked p JOIN inbox_sequence s \
           ON s.consumer = p.consumer AND s.aggregate_type = p.aggregate_type AND s.aggregate_id = p.aggregate_id \
         WHERE p.consumer = $1",
    )
    .bind::<Text, _>(consumer)
    .bind::<Double, _>(gap_timeout.as_secs_f64())
    .get_result(conn)
    .await
}

type Timestamp = chrono::DateTime<chrono::Utc>;

/// One parked event, as the tooling lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// Its version.
    pub version: i64,
    /// Its event id.
    pub event_id: Uuid,
    /// Its type.
    pub event_type: String,
    /// When it was parked.
    pub parked_at: chrono::DateTime<chrono::Utc>,
    /// When it was last released (sent back), if ever.
    pub released_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// An aggregate with parked events.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The aggregate.
    pub aggregate: Aggregate,
    /// Where it stands.
    pub position: Position,
    /// Its parked events, by version.
    pub parked: Vec<Parked>,
    /// The gap policy's last action on it, if any.
    pub gap_action: Option<GapAction>,
}

/// Every aggregate of `consumer` with parked events, oldest first.
pub async fn held(conn: &mut AsyncPgConnection, consumer: &str) -> QueryResult<Vec<Held>> {
    #[derive(diesel::Queryable)]
    struct Row {
        kind: String,
        id: String,
        version: i64,
        event_id: Uuid,
        event_type: String,
        parked_at: Timestamp,
        released_at: Option<Timestamp>,
    }
    let rows: Vec<Row> = inbox_parked::table
        .filter(inbox_parked::consumer.eq(consumer))
        .order((
            inbox_parked::aggregate_type,
            inbox_parked::aggregate_id,
            inbox_parked::aggregate_version,
        ))
        .select((
            inbox_parked::aggregate_type,
            inbox_parked::aggregate_id,
            inbox_parked::aggregate_version,
            inbox_parked::event_id,
            inbox_parked::event_type,
            inbox_parked::parked_at,
            inbox_parked::released_at,
        ))
        .load(conn)
        .await?;
    let mut by_aggregate: BTreeMap<Aggregate, Vec<Parked>> = BTreeMap::new();
    for row in rows {
        by_aggregate
            .entry(Aggregate {
                kind: row.kind,
                id: row.id,
            })
            .or_default()
            .push(Parked {
                version: row.version,
                event_id: row.event_id,
                event_type: row.event_type,
                parked_at: row.parked_at,
                released_at: row.released_at,
            });
    }
    let mut held = Vec::with_capacity(by_aggregate.len());
    for (aggregate, parked) in by_aggregate {
        let position = position(conn, consumer, &aggregate).await?;
        let gap_action = gap_action(conn, consumer, &aggregate).await?;
        held.push(Held {
            aggregate,
            position,
            parked,
            gap_action,
        });
    }
    held.sort_by_key(|h| h.parked.as_slice().first().map(|p| p.parked_at));
    Ok(held)
}

/// The event applied at each of `aggregates`' last version, where one is
/// recorded: (last version, its event id). Read in the consumer's
/// transaction, with the aggregates locked, only for a batch that holds a
/// repeat of some last version (a candidate version conflict).
pub(crate) async fn last_events(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregates: &[&Aggregate],
) -> QueryResult<HashMap<Aggregate, (i64, Uuid)>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        aggregate_type: String,
        #[diesel(sql_type = Text)]
        aggregate_id: String,
        #[diesel(sql_type = BigInt)]
        last_version: i64,
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        last_event: Uuid,
    }
    if aggregates.is_empty() {
        return Ok(HashMap::new());
    }
    let (kinds, ids) = columns(aggregates);
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT s.aggregate_type, s.aggregate_id, s.last_version, s.last_event FROM inbox_sequence s \
         JOIN unnest($2::text[], $3::text[]) AS a(t, i) ON s.aggregate_type = a.t AND s.aggregate_id = a.i \
         WHERE s.consumer = $1 AND s.last_event IS NOT NULL",
    )
    .bind::<Text, _>(consumer)
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<Text>, _>(&ids)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            (
                Aggregate {
                    kind: row.aggregate_type,
                    id: row.aggregate_id,
                },
                (row.last_version, row.last_event),
            )
        })
        .collect())
}

/// An event that arrived at its aggregate's last version with another
/// event id than the one applied there (see the module docs, "Version
/// conflicts"): not applied, recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The aggregate.
    pub aggregate: Aggregate,
    /// The version both events claim.
    pub version: i64,
    /// The event that arrived and was not applied.
    pub event_id: Uuid,
    /// Its type.
    pub event_type: String,
    /// The event applied at that version.
    pub applied_event: Uuid,
    /// When it was first seen.
    pub seen_at: chrono::DateTime<chrono::Utc>,
}

/// Records `conflicts` (a repeat of one recorded before is left as it is);
/// returns how many are new.
pub(crate) async fn record_conflicts(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    conflicts: &[(Aggregate, i64, Uuid, &str, Uuid)],
) -> QueryResult<usize> {
    if conflicts.is_empty() {
        return Ok(0);
    }
    let rows: Vec<_> = conflicts
        .iter()
        .map(|(aggregate, version, event_id, event_type, applied)| {
            (
                inbox_conflicts::consumer.eq(consumer),
                inbox_conflicts::event_id.eq(*event_id),
                inbox_conflicts::aggregate_type.eq(&aggregate.kind),
                inbox_conflicts::aggregate_id.eq(&aggregate.id),
                inbox_conflicts::aggregate_version.eq(*version),
                inbox_conflicts::applied_event.eq(*applied),
                inbox_conflicts::event_type.eq(*event_type),
            )
        })
        .collect();
    diesel::insert_into(inbox_conflicts::table)
        .values(rows)
        .on_conflict_do_nothing()
        .execute(conn)
        .await
}

/// The version conflicts recorded for `consumer`, oldest first.
pub async fn conflicts(conn: &mut AsyncPgConnection, consumer: &str) -> QueryResult<Vec<Conflict>> {
    let rows: Vec<(String, String, i64, Uuid, String, Uuid, Timestamp)> = inbox_conflicts::table
        .filter(inbox_conflicts::consumer.eq(consumer))
        .order(inbox_conflicts::seen_at)
        .select((
            inbox_conflicts::aggregate_type,
            inbox_conflicts::aggregate_id,
            inbox_conflicts::aggregate_version,
            inbox_conflicts::event_id,
            inbox_conflicts::event_type,
            inbox_conflicts::applied_event,
            inbox_conflicts::seen_at,
        ))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(kind, id, version, event_id, event_type, applied_event, seen_at)| Conflict {
                aggregate: Aggregate { kind, id },
                version,
                event_id,
                event_type,
                applied_event,
                seen_at,
            },
        )
        .collect())
}

/// Deletes the conflicts of `consumer` recorded more than `retention` ago.
pub(crate) async fn forget_conflicts(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    retention: std::time::Duration,
) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM inbox_conflicts WHERE consumer = $1 AND seen_at < now() - make_interval(secs => $2)",
    )
    .bind::<Text, _>(consumer)
    .bind::<Double, _>(retention.as_secs_f64())
    .execute(conn)
    .await
}

/// What a consumer does about a gap older than `CONSUMER_GAP_TIMEOUT`
/// (`CONSUMER_GAP_POLICY`; see the module docs, "The gap policy").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GapPolicy {
    /// Wait for the missing versions (or an operator): only counted.
    Wait,
    /// Ask the producer to republish the aggregate's state (a snapshot).
    Resync,
    /// Apply the first parked event past the gap, when its type carries
    /// the whole state; otherwise wait.
    ApplyNext,
}

impl GapPolicy {
    /// The setting's value and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::Resync => "resync",
            Self::ApplyNext => "apply-next",
        }
    }
}

impl std::fmt::Display for GapPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An aggregate stuck behind a gap, claimed for the gap policy's action.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct StuckGap {
    /// `aggregate_type`.
    #[diesel(sql_type = Text)]
    pub aggregate_type: String,
    /// `aggregate_id`.
    #[diesel(sql_type = Text)]
    pub aggregate_id: String,
    /// Its position.
    #[diesel(sql_type = BigInt)]
    pub last_version: i64,
    /// The first version parked past the gap.
    #[diesel(sql_type = BigInt)]
    pub first_parked: i64,
    /// That event's type.
    #[diesel(sql_type = Text)]
    pub first_type: String,
}

impl StuckGap {
    /// The aggregate.
    pub fn aggregate(&self) -> Aggregate {
        Aggregate {
            kind: self.aggregate_type.clone(),
            id: self.aggregate_id.clone(),
        }
    }
}

/// Claims up to `limit` aggregates of `consumer` stuck behind a gap (an
/// event parked more than `timeout` ago, the next version not parked, no
/// dead letter) on which no action was taken within `timeout`: each is
/// marked with `action` (outcome `started`) now, so that no replica acts on
/// it again before `timeout` has passed. Rows another transaction holds
/// are skipped.
pub(crate) async fn claim_stuck_gaps(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    timeout: std::time::Duration,
    action: &str,
    limit: i64,
) -> QueryResult<Vec<StuckGap>> {
    diesel::sql_query(
        "WITH stuck AS ( \
           SELECT s.aggregate_type, s.aggregate_id FROM inbox_sequence s \
           WHERE s.consumer = $1 AND s.dead_letter_event IS NULL \
             AND (s.gap_action_at IS NULL OR s.gap_action_at < now() - make_interval(secs => $2)) \
             AND (s.aggregate_type, s.aggregate_id) IN ( \
               SELECT p.aggregate_type, p.aggregate_id FROM inbox_parked p \
               WHERE p.consumer = $1 AND p.parked_at < now() - make_interval(secs => $2)) \
             AND NOT EXISTS (SELECT 1 FROM inbox_parked n WHERE n.consumer = $1 \
               AND n.aggregate_type = s.aggregate_type AND n.aggregate_id = s.aggregate_id \
               AND n.aggregate_version <= s.last_version + 1) \
           ORDER BY s.aggregate_type, s.aggregate_id LIMIT $4 FOR UPDATE OF s SKIP LOCKED) \
         UPDATE inbox_sequence s SET gap_action = $3, gap_action_outcome = 'started', gap_action_at = now() \
         FROM stuck WHERE s.consumer = $1 AND s.aggregate_type = stuck.aggregate_type AND s.aggregate_id = stuck.aggregate_id \
         RETURNING s.aggregate_type, s.aggregate_id, s.last_version, \
           (SELECT p.aggregate_version FROM inbox_parked p WHERE p.consumer = $1 AND p.aggregate_type = s.aggregate_type \
              AND p.aggregate_id = s.aggregate_id ORDER BY p.aggregate_version LIMIT 1) AS first_parked, \
           (SELECT p.event_type FROM inbox_parked p WHERE p.consumer = $1 AND p.aggregate_type = s.aggregate_type \
              AND p.aggregate_id = s.aggregate_id ORDER BY p.aggregate_version LIMIT 1) AS first_type",
    )
    .bind::<Text, _>(consumer)
    .bind::<Double, _>(timeout.as_secs_f64())
    .bind::<Text, _>(action)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await
}

/// Records how the gap policy's action on `aggregates` went.
pub(crate) async fn record_gap_outcome(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregates: &[Aggregate],
    outcome: &str,
) -> QueryResult<()> {
    if aggregates.is_empty() {
        return Ok(());
    }
    let refs: Vec<&Aggregate> = aggregates.iter().collect();
    let (kinds, ids) = columns(&refs);
    diesel::sql_query(
        "UPDATE inbox_sequence s SET gap_action_outcome = $4 FROM unnest($2::text[], $3::text[]) AS a(t, i) \
         WHERE s.consumer = $1 AND s.aggregate_type = a.t AND s.aggregate_id = a.i",
    )
    .bind::<Text, _>(consumer)
    .bind::<Array<Text>, _>(&kinds)
    .bind::<Array<Text>, _>(&ids)
    .bind::<Text, _>(outcome)
    .execute(conn)
    .await?;
    Ok(())
}

/// The gap policy's last action on an aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct GapAction {
    /// The policy that acted (`wait`, `resync`, `apply-next`).
    pub action: String,
    /// How it went (`waited`, `requested`, `applied`, `failed`, …).
    pub outcome: Option<String>,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// The gap policy's last action on `aggregate`, if any.
pub async fn gap_action(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
) -> QueryResult<Option<GapAction>> {
    let row = sequence_row(conn, consumer, aggregate).await?;
    Ok(row.and_then(|(.., action, outcome, at)| {
        Some(GapAction {
            action: action?,
            outcome,
            at: at?,
        })
    }))
}

/// Sets `aggregate`'s position to `version` (`shop dlq set-position`), in
/// either direction, in a transaction of its own: the way out of a version
/// conflict after the producer's database was restored (set it back below
/// the reused versions, then resync: the snapshot applies). A dead letter
/// at or below `version` stops holding it; parked events at or below it
/// are forgotten, and the one at `version + 1`, if any, is released and
/// returned for the caller to [`send_back`]. Returns the position before.
pub async fn set_position(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    aggregate: &Aggregate,
    version: i64,
) -> QueryResult<(Position, Vec<ParkedEvent>)> {
    use diesel_async::AsyncConnection as _;
    conn.transaction(async |conn| {
        let before = lock(conn, consumer, &[aggregate])
            .await?
            .remove(aggregate)
            .unwrap_or_default();
        diesel::sql_query(
            "INSERT INTO inbox_sequence AS s (consumer, aggregate_type, aggregate_id, last_version) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET \
               last_version = excluded.last_version, last_event = NULL, \
               dead_letter_event = CASE WHEN s.dead_letter_version <= excluded.last_version THEN NULL ELSE s.dead_letter_event END, \
               dead_letter_version = CASE WHEN s.dead_letter_version <= excluded.last_version THEN NULL ELSE s.dead_letter_version END, \
               parked_until = CASE WHEN s.parked_until <= excluded.last_version THEN NULL ELSE s.parked_until END, \
               updated_at = now()",
        )
        .bind::<Text, _>(consumer)
        .bind::<Text, _>(&aggregate.kind)
        .bind::<Text, _>(&aggregate.id)
        .bind::<BigInt, _>(version)
        .execute(conn)
        .await?;
        diesel::sql_query(
            "DELETE FROM inbox_parked WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
             AND aggregate_version <= $4",
        )
        .bind::<Text, _>(consumer)
        .bind::<Text, _>(&aggregate.kind)
        .bind::<Text, _>(&aggregate.id)
        .bind::<BigInt, _>(version)
        .execute(conn)
        .await?;
        let released = release_next(conn, consumer, aggregate).await?;
        Ok((before, released))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_version_applies_older_ones_are_duplicates_later_ones_park() {
        let mut position = Position::default();
        assert_eq!(position.decide(2), Decision::Park(ParkReason::Gap));
        assert_eq!(position.decide(1), Decision::Apply);
        assert_eq!(position.decide(1), Decision::Duplicate);
        assert_eq!(position.decide(2), Decision::Apply);
        assert_eq!(position.last_version, 2);
        position.dead_letter = Some((Uuid::nil(), 3));
        assert_eq!(position.decide(4), Decision::Park(ParkReason::BehindDeadLetter));
        assert_eq!(position.decide(3), Decision::Apply);
        assert_eq!(position.dead_letter, None);
        assert_eq!(position.decide(4), Decision::Apply);
    }

    fn aggregate(id: &str) -> Aggregate {
        Aggregate {
            kind: "user".into(),
            id: id.into(),
        }
    }

    #[test]
    fn remembered_positions_decide_only_runs_of_next_versions() {
        let (a, b, c, d) = (aggregate("a"), aggregate("b"), aggregate("c"), aggregate("d"));
        let mut remembered = Remembered::new(16);
        let row = RowId { block: 7, line: 3 };
        for (aggregate, last) in [(&a, 2), (&b, 2), (&c, 2)] {
            remembered.set(
                aggregate,
                &Position {
                    last_version: last,
                    dead_letter: None,
                },
                Some(row),
            );
        }
        let (e, f) = (aggregate("e"), aggregate("f"));
        // a: 3, 4 follow 2; b: 4 skips 3 (parks); c: 2 is a repeat; d: not
        // remembered, at 2; e: not remembered, at 1 and 2 (new); f: not
        // remembered, 1 twice.
        let (known, mut to_read) = from_memory(
            &mut remembered,
            [
                (&a, 3),
                (&b, 4),
                (&c, 2),
                (&d, 2),
                (&a, 4),
                (&e, 1),
                (&e, 2),
                (&f, 1),
                (&f, 1),
            ],
        );
        to_read.sort();
        assert_eq!(known.len(), 2);
        assert_eq!(known[&a].0.last_version, 2, "decided from the remembered version");
        assert_eq!(known[&a].1, Some(row), "and moved by its row");
        assert_eq!(
            known[&e],
            (Position::default(), None),
            "a first version is taken as new"
        );
        assert_eq!(to_read, vec![&b, &c, &d, &f]);
    }

    #[test]
    fn remembered_positions_are_bounded_and_a_dead_letter_is_never_remembered() {
        let mut remembered = Remembered::new(2);
        let at = |last_version| Position {
            last_version,
            dead_letter: None,
        };
        remembered.set(&aggregate("a"), &at(1), None);
        remembered.set(&aggregate("b"), &at(1), None);
        remembered.set(&aggregate("c"), &at(1), None);
        assert_eq!(remembered.len(), 3, "a and b are the older generation");
        assert_eq!(
            remembered.get(&aggregate("a")),
            Some((1, None)),
            "a hit moves to the newer"
        );
        remembered.set(&aggregate("d"), &at(1), None);
        assert!(remembered.len() <= 4);
        assert_eq!(
            remembered.get(&aggregate("b")),
            None,
            "dropped with its generation"
        );
        remembered.set(
            &aggregate("d"),
            &Position {
                last_version: 1,
                dead_letter: Some((Uuid::nil(), 2)),
            },
            None,
        );
        assert_eq!(remembered.get(&aggregate("d")), None);
        let mut none = Remembered::new(0);
        none.set(&aggregate("a"), &at(1), None);
        assert_eq!(none.get(&aggregate("a")), None);
    }

    #[test]
    fn a_row_id_reads_back_as_postgresql_prints_it() {
        let row = RowId::parse("(4294967295,65535)").unwrap();
        assert_eq!(row.to_string(), "(4294967295,65535)");
        assert_eq!(RowId::parse("(12,5)"), Some(RowId { block: 12, line: 5 }));
        for bad in ["", "(1,2", "1,2)", "(1;2)", "(a,2)", "(1,70000)"] {
            assert_eq!(RowId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn parked_properties_come_back_as_they_arrived_and_marked_released() {
        let mut headers = FieldTable::default();
        headers.insert(wire::AGGREGATE_ID.into(), wire::long_string("a-1"));
        headers.insert(wire::AGGREGATE_VERSION.into(), AMQPValue::LongLongInt(3));
        headers.insert(wire::PARTITION.into(), AMQPValue::ShortInt(7));
        headers.insert("traceparent".into(), wire::long_string("00-abc-def-01"));
        headers.insert("x-death".into(), AMQPValue::Boolean(true));
        let properties = BasicProperties::default()
            .with_app_id("user-service".into())
            .with_timestamp(42)
            .with_headers(headers);
        let aggregate = Aggregate {
            kind: "user".into(),
            id: "a-1".into(),
        };
        let id = Uuid::now_v7();
        let parked = ParkedEvent::new(
            &aggregate,
            3,
            id,
            "shop.user.v1.UserUpdated",
            b"body",
            &properties,
        );
        let back = parked.amqp_properties();
        let headers = back.headers().clone().unwrap_or_default();
        assert_eq!(
            back.message_id().as_ref().map(|m| m.to_string()),
            Some(id.to_string())
        );
        assert_eq!(
            back.kind().as_ref().map(|k| k.to_string()).as_deref(),
            Some("shop.user.v1.UserUpdated")
        );
        assert_eq!(
            back.app_id().as_ref().map(|a| a.to_string()).as_deref(),
            Some("user-service")
        );
        assert_eq!(*back.timestamp(), Some(42));
        assert_eq!(wire::header_i64(&headers, wire::PARTITION), Some(7));
        assert_eq!(wire::header_i64(&headers, wire::AGGREGATE_VERSION), Some(3));
        assert_eq!(wire::header_str(&headers, "traceparent"), Some("00-abc-def-01"));
        assert!(headers.inner().get("x-death").is_none());
        assert!(matches!(
            headers.inner().get(wire::RELEASED),
            Some(AMQPValue::Boolean(true))
        ));
    }

    #[test]
    fn an_aggregate_reads_back_as_printed() {
        let aggregate: Aggregate = "user/3f2504e0".parse().unwrap();
        assert_eq!(aggregate.to_string(), "user/3f2504e0");
        assert!("no-slash".parse::<Aggregate>().is_err());
    }
}
