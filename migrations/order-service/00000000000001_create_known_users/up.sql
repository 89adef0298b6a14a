-- The order service's projection of users, fed by the user service's
-- events. A row exists once any event of the user arrived; `version` is the
-- user's aggregate version of the last applied event, so stale and repeated
-- events are ignored.
CREATE TABLE known_users (
    user_id     UUID PRIMARY KEY,
    email       TEXT NOT NULL DEFAULT '',
    name        TEXT NOT NULL DEFAULT '',
    version     BIGINT NOT NULL,
    deleted     BOOLEAN NOT NULL DEFAULT false,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
