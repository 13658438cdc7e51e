-- The kernel cache's change log (see sql/postgres/004): every L3 row deleted or
-- overwritten leaves one row, written by triggers; every cache process polls it and
-- drops those ids from its L1. This is how the embedded default, which has no
-- Redis, invalidates other processes' copies. SQLite has one writer at a time and
-- `seq` is taken inside the write transaction, so seq order is commit order and a
-- reader's "seq > last seen" cursor misses nothing. Times are Unix epoch seconds.
CREATE TABLE IF NOT EXISTS kernel_invalidations (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    id        TEXT NOT NULL,
    l2_stale  INTEGER NOT NULL DEFAULT 0,
    at        REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE INDEX IF NOT EXISTS kernel_invalidations_at_idx ON kernel_invalidations (at);

CREATE TRIGGER IF NOT EXISTS kernel_cache_deleted AFTER DELETE ON kernel_cache
BEGIN
    INSERT INTO kernel_invalidations (id) VALUES (OLD.id);
END;

CREATE TRIGGER IF NOT EXISTS kernel_cache_changed AFTER UPDATE OF data, object_key ON kernel_cache
BEGIN
    INSERT INTO kernel_invalidations (id) VALUES (OLD.id);
END;
