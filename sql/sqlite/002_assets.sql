-- The asset repository, embedded. Same shape as sql/postgres/002: arrays and
-- JSON are TEXT holding JSON; times are Unix epoch seconds (REAL).
CREATE TABLE IF NOT EXISTS assets (
    asset_id             TEXT PRIMARY KEY,
    asset_type           TEXT NOT NULL CHECK (asset_type IN ('blueprint', 'kernel', 'checkpoint')),
    name                 TEXT NOT NULL,
    version              TEXT NOT NULL,
    version_number       INTEGER NOT NULL CHECK (version_number > 0),
    previous_version_id  TEXT REFERENCES assets (asset_id),
    created_at           REAL NOT NULL,
    created_by           TEXT NOT NULL,
    parent_id            TEXT REFERENCES assets (asset_id),
    derived_from         TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(derived_from)),
    tags                 TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tags)),
    properties           TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(properties)),
    compilation_time_ms  REAL,
    size_bytes           INTEGER NOT NULL,
    checksum             TEXT NOT NULL,
    data                 BLOB,
    object_key           TEXT,
    last_accessed        REAL,
    access_count         INTEGER NOT NULL DEFAULT 0,
    state                TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'deprecated', 'archived')),
    expires_at           REAL,
    CHECK ((data IS NULL) <> (object_key IS NULL)),
    UNIQUE (asset_type, name, version_number),
    UNIQUE (asset_type, name, version),
    UNIQUE (checksum, asset_type)
);

CREATE INDEX IF NOT EXISTS assets_type_created_idx ON assets (asset_type, created_at);
-- Not partial: SQLite will not use a partial index for the recursive lineage joins.
CREATE INDEX IF NOT EXISTS assets_parent_idx ON assets (parent_id);
CREATE INDEX IF NOT EXISTS assets_state_idx ON assets (state);
CREATE INDEX IF NOT EXISTS assets_name_idx ON assets (name);
-- Orderable search fields, so "top N by X" walks an index instead of sorting every match.
CREATE INDEX IF NOT EXISTS assets_created_idx ON assets (created_at);
CREATE INDEX IF NOT EXISTS assets_compile_time_idx ON assets (compilation_time_ms);
CREATE INDEX IF NOT EXISTS assets_access_idx ON assets (access_count DESC);

CREATE TABLE IF NOT EXISTS asset_events (
    event_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    asset_id   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    at         REAL NOT NULL,
    details    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(details))
);
CREATE INDEX IF NOT EXISTS asset_events_asset_idx ON asset_events (asset_id, event_id);
