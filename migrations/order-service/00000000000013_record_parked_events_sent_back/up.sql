-- When a released parked event was last sent back to its partition queue
-- and the broker confirmed it (NULL: never). The sweep sends again only a
-- release that was not confirmed (the process died between the commit that
-- released it and the publish, or the publish failed): one that was is in
-- the queue, maybe behind a backlog, and sending it again would only add a
-- duplicate (shop_messaging::sequence::take_ready).
ALTER TABLE inbox_parked ADD COLUMN sent_at TIMESTAMPTZ;
