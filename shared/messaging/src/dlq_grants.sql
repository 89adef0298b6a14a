-- What the dead-letter commands (`shop dlq`, connecting with
-- CONSUMER_DATABASE_URL) may do in a consumer's database, and nothing more:
-- read what is parked and where each aggregate stands (list, show), and
-- move a position past a skipped dead letter or a gap, forgetting and
-- releasing the events parked behind it and recording them as sent back
-- (skip, release; shared/messaging/src/sequence.rs, `release`,
-- `mark_sent`), or set it back or forth (set-position, `set_position`);
-- list reads the version conflicts recorded (`inbox_conflicts`); purge
-- reads the positions dead letters hold. The consumer's projection,
-- its inbox, its ledger and its members are out of reach. The service's
-- migrator runs these after every migration for the role named by
-- DLQ_DATABASE_ROLE; {role} is that role, quoted.
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE ON inbox_sequence TO {role};
GRANT SELECT, UPDATE, DELETE ON inbox_parked TO {role};
GRANT SELECT ON inbox_conflicts TO {role};
