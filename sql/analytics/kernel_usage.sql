-- Per kernel and tier, one day of cache reads: requests, the tier's share of the
-- kernel's reads (hit_rate; for tier 'miss' it is the miss rate), bytes and the
-- p50/p95/p99 latency. A quantile is the upper bound (latency_bounds) of the first
-- bucket at which the cumulative count of the summed histograms reaches q * timed;
-- +inf when that is the overflow bucket, NULL when no request of the tier was timed.
WITH reads AS (
    SELECT id, tier, requests, bytes, latency_hist
    FROM day_events
    WHERE source = 'cache' AND op IN ('get', 'get_many')  -- puts answer no request
),
per_tier AS (
    -- The histograms are summed bucket by bucket here, in the one pass over the day's
    -- rows (unnesting every row's list first made 16 rows of each: 10x slower). One
    -- sum per bucket of schema.BUCKETS (16; test_rollups holds the two equal).
    SELECT id, tier, sum(requests) AS requests, sum(bytes) AS bytes,
           [
            sum(latency_hist[1]),
            sum(latency_hist[2]),
            sum(latency_hist[3]),
            sum(latency_hist[4]),
            sum(latency_hist[5]),
            sum(latency_hist[6]),
            sum(latency_hist[7]),
            sum(latency_hist[8]),
            sum(latency_hist[9]),
            sum(latency_hist[10]),
            sum(latency_hist[11]),
            sum(latency_hist[12]),
            sum(latency_hist[13]),
            sum(latency_hist[14]),
            sum(latency_hist[15]),
            sum(latency_hist[16])
           ] AS hist
    FROM reads
    GROUP BY id, tier
),
buckets AS (
    SELECT id, tier, generate_subscripts(hist, 1) AS bucket, unnest(hist) AS n
    FROM per_tier
),
cumulative AS (
    SELECT id, tier, bucket,
           sum(n) OVER (PARTITION BY id, tier ORDER BY bucket) AS at_or_below,
           sum(n) OVER (PARTITION BY id, tier) AS timed
    FROM buckets
),
quantiles AS (
    SELECT c.id, c.tier,
           min(b.upper_us) FILTER (WHERE c.at_or_below >= 0.50 * c.timed) AS p50_us,
           min(b.upper_us) FILTER (WHERE c.at_or_below >= 0.95 * c.timed) AS p95_us,
           min(b.upper_us) FILTER (WHERE c.at_or_below >= 0.99 * c.timed) AS p99_us
    FROM cumulative AS c
    JOIN latency_bounds AS b USING (bucket)
    WHERE c.timed > 0
    GROUP BY c.id, c.tier
)
SELECT t.id AS kernel_id, t.tier, t.requests,
       t.requests / NULLIF(sum(t.requests) OVER (PARTITION BY t.id), 0) AS hit_rate,
       t.bytes, q.p50_us, q.p95_us, q.p99_us
FROM per_tier AS t
LEFT JOIN quantiles AS q USING (id, tier)
ORDER BY kernel_id, tier
