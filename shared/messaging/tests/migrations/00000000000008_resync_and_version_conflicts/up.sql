-- The event that made each position's last version (NULL: moved by an
-- operator, or before this column existed): an event at that same version
-- with another id is a version conflict (the producer reused a version
-- after a restore), surfaced rather than dropped as a duplicate
-- (shop_messaging::sequence, "Version conflicts").
ALTER TABLE inbox_sequence ADD COLUMN last_event UUID;
-- The gap policy's last action on an aggregate stuck behind a gap
-- (CONSUMER_GAP_POLICY): what was done, how it went, and when; at most one
-- per aggregate per CONSUMER_GAP_TIMEOUT, claimed by setting gap_action_at.
ALTER TABLE inbox_sequence ADD COLUMN gap_action TEXT;
ALTER TABLE inbox_sequence ADD COLUMN gap_action_outcome TEXT;
ALTER TABLE inbox_sequence ADD COLUMN gap_action_at TIMESTAMPTZ;
-- Events that arrived at an aggregate's last version with another event id
-- than the one applied there, not applied. Kept for INBOX_RETENTION; a
-- repeat of the same conflicting event is recorded once.
CREATE TABLE inbox_conflicts (
    consumer TEXT NOT NULL,
    event_id UUID NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    applied_event UUID NOT NULL,
    event_type TEXT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
