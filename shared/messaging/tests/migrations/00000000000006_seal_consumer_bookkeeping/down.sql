DROP TABLE consumer_seal_keys;
