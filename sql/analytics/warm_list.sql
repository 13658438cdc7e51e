-- The kernels to load into the cache first: cache reads over the lookback window,
-- each day's weighing 0.5 ^ (its age in days / half_life_days), so a kernel read a lot
-- last month ranks below one read steadily this week. Misses count: a kernel asked for
-- and not found is the one warming helps most. Ties go by kernel id.
-- usage_days: each day's kernel_usage rows (a row per kernel and tier) with their day.
WITH aged AS (
    SELECT u.kernel_id, u.requests, u.day AS used_on,
           date_diff('day', u.day, p.day) AS age_days
    FROM usage_days AS u, params AS p
    WHERE u.requests > 0
),
scored AS (
    SELECT kernel_id,
           sum(requests * pow(0.5, age_days / p.half_life_days)) AS score,
           sum(requests) AS requests,
           max(used_on) AS last_used
    FROM aged, params AS p
    WHERE age_days BETWEEN 0 AND p.lookback_days - 1
    GROUP BY kernel_id
),
ranked AS (
    SELECT row_number() OVER (ORDER BY score DESC, kernel_id) AS rank, *
    FROM scored
)
SELECT rank, kernel_id, score, requests, last_used
FROM ranked
WHERE rank <= (SELECT top_n FROM params)
ORDER BY rank
