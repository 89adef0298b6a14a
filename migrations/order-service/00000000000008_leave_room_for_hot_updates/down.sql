ALTER TABLE inbox_sequence RESET (fillfactor);
ALTER TABLE known_users RESET (fillfactor);
