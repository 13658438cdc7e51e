"""Use cases without Dagster: what happens when blueprints land (``landing``,
``arrivals``), how a blueprint becomes a registered kernel (``kernels``).

May import: ``esper_assets.errors``, ``settings``, ``blueprints``, ``storage``.
Never Dagster: ``defs/`` wraps these in assets, sensors and jobs.
"""
