-- L3 of the kernel cache. `data` holds the framed value (header + payload, see
-- esper_assets/storage/framing.py); values above the large-object threshold live
-- in the object store and their row keeps only `object_key` as a pointer.
CREATE TABLE IF NOT EXISTS kernel_cache (
    id            TEXT PRIMARY KEY,
    data          BYTEA,
    object_key    TEXT,
    metadata      JSONB NOT NULL DEFAULT '{}'::jsonb,
    size_bytes    BIGINT NOT NULL,            -- raw (uncompressed) value size
    stored_bytes  BIGINT NOT NULL,            -- framed size as stored
    compressed    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    accessed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    access_count  BIGINT NOT NULL DEFAULT 0,
    expires_at    TIMESTAMPTZ,
    CONSTRAINT kernel_cache_inline_xor_object CHECK ((data IS NULL) <> (object_key IS NULL))
);

-- Payloads are already compressed (zstd) or incompressible: don't let TOAST try again.
ALTER TABLE kernel_cache ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE INDEX IF NOT EXISTS kernel_cache_expires_at_idx
    ON kernel_cache (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS kernel_cache_accessed_at_idx ON kernel_cache (accessed_at);
CREATE INDEX IF NOT EXISTS kernel_cache_access_count_idx ON kernel_cache (access_count DESC);
CREATE INDEX IF NOT EXISTS kernel_cache_metadata_idx ON kernel_cache USING GIN (metadata jsonb_path_ops);
