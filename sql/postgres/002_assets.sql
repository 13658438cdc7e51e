-- The asset repository: blueprints, kernels and checkpoints with versions, tags,
-- JSON properties, lineage, lifecycle state and an audit trail.
CREATE TABLE IF NOT EXISTS assets (
    asset_id             TEXT PRIMARY KEY,
    asset_type           TEXT NOT NULL CHECK (asset_type IN ('blueprint', 'kernel', 'checkpoint')),
    name                 TEXT NOT NULL,
    version              TEXT NOT NULL,
    version_number       INTEGER NOT NULL CHECK (version_number > 0),
    previous_version_id  TEXT REFERENCES assets (asset_id),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_by           TEXT NOT NULL,
    parent_id            TEXT REFERENCES assets (asset_id),
    derived_from         TEXT[] NOT NULL DEFAULT '{}',
    tags                 TEXT[] NOT NULL DEFAULT '{}',
    properties           JSONB NOT NULL DEFAULT '{}'::jsonb,
    compilation_time_ms  DOUBLE PRECISION,
    size_bytes           BIGINT NOT NULL,
    checksum             TEXT NOT NULL,
    data                 BYTEA,              -- inline data at or under the large-object threshold
    object_key           TEXT,               -- else where the object store holds it
    last_accessed        TIMESTAMPTZ,
    access_count         BIGINT NOT NULL DEFAULT 0,
    state                TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'deprecated', 'archived')),
    expires_at           TIMESTAMPTZ,
    CONSTRAINT assets_inline_xor_object CHECK ((data IS NULL) <> (object_key IS NULL)),
    CONSTRAINT assets_version_unique UNIQUE (asset_type, name, version_number),
    CONSTRAINT assets_version_label_unique UNIQUE (asset_type, name, version),
    CONSTRAINT assets_content_unique UNIQUE (checksum, asset_type)  -- dedup; checksum leads for lookups
);

CREATE INDEX IF NOT EXISTS assets_type_created_idx ON assets (asset_type, created_at);
CREATE INDEX IF NOT EXISTS assets_parent_idx ON assets (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS assets_state_idx ON assets (state);
CREATE INDEX IF NOT EXISTS assets_name_idx ON assets (name);
-- Orderable search fields, so "top N by X" walks an index instead of sorting every match.
CREATE INDEX IF NOT EXISTS assets_created_idx ON assets (created_at);
CREATE INDEX IF NOT EXISTS assets_compile_time_idx ON assets (compilation_time_ms);
CREATE INDEX IF NOT EXISTS assets_tags_idx ON assets USING GIN (tags);
CREATE INDEX IF NOT EXISTS assets_properties_idx ON assets USING GIN (properties jsonb_path_ops);
CREATE INDEX IF NOT EXISTS assets_access_idx ON assets (access_count DESC);

CREATE TABLE IF NOT EXISTS asset_events (
    event_id   BIGSERIAL PRIMARY KEY,
    asset_id   TEXT NOT NULL,
    event      TEXT NOT NULL,
    actor      TEXT NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    details    JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS asset_events_asset_idx ON asset_events (asset_id, event_id);
