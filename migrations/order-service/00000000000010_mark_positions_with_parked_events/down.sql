ALTER TABLE inbox_sequence DROP COLUMN parked_until;
