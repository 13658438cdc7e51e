-- What the repository holds, by asset type and state: how many, how many bytes, and how
-- many of them are expired (deleted checkpoints keep their row for the audit trail).
SELECT asset_type, state, count(*) AS assets,
       CAST(coalesce(sum(size_bytes), 0) AS BIGINT) AS bytes,
       count(*) FILTER (WHERE expired) AS expired
FROM repo_assets
GROUP BY asset_type, state
ORDER BY asset_type, state
