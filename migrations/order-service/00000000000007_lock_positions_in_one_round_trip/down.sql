DROP FUNCTION inbox_sequence_lock(TEXT, TEXT[], TEXT[]);
