DROP TABLE inbox_crashes;
