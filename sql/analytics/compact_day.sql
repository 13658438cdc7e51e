-- One day's usage rows in the order readers look them up: a kernel's rows together,
-- per tier, in time. The path columns (date, hour) are dropped: the daily file's own
-- path holds the date again.
SELECT * EXCLUDE (date, hour)
FROM day_events
ORDER BY id, tier, window_start, host, pid, op
