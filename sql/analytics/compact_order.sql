-- The order of one day's usage rows in its compacted file: the order readers look them
-- up in, a kernel's rows together, per tier, in time. Only the row numbers are sorted;
-- the rows follow them (rollups.compact_day).
SELECT "row"
FROM day_events
ORDER BY id, tier, window_start, host, pid, op
