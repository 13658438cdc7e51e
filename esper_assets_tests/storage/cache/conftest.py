"""Helpers shared by the cache tests: values, frames, and SQL on a cache's L3."""

from __future__ import annotations

import random
import sqlite3
from contextlib import closing

from esper_assets.storage import PersistentKernelCache
from esper_assets.storage.cache import framing


def noise(n: int, seed: int = 0) -> bytes:
    """Incompressible bytes (stored raw, like float weights)."""
    return random.Random(seed).randbytes(n)


def decode(cache: PersistentKernelCache, blob: bytes) -> bytes:
    """The value inside a stored frame (raises CorruptValue if the frame is damaged)."""
    return cache.codecs.decode(framing.unpack(blob))


def sql(cache: PersistentKernelCache, query: str, params: tuple = ()) -> list[tuple]:
    """Run ``query`` (``?`` placeholders) on the cache's L3 database over a fresh connection."""
    if cache.config.postgres_url:
        import psycopg

        with psycopg.connect(cache.config.postgres_url, autocommit=True) as conn:
            cur = conn.execute(query.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []
    with closing(sqlite3.connect(cache.config.sqlite_path, isolation_level=None)) as conn:
        return conn.execute(query, params).fetchall()
