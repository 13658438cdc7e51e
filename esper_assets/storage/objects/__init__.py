"""Object stores: one ``ObjectStore`` protocol, a directory and S3 (boto3, one
attempt, bounded waits) and the one map from botocore's errors to esper's. L4 of the kernel cache and the repository's large objects
both live in one.

May import: ``esper_assets.errors``. Nothing else in ``storage``.
"""

from esper_assets.storage.objects.stores import (
    MISSING_KEY,
    DirectoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    boto_errors,
    make_s3_client,
    object_store_from_settings,
    s3_error_code,
    s3_failure,
    s3_status,
    start_writeback,
)

__all__ = [
    "MISSING_KEY",
    "DirectoryObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "boto_errors",
    "make_s3_client",
    "object_store_from_settings",
    "s3_error_code",
    "s3_failure",
    "s3_status",
    "start_writeback",
]
