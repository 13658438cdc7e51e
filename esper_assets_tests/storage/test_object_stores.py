"""The two object stores speak alike: parts written in order, views read back,
flushes, missing keys, bad keys (the directory one on disk, S3 through moto's HTTP
server)."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class FlakyRelay:
    """A loopback HTTP relay to moto's server that answers the first ``failures``
    requests of each method with S3's 500 InternalError, as S3 itself sometimes does."""

    def __init__(self, upstream: str, failures: int) -> None:
        upstream_host, upstream_port = upstream.removeprefix("http://").split(":")
        self.failed: dict[str, int] = {}
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if relay.failed.get(self.command, 0) < failures:
                    relay.failed[self.command] = relay.failed.get(self.command, 0) + 1
                    return self.answer(500, {}, INTERNAL_ERROR)
                upstream_conn = http.client.HTTPConnection(upstream_host, int(upstream_port))
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                answer = upstream_conn.getresponse()
                self.answer(answer.status, dict(answer.getheaders()), answer.read())
                upstream_conn.close()

            def answer(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_DELETE = do_HEAD = do_POST = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


@pytest.fixture
def flaky_s3(s3_endpoint, s3_bucket):
    relays: list[FlakyRelay] = []

    def open_store(failures: int) -> tuple[S3ObjectStore, FlakyRelay]:
        relays.append(FlakyRelay(s3_endpoint, failures))
        return S3ObjectStore(make_s3_client(relays[-1].url), s3_bucket), relays[-1]

    yield open_store
    for relay in relays:
        relay.close()


def test_s3_answering_500_once_is_asked_again(flaky_s3):
    store, relay = flaky_s3(failures=1)
    store.put("k", b"bytes")
    assert store.get("k") == b"bytes"
    store.delete("k")
    assert relay.failed == {"PUT": 1, "GET": 1, "DELETE": 1}  # each failed once, then worked
    assert store.get("k") is None


def test_s3_answering_500_twice_is_a_clear_error(flaky_s3):
    store, relay = flaky_s3(failures=2)
    with pytest.raises(TierUnavailable, match="PUT k failed.*InternalError"):
        store.put("k", b"bytes")
    assert relay.failed == {"PUT": 2}  # one retry, no more
