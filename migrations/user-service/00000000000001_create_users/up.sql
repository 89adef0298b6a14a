-- Users, as the user service owns them.
CREATE TABLE users (
    id          UUID PRIMARY KEY,
    email       TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     BIGINT NOT NULL CHECK (version >= 1),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- Emails are unique whatever their case. The index name is the constraint
-- name the service maps to ALREADY_EXISTS.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- CreateUser requests that carried a request_id: a repeat returns the user
-- created the first time and writes nothing.
CREATE TABLE create_user_requests (
    request_id  UUID PRIMARY KEY,
    user_id     UUID NOT NULL,
    email       TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
