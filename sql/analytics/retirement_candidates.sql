-- Active kernels and blueprints nobody used (no usage row of either source names them)
-- in the window and that are older than it. Never a kernel a live checkpoint names
-- (restoring it needs the kernel), never a blueprint a kernel that stays active was
-- compiled from (its lineage must stay readable).
WITH used AS (
    SELECT DISTINCT id FROM used_ids  -- the ids the window's usage files name
),
idle AS (
    SELECT a.*
    FROM repo_assets AS a, params AS p
    WHERE a.state = 'active' AND a.created_at < p.cutoff
      AND a.asset_id NOT IN (SELECT id FROM used)
),
idle_kernels AS (
    SELECT * FROM idle
    WHERE asset_type = 'kernel'
      AND asset_id NOT IN (SELECT kernel_id FROM checkpoint_kernels)
),
kept_kernels AS (
    SELECT * FROM repo_assets
    WHERE asset_type = 'kernel' AND state = 'active'
      AND asset_id NOT IN (SELECT asset_id FROM idle_kernels)
),
needed_blueprints AS (
    SELECT DISTINCT unnest(derived_from) AS asset_id FROM kept_kernels
),
idle_blueprints AS (
    SELECT * FROM idle
    WHERE asset_type = 'blueprint'
      AND asset_id NOT IN (SELECT asset_id FROM needed_blueprints)
)
SELECT asset_id, asset_type, name, version, created_at
FROM (SELECT * FROM idle_kernels UNION ALL SELECT * FROM idle_blueprints)
ORDER BY asset_type DESC, asset_id  -- kernels first: they go before their blueprints
