-- The kernels to load into the cache first: cache reads over the lookback window,
-- each day's weighing 0.5 ^ (its age in days / half_life_days), so a kernel read a lot
-- last month ranks below one read steadily this week. Misses count: a kernel asked for
-- and not found is the one warming helps most. Ties go by kernel id.
WITH aged AS (
    SELECT e.id, e.requests, CAST(e.date AS DATE) AS used_on,
           date_diff('day', CAST(e.date AS DATE), p.day) AS age_days
    FROM window_events AS e, params AS p
    WHERE e.source = 'cache' AND e.op IN ('get', 'get_many')
),
scored AS (
    SELECT id AS kernel_id,
           sum(requests * pow(0.5, age_days / p.half_life_days)) AS score,
           sum(requests) AS requests,
           max(used_on) AS last_used
    FROM aged, params AS p
    WHERE age_days BETWEEN 0 AND p.lookback_days - 1
    GROUP BY id
),
ranked AS (
    SELECT row_number() OVER (ORDER BY score DESC, kernel_id) AS rank, *
    FROM scored
)
SELECT rank, kernel_id, score, requests, last_used
FROM ranked
WHERE rank <= (SELECT top_n FROM params)
ORDER BY rank
