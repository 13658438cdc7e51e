"""Saving and restoring checkpoints on both backends: the three kinds of component,
dedup accounting, selective restore, load_tensors, lineage, save_async, Checkpointer."""

from __future__ import annotations

import os
import sys
import threading
from datetime import timedelta

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from esper_assets.checkpoints import Checkpointer, CheckpointStore
from esper_assets.storage.chunks import ChunkStore
from esper_assets.storage.objects.stores import DirectoryObjectStore
from esper_assets.storage.repository import AssetMetadata
from esper_assets_tests.checkpoints.conftest import weights


def test_round_trip_of_all_three_kinds(checkpoints, tmp_path):
    model = weights(4)
    save_file(model, str(tmp_path / "model.safetensors"), metadata={"epoch": "3"})
    (tmp_path / "tokenizer.json").write_bytes(os.urandom(300_000))
    optimizer = {"m": np.arange(1000, dtype=np.float64), "count": np.array([7], np.int32)}
    blob = os.urandom(200_000)
    info = checkpoints.save(
        "run-a", 10,
        {"model": tmp_path / "model.safetensors", "optimizer": optimizer,
         "tokenizer": str(tmp_path / "tokenizer.json"), "state": blob},
    )  # fmt: skip
    assert info.logical_bytes > 0 and info.stored_bytes > 0

    report = checkpoints.restore("run-a", dest=tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model" / "model.safetensors").read_bytes() == (
        tmp_path / "model.safetensors"
    ).read_bytes()
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (
        tmp_path / "tokenizer.json"
    ).read_bytes()
    assert (out / "state" / "state.bin").read_bytes() == blob
    restored = load_file(str(out / "optimizer" / "optimizer.safetensors"))
    np.testing.assert_array_equal(restored["m"], optimizer["m"])
    assert report.step == 10 and len(report.files) == 4
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]

    manifest = checkpoints.show("run-a", 10)
    assert manifest["components"]["model"]["files"][0]["metadata"] == {"epoch": "3"}
    assert {t["name"] for t in manifest["components"]["model"]["files"][0]["tensors"]} == set(model)


def test_load_tensors_equals_the_arrays(checkpoints, tmp_path):
    arrays = {"w": np.random.default_rng(1).random((30, 40)), "b": np.arange(5, dtype=np.int16),
              "scalar": np.array(3.5, np.float32), "empty": np.zeros((0, 3), np.uint8),
              "big_endian": np.arange(4, dtype=">i4"), "strided": np.arange(20.0)[::2]}  # fmt: skip
    save_file(weights(3), str(tmp_path / "m.safetensors"))
    checkpoints.save("run-l", 0, {"opt": arrays, "model": tmp_path / "m.safetensors"})
    loaded = checkpoints.load_tensors("run-l", component="opt")
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].shape == array.shape
        assert loaded[name].dtype == array.dtype.newbyteorder("<")  # stored little-endian
    from_file = checkpoints.load_tensors("run-l", 0, component="model")
    for name, array in weights(3).items():
        np.testing.assert_array_equal(from_file[name], array)


def test_unchanged_tensors_are_stored_once(checkpoints):
    model = weights(10)
    first = checkpoints.save("run-d", 0, {"model": model})
    for name in list(model)[:2]:  # 20 % of the tensors change, 80 % are frozen
        model[name] = model[name] + 1
    second = checkpoints.save("run-d", 1, {"model": model})
    assert first.stored_bytes > 0.9 * first.logical_bytes  # random floats: little compression
    assert 0.15 < second.stored_bytes / second.logical_bytes < 0.25
    third = checkpoints.save("run-d", 2, {"model": model})  # nothing changed
    assert third.stored_bytes / third.logical_bytes < 0.005


