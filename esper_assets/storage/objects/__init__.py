"""Object stores: one ``ObjectStore`` protocol, a directory and S3 (boto3, one
attempt, bounded waits). L4 of the kernel cache and the repository's large objects
both live in one.

May import: ``esper_assets.errors``. Nothing else in ``storage``.
"""

from esper_assets.storage.objects.stores import (
    DirectoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    make_s3_client,
    object_store_from_settings,
)

__all__ = [
    "DirectoryObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "make_s3_client",
    "object_store_from_settings",
]
