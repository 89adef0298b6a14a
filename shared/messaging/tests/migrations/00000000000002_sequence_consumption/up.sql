-- Ordered consumption (tables owned by the shop-messaging crate, see
-- shared/messaging/src/sequence.rs): each aggregate's events are applied
-- once, in version order, with no gaps.

-- The last version applied per aggregate, and the dead letter (if any) that
-- holds the aggregate's next version. One row per aggregate the consumer
-- has seen, like the projection itself.
CREATE TABLE inbox_sequence (
    consumer             TEXT NOT NULL,
    aggregate_type       TEXT NOT NULL,
    aggregate_id         TEXT NOT NULL,
    last_version         BIGINT NOT NULL DEFAULT 0,
    dead_letter_event    UUID,
    dead_letter_version  BIGINT,
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);

-- Events that arrived ahead of their aggregate's next version: held here
-- (acknowledged on the broker) until the versions before them are applied,
-- then sent back through the consumer's queue in order.
CREATE TABLE inbox_parked (
    consumer           TEXT NOT NULL,
    aggregate_type     TEXT NOT NULL,
    aggregate_id       TEXT NOT NULL,
    aggregate_version  BIGINT NOT NULL,
    event_id           UUID NOT NULL,
    event_type         TEXT NOT NULL,
    payload            BYTEA NOT NULL,
    properties         JSONB NOT NULL,
    parked_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    released_at        TIMESTAMPTZ,
    PRIMARY KEY (consumer, aggregate_type, aggregate_id, aggregate_version)
);

-- The live replicas of each consumer, which share its partitions.
CREATE TABLE consumer_members (
    consumer  TEXT NOT NULL,
    member    UUID NOT NULL,
    seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, member)
);

-- Every application of an event, in order, when CONSUMER_LEDGER is on
-- (for audits and for the chaos run's reconciliation).
CREATE TABLE inbox_ledger (
    seq                BIGSERIAL PRIMARY KEY,
    consumer           TEXT NOT NULL,
    event_id           UUID NOT NULL,
    aggregate_type     TEXT,
    aggregate_id       TEXT,
    aggregate_version  BIGINT,
    applied_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX inbox_ledger_applied_at ON inbox_ledger (applied_at);

-- The test handler's order of applications, and which consumer applied.
ALTER TABLE applied ADD COLUMN seq BIGSERIAL;
ALTER TABLE applied ADD COLUMN instance TEXT NOT NULL DEFAULT '';
