-- The transactional outbox (shape owned by the shop-outbox crate, see
-- migrations/README.md). Commands insert here in their own transaction; the
-- relay publishes and marks rows.
CREATE TABLE outbox (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id           UUID NOT NULL UNIQUE,
    aggregate_type     TEXT NOT NULL,
    aggregate_id       TEXT NOT NULL,
    aggregate_version  BIGINT NOT NULL,
    partition_key      SMALLINT NOT NULL,
    event_type         TEXT NOT NULL,
    routing_key        TEXT NOT NULL,
    payload            BYTEA NOT NULL,
    trace_context      JSONB NOT NULL DEFAULT '{}',
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at       TIMESTAMPTZ
);

-- What the relay reads: unpublished rows in insertion order.
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
-- What retention deletes.
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake the relay when events are committed (NOTIFY is delivered at commit,
-- once per transaction).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
