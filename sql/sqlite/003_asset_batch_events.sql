-- See sql/postgres/003: one "created" event per create call, referenced by each row it
-- created; searches order by (field, asset_id), so the index covers the tie-break.
ALTER TABLE assets ADD COLUMN created_event INTEGER;

CREATE INDEX IF NOT EXISTS assets_compile_time_id_idx ON assets (compilation_time_ms, asset_id);
DROP INDEX IF EXISTS assets_compile_time_idx;
CREATE INDEX IF NOT EXISTS assets_created_id_idx ON assets (created_at, asset_id);
DROP INDEX IF EXISTS assets_created_idx;
