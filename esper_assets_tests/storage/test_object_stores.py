"""The two object stores speak alike: parts written in order, views read back,
flushes, missing keys, bad keys (the directory one on disk, S3 through moto's HTTP
server)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from esper_assets.errors import InvalidInput, TierUnavailable
from esper_assets.storage.objects.stores import (
    DirectoryObjectStore,
    S3ObjectStore,
    make_s3_client,
)


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path: Path):
    if request.param == "directory":
        return DirectoryObjectStore(tmp_path / "objects")
    client = make_s3_client(request.getfixturevalue("s3_endpoint"))
    return S3ObjectStore(client, request.getfixturevalue("s3_bucket"), "objects")


def test_parts_are_written_in_order_and_read_back(store):
    big = bytes(range(256)) * 4096  # 1 MiB
    store.put("a/b", [b"\x00", memoryview(big), b"end"])
    assert store.get("a/b") == b"\x00" + big + b"end"
    assert bytes(store.get_view("a/b")) == b"\x00" + big + b"end"
    store.put("a/c", b"whole", durable=False)
    store.sync(["a/b", "a/c"])
    assert store.get("a/c") == b"whole"


def test_missing_keys_read_as_none_and_bad_keys_are_refused(store):
    assert store.get("nope") is None and store.get_view("nope") is None
    for key in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(InvalidInput):
            store.put(key, b"x")


def test_a_directory_view_is_this_threads_buffer_until_its_next_read(tmp_path):
    store = DirectoryObjectStore(tmp_path)
    store.put("one", b"first")
    store.put("two", b"2nd")
    first = store.get_view("one")
    assert bytes(first) == b"first"
    other: list[bytes] = []
    thread = threading.Thread(target=lambda: other.append(bytes(store.get_view("two"))))
    thread.start()
    thread.join()
    assert other == [b"2nd"] and bytes(first) == b"first"  # another thread's read: no effect
    second = store.get_view("two")
    assert bytes(second) == b"2nd" and bytes(first[:3]) == b"2nd"  # same buffer, reused


def test_a_directory_store_flushes_and_cleans_up(tmp_path):
    store = DirectoryObjectStore(tmp_path)
    store.put("x/y", [b"a", b"b"])  # durable by default: fsynced before the rename
    assert (tmp_path / "x" / "y").read_bytes() == b"ab"
    assert not [p for p in (tmp_path / "x").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(TierUnavailable, match="cannot flush"):
        store.sync(["x/missing"])
