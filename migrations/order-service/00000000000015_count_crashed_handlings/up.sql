-- The consumer's own poison rule, kept where a crash cannot reset it: how
-- many times the handling of a redelivered event started (a short
-- committed statement before its transaction). A handling that ends with
-- an outcome (applied, retried, dead-lettered) deletes the row; one the
-- process died in leaves it counted. Past the consumer's attempt limit the
-- event is dead-lettered as `crashed` (shop_messaging::consumer, crashes).
-- The broker's own delivery limit is not that rule: every hand-over
-- returns messages, and returns count towards it.
CREATE TABLE inbox_crashes (
    consumer   TEXT NOT NULL,
    event_id   UUID NOT NULL,
    handlings  INTEGER NOT NULL,
    counted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
