-- The kernel cache's change log: every L3 row deleted (invalidate, cleanup, by hand)
-- or overwritten (a put over an existing id) leaves one row here, written by the
-- database itself so no writer can forget it. Every cache process reads the rows
-- after the last one it has seen (once a second by default) and drops those ids from
-- its L1: the embedded default has no Redis pub/sub, and with Redis this bounds what
-- a lost message can cost. `l2_stale` rows are written by a process whose write or
-- invalidation did not reach Redis: every process deletes those ids from L2 before
-- its next Redis call. Rows older than the retention are removed by cleanup().
--
-- Readers find new rows by transaction, not by `seq`: a sequence value is taken at
-- insert time, not at commit, so a row with a smaller seq can commit after one with
-- a larger seq and a "seq > last seen" cursor would skip it. Each reader keeps the
-- snapshot of its last look and asks for the rows whose transaction it did not see
-- then (txid >= that snapshot's xmin and not visible in it).
CREATE TABLE IF NOT EXISTS kernel_invalidations (
    seq       BIGSERIAL PRIMARY KEY,
    id        TEXT NOT NULL,
    l2_stale  BOOLEAN NOT NULL DEFAULT FALSE,
    txid      XID8 NOT NULL DEFAULT pg_current_xact_id(),
    at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS kernel_invalidations_txid_idx ON kernel_invalidations (txid);
CREATE INDEX IF NOT EXISTS kernel_invalidations_at_idx ON kernel_invalidations (at);
CREATE INDEX IF NOT EXISTS kernel_invalidations_l2_stale_idx
    ON kernel_invalidations (at) WHERE l2_stale;

-- Deletes: one statement-level trigger, one INSERT ... SELECT per DELETE however many
-- rows it removes (cleanup() of 100,000 expired rows is one insert, not 100,000).
CREATE OR REPLACE FUNCTION kernel_cache_log_deletes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO kernel_invalidations (id) SELECT id FROM gone;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS kernel_cache_deleted ON kernel_cache;
CREATE TRIGGER kernel_cache_deleted AFTER DELETE ON kernel_cache
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION kernel_cache_log_deletes();

-- Overwrites: row level, because PostgreSQL allows no transition table on a trigger
-- with a column list, and the list keeps access-count updates out of the log.
CREATE OR REPLACE FUNCTION kernel_cache_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO kernel_invalidations (id) VALUES (OLD.id);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS kernel_cache_changed ON kernel_cache;
CREATE TRIGGER kernel_cache_changed AFTER UPDATE OF data, object_key ON kernel_cache
    FOR EACH ROW EXECUTE FUNCTION kernel_cache_log_change();
