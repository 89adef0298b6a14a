-- Each consumer group's key for sealing the headers it writes for itself
-- (attempt, released, dead_letter_*, original_*): they count only on copies
-- the group sealed (shop_messaging::seal). Made by the first replica that
-- starts (32 random bytes); every replica reads the same one.
CREATE TABLE consumer_seal_keys (
    consumer    TEXT PRIMARY KEY,
    seal_key    BYTEA NOT NULL CHECK (length(seal_key) >= 32),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
