"""collect_garbage on both backends: after retention deletes a checkpoint, exactly the
chunks only it used are freed (shared ones survive and later steps restore); archived
checkpoints keep theirs; chunks of a save still running are spared by the grace."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from esper_assets.checkpoints import RetentionPolicy, apply_retention, collect_garbage
from esper_assets.checkpoints.retention import delete_checkpoint
from esper_assets.errors import MissingChunk
from esper_assets.storage.chunks import object_key

FROZEN = b"frozen layers " * 4000  # shared by every step


def head(step: int) -> bytes:
    return f"head of step {step} ".encode() * 300


def chunk_set(store, run: str, step: int) -> set[str]:
    manifest = store.show(run, step)
    return {a for c in manifest["components"].values() for f in c["files"] for a, _ in f["chunks"]}


@pytest.fixture
def age_chunks(request, backend, tmp_path):
    """``age_chunks()``: every chunk now looks last touched two hours ago."""

    def make_old() -> None:
        if backend == "sqlite":
            sql = "UPDATE checkpoint_chunks SET touched_at = touched_at - 7200"
            with closing(sqlite3.connect(tmp_path / "assets.sqlite3")) as conn, conn:
                conn.execute(sql)
            return
        import psycopg

        sql = "UPDATE checkpoint_chunks SET touched_at = touched_at - interval '2 hours'"
        with psycopg.connect(request.getfixturevalue("pg_url")) as conn:
            conn.execute(sql)

    return make_old


@pytest.fixture
def three_steps(checkpoints):
    for step in (1, 2, 3):
        checkpoints.save("r", step, {"frozen": FROZEN, "head": head(step)})
    return checkpoints


def delete_all_but(store, keep_every: int):
    policy = RetentionPolicy(keep_last=None, keep_every=keep_every, keep_newer_than=None,
                             action="delete")  # fmt: skip
    return apply_retention(store, policy)


def test_delete_then_gc_frees_only_the_deleted_steps_chunks(three_steps, age_chunks, tmp_path):
    store = three_steps
    only_1 = chunk_set(store, "r", 1) - chunk_set(store, "r", 2) - chunk_set(store, "r", 3)
    assert only_1 and chunk_set(store, "r", 1) & chunk_set(store, "r", 3)  # shared too
    survivors = chunk_set(store, "r", 2) | chunk_set(store, "r", 3)
    # keep_every=2 keeps step 2, the newest (3) is always kept: step 1 is deleted.
    assert delete_all_but(store, keep_every=2).deleted == ["checkpoint:r:1"]
    age_chunks()
    report = collect_garbage(store)
    assert report.chunks_deleted == len(only_1) and report.bytes_freed > 0
    assert report.chunks_kept == len(survivors) and report.chunks_in_grace == 0
    assert store.chunks.missing(only_1) == only_1
    for step in (2, 3):
        assert store.verify("r", step)["ok"]
    store.restore("r", 3, dest=tmp_path / "out")
    assert (tmp_path / "out" / "frozen").is_dir()


def test_a_deleted_middle_step_leaves_later_steps_restorable(three_steps, age_chunks, tmp_path):
    store = three_steps
    only_2 = chunk_set(store, "r", 2) - chunk_set(store, "r", 1) - chunk_set(store, "r", 3)
    delete_checkpoint(store, "checkpoint:r:2", "test: the middle step")
    age_chunks()
    report = collect_garbage(store)
    assert report.chunks_deleted == len(only_2)
    assert store.chunks.missing(only_2) == only_2
    assert all(store.chunks.objects.get(object_key(a)) is None for a in only_2)
    restored = store.restore("r", 3, dest=tmp_path / "out")
    assert sorted(f.read_bytes() for f in restored.files) == sorted([FROZEN, head(3)])
    assert store.verify("r", 1)["ok"]


def test_archived_checkpoints_keep_their_chunks(three_steps, age_chunks):
    only_old = (chunk_set(three_steps, "r", 1) | chunk_set(three_steps, "r", 2)) - chunk_set(
        three_steps, "r", 3
    )
    report = apply_retention(three_steps, RetentionPolicy(keep_last=1, keep_newer_than=None))
    # Only the chunks no active step uses move under archive/ (FROZEN's stay).
    assert report.chunks_archived == len(only_old) > 0 and report.bytes_archived > 0
    moved = {k.rsplit("/", 1)[1] for k, _, _ in three_steps.chunks.objects.list("archive/chunks/")}
    assert moved == only_old
    age_chunks()
    report = collect_garbage(three_steps)
    assert report.chunks_deleted == 0 and report.bytes_freed == 0
    assert all(three_steps.verify("r", s)["ok"] for s in (1, 2, 3))


def test_chunks_of_a_save_in_progress_survive(three_steps, age_chunks):
    """A save stores (touches) its chunks before its manifest exists: within the grace
    period they are not garbage, even though no manifest references them yet."""
    ref = three_steps.chunks.put(b"a save's chunk, its manifest not written yet" * 50)
    report = collect_garbage(three_steps)
    assert report.chunks_deleted == 0 and report.chunks_in_grace == 1
    assert three_steps.chunks.missing([ref.address]) == set()
    age_chunks()  # the save never finished: two hours later it is garbage
    assert collect_garbage(three_steps).chunks_deleted == 1


def test_gc_dry_run_and_idempotence(three_steps, age_chunks):
    delete_all_but(three_steps, keep_every=3)  # keeps 3 only
    age_chunks()
    before = three_steps.chunks.stats()
    dry = collect_garbage(three_steps, dry_run=True)
    assert dry.dry_run and dry.chunks_deleted > 0
    assert three_steps.chunks.stats() == before
    real = collect_garbage(three_steps)
    assert (real.chunks_deleted, real.bytes_freed) == (dry.chunks_deleted, dry.bytes_freed)
    again = collect_garbage(three_steps)
    assert (again.chunks_deleted, again.bytes_freed) == (0, 0)
    assert again.chunks_kept == real.chunks_kept
    assert three_steps.verify("r", 3)["ok"]


def test_a_save_after_gc_stores_the_freed_chunks_again(three_steps, age_chunks, tmp_path):
    delete_all_but(three_steps, keep_every=3)
    age_chunks()
    collect_garbage(three_steps)
    info = three_steps.save("r", 4, {"frozen": FROZEN, "head": head(1)})
    assert info.new_chunks > 0  # head(1)'s chunks were freed, stored anew
    assert three_steps.verify("r", 4)["ok"]


def test_a_save_whose_chunks_were_collected_meanwhile_registers_nothing(checkpoints, monkeypatch):
    """A save longer than the grace period may lose its first chunks to gc: it touches
    them all again before registering, and refuses when one is gone."""
    from esper_assets.checkpoints import store as store_module

    original = store_module.store_source

    def collected_meanwhile(chunks, source, *args, **kwargs):
        entry = original(chunks, source, *args, **kwargs)
        chunks.discard(entry["chunks"][0][0])  # what gc does to an old unreferenced chunk
        return entry

    monkeypatch.setattr(store_module, "store_source", collected_meanwhile)
    with pytest.raises(MissingChunk, match="garbage-collected while it ran"):
        checkpoints.save("r", 1, {"head": head(1)})
    assert checkpoints.list() == []
    monkeypatch.undo()
    assert checkpoints.save("r", 1, {"head": head(1)}).new_chunks == 1  # stored anew
    assert checkpoints.verify("r", 1)["ok"]


def access_counts(store) -> dict[str, int]:
    store.repo.flush_access()
    return {r["asset_id"]: store.repo.get_metadata(r["asset_id"]).access_count
            for r in store.list("r")}  # fmt: skip


def test_retention_and_gc_do_not_count_as_use(three_steps, age_chunks):
    """Their manifest reads are bookkeeping: access counts feed cache warming,
    deprecate_unused and the usage analytics, so they must not move."""
    three_steps.show("r", 3)  # a real use: counted
    before = access_counts(three_steps)
    assert before == {"checkpoint:r:1": 0, "checkpoint:r:2": 0, "checkpoint:r:3": 1}
    report = apply_retention(three_steps, RetentionPolicy(keep_last=2, keep_newer_than=None))
    assert report.archived == ["checkpoint:r:1"] and report.chunks_archived > 0
    age_chunks()
    assert collect_garbage(three_steps).chunks_kept > 0  # it read every live manifest
    assert access_counts(three_steps) == before
