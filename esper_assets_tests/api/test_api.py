"""``esper serve`` as a real process, asked over real HTTP (httpx), on the embedded
default and on PostgreSQL + Redis + S3: every route, its errors, auth, and a client
that goes away mid-stream."""

from __future__ import annotations

import hashlib
import socket

import httpx
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from esper_assets.api.query import MAX_PAGE
from esper_assets.storage.cache.config import is_valid_id
from esper_assets.storage.repository.records import is_asset_id
from esper_assets_tests.api.conftest import TOKEN, seed
from esper_assets_tests.conftest import wait_until

TIMEOUT = httpx.Timeout(10.0)


def get(server, path: str, **kwargs) -> httpx.Response:
    return httpx.get(server.url + path, timeout=TIMEOUT, **kwargs)


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=TIMEOUT, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


def test_health_readiness_and_openapi(served):
    server, _ = served
    assert get(server, "/healthz").json() == {"status": "alive"}
    ready = get(server, "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert ready.json()["down"] == []
    assert {"l1", "l3", "l4", "repository"} <= set(ready.json()["tiers"])
    paths = get(server, "/api/v1/openapi.json").json()["paths"]
    assert "/api/v1/kernels/{id}/binary" in paths and "post" in paths["/api/v1/cache/optimize"]


def test_search_filters_and_pages(served):
    server, seeded = served
    found = get(server, "/api/v1/kernels/search", params={"tag": seeded.tag, "limit": 2})
    assert found.status_code == 200, found.text
    page = found.json()
    assert len(page["items"]) == 2 and page["next_offset"] == 2
    rest = get(server, "/api/v1/kernels/search", params={"tag": seeded.tag, "offset": 2}).json()
    ids = {k["asset_id"] for k in page["items"] + rest["items"]}
    assert ids == set(seeded.kernels) and rest["next_offset"] is None
    assert all("object_key" not in k for k in rest["items"])
    both = {"tags": f"{seeded.tag},size-small", "match": "all"}
    assert [
        k["asset_id"] for k in get(server, "/api/v1/kernels/search", params=both).json()["items"]
    ] == [next(iter(seeded.kernels))]
    name = next(iter(rest["items"]))["name"]
    by_blueprint = {
        "blueprint": name,
        "state": "active",
        "order": "version_number",
        "direction": "desc",
    }
    items = get(server, "/api/v1/kernels/search", params=by_blueprint).json()["items"]
    assert [k["version"] for k in items] == ["1.0.2", "1.0.1", "1.0.0"]
    deprecated = get(
        server, "/api/v1/kernels/search", params={"blueprint": name, "state": "deprecated"}
    )
    assert deprecated.json()["items"] == []


MALFORMED = [
    ({"state": "gone"}, "state"),
    ({"limit": str(MAX_PAGE + 1)}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"offset": "x"}, "offset"),
    ({"order": "checksum; DROP TABLE assets"}, "order"),
    ({"tag": "a,b"}, "tag"),
    ({"tags": "x" * 65}, "tags"),
    ({"match": "some"}, "match"),
    ({"direction": "up"}, "direction"),
    ({"blueprint": "x" * 1001}, "blueprint"),
    ({"colour": "red"}, "colour"),
]


def test_malformed_query_is_400_naming_the_field(served):
    server, _ = served
    for params, field in MALFORMED:
        error = error_of(get(server, "/api/v1/kernels/search", params=params), 400)
        assert (error["field"], bool(error["message"])) == (field, True), params


def test_kernel_metadata_and_lineage(served):
    server, seeded = served
    kernel_id, data = next(iter(seeded.kernels.items()))
    doc = get(server, f"/api/v1/kernels/{kernel_id}").json()
    assert doc["kernel"]["asset_id"] == kernel_id and doc["kernel"]["size_bytes"] == len(data)
    assert doc["kernel"]["checksum"] == hashlib.sha256(data).hexdigest()
    assert doc["lineage"]["parent"]["asset_id"] == seeded.blueprint_id
    assert [a["asset_type"] for a in doc["lineage"]["ancestors"]] == ["blueprint"]
    error = error_of(get(server, f"/api/v1/kernels/{seeded.blueprint_id}"), 404)
    assert "blueprint" in error["message"]  # an id that is not a kernel's
    assert (
        error_of(get(server, f"/api/v1/kernels/{kernel_id}", params={"depth": "999"}), 400)["field"]
        == "depth"
    )


