"""Use cases without Dagster, for every entry point (Dagster's ``defs/``, ``runner/``,
``cli/``, ``bench/``, ``api/``) to call.

What each module owns:

- ``wiring``: the one place storage objects are built from ``Settings``: the kernel
  cache and the asset repository (context managers), the object store, the landing
  zone, the bounded S3 client. Entry points build objects here and nowhere else.
- ``landing``: where blueprint files arrive (a directory or an S3 prefix), read and
  moved only inside itself.
- ``arrivals``: what arrived since the last look (the ``new_blueprints`` sensor's
  logic and its cursor), and ``BacklogWatch``: the landed blueprint files no kernel
  was built from yet (``/metrics``' landing lag, pending and invalid files).
- ``kernels``: how a landed blueprint becomes a registered, compiled, cached kernel;
  lineage queries.
- ``upkeep``: cache cleanup, cache warming (restoring a kernel every tier lost from
  the repository) and nightly re-validation.
- ``health``: the kernel cache's health, each tier pinged and probed (write, read
  back, delete): ``esper health`` and the ``kernel_cache_healthy`` check.
- ``checkpoints``: what the ``new_checkpoints`` sensor finds (checkpoints saved since
  its cursor, landed checkpoint folders) and the platform's own state as a checkpoint.

May import: ``esper_assets.errors``, ``settings``, ``blueprints``, ``storage``,
``checkpoints``.
Never Dagster, never ``defs``, ``runner``, ``cli``, ``bench`` or ``api`` (they import
this).
"""
