"""``esper bench checkpoints``: saving and restoring a synthetic model, step after step.

A model of fp32 tensors (256 MB quick, 1 GB full) is written as a safetensors file
and saved as step 0 of one run; then each scenario writes the next step's file and
saves it: every tensor new, 80 % of the layers frozen, a LoRA-like update (only the
small adapter tensors change), nothing changed, and a bf16 copy. Per scenario:

- stored bytes of the new checkpoint / its logical size (what dedup saved);
- save and restore throughput against ``shutil.copyfile`` of the same file on the
  same filesystem, measured in the same run;
- peak RSS of the save and of the restore, each in a fresh child process (spawned,
  so the parent's copy of the model does not count);

and the training overhead of ``save_async``: a loop of matmuls timed alone and with
a save in flight.

Embedded default: Settings of its own on a fresh temporary ESPER_HOME. With
ESPER_DATABASE_URL / ESPER_S3_BUCKET in the environment: a fresh PostgreSQL schema
and a fresh S3 prefix on those services. Nothing is written to the environment.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np

from esper_assets.checkpoints import CheckpointStore
from esper_assets.settings import Settings

MB = 1 << 20
RUN = "bench"
STORED_TARGETS = {"frozen_80": 0.25, "lora_1": 0.03, "unchanged": 0.005}
RSS_TARGET_MB = 256
RESTORE_S_PER_GB_TARGET = 3.0
OVERHEAD_TARGET_PCT = 5.0


# -- where it runs ----------------------------------------------------------------------
@contextmanager
def bench_environ(environ: Mapping[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """The backend label and the variables its Settings are built from (children get
    the same mapping): a temporary home, and the services' fresh namespaces if set."""
    from esper_assets.bench.scratch import postgres_schema

    with ExitStack() as stack:
        tmp = stack.enter_context(TemporaryDirectory(prefix="esper-bench-checkpoints-"))
        env = {"ESPER_HOME": str(Path(tmp) / "home")}
        services = [k for k in ("ESPER_DATABASE_URL", "ESPER_S3_BUCKET") if environ.get(k)]
        for key in ("ESPER_S3_BUCKET", "AWS_ENDPOINT_URL"):
            if environ.get(key):
                env[key] = environ[key]
        if environ.get("ESPER_S3_BUCKET"):
            # A prefix of its own; its objects are left behind (no bulk delete here).
            env["ESPER_S3_PREFIX"] = f"esper-bench-{uuid.uuid4().hex[:8]}"
        if environ.get("ESPER_DATABASE_URL"):
            env["ESPER_DATABASE_URL"] = stack.enter_context(
                postgres_schema(environ["ESPER_DATABASE_URL"])
            )
        yield ("services" if services else "embedded"), env


