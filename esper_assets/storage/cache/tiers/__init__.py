"""The cache's tiers, one module each: ``memory`` (L1), ``redis`` (L2 and pub/sub
invalidation), ``sql`` (L3 on PostgreSQL or SQLite, and its change log), ``objects``
(L4). Each is driven only by ``PersistentKernelCache``, through its slot (``slots``).
"""
