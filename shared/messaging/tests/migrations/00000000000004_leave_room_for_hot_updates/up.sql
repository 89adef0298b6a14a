-- As in the order service: positions are updated in place, batch after
-- batch; a third of each page free lets those updates be HOT (no index
-- entry written).
ALTER TABLE inbox_sequence SET (fillfactor = 70);
