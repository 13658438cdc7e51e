-- The chunk index of checkpoints (see sql/postgres/005): one row per content-addressed
-- chunk in the object store, inserted only after its object is durable. touched_at:
-- the last save that wrote or reused the chunk, for garbage collection's grace
-- period. Times are Unix epoch seconds.
CREATE TABLE IF NOT EXISTS checkpoint_chunks (
    address     TEXT PRIMARY KEY CHECK (length(address) = 64),
    size        INTEGER NOT NULL CHECK (size >= 0),
    stored_size INTEGER NOT NULL CHECK (stored_size >= 1),
    created_at  REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    touched_at  REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE INDEX IF NOT EXISTS checkpoint_chunks_touched_at_idx ON checkpoint_chunks (touched_at);