def test_selective_restore_writes_only_what_was_asked(checkpoints, tmp_path):
    checkpoints.save("run-s", 5, {"model": weights(2), "optimizer": weights(2, seed=1),
                                  "policy": b"policy-bytes"})  # fmt: skip
    report = checkpoints.restore("run-s", 5, components=["policy"], dest=tmp_path / "o")
    assert [p.relative_to(tmp_path / "o").as_posix() for p in report.files] == ["policy/policy.bin"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["policy"]


def test_latest_step_parent_chain_and_kernel_lineage(checkpoints):
    repo = checkpoints.repo
    kernel_id = "kernel-0123abcd"
    repo.create_asset(AssetMetadata("kernel", "conv", asset_id=kernel_id), b"compiled kernel")
    a = checkpoints.save("run-k", 100, {"m": b"a"}, kernels=[kernel_id, "kernel-unknown"])
    b = checkpoints.save("run-k", 200, {"m": b"b"}, kernels=[kernel_id])
    assert checkpoints.show("run-k")["step"] == 200  # latest when no step
    assert b.parent_id == a.asset_id and a.parent_id is None
    lineage = repo.get_lineage(b.asset_id)
    assert lineage["parent"].asset_id == a.asset_id
    meta = repo.get_metadata(b.asset_id)
    assert meta.derived_from == [kernel_id] and meta.version == "step-200"
    assert meta.asset_type == "checkpoint" and meta.name == "run-k"
    assert checkpoints.show("run-k", 100)["kernels"] == [kernel_id, "kernel-unknown"]
    listed = checkpoints.list("run-k")
    assert [row["step"] for row in listed] == [100, 200]
    assert [row["run"] for row in checkpoints.list()] == ["run-k", "run-k"]


def test_save_async_saves_the_values_of_the_moment_of_the_call(checkpoints):
    model = weights(3)
    expected = {k: v.copy() for k, v in model.items()}
    buffer = bytearray(b"before" * 1000)
    future = checkpoints.save_async("run-async", 1, {"model": model, "buf": buffer})
    for array in model.values():  # training goes on at once, in place
        array *= 0
    buffer[:6] = b"after!"
    info = future.result(timeout=30)
    assert info.step == 1
    loaded = checkpoints.load_tensors("run-async", 1, component="model")
    for name, array in expected.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_verify_reports_a_complete_checkpoint(checkpoints):
    checkpoints.save("run-v", 0, {"model": weights(3)})
    report = checkpoints.verify("run-v")
    assert report["ok"] and report["verified"] == report["chunks"] > 0
    sampled = checkpoints.verify("run-v", 0, sample=0.5)
    assert sampled["ok"] and 0 < sampled["verified"] <= report["chunks"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_checkpointer_saves_only_when_due(checkpoints):
    clock = FakeClock()
    saver = Checkpointer(checkpoints, "run-c", every=timedelta(minutes=30), clock=clock)
    started = []
    for step in range(10):
        clock.now = step * 10 * 60  # ten minutes a step
        if saver.maybe_save(step, {"state": f"step {step}".encode()}) is not None:
            started.append(step)
    saved = saver.flush()
    assert started == [0, 3, 6, 9]
    assert [info.step for info in saved] == [0, 3, 6, 9]
    assert [row["step"] for row in checkpoints.list("run-c")] == [0, 3, 6, 9]


def test_a_second_store_on_the_same_backend_restores_the_checkpoint(make_checkpoints, tmp_path):
    make_checkpoints().save("run-x", 1, {"m": b"shared"})
    other = make_checkpoints()
    other.restore("run-x", dest=tmp_path / "x")
    assert (tmp_path / "x" / "m" / "m.bin").read_bytes() == b"shared"


def test_a_large_file_round_trips_in_many_chunks(checkpoints, tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(24 << 20))
    info = checkpoints.save("run-big", 0, {"big": path})
    assert info.chunk_count > 8
    seen = []
    checkpoints.restore("run-big", dest=tmp_path / "o", progress=lambda d, t: seen.append((d, t)))
    assert (tmp_path / "o" / "big" / "big.bin").read_bytes() == path.read_bytes()
    assert seen[-1] == (24 << 20, 24 << 20)


def test_an_empty_component_round_trips(checkpoints, tmp_path):
    checkpoints.save("run-e", 0, {"empty": b"", "no_tensors": {}})
    checkpoints.restore("run-e", dest=tmp_path / "o")
    assert (tmp_path / "o" / "empty" / "empty.bin").read_bytes() == b""
    assert checkpoints.load_tensors("run-e", component="no_tensors") == {}


def test_from_env_uses_the_embedded_default(esper_home, tmp_path):
    from esper_assets.checkpoints import CheckpointStore

    with CheckpointStore.from_env() as store:
        store.save("run-env", 0, {"m": b"embedded"})
    with CheckpointStore.from_env() as store:  # a new process's view
        assert store.show("run-env")["step"] == 0
    assert (esper_home / "esper.sqlite3").exists()


class PriorityOfWriters:
    """An object store that notes the CPU priority (nice) of each thread writing to it."""

    def __init__(self, inner) -> None:
        self.inner, self.nice = inner, set()

    def put(self, key, data, durable=None) -> None:
        self.nice.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        self.inner.put(key, data, durable)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_save_async_yields_the_cpu_to_training_and_save_does_not(checkpoints, tmp_path):
    objects = PriorityOfWriters(DirectoryObjectStore(tmp_path / "objects"))
    store = CheckpointStore(
        ChunkStore(objects, sqlite_path=str(tmp_path / "i.db")), checkpoints.repo
    )
    store.save_async("run-nice", 0, {"model": weights(3)}).result(timeout=30)
    assert objects.nice == {19}  # the chunk workers inherit the background thread's
    objects.nice.clear()
    store.save("run-nice", 1, {"model": weights(3, seed=1)})
    assert objects.nice == {os.getpriority(os.PRIO_PROCESS, 0)}
    store.close()
