"""L4: framed kernel values as objects in an object store (a directory or S3)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from urllib.parse import quote

from esper_assets.storage.cache import framing
from esper_assets.storage.objects import ObjectStore

_MAX_NAME = 200  # file systems allow 255 bytes per name; keep a margin for ".tmp-" files


def kernel_object_key(kernel_id: str) -> str:
    """A file- and URL-safe object key for a kernel id: the quoted id when it is
    short enough to be a file name, else its SHA-256."""
    name = quote(kernel_id, safe="").replace(".", "%2E")
    if len(name) > _MAX_NAME:
        name = "sha256-" + hashlib.sha256(kernel_id.encode()).hexdigest()
    return "kernels/" + name


class ObjectTier:
    """L4: framed values as objects. The sole home of values above the
    large-object threshold (L3 keeps a pointer row), and optionally an archive
    copy of every value."""

    name = "l4"
    durable = True

    def __init__(self, store: ObjectStore, ttl_seconds: float | None = None) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds

    def get(self, key: str) -> bytes | None:
        return self.store.get(kernel_object_key(key))

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            blob = self.get(key)
            if blob is not None:
                found[key] = blob
        return found

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        for key, blob in items:
            self.store.put(kernel_object_key(key), blob)

    def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.store.delete(kernel_object_key(key))

    def cleanup(self) -> list[str]:
        """Delete objects whose frame says they have expired (reads headers only)."""
        removed, now = [], framing.now_ms()
        for object_key, _, _ in list(self.store.list("kernels/")):
            head = self.store.head(object_key, framing.HEADER_SIZE)
            if head is None:
                continue
            expires = framing.peek_expires_ms(head)
            if expires is not None and expires != 0 and expires <= now:
                self.store.delete(object_key)
                removed.append(object_key)
        return removed

    def size(self) -> dict[str, int]:
        sizes = [size for _, size, _ in self.store.list("kernels/")]
        return {"entries": len(sizes), "stored_bytes": sum(sizes)}

    def ping(self) -> None:
        self.store.ping()

    def close(self) -> None:
        pass  # boto3 clients and directories hold nothing that needs releasing