def test_unknown_and_malformed_ids(served):
    server, _ = served
    for path in ("/api/v1/kernels/no-such-kernel", "/api/v1/kernels/no-such-kernel/binary"):
        assert error_of(get(server, path), 404)["code"] == "not_found"
    for bad in ("x" * 300, "bad%01id"):
        for suffix in ("", "/binary"):
            error = error_of(get(server, f"/api/v1/kernels/{bad}{suffix}"), 400)
            assert error["field"] == "id"
    assert error_of(get(server, "/api/v1/nothing-here"), 404)["code"] == "not_found"
    assert (
        error_of(httpx.delete(server.url + "/api/v1/cache/stats"), 405)["code"]
        == "method_not_allowed"
    )


def test_binary_etag_conditional_and_ranges(served):
    server, seeded = served
    for kernel_id, data in seeded.kernels.items():
        path = f"/api/v1/kernels/{kernel_id}/binary"
        full = get(server, path)
        assert full.status_code == 200 and full.content == data
        etag = full.headers["etag"]
        assert etag == f'"{hashlib.sha256(data).hexdigest()}"'
        not_modified = get(server, path, headers={"If-None-Match": etag})
        assert not_modified.status_code == 304 and not_modified.content == b""
        assert get(server, path, headers={"If-None-Match": '"other"'}).status_code == 200
        part = get(server, path, headers={"Range": "bytes=100-1123"})
        assert part.status_code == 206 and part.content == data[100:1124]
        assert part.headers["content-range"] == f"bytes 100-1123/{len(data)}"
        assert get(server, path, headers={"Range": "bytes=-10"}).content == data[-10:]
        tail = get(server, path, headers={"Range": f"bytes={len(data) - 5}-99999999999999"})
        assert tail.status_code == 206 and tail.content == data[-5:]
        huge = get(server, path, headers={"Range": "bytes=99999999999999-"})
        assert error_of(huge, 416)["field"] == "Range"
        assert huge.headers["content-range"] == f"bytes */{len(data)}"
        assert get(server, path, headers={"Range": "bytes=0-1,5-6"}).content == data  # whole
        stale = get(server, path, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        assert stale.status_code == 200 and stale.content == data


def test_binary_answers_alike_through_the_router_and_from_l1(backend_env, start_server):
    """The first read of an id goes through Starlette (L1 is empty in a fresh server and
    that read fills it), the next is answered by FastBinary: same status, headers, body."""
    variants = {"plain": {}, "range": {"Range": "bytes=10-19"}, "suffix": {"Range": "bytes=-7"},
                "if-range": {"Range": "bytes=0-9", "If-Range": '"old"'}, "etag": None}  # fmt: skip
    seeded = seed(backend_env, dict.fromkeys(variants, 4096))
    server = start_server(backend_env)
    for (kernel_id, data), (variant, headers) in zip(
        seeded.kernels.items(), variants.items(), strict=True
    ):
        if headers is None:
            headers = {"If-None-Match": f'"{hashlib.sha256(data).hexdigest()}"'}
        path = f"/api/v1/kernels/{kernel_id}/binary"
        routed, fast = (get(server, path, headers=headers) for _ in range(2))
        assert fast.status_code == routed.status_code, variant
        assert fast.content == routed.content, variant
        assert same_headers(fast) == same_headers(routed), variant


def same_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headers.items() if k not in ("date", "server")]


def test_binary_from_the_repository_when_no_cache_tier_holds_it(backend_env, start_server):
    seeded = seed(backend_env, {"only-registered": 8192}, in_cache=False)
    server = start_server(backend_env)
    kernel_id, data = next(iter(seeded.kernels.items()))
    assert get(server, f"/api/v1/kernels/{kernel_id}/binary").content == data


