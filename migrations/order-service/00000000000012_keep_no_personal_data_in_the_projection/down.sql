-- The columns come back empty: what was dropped is gone.
ALTER TABLE known_users ADD COLUMN email TEXT NOT NULL DEFAULT '', ADD COLUMN name TEXT NOT NULL DEFAULT '';
