"""``esper bench serve`` plumbing with a tiny load: the server process starts, both
sides answer the same bytes, the figures and the JSON come out, and the server is gone
afterwards. No timing is asserted."""

from __future__ import annotations

import json

import httpx

from esper_assets.bench import serve as bench
from esper_assets.flows import wiring
from esper_assets.settings import Settings


def test_bench_serve_runs_end_to_end_and_writes_its_json(tmp_path):
    from esper_assets.cli.bench import _render_serve_bench
    from esper_assets.cli.render import write_and_emit

    settings = Settings.from_env({"ESPER_HOME": str(tmp_path / "home")})
    result = bench.run(settings, progress=lambda _: None, connections=2, load_shape=(1, 64, 20.0))
    assert result["backend"] == "embedded" and set(result["sizes"]) == set(bench.SIZES)
    for figures in result["sizes"].values():
        assert figures["ours"]["requests"] == figures["ceiling"]["requests"] == 64
        assert figures["ratio"] > 0 and figures["ours"]["p99_ms"] > 0
        assert isinstance(figures["ok"], bool) and figures["target"] == ">= 0.8x"
    out = tmp_path / "serve.json"
    write_and_emit(result, out, False, _render_serve_bench)
    assert json.loads(out.read_text())["bench"] == "serve"


def test_both_sides_serve_the_same_bytes(tmp_path):
    with bench._bench_env(Settings.from_env({"ESPER_HOME": str(tmp_path / "h")})) as (_, env):
        ids = bench._seed(env)
        with bench._server(env) as port:
            for kernel_id in ids["256KiB"][:2]:
                ours = httpx.get(f"http://127.0.0.1:{port}/api/v1/kernels/{kernel_id}/binary")
                ceiling = httpx.get(f"http://127.0.0.1:{port}/ceiling/{kernel_id}")
                assert ours.status_code == ceiling.status_code == 200
                assert ours.content == ceiling.content and len(ours.content) == 256 * 1024
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)
            raise AssertionError("the bench server still answers after the run")
        except httpx.TransportError:
            pass


def test_the_scratch_prefix_in_s3_is_emptied_afterwards(tmp_path, s3_endpoint, s3_bucket):
    import boto3

    env = {"ESPER_HOME": str(tmp_path / "h"), "ESPER_S3_BUCKET": s3_bucket,
           "AWS_ENDPOINT_URL": s3_endpoint}  # fmt: skip
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    with bench._bench_env(Settings.from_env(env)) as (_, bench_env):
        prefix = bench_env["ESPER_S3_PREFIX"]
        # what a run may leave there: a large kernel's body, a usage file
        wiring.object_store(Settings.from_env(bench_env)).put("objects/big", b"x" * 1000)
        stored = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("KeyCount", 0)
        assert stored == 1
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix).get("KeyCount", 0) == 0
