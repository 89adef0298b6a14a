-- The test kit's documented identity on a PostgreSQL server (the defaults of
-- TEST_DATABASE_URL): shop_test, password shop_test. It may create
-- databases and roles, and end the sessions of the roles it created (the
-- test kit drops its databases WITH (FORCE)); it is no superuser. Compose's
-- database-roles runs this on the users database's server, .ci/run on a
-- native server. Idempotent. Reachable only where the server is: compose
-- publishes it on 127.0.0.1 only.
SELECT 'CREATE ROLE shop_test' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'shop_test') \gexec
ALTER ROLE shop_test WITH LOGIN NOSUPERUSER CREATEDB CREATEROLE PASSWORD 'shop_test';
SELECT 'GRANT pg_signal_backend TO shop_test'
 WHERE NOT pg_has_role('shop_test', 'pg_signal_backend', 'MEMBER') \gexec
-- The tests set the message language of their own databases (lc_messages,
-- a superuser setting) to prove that outages are told by SQLSTATE, not by
-- PostgreSQL's English text: a privilege on that one setting (PostgreSQL 15
-- and later), no superuser.
SELECT 'GRANT SET ON PARAMETER lc_messages TO shop_test'
 WHERE current_setting('server_version_num')::int >= 150000 \gexec