# -- the synthetic model ----------------------------------------------------------------
def model_layout(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, about ``total_bytes`` of fp32 in layers of varied shapes:
    a weight, its bias and a rank-r adapter pair (lora_a, lora_b) of ~0.8 % of it."""
    d = max(64, int((total_bytes / 4 / 48) ** 0.5) // 32 * 32)
    r = max(1, d // 256)
    shapes = [(d, d), (d, d // 2), (d // 2, d), (d, 3 * d // 2)]
    layout: dict[str, tuple[int, ...]] = {}
    size, i = 0, 0
    while size < total_bytes:
        rows, cols = shapes[i % len(shapes)]
        layer = {"weight": (rows, cols), "bias": (rows,), "lora_a": (r, cols), "lora_b": (rows, r)}
        for part, shape in layer.items():
            layout[f"layers.{i:03d}.{part}"] = shape
            size += 4 * int(np.prod(shape))
        i += 1
    return layout


def random_tensors(layout: Mapping[str, tuple[int, ...]], names, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(layout[n], dtype=np.float32) for n in names}


def scenarios(layout: Mapping[str, tuple[int, ...]]) -> list[tuple[str, Callable]]:
    """(name, step function): each maps the previous model to the next one."""
    names = list(layout)
    layers = sorted({n.split(".")[1] for n in names})
    frozen_out = {layers[i] for i in range(0, len(layers), 5)}  # 1 layer in 5 trains
    return [
        ("full_fp32", lambda m: random_tensors(layout, names, 1)),
        ("frozen_80", lambda m: {**m, **random_tensors(
            layout, [n for n in names if n.split(".")[1] in frozen_out], 2)}),
        ("lora_1", lambda m: {**m, **random_tensors(
            layout, [n for n in names if ".lora_" in n], 3)}),
        ("unchanged", lambda m: m),
        ("bf16", lambda m: m),  # written as bf16 below
    ]  # fmt: skip


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], bf16: bool = False) -> int:
    """Write ``tensors`` (fp32, or their bf16 truncation) as a safetensors file."""
    header, offset = {}, 0
    for name, a in tensors.items():
        nbytes = a.size * (2 if bf16 else 4)
        header[name] = {"dtype": "BF16" if bf16 else "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for a in tensors.values():
            # bf16 is the upper half of the fp32 bits (truncation, not rounding)
            fh.write((a.view(np.uint32) >> 16).astype(np.uint16) if bf16 else a)
    return path.stat().st_size


# -- measurements in a child process ----------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ``ru_maxrss``: Linux keeps ``ru_maxrss``
    across exec, so a spawned child would report the parent's peak (the model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(env: dict[str, str], action: str, args: tuple) -> dict[str, Any]:
    """Runs in a spawned process: open the store, note the RSS, do ``action``."""
    with CheckpointStore.from_settings(Settings.from_env(env)) as store:
        baseline = peak_rss_mb()
        start = time.perf_counter()
        if action == "save":
            info = store.save(RUN, args[0], {"model": args[1]})
            extra = {"logical_bytes": info.logical_bytes, "stored_bytes": info.stored_bytes}
        else:
            report = store.restore(RUN, args[0], dest=args[1])
            extra = {"restored_bytes": report.bytes}
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            **extra}  # fmt: skip


def in_child(env: dict[str, str], action: str, *args) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child, (env, action, args))


def prime_free_pages(work: Path, nbytes: int) -> None:
    """Write and delete ``nbytes`` of scratch, so that the timed step after it finds
    free pages the kernel has just used, whatever ran before it.

    On this kind of VM the guest hands freed memory back to its host, and the first
    touch of such a page costs ~3 us per 4 KiB (~0.3 GB/s): a copy into new files ran
    at 0.4-1 GB/s, the same copy into pages a deletion had just freed at 3.8 GB/s.
    Unprimed, every write figure here (the raw copy's included) depended on whether
    the step before it happened to delete something."""
    block = bytes(4 << 20)
    scratch = work / "prime.scratch"
    with open(scratch, "wb") as fh:
        for _ in range(0, nbytes, len(block)):
            fh.write(block)
    scratch.unlink()


def raw_copy_s(src: Path, dst: Path, fsync: bool = False, repeats: int = 3) -> float:
    """Median seconds of ``shutil.copyfile`` (single copies swing 10x with writeback),
    optionally with an fsync of the copy (the durable copy: save and restore both
    flush what they write before they report it done)."""
    prime_free_pages(dst.parent, src.stat().st_size + (64 << 20))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        shutil.copyfile(src, dst)
        if fsync:
            with open(dst, "rb+") as fh:
                os.fsync(fh.fileno())
        samples.append(time.perf_counter() - start)
        dst.unlink()
    return statistics.median(samples)


def raw_s3_s(env: dict, path: Path, dst: Path) -> tuple[float, float]:
    """Seconds to upload ``path`` to the bench's S3 prefix and download it again with
    boto3's own transfer manager (multipart, threaded): the raw client's best."""
    from esper_assets.storage.objects import make_s3_client

    client = make_s3_client(env.get("AWS_ENDPOINT_URL"), timeout_s=30)
    key = f"{env['ESPER_S3_PREFIX']}/raw-baseline/{path.name}"
    start = time.perf_counter()
    client.upload_file(str(path), env["ESPER_S3_BUCKET"], key)
    upload_s = time.perf_counter() - start
    start = time.perf_counter()
    client.download_file(env["ESPER_S3_BUCKET"], key, str(dst))
    download_s = time.perf_counter() - start
    dst.unlink()
    client.delete_object(Bucket=env["ESPER_S3_BUCKET"], Key=key)
    return upload_s, download_s


def measure_step(env: dict, work: Path, step: int, path: Path) -> dict[str, Any]:
    """Save ``path`` as ``step``, restore it, each against a raw copy of the file
    (and, on S3, against boto3 uploading and downloading it)."""
    size = path.stat().st_size
    raw_s = raw_copy_s(path, work / "raw-copy")
    raw_fsync_s = raw_copy_s(path, work / "raw-copy", fsync=True)
    s3 = raw_s3_s(env, path, work / "raw-s3") if env.get("ESPER_S3_BUCKET") else None
    prime = size + (64 << 20)
    prime_free_pages(work, prime)
    save = in_child(env, "save", step, str(path))
    dest = work / f"restored-{step}"
    prime_free_pages(work, prime)
    restore = in_child(env, "restore", step, str(dest))
    restored = dest / "model" / path.name
    ok_bytes = restored.stat().st_size == size
    shutil.rmtree(dest)
    mb = size / MB
    s3_figures = {} if s3 is None else {
        "raw_s3_upload_mb_s": round(mb / s3[0], 1),
        "raw_s3_download_mb_s": round(mb / s3[1], 1),
        "save_vs_raw_s3": round(s3[0] / save["seconds"], 3),
        "restore_vs_raw_s3": round(s3[1] / restore["seconds"], 3),
    }  # fmt: skip
    return {
        **s3_figures,
        "logical_bytes": save["logical_bytes"],
        "stored_bytes": save["stored_bytes"],
        "stored_fraction": round(save["stored_bytes"] / save["logical_bytes"], 4),
        "raw_copy_mb_s": round(mb / raw_s, 1),
        "raw_copy_fsync_mb_s": round(mb / raw_fsync_s, 1),
        "save_mb_s": round(mb / save["seconds"], 1),
        "save_vs_raw": round(raw_s / save["seconds"], 3),
        "save_vs_durable_copy": round(raw_fsync_s / save["seconds"], 3),
        "restore_mb_s": round(mb / restore["seconds"], 1),
        "restore_vs_raw": round(raw_s / restore["seconds"], 3),
        "restore_vs_durable_copy": round(raw_fsync_s / restore["seconds"], 3),
        "restore_s_per_gb": round(restore["seconds"] / (size / (1 << 30)), 2),
        "save_peak_rss_mb": save["peak_rss_mb"],
        "restore_peak_rss_mb": restore["peak_rss_mb"],
        "child_baseline_rss_mb": save["baseline_rss_mb"],
        "restored_size_ok": ok_bytes,
    }


def judge(name: str, r: dict[str, Any], embedded: bool) -> dict[str, dict[str, Any]]:
    """The targets this scenario is held to: short name -> the target and met or not."""
    peak = max(r["save_peak_rss_mb"], r["restore_peak_rss_mb"])
    # Save and restore flush what they write before they report it done (a
    # checkpoint that a power cut can take back is not saved), so the like-for-like
    # raw copy is one that flushes too; the ratio to a plain copy is reported beside.
    # On S3 the raw client is boto3 moving the same file.
    raw = "raw_s3" if "save_vs_raw_s3" in r else "durable_copy"
    label = "boto3 upload/download" if raw == "raw_s3" else "durable raw copy"
    checks = [
        ("save", f">= 0.5x {label}", r[f"save_vs_{raw}"] >= 0.5),
        ("restore", f">= 0.5x {label}", r[f"restore_vs_{raw}"] >= 0.5),
        ("peak RSS", f"<= {RSS_TARGET_MB} MB", peak <= RSS_TARGET_MB),
    ]
    if name in STORED_TARGETS:
        limit = STORED_TARGETS[name]
        checks.insert(0, ("stored", f"<= {limit:.1%}", r["stored_fraction"] <= limit))
    if embedded:  # the s/GB target is the embedded default's
        checks.append(("s/GB", f"<= {RESTORE_S_PER_GB_TARGET} s per GB restored",
                       r["restore_s_per_gb"] <= RESTORE_S_PER_GB_TARGET))  # fmt: skip
    return {short: {"target": target, "met": met} for short, target, met in checks}


# -- save_async overhead ----------------------------------------------------------------
def _train_step(a: np.ndarray, b: np.ndarray) -> None:
    np.tanh(a @ b, out=a)


def training_loop(min_s: float, until: Callable[[], bool] | None = None) -> tuple[float, int]:
    """(mean seconds per iteration, iterations) of a small matmul loop that runs at
    least ``min_s`` seconds, and on while ``until`` says the save is not done."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 384, 384), dtype=np.float32)
    b /= 20  # keeps tanh out of saturation
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s or (until is not None and not until()):
        _train_step(a, b)
        n += 1
    return (time.perf_counter() - start) / n, n


def bench_save_async(env: dict, step: int, path: Path, alone_s: float) -> dict[str, Any]:
    """The loop alone (before and after, averaged), then while a save_async runs.

    The target is held to the slowdown *while the save is in flight*, the strictest
    reading. What training loses in all (the slowdown times the iterations run
    meanwhile) is also given, and as a share of the default 30-minute interval."""
    with CheckpointStore.from_settings(Settings.from_env(env)) as store:
        alone_before, _ = training_loop(alone_s)
        start = time.perf_counter()
        future = store.save_async(RUN, step, {"model": str(path)})
        returned_ms = (time.perf_counter() - start) * 1000
        busy, busy_n = training_loop(0, until=future.done)
        save_s = time.perf_counter() - start
        future.result()
        alone_after, _ = training_loop(alone_s)
    alone = (alone_before + alone_after) / 2
    overhead = (busy - alone) / alone * 100
    lost_s = max(0.0, (busy - alone) * busy_n)
    return {
        "loop_ms_per_iter_alone": round(alone * 1000, 3),
        "loop_ms_per_iter_with_save": round(busy * 1000, 3),
        "save_async_returned_ms": round(returned_ms, 1),
        "save_in_flight_s": round(save_s, 2),
        "overhead_pct": round(overhead, 1),
        "training_lost_s": round(lost_s, 3),
        "lost_per_30_min_pct": round(lost_s / 1800 * 100, 4),
        "target": f"<= {OVERHEAD_TARGET_PCT} % while the save is in flight",
        "ok": overhead <= OVERHEAD_TARGET_PCT,
    }


def save_async_rounds(
    env: dict, work: Path, layout: Mapping, first_step: int, alone_s: float,
    progress: Callable[[str], None], rounds: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """:func:`bench_save_async` over ``rounds`` fresh models (one round swings by
    +-15 % here): the median round, with every round's overhead beside it."""
    results = []
    for i in range(rounds):
        progress(f"save_async overhead on a training loop, round {i + 1} of {rounds}")
        path = work / f"model-async-{i}.safetensors"
        write_safetensors(path, random_tensors(layout, list(layout), 9 + i))
        results.append(bench_save_async(env, first_step + i, path, alone_s))
        path.unlink()
    median = sorted(results, key=lambda r: r["overhead_pct"])[rounds // 2]
    return {**median, "rounds_overhead_pct": [r["overhead_pct"] for r in results]}


# -- the run ----------------------------------------------------------------------------
def run(
    quick: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    model_bytes: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole bench; ``model_bytes`` overrides the size (tests use a few MB)."""
    model_bytes = model_bytes or (256 * MB if quick else 1024 * MB)
    environ = os.environ if environ is None else environ
    layout = model_layout(model_bytes)
    with (
        bench_environ(environ) as (backend, env),
        TemporaryDirectory(prefix="esper-bench-work-") as tmp,
    ):
        work = Path(tmp)
        settings = Settings.from_env(env)
        progress(f"backend {backend}: a model of {len(layout)} tensors")
        model = random_tensors(layout, list(layout), 0)
        path = work / "model-0.safetensors"
        write_safetensors(path, model)
        results = {"initial": measure_step(env, work, 0, path)}
        for step, (name, change) in enumerate(scenarios(layout), start=1):
            progress(f"step {step}: {name}")
            model = change(model)
            path.unlink()
            path = work / f"model-{step}.safetensors"
            write_safetensors(path, model, bf16=name == "bf16")
            results[name] = measure_step(env, work, step, path)
        path.unlink()
        del model
        overhead = save_async_rounds(env, work, layout, len(results), 1.0 if quick else 2.0,
                                     progress)  # fmt: skip
    for name, r in results.items():
        r["targets"] = judge(name, r, backend == "embedded")
        r["ok"] = all(t["met"] for t in r["targets"].values())
    return {
        "bench": "checkpoints",
        "quick": quick,
        "backend": backend,
        "settings": {k: v for k, v in settings.describe().items() if k != "home"},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },  # fmt: skip
        "model": {"bytes": model_bytes, "tensors": len(layout), "dtype": "F32"},
        "raw_baseline": "shutil.copyfile of the same safetensors file, same filesystem, "
        "median of 3, after priming free pages (prime_free_pages); raw_copy_fsync_mb_s "
        "adds an fsync: the durable copy that *_vs_durable_copy and the targets compare "
        "with, as save and restore flush what they write",
        "scenarios": results,
        "save_async": overhead,
        "ok": all(r["ok"] for r in results.values()) and overhead["ok"],
    }
