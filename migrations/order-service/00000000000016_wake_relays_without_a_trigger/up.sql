-- Relays are woken without a trigger. `NOTIFY` at a command's commit took a
-- lock that serialised every commit of the database (a notifying commit
-- shares no WAL flush): the command transaction's ceiling was 5462
-- commits/s with the trigger against 9886 without. A command now wakes its
-- own process's relay after it committed, and a background task sends at
-- most one `NOTIFY outbox` per OUTBOX_NOTIFY_INTERVAL for the relays of
-- other processes (shop_outbox::Wake). A writer of the outbox outside the
-- services sends `NOTIFY outbox` itself after its commit, or its events are
-- published within RELAY_POLL_INTERVAL.
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();

-- A relay batch's claim and read in one round trip. The partitions of the
-- lane (lane, lane + lanes, ... below partitions) are claimed with
-- transaction-scoped advisory locks, then their oldest unpublished rows are
-- read. The read is a second statement of a VOLATILE function, so it takes
-- a snapshot of its own after the locks are held: a partition freed by a
-- relay that committed in between is read as that relay left it (one
-- statement would read with a snapshot taken before its locks and publish
-- those rows again).
--
-- A read-only session (a standby after a failover) is refused before
-- anything is claimed: rows it published could not be marked.
--
-- The batch's commit (the rows marked published) does not wait for its WAL
-- flush: a mark lost in a crash of the database server within the WAL
-- writer's delay only publishes those events again, which consumers absorb
-- (their inbox and positions drop what they applied). The WAL is written
-- in order, so a lost mark is never followed by a kept later one.
CREATE FUNCTION outbox_claim(lane integer, lanes integer, partitions integer, namespace integer, batch_size bigint)
RETURNS SETOF outbox LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held smallint[];
BEGIN
    IF current_setting('transaction_read_only') = 'on' THEN
        RAISE EXCEPTION 'cannot publish from a read-only transaction: the rows could not be marked'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    held := ARRAY(
        SELECT p::smallint FROM generate_series(lane, partitions - 1, lanes) AS p
        WHERE pg_try_advisory_xact_lock(namespace, p)
    );
    IF cardinality(held) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT * FROM outbox
        WHERE published_at IS NULL AND partition_key = ANY(held)
        ORDER BY seq
        LIMIT batch_size;
END
$$;
