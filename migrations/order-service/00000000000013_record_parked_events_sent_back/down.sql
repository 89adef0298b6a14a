ALTER TABLE inbox_parked DROP COLUMN sent_at;
