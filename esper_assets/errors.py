"""One exception hierarchy for the whole project.

Every message says what was wrong, where, and what to do about it. Secrets never
appear in messages: URLs are passed through :func:`redact_url` first.
"""

from __future__ import annotations

import re


class EsperError(Exception):
    """Base of every error esper_assets raises on purpose."""


class ConfigError(EsperError):
    """An ``ESPER_*`` variable (or a config field) has a value we cannot use."""


class InvalidInput(EsperError, ValueError):
    """The caller passed something we refuse to store or look up."""


class InvalidKernelId(InvalidInput):
    """A kernel id is empty, too long, not a string or holds unprintable characters."""


class InvalidValue(InvalidInput):
    """A value is not bytes, or is larger than the configured maximum."""


class AssetNotFound(EsperError, LookupError):
    """No asset with that id (or a parent / derived_from id that does not exist)."""


class AssetExpired(AssetNotFound):
    """The asset exists but its expires_at has passed."""


class AssetConflict(EsperError):
    """The write contradicts what is stored (e.g. the same version label with other content)."""


class LineageCycle(InvalidInput):
    """A parent link would make an asset its own ancestor."""


class InvalidAssetField(InvalidInput):
    """An asset field is unknown, read-only, or holds a value of the wrong kind."""


class InvalidQuery(InvalidInput):
    """An AssetQuery was given a value it cannot search with."""


class JsonTooDeep(InvalidInput):
    """JSON (asset properties, a property filter, ``--property`` text) nests deeper than
    the repository's limit (``esper_assets.storage.assets.MAX_JSON_DEPTH``)."""


class PropertiesTooDeep(JsonTooDeep, InvalidAssetField):
    """An asset's properties nest too deeply (create, bulk_create, update)."""


class QueryTooDeep(JsonTooDeep, InvalidQuery):
    """A property filter (AssetQuery.with_properties, ``--property``) nests too deeply."""


class StorageError(EsperError):
    """A storage tier failed in a way the caller must know about."""


class TierUnavailable(StorageError):
    """A tier could not be reached (connection refused, timeout, open circuit)."""


class DurableWriteError(StorageError):
    """The durable tier did not confirm a write: the value is NOT stored."""


class FlushError(DurableWriteError):
    """Write-back could not persist dirty keys; they are still held in memory."""


class CorruptValue(StorageError):
    """Stored bytes failed their checksum or could not be decoded."""


class MigrationError(StorageError):
    """A schema migration failed or the migration files are inconsistent."""


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/]*)(:[^@/]*)?@")
# libpq, psycopg and redis-py also take secrets as query parameters.
_SECRET_PARAM = re.compile(r"(?i)([?&](?:password|pass|pwd|sslpassword|secret|token)=)[^&#]*")


def redact_url(url: str | None) -> str:
    """Hide passwords in ``scheme://user:password@host`` and ``?password=`` URLs."""
    if not url:
        return ""
    url = _USERINFO.sub(
        lambda m: f"{m['scheme']}{m['user']}:***@" if m.group(3) else m.group(0), url
    )
    return _SECRET_PARAM.sub(r"\1***", url)
