"""AssetRepository verifies what it reads (issue 8, hardening).

Every content read checks the sha256 of the bytes it got against the asset's
recorded ``checksum``. Bytes damaged behind the repository's back - the inline
``data`` column changed over SQL, the object rewritten through a plain boto3
client or in the objects directory - raise ``CorruptValue`` naming the asset, where
the bytes came from and what to do, and are counted and logged. Nothing is mocked:
the damage is done with the same tools an operator (or a bad disk) would use.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from esper_assets.errors import CorruptValue, StorageError
from esper_assets.storage.objects import make_s3_client
from esper_assets.storage.repository import AssetMetadata, AssetQuery, AssetRepository

THRESHOLD = 1024
OPTIONS = {"large_object_threshold": THRESHOLD, "access_flush_interval_s": 3600.0}
SMALL, LARGE = 200, 4 * THRESHOLD  # inline in the row / in the object store


@pytest.fixture
def repo(make_repo, backend) -> AssetRepository:
    return make_repo(backend, **OPTIONS)


def data_of(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def create(repo: AssetRepository, name: str, data: bytes) -> str:
    return repo.create_asset(AssetMetadata(asset_type="kernel", name=name), data)


def damaged(data: bytes) -> bytes:
    """The same length, one byte different: only a checksum can tell."""
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


def overwrite_row(backend: str, request, tmp_path, asset_id: str, new: bytes) -> None:
    """Change the inline data directly in the database, bypassing the repository."""
    if backend == "sqlite":
        with sqlite3.connect(tmp_path / "assets.sqlite3") as conn:
            n = conn.execute(
                "UPDATE assets SET data = ? WHERE asset_id = ?", (new, asset_id)
            ).rowcount
    else:
        import psycopg

        with psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True) as conn:
            n = conn.execute(
                "UPDATE assets SET data = %s WHERE asset_id = %s", (new, asset_id)
            ).rowcount
    assert n == 1


def overwrite_object(backend: str, request, tmp_path, key: str, new: bytes) -> None:
    """Rewrite the object with a plain client: a real boto3 client for S3, open() for a directory."""
    if backend == "sqlite":
        path = tmp_path / "objects" / key
        assert path.is_file()
        path.write_bytes(new)
    else:
        client = make_s3_client(request.getfixturevalue("s3_endpoint"))
        bucket = request.getfixturevalue("s3_bucket")
        client.head_object(Bucket=bucket, Key=f"esper/{key}")  # it is there
        client.put_object(Bucket=bucket, Key=f"esper/{key}", Body=new)


def assert_helpful(exc: CorruptValue, asset_id: str, where: str) -> None:
    message = str(exc)
    assert asset_id in message
    assert where in message
    assert "sha256" in message
    assert "restore" in message.lower() and "re-create" in message


# -- inline data ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage", [damaged, lambda d: d[:-1], lambda d: d + b"\x00", lambda d: b""]
)
def test_damaged_inline_data_raises_corrupt_value(repo, backend, request, tmp_path, damage):
    good = data_of(SMALL, 1)
    aid = create(repo, "inline", good)
    assert repo.get_asset(aid)[1] == good
    overwrite_row(backend, request, tmp_path, aid, damage(good))
    with pytest.raises(CorruptValue) as info:
        repo.get_asset(aid)
    assert_helpful(info.value, aid, "inline")


# -- object store --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [damaged, lambda d: d[: THRESHOLD * 2], lambda d: b"x"])
def test_damaged_object_raises_corrupt_value(repo, backend, request, tmp_path, damage):
    good = data_of(LARGE, 2)
    aid = create(repo, "large", good)
    key = repo.get_metadata(aid).object_key
    assert key == f"assets/{aid}"
    assert repo.get_asset(aid)[1] == good
    overwrite_object(backend, request, tmp_path, key, damage(good))
    with pytest.raises(CorruptValue) as info:
        repo.get_asset(aid)
    assert_helpful(info.value, aid, key)


def test_damaged_archived_object_raises_corrupt_value(repo, backend, request, tmp_path):
    good = data_of(LARGE, 3)
    aid = create(repo, "cold", good)
    assert repo.archive_assets(datetime.now(UTC) + timedelta(seconds=1)) == 1
    key = repo.get_metadata(aid).object_key
    assert key == f"archive/{aid}"
    overwrite_object(backend, request, tmp_path, key, damaged(good))
    with pytest.raises(CorruptValue) as info:
        repo.get_asset(aid)
    assert_helpful(info.value, aid, key)


# -- counted, logged, and nothing else affected ---------------------------------------------
def test_corruption_is_counted_logged_and_touches_nothing_else(
    repo, backend, request, tmp_path, make_repo, caplog
):
    small, large, fine = data_of(SMALL, 4), data_of(LARGE, 5), data_of(SMALL, 6)
    bad_row, bad_obj = create(repo, "bad-row", small), create(repo, "bad-obj", large)
    ok = create(repo, "fine", fine)
    overwrite_row(backend, request, tmp_path, bad_row, damaged(small))
    overwrite_object(backend, request, tmp_path, f"assets/{bad_obj}", damaged(large))
    assert repo.corrupt_reads == 0
    with caplog.at_level(logging.ERROR, logger="esper_assets.storage.repository"):
        for aid in (bad_row, bad_obj, bad_row):
            with pytest.raises(CorruptValue):
                repo.get_asset(aid)
    assert repo.corrupt_reads == 3
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 3 and bad_row in logged[0].getMessage()
    # CorruptValue is a StorageError: callers that handle storage failures handle it too
    assert issubclass(CorruptValue, StorageError)
    # the metadata is still readable, the other asset still reads, searches still work
    assert repo.get_metadata(bad_row).checksum == hashlib.sha256(small).hexdigest()
    assert repo.get_asset(ok)[1] == fine
    assert len(repo.search_assets(AssetQuery())) == 3
    # failed reads are not counted as accesses; the good read is
    repo.flush_access()
    counts = {m.asset_id: m.access_count for m in repo.search_assets(AssetQuery())}
    assert counts == {bad_row: 0, bad_obj: 0, ok: 1}


def test_archiving_skips_a_corrupt_asset_and_archives_the_rest(
    repo, backend, request, tmp_path, caplog
):
    bad_data, good_data = data_of(LARGE, 7), data_of(LARGE, 8)
    bad, good = create(repo, "bad", bad_data), create(repo, "good", good_data)
    overwrite_object(backend, request, tmp_path, f"assets/{bad}", damaged(bad_data))
    with caplog.at_level(logging.ERROR, logger="esper_assets.storage.repository"):
        archived = repo.archive_assets(datetime.now(UTC) + timedelta(seconds=1))
    assert archived == 1
    assert repo.get_metadata(good).state == "archived"
    assert repo.get_asset(good)[1] == good_data
    # the damaged copy stays where it was, unarchived, for someone to restore
    left = repo.get_metadata(bad)
    assert (left.state, left.object_key) == ("active", f"assets/{bad}")
    assert repo.corrupt_reads == 1
    assert any(bad in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_intact_data_still_reads_on_both_paths(repo):
    small, large = data_of(SMALL, 9), data_of(LARGE, 10)
    a, b = create(repo, "s", small), create(repo, "l", large)
    assert repo.get_asset(a)[1] == small
    assert repo.get_asset(b)[1] == large
    assert repo.corrupt_reads == 0
