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
    the repository's limit (``esper_assets.storage.repository.repository.MAX_JSON_DEPTH``)."""


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


class MissingChunk(StorageError, LookupError):
    """A checkpoint chunk its manifest names is not in the chunk store."""


class CorruptChunk(CorruptValue):
    """A stored checkpoint chunk does not decompress or does not hash to its address."""


class CheckpointNotFound(EsperError, LookupError):
    """No checkpoint for that run (or that step of it)."""


class CheckpointExists(EsperError):
    """A checkpoint for that (run, step) is already saved; steps are written once."""


class InvalidCheckpoint(InvalidInput):
    """A component or manifest is malformed (a truncated or lying safetensors header,
    a manifest naming a component or chunk that is not there, a component that changed
    while it was being saved)."""


class RetentionFailed(EsperError):
    """Retention after a Checkpointer's save failed; the save itself is stored."""


class RestoreRefused(EsperError):
    """A restore would overwrite something (a non-empty destination without force)."""


_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_SECRET_KEYS = r"(?:password|sslpassword|passwd|pass|pwd|secret|token)"
# libpq, psycopg and redis-py also take secrets as query parameters. The value runs to
# the next '&' only: an unencoded '#' or '?' would not end it for libpq.
_SECRET_PARAM = re.compile(rf"(?i)([?&;]{_SECRET_KEYS}=)[^&]*")
# libpq key=value connection strings: ``password=s3cret`` or ``password = 'a \' quoted'``
# (single quotes, backslash escapes; an unterminated quote runs to the end).
_KV_SECRET = re.compile(rf"(?i)(?:^|(?<=\s))({_SECRET_KEYS}\s*=\s*)(?:'(?:[^'\\]|\\.?)*'?|\S*)")


def redact_url(url: str | None) -> str:
    """``url`` with every password hidden as ``***``, in any form we may be handed:
    ``scheme://user:password@host``, ``user:password@host`` without a scheme,
    ``?password=`` (and similar) query parameters, and libpq ``key=value`` strings
    (``password=...``, quoted or not).

    Passwords holding unencoded ``@ / : ? #`` make a URL ambiguous: the password is
    then taken to run from the first ``:`` of the user info to the *last* ``@`` in
    the whole string, so no fragment of it stays visible, at the price of hiding a
    little more than the password when an ``@`` appears later in a query value
    (Settings refuses such URLs anyway: it wants every other ``@`` as ``%40``).
    """
    if not url:
        return ""
    text = _KV_SECRET.sub(r"\1***", str(url))
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    at = text.rfind("@")
    colon = text.find(":", start, at) if at >= start else -1
    if colon != -1:
        text = f"{text[: colon + 1]}***{text[at:]}"
    return _SECRET_PARAM.sub(r"\1***", text)
