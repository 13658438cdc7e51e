-- The chunk index of checkpoints: one row per content-addressed chunk written to the
-- object store (key chunks/<first 2 hex>/<address>). A row is inserted only after its
-- object is durable, so the index never names a missing object; a second writer of
-- the same address inserts nothing (ON CONFLICT DO NOTHING).
--   address     blake3 hex digest of the raw (uncompressed) bytes
--   size        raw bytes; stored_size: bytes of the object (codec byte + payload)
--   touched_at  the last time a save wrote or reused the chunk: garbage collection
--               spares chunks touched within its grace period, so a save that
--               deduplicates against an unreferenced chunk never loses it.
CREATE TABLE IF NOT EXISTS checkpoint_chunks (
    address     TEXT PRIMARY KEY CHECK (address ~ '^[0-9a-f]{64}$'),
    size        BIGINT NOT NULL CHECK (size >= 0),
    stored_size BIGINT NOT NULL CHECK (stored_size >= 1),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    touched_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS checkpoint_chunks_touched_at_idx ON checkpoint_chunks (touched_at);
