"""Bad input on both backends: each a clear EsperError, nothing half-written (no
manifest naming a missing chunk, nothing in the restore destination)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from esper_assets.checkpoints import CheckpointStore
from esper_assets.errors import (
    CheckpointExists,
    CheckpointNotFound,
    CorruptChunk,
    InvalidCheckpoint,
    InvalidInput,
    MissingChunk,
    RestoreRefused,
    StorageError,
)
from esper_assets.storage.chunks import object_key
from esper_assets_tests.checkpoints.conftest import safetensors_bytes, weights


def nothing_saved(checkpoints: CheckpointStore, chunks_before: dict) -> bool:
    return checkpoints.list() == [] and checkpoints.chunks.stats() == chunks_before


@pytest.mark.parametrize(
    ("blob", "complaint"),
    [
        (b"\x10\0\0\0", "truncated"),
        (safetensors_bytes({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                           b"\0" * 8), "past the end"),
        (safetensors_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                           b"\0" * 12), "overlaps"),
        (safetensors_bytes({"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}},
                           b"\0" * 8), "F64"),
    ],
)  # fmt: skip
def test_a_bad_safetensors_file_is_refused_before_anything_is_stored(
    checkpoints, tmp_path, blob, complaint
):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    before = checkpoints.chunks.stats()
    with pytest.raises(InvalidCheckpoint, match=complaint):
        checkpoints.save("run-bad", 0, {"model": path})
    assert nothing_saved(checkpoints, before)


@pytest.mark.parametrize(
    ("run_id", "step"), [("", 0), ("a/b", 0), ("x" * 129, 0), ("tab\there", 0), ("r", -1),
                         ("r", True), ("r", 1.5), (None, 0)],
)  # fmt: skip
def test_bad_run_ids_and_steps_are_refused(checkpoints, run_id, step):
    with pytest.raises(InvalidInput):
        checkpoints.save(run_id, step, {"m": b"x"})


@pytest.mark.parametrize("components", [{}, {"m": 42}, {"m": {"w": [1, 2]}}, {"../up": b"x"}])
def test_bad_components_are_refused(checkpoints, components):
    with pytest.raises(InvalidInput):
        checkpoints.save("run", 0, components)


def test_unknown_run_step_and_component(checkpoints, tmp_path):
    with pytest.raises(CheckpointNotFound, match="no checkpoint for run 'nope'"):
        checkpoints.restore("nope", dest=tmp_path / "o")
    checkpoints.save("run-u", 1, {"m": b"x"})
    with pytest.raises(CheckpointNotFound, match="step 2"):
        checkpoints.show("run-u", 2)
    with pytest.raises(CheckpointNotFound, match="step 2"):
        checkpoints.verify("run-u", 2)
    with pytest.raises(CheckpointNotFound, match="optimizer"):
        checkpoints.load_tensors("run-u", 1, component="optimizer")
    assert not (tmp_path / "o").exists()


def test_the_same_run_and_step_twice(checkpoints, tmp_path):
    checkpoints.save("run-t", 3, {"m": b"first"})
    with pytest.raises(CheckpointExists, match="step 3"):
        checkpoints.save("run-t", 3, {"m": b"second"})
    checkpoints.restore("run-t", 3, dest=tmp_path / "o")
    assert (tmp_path / "o" / "m" / "m.bin").read_bytes() == b"first"


def two_file_checkpoint(checkpoints) -> tuple[str, str]:
    """A checkpoint of two components; the address of the second one's last chunk."""
    checkpoints.save("run-c", 0, {"a": weights(2), "b": weights(2, seed=9)})
    chunks = checkpoints.show("run-c")["components"]["b"]["files"][0]["chunks"]
    return "run-c", chunks[-1][0]


