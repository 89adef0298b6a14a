-- What is left of a deleted user: its id, the version its deletion had (the
-- `UserDeleted` event's) and when. No personal data. DeleteUser writes the
-- row in the transaction that deletes the user and enqueues `UserDeleted`,
-- so a re-synchronisation (`ResyncUsers`) can still tell a consumer that
-- missed that event that the user is gone, at which version.
--
-- Tombstones are kept for good: a row is a few dozen bytes, and a consumer
-- may need one years later (a restored backup). Ids are UUIDv7s the service
-- generates, so no CreateUser can ever bring an id back to life.
CREATE TABLE user_tombstones (
    id          UUID PRIMARY KEY,
    version     BIGINT NOT NULL CHECK (version >= 2),
    deleted_at  TIMESTAMPTZ NOT NULL
);

-- `ResyncUsers` with `changed_since` selects by this column.
CREATE INDEX user_tombstones_deleted_at ON user_tombstones (deleted_at);
-- ... and live users by when they last changed.
CREATE INDEX users_updated_at ON users (updated_at);
