-- The retention sweep deletes request ids older than REQUEST_ID_RETENTION
-- by this column.
CREATE INDEX create_user_requests_created_at ON create_user_requests (created_at);
