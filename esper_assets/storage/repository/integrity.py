"""Content reads are checked against the checksum recorded at creation: bytes changed
behind the repository's back are refused, counted and logged, never handed out."""

from __future__ import annotations

import hashlib
import logging
import threading

from esper_assets.errors import CorruptValue

log = logging.getLogger(__name__)


class ChecksumGuard:
    """Verifies content read from ``db_location`` (inline rows) or an object store."""

    def __init__(self, db_location: str) -> None:
        self._db_location = db_location
        self._lock = threading.Lock()
        self._corrupt = 0

    @property
    def corrupt_reads(self) -> int:
        """Content reads refused because the bytes did not hash to the recorded checksum."""
        return self._corrupt

    def inline_location(self) -> str:
        return f"the inline data column of its row in {self._db_location}"

    @staticmethod
    def object_location(store, key: str | None) -> str:
        return f"object {key!r} in the object store {store.location}"

    def verify(self, asset_id: str, checksum: str | None, data: bytes, where: str) -> None:
        """Raise CorruptValue (counted and logged) unless ``data`` hashes to ``checksum``.

        Every content read goes through here: bytes changed behind the repository's
        back (a bad disk, a hand-edited row, an object overwritten in the bucket) are
        never handed out as if they were the asset."""
        actual = hashlib.sha256(data).hexdigest()
        if actual == checksum:
            return
        with self._lock:
            self._corrupt += 1
        message = (
            f"asset {asset_id!r} is corrupt: the {len(data)} bytes read from {where} hash to "
            f"sha256 {actual}, not to its recorded sha256 {checksum}. Restore the original "
            "bytes there from a backup, or re-create them from the asset's source and write "
            "them back there (they must hash to the recorded checksum; create_asset with the "
            "same bytes returns this asset and does not repair it); if neither is possible, "
            "deprecate the asset. Its metadata and other assets are not affected"
        )
        log.error("%s", message)
        raise CorruptValue(message)
