"""``esper bench serve``: ``/binary`` against the ceiling, on the same server.

One uvicorn process serves :func:`bench_app`: the API (``create_app``) and, under
``/ceiling/{id}``, a minimal ASGI app returning the same bytes from a dict (filled
once from the cache on a first miss, then pure lookups): what uvicorn itself costs,
with nothing of ours in between. A loopback load generator (asyncio, raw HTTP/1.1 on
keep-alive connections, so the client costs little) asks each side in turn, in
alternating rounds, bounded in requests and in time. Figures: requests/s, MB/s and p99
latency per side and kernel size, and ours / ceiling (target >= 0.8x throughput).
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from esper_assets.bench.scratch import postgres_schema
from esper_assets.errors import EsperError
from esper_assets.settings import SERVICE_VARIABLES, Settings

SIZES = {"4KiB": 4096, "256KiB": 256 * 1024}
TARGET = 0.8
IDS_PER_SIZE = 8


# -- the server side ---------------------------------------------------------------------
def bench_app():
    """uvicorn's factory: the API, with ``/ceiling/{id}`` answered from a dict."""
    from starlette.concurrency import run_in_threadpool

    from esper_assets.api import app_from_env

    api = app_from_env()
    values: dict[str, bytes] = {}

    async def ceiling(scope, receive, send) -> None:
        kernel_id = scope["path"][len("/ceiling/") :]
        data = values.get(kernel_id)
        if data is None:  # once per id, before the measured rounds
            data = await run_in_threadpool(api.state.services.cache.get, kernel_id) or b""
            values[kernel_id] = data
        headers = [(b"content-type", b"application/octet-stream"),
                   (b"content-length", str(len(data)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/ceiling/"):
            await ceiling(scope, receive, send)
        else:
            await api(scope, receive, send)

    return app


@contextmanager
def _server(env: dict[str, str], timeout_s: float = 30.0) -> Iterator[int]:
    """:func:`bench_app` on a free loopback port in a process of its own; killed after."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "--factory", "esper_assets.bench.serve:bench_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise EsperError(f"bench server did not start (exit {process.returncode})")
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# -- the load generator -------------------------------------------------------------------
async def _connection(port: int, paths: list[str], count: int, deadline: float,
                      latencies: list[float]) -> int:  # fmt: skip
    """``count`` GETs of ``paths`` in turn on one keep-alive connection (stops at
    ``deadline``); each latency in ``latencies``; returns the body bytes read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    requests = [f"GET {p} HTTP/1.1\r\nHost: bench\r\n\r\n".encode() for p in paths]
    total = 0
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise EsperError(f"bench request got {head[:40]!r}")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            total += len(await reader.readexactly(length))
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()
    return total


def load(port: int, paths: list[str], requests: int, connections: int,
         seconds: float) -> dict[str, float]:  # fmt: skip
    """Requests/s, MB/s and latency percentiles of ``requests`` GETs over ``connections``."""
    latencies: list[float] = []

    async def main() -> tuple[int, float]:
        deadline = time.monotonic() + seconds
        start = time.perf_counter()
        per = requests // connections
        totals = await asyncio.gather(*(_connection(port, paths, per, deadline, latencies)
                                        for _ in range(connections)))  # fmt: skip
        return sum(totals), time.perf_counter() - start

    nbytes, elapsed = asyncio.run(main())
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "mb_s": nbytes / elapsed / 1e6, "latencies": latencies}  # fmt: skip


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)


def compare(port: int, ids: list[str], rounds: int, requests: int, connections: int,
            seconds: float) -> dict[str, Any]:  # fmt: skip
    """Alternating rounds of ours and the ceiling on the same ids; medians of the rounds'
    throughput, p99 over every request of a side."""
    sides = {"ours": [f"/api/v1/kernels/{i}/binary" for i in ids],
             "ceiling": [f"/ceiling/{i}" for i in ids]}  # fmt: skip
    for paths in sides.values():  # warm: L1, the ETag memo, the ceiling's dict, connections
        load(port, paths, max(len(ids) * 4, requests // 10), connections, seconds)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, paths in sides.items():
            runs[name].append(load(port, paths, requests, connections, seconds))
    out: dict[str, Any] = {}
    for name, results in runs.items():
        every = [x for r in results for x in r["latencies"]]
        out[name] = {"rps": round(statistics.median(r["rps"] for r in results)),
                     "mb_s": round(statistics.median(r["mb_s"] for r in results), 1),
                     "p50_ms": _p(every, 0.5), "p99_ms": _p(every, 0.99), "requests": len(every)}  # fmt: skip
    ratio = round(out["ours"]["rps"] / out["ceiling"]["rps"], 3)
    p99_ratio = round(out["ours"]["p99_ms"] / out["ceiling"]["p99_ms"], 3)
    return {
        **out,
        "ratio": ratio,
        "p99_ratio": p99_ratio,
        "target": f">= {TARGET}x",
        "ok": ratio >= TARGET,
    }


# -- the run ------------------------------------------------------------------------------------
@contextmanager
def _bench_env(settings: Settings) -> Iterator[tuple[str, dict[str, str]]]:
    """The server's environment: the configured services in scratch space (a fresh
    PostgreSQL schema, an S3 prefix of its own), or the embedded default in a temporary
    ESPER_HOME. Usage files off."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(TemporaryDirectory(prefix="esper-bench-serve-")))
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        env |= {"ESPER_HOME": str(tmp / "home"), "ESPER_USAGE": "off"}
        env.pop("ESPER_API_TOKEN", None)
        label = "embedded"
        if settings.database_url:
            env["ESPER_DATABASE_URL"] = stack.enter_context(postgres_schema(settings.database_url))
            label = "services"
        if settings.redis_url:
            env["ESPER_REDIS_URL"] = settings.redis_url
        if settings.s3_bucket:
            env |= {"ESPER_S3_BUCKET": settings.s3_bucket,
                    "ESPER_S3_PREFIX": f"esper-bench-{uuid.uuid4().hex[:8]}"}  # fmt: skip
            if settings.aws_endpoint_url:
                env["AWS_ENDPOINT_URL"] = settings.aws_endpoint_url
            stack.callback(_empty_scratch_prefix, dict(env))
        yield label, env


def _empty_scratch_prefix(env: dict[str, str]) -> None:
    """Delete what the run stored under its own S3 prefix (kernel bodies, usage files)."""
    from esper_assets.flows import wiring

    store = wiring.object_store(Settings.from_env(env))
    for key, _, _ in list(store.list("")):
        store.delete(key)


def _seed(env: dict[str, str]) -> dict[str, list[str]]:
    """IDS_PER_SIZE random kernels per size, registered and cached through the wiring."""
    from esper_assets.flows import wiring
    from esper_assets.storage import AssetMetadata

    settings = Settings.from_env(env)
    run = uuid.uuid4().hex[:8]
    ids: dict[str, list[str]] = {}
    store = wiring.object_store(settings)
    with (
        wiring.open_repository(settings, store) as repo,
        wiring.open_cache(settings, store) as cache,
    ):
        for label, size in SIZES.items():
            ids[label] = []
            for i in range(IDS_PER_SIZE):
                kernel_id, data = f"bench-{run}-{label}-{i}", os.urandom(size)
                repo.create_asset(AssetMetadata(asset_type="kernel", asset_id=kernel_id,
                                                name=f"bench-{label}", version=f"1.0.{i}"), data)  # fmt: skip
                cache.put(kernel_id, data)
                ids[label].append(kernel_id)
    return ids


def _forget(env: dict[str, str], ids: dict[str, list[str]]) -> None:
    from esper_assets.flows import wiring

    with wiring.open_cache(Settings.from_env(env)) as cache:
        for kernel_id in (i for group in ids.values() for i in group):
            cache.invalidate(kernel_id)


def run(settings: Settings, quick: bool = False, progress: Callable[[str], None] = print,
        connections: int = 4, load_shape: tuple[int, int, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """``load_shape``: (rounds, requests per round, seconds per round at most); default
    (3, 1,000, 10 s) with ``quick``, else (7, 4,000, 20 s)."""
    rounds, requests, seconds = load_shape or ((3, 1_000, 10.0) if quick else (7, 4_000, 20.0))
    results: dict[str, Any] = {}
    with _bench_env(settings) as (label, env):
        progress(f"backend: {label}; seeding kernels ...")
        ids = _seed(env)
        try:
            with _server(env) as port:
                for size, group in ids.items():
                    progress(f"measuring /binary, {size} ...")
                    results[size] = compare(port, group, rounds, requests, connections, seconds)
        finally:
            _forget(env, ids)
    return {
        "bench": "serve",
        "backend": label,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },  # fmt: skip
        "load": {
            "rounds": rounds,
            "requests_per_round": requests,
            "connections": connections,
            "seconds_per_round_max": seconds,
            "ids_per_size": IDS_PER_SIZE,
        },  # fmt: skip
        "sizes": results,
        "raw_baseline": "a minimal ASGI app on the same uvicorn process returning the same "
        "bytes from a dict (/ceiling/{id})",
    }
