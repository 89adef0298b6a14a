-- The retention sweep deletes request ids older than REQUEST_ID_RETENTION
-- by this column.
CREATE INDEX create_order_requests_created_at ON create_order_requests (created_at);
