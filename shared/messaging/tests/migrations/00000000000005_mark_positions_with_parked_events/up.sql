-- The highest version parked behind each aggregate's position (NULL:
-- nothing parked): a consumer moves a position with nothing behind it (no
-- parked event, no dead letter) by a short UPDATE, and leaves the rest to
-- the statement that also forgets and releases parked events
-- (shop_messaging::sequence::advance). An aggregate that has parked events
-- but no position yet gets a row at 0.
ALTER TABLE inbox_sequence ADD COLUMN parked_until BIGINT;
INSERT INTO inbox_sequence AS s (consumer, aggregate_type, aggregate_id, parked_until)
SELECT consumer, aggregate_type, aggregate_id, max(aggregate_version)
FROM inbox_parked GROUP BY consumer, aggregate_type, aggregate_id
ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET parked_until = excluded.parked_until;
