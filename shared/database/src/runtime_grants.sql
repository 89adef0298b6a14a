-- What a service's runtime role may do in its database: read and write rows,
-- nothing else. The runtime role is the user of DATABASE_URL; the migrator,
-- the user of DATABASE_MIGRATION_URL, owns the schema (every table, index,
-- function and sequence its migrations create) and runs these statements
-- after the migrations at every start, under the migration lock. {role} is
-- the runtime role, quoted.
--
-- Not granted, so refused: DDL of any kind (CREATE, ALTER, DROP, TRUNCATE:
-- only the owner may), REFERENCES and TRIGGER, and anything outside this
-- database (the role itself has neither CREATEDB nor CREATEROLE).
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};
-- Tables and sequences that later migrations create get the same, as the
-- migrator creates them: no start without the grants above is needed for a
-- new table to be reachable.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {role};
-- The migrations' own bookkeeping is the migrator's: the runtime may see
-- which ran, not change it.
REVOKE INSERT, UPDATE, DELETE ON __diesel_schema_migrations FROM {role};