def test_cache_stats_and_optimize_need_the_token(served):
    server, seeded = served
    stats = get(server, "/api/v1/cache/stats").json()
    assert "l3" in stats["tiers"] and stats["requests"] >= 0
    path = "/api/v1/cache/optimize"
    missing = post(server, path)
    assert (
        error_of(missing, 401)["code"] == "unauthorized"
        and missing.headers["www-authenticate"] == "Bearer"
    )
    wrong = post(server, path, headers={"Authorization": "Bearer not-the-token"})
    assert error_of(wrong, 401)["code"] == "unauthorized"
    assert TOKEN not in wrong.text and "not-the-token" not in wrong.text
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (
        error_of(post(server, path, headers=auth, content=b"{" * 5000), 413)["code"]
        == "body_too_large"
    )
    assert error_of(post(server, path, headers=auth, json={"top": -1}), 400)["field"] == "top"
    assert error_of(post(server, path, headers=auth, json={"tpo": 1}), 400)["field"] == "tpo"
    done = post(server, path, headers=auth, json={"top": 10})
    assert done.status_code == 200, done.text
    assert set(done.json()) == {"removed", "warmed", "asked", "from"}
    assert TOKEN not in server.output()


def test_mutations_refused_without_a_configured_token(tmp_path, start_server):
    from esper_assets_tests.api.server import server_env

    server = start_server(server_env(tmp_path / "home"))
    refused = post(server, "/api/v1/cache/optimize", headers={"Authorization": "Bearer anything"})
    assert error_of(refused, 403)["code"] == "mutations_disabled"
    assert get(server, "/api/v1/cache/stats").status_code == 200  # reads stay open


def _abandon(server, kernel_id: str) -> None:
    """Ask for the kernel, read a little of the body, then hang up."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(f"GET /api/v1/kernels/{kernel_id}/binary HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(1024)


def test_client_disconnecting_mid_stream(backend_env, start_server):
    seeded = seed(backend_env, {"big": 16 << 20})
    server = start_server(backend_env)
    kernel_id, data = next(iter(seeded.kernels.items()))
    assert get(server, f"/api/v1/kernels/{kernel_id}/binary").content == data  # now in L1
    baseline = server.open_fds()
    for _ in range(20):
        _abandon(server, kernel_id)
    wait_until(
        lambda: server.open_fds() <= baseline, "the server to close abandoned connections", 10
    )
    assert get(server, f"/api/v1/kernels/{kernel_id}/binary").content == data
    log = server.output()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_a_tier_down(private_redis, pg_url, s3_bucket, s3_endpoint, tmp_path, start_server):
    """Redis killed under a running server: /readyz names L2 (degraded, still 200), and
    /binary is served from L3 (the server's L1 never held the kernel)."""
    from esper_assets_tests.api.server import server_env

    env = server_env(
        tmp_path / "home", ESPER_DATABASE_URL=pg_url, ESPER_REDIS_URL=private_redis.url,
        ESPER_S3_BUCKET=s3_bucket, AWS_ENDPOINT_URL=s3_endpoint,
    )  # fmt: skip
    seeded = seed(env, {"small": 4096, "large": 3 << 20})
    server = start_server(env)
    private_redis.stop()
    ready = get(server, "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "degraded" and ready.json()["down"] == ["l2"]
    assert ready.json()["tiers"]["l2"]["status"] == "unavailable"
    for kernel_id, data in seeded.kernels.items():
        response = get(server, f"/api/v1/kernels/{kernel_id}/binary")
        assert response.status_code == 200 and response.content == data
    assert "Traceback" not in server.output()


def test_the_token_is_read_by_settings_and_never_shown():
    from esper_assets.settings import Settings

    settings = Settings.from_env({"ESPER_API_TOKEN": "  s3cret-token  "})
    assert settings.api_token == "s3cret-token"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.describe())
    assert Settings.from_env({}).api_token is None


@hypothesis_settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=300), st.text(alphabet=st.characters(), max_size=8)))
def test_every_id_l1_can_hold_is_an_asset_id(value):
    # FastBinary answers an id L1 holds without checking it again: the cache's id rules
    # must never let in an id the Starlette route would refuse as an asset id
    if is_valid_id(value):
        assert is_asset_id(value)
