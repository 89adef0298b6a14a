DROP TABLE inbox_conflicts;
ALTER TABLE inbox_sequence DROP COLUMN gap_action_at;
ALTER TABLE inbox_sequence DROP COLUMN gap_action_outcome;
ALTER TABLE inbox_sequence DROP COLUMN gap_action;
ALTER TABLE inbox_sequence DROP COLUMN last_event;
