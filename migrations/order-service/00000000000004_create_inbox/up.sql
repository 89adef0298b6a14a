-- The inbox (shape owned by the shop-messaging crate): ids of the events
-- each consumer applied, written in the same transaction as the projection.
CREATE TABLE inbox (
    consumer      TEXT NOT NULL,
    event_id      UUID NOT NULL,
    event_type    TEXT NOT NULL,
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- What retention deletes.
CREATE INDEX inbox_processed_at ON inbox (processed_at);
