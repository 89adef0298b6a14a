DROP TABLE inbox_ledger;
DROP TABLE consumer_members;
DROP TABLE inbox_parked;
DROP TABLE inbox_sequence;
