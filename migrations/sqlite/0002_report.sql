-- A finished job's report: the video job's summary as JSON (the per-frame records left out).
ALTER TABLE jobs ADD COLUMN report TEXT;
