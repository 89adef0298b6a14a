-- A consumer batch locks its aggregates and reads their positions in one
-- round trip (shop_messaging::sequence::lock). The positions are read by the
-- function's second statement: in READ COMMITTED a VOLATILE function takes
-- a fresh snapshot for each statement, so the read sees what the previous
-- holder of a lock committed. A single statement doing both would read with
-- the snapshot taken before its locks.
CREATE FUNCTION inbox_sequence_lock(consumer_name TEXT, types TEXT[], ids TEXT[])
RETURNS TABLE (aggregate_type TEXT, aggregate_id TEXT, last_version BIGINT,
               dead_letter_event UUID, dead_letter_version BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- In key order, so two batches over the same aggregates never deadlock.
    PERFORM pg_advisory_xact_lock(keys.k) FROM (
        SELECT DISTINCT hashtextextended(consumer_name || '/' || a.t || '/' || a.i, 0) AS k
        FROM unnest(types, ids) AS a(t, i) ORDER BY k) AS keys;
    -- One index lookup per aggregate whatever the table's statistics (the
    -- LIMIT keeps the lateral lookup from being planned as a join over
    -- every position of the consumer).
    RETURN QUERY
    SELECT s.aggregate_type, s.aggregate_id, s.last_version, s.dead_letter_event, s.dead_letter_version
    FROM unnest(types, ids) AS a(t, i) CROSS JOIN LATERAL (
        SELECT * FROM inbox_sequence p
        WHERE p.consumer = consumer_name AND p.aggregate_type = a.t AND p.aggregate_id = a.i
        LIMIT 1) AS s;
END
$$;