def test_a_corrupt_chunk_is_named_and_nothing_is_written(checkpoints, make_repo, backend, tmp_path):
    run, address = two_file_checkpoint(checkpoints)
    store = make_repo.store(backend)
    stored = bytearray(store.get(object_key(address)))
    stored[-1] ^= 0xFF
    store.put(object_key(address), bytes(stored))
    with pytest.raises(CorruptChunk, match=address):
        checkpoints.restore(run, dest=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # not even the first, sound component
    report = checkpoints.verify(run)
    assert not report["ok"] and [c["address"] for c in report["corrupt"]] == [address]


def test_a_missing_chunk_is_named_and_nothing_is_written(checkpoints, make_repo, backend, tmp_path):
    run, address = two_file_checkpoint(checkpoints)
    make_repo.store(backend).delete(object_key(address))
    (tmp_path / "o").mkdir()
    with pytest.raises(MissingChunk, match=address):
        checkpoints.restore(run, dest=tmp_path / "o")
    assert list((tmp_path / "o").iterdir()) == []
    assert not checkpoints.verify(run)["ok"]


def test_restore_into_a_non_empty_directory_needs_force(checkpoints, tmp_path):
    checkpoints.save("run-f", 0, {"m": b"new"})
    dest = tmp_path / "o"
    (dest / "m").mkdir(parents=True)
    (dest / "m" / "m.bin").write_bytes(b"old")
    with pytest.raises(RestoreRefused, match="not empty"):
        checkpoints.restore("run-f", dest=dest)
    assert (dest / "m" / "m.bin").read_bytes() == b"old"
    checkpoints.restore("run-f", dest=dest, force=True)
    assert (dest / "m" / "m.bin").read_bytes() == b"new"


class Interfering:
    """A chunk store that runs ``interfere`` once in the middle of a save: when
    put_many has taken four chunks (a writer touching the file, the object store
    going away)."""

    def __init__(self, chunks, interfere) -> None:
        self._chunks, self._interfere, self.done = chunks, interfere, False

    def put_many(self, chunks, workers=4):
        def taken():
            for n, chunk in enumerate(chunks):
                if n == 4 and not self.done:
                    self.done = True
                    self._interfere()
                yield chunk

        return self._chunks.put_many(taken(), workers=workers)

    def __getattr__(self, name):
        return getattr(self._chunks, name)


def test_a_file_changing_while_it_is_saved(checkpoints, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).bytes(40 << 20))  # several batches of chunks

    def append() -> None:
        with open(path, "ab") as fh:
            fh.write(b"more")

    interfering = Interfering(checkpoints.chunks, append)
    store = CheckpointStore(interfering, checkpoints.repo)
    with pytest.raises(InvalidCheckpoint, match="changed while it was being saved"):
        store.save("run-w", 0, {"data": path})
    store.close()
    assert interfering.done
    assert checkpoints.list() == []


def test_the_object_store_going_away_mid_save_leaves_no_manifest(checkpoints, tmp_path):
    def fail() -> None:
        raise StorageError("object store unreachable")

    interfering = Interfering(checkpoints.chunks, fail)
    store = CheckpointStore(interfering, checkpoints.repo)
    with pytest.raises(StorageError, match="unreachable"):
        store.save("run-o", 0, {"model": weights(20, size=256 * 1024)})
    store.close()
    assert interfering.done
    assert checkpoints.list() == []


def test_load_tensors_of_bytes_and_a_bad_sample_are_refused(checkpoints):
    checkpoints.save("run-b", 0, {"state": b"not tensors"})
    with pytest.raises(InvalidCheckpoint, match="not tensors"):
        checkpoints.load_tensors("run-b", component="state")
    with pytest.raises(InvalidInput, match="sample"):
        checkpoints.verify("run-b", sample=1.5)


def test_a_save_racing_another_for_the_same_step(checkpoints, make_checkpoints):
    """The other store committed between our existence check and our manifest: the
    repository's primary key refuses the second, reported as CheckpointExists."""
    other = make_checkpoints()
    checks = []

    def exists_after_the_first_check(asset_id: str) -> bool:
        checks.append(asset_id)
        return len(checks) > 1

    checkpoints.save("run-race", 1, {"m": b"theirs"})
    other._exists = exists_after_the_first_check
    with pytest.raises(CheckpointExists):
        other.save("run-race", 1, {"m": b"ours"})
    assert checkpoints.show("run-race", 1)["components"]["m"]["files"][0]["size"] == 6


class Blocking:
    """A chunk store whose first put_many waits until the test releases it."""

    def __init__(self, chunks) -> None:
        self._chunks, self.release, self._first = chunks, threading.Event(), True

    def put_many(self, chunks, workers=4):
        if self._first:
            self._first = False
            assert self.release.wait(30)
        return self._chunks.put_many(chunks, workers=workers)

    def __getattr__(self, name):
        return getattr(self._chunks, name)


def test_save_async_refuses_a_file_changed_before_it_was_read(checkpoints, tmp_path):
    path = tmp_path / "policy.bin"
    path.write_bytes(b"policy v1")
    blocking = Blocking(checkpoints.chunks)
    store = CheckpointStore(blocking, checkpoints.repo)
    first = store.save_async("run-a", 0, {"m": b"holds the worker"})
    second = store.save_async("run-a", 1, {"policy": path})
    path.write_bytes(b"policy v2, longer")  # after save_async returned, before the read
    blocking.release.set()
    assert first.result(timeout=30).step == 0
    with pytest.raises(InvalidCheckpoint, match="changed while it was being saved"):
        second.result(timeout=30)
    store.close()
    assert [row["step"] for row in checkpoints.list("run-a")] == [0]
