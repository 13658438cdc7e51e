-- L3 of the kernel cache, embedded. Same shape as sql/postgres/001: `data` is the
-- framed value or NULL when the value lives in the object store (`object_key`).
-- Times are Unix epoch seconds (REAL).
CREATE TABLE IF NOT EXISTS kernel_cache (
    id            TEXT PRIMARY KEY,
    data          BLOB,
    object_key    TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    size_bytes    INTEGER NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    compressed    INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    accessed_at   REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    access_count  INTEGER NOT NULL DEFAULT 0,
    expires_at    REAL,
    CHECK ((data IS NULL) <> (object_key IS NULL))
);

CREATE INDEX IF NOT EXISTS kernel_cache_expires_at_idx
    ON kernel_cache (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS kernel_cache_accessed_at_idx ON kernel_cache (accessed_at);
CREATE INDEX IF NOT EXISTS kernel_cache_access_count_idx ON kernel_cache (access_count DESC);
