DROP INDEX users_updated_at;
DROP TABLE user_tombstones;
