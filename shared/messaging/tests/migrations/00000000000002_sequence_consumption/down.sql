ALTER TABLE applied DROP COLUMN instance;
ALTER TABLE applied DROP COLUMN seq;
DROP TABLE inbox_ledger;
DROP TABLE consumer_members;
DROP TABLE inbox_parked;
DROP TABLE inbox_sequence;
