"""Invalidation across processes: Redis pub/sub, L3's change log, fences.

A second, real process (multiprocessing "spawn") holds a value in its L1 or reads
it in a loop; this process invalidates or replaces it; the other process must stop
serving the old value, and must never bring it back into L2 or its own L1. Effects
are awaited with bounded polling, never timed.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time

import pytest

from esper_assets.errors import InvalidKernelId
from esper_assets.storage import CacheConfig, PersistentKernelCache
from esper_assets_tests.conftest import wait_until
from esper_assets_tests.storage.cache.conftest import noise, sql

POLL_S, POLL_LIMIT_S = 0.05, 5.0


def _other_process(config: dict, commands, replies) -> None:
    """Runs in the spawned process: a cache of its own, driven by ``commands``.

    ("read", id)             -> ("read", value, id is in L1 now)
    ("await", id, expected)  -> ("await", last value seen): polls get(id) until it
                                returns ``expected`` or POLL_LIMIT_S have passed
    ("spin", id)             -> ("spin",): a thread reads id in a loop until "halt"
    ("halt",)                -> ("halt", reads made by the spinning thread)
    ("l1_gone", id)          -> ("l1_gone", True if id left L1 within POLL_LIMIT_S);
                                looks at L1 only, never reads through
    ("stop",)                -> closes the cache and returns
    """
    cache = PersistentKernelCache(CacheConfig(**config))
    l1 = cache.tier("l1")
    spinner: Spinner | None = None
    try:
        listens = l1 is not None and "l2" in cache.tiers  # pub/sub reaches L1 only
        if listens and not cache.wait_subscribed(10):
            replies.put(("error", "the invalidation listener never subscribed"))
            return
        replies.put(("ready",))
        while True:
            command = commands.get(timeout=60)
            if command[0] == "read":
                value = cache.get(command[1])
                replies.put(("read", value, l1 is not None and command[1] in l1))
            elif command[0] == "spin":
                spinner = Spinner(cache, command[1])
                replies.put(("spin",))
            elif command[0] == "halt":
                replies.put(("halt", spinner.stop()))
            elif command[0] == "l1_gone":
                deadline = time.monotonic() + POLL_LIMIT_S
                while command[1] in l1 and time.monotonic() < deadline:
                    time.sleep(0.001)
                replies.put(("l1_gone", command[1] not in l1))
            elif command[0] == "await":
                _, kernel_id, expected = command
                deadline = time.monotonic() + POLL_LIMIT_S
                value = cache.get(kernel_id)
                while value != expected and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    value = cache.get(kernel_id)
                replies.put(("await", value))
            else:
                return
    finally:
        if spinner is not None:
            spinner.stop()
        cache.close()


class Spinner:
    """Reads one id as fast as it can on a thread of its own: the concurrent reader."""

    def __init__(self, cache: PersistentKernelCache, kernel_id: str) -> None:
        self.reads = 0
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(cache, kernel_id), daemon=True)
        self.thread.start()

    def run(self, cache: PersistentKernelCache, kernel_id: str) -> None:
        while not self.halt.is_set():
            cache.get(kernel_id)
            self.reads += 1

    def stop(self) -> int:
        self.halt.set()
        self.thread.join(timeout=10)
        return self.reads


class OtherProcess:
    def __init__(self, config: dict) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_other_process, args=(config, self.commands, self.replies), daemon=True
        )
        self.process.start()
        assert self.reply() == ("ready",)

    def reply(self, timeout: float = 60) -> tuple:
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the other process did not answer (exit code {self.process.exitcode})")

    def ask(self, *command) -> tuple:
        self.commands.put(command)
        return self.reply()

    def stop(self) -> None:
        if self.process.is_alive():
            self.commands.put(("stop",))
            self.process.join(timeout=20)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)


@pytest.fixture
def other_process(pg_url, redis_server_url, redis_prefix, tmp_path):
    """Start another process whose cache shares this test's L2 and L3 (``overrides``
    go into its CacheConfig)."""
    started: list[OtherProcess] = []

    def start(**overrides) -> OtherProcess:
        config = {
            "postgres_url": pg_url,
            "redis_url": redis_server_url,
            "redis_prefix": redis_prefix,
            "object_store_path": str(tmp_path / "objects"),
            **overrides,
        }
        started.append(OtherProcess(config))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def assert_invalidate_and_put_reach(cache: PersistentKernelCache, other: OtherProcess) -> None:
    x, y_old, y_new = noise(900, 1), noise(900, 2), noise(900, 3)
    cache.put("X", x)
    cache.put("Y", y_old)
    # invalidate: the other process's L1 copy goes, and nothing below has it either
    assert other.ask("read", "X") == ("read", x, True)
    cache.invalidate("X")
    assert other.ask("await", "X", None) == ("await", None)
    # a new value: the other process's L1 copy is replaced by the new value
    assert other.ask("read", "Y") == ("read", y_old, True)
    cache.put("Y", y_new)
    assert other.ask("await", "Y", y_new) == ("await", y_new)


def test_invalidate_and_put_reach_another_process(other_process, make_cache):
    cache = make_cache("services", s3_bucket=None, object_store_path=None)
    other = other_process()
    assert_invalidate_and_put_reach(cache, other)
    other.stop()
    assert other.process.exitcode == 0


# write_back fills L1 *before* announcing on L2, so a cache that obeyed its own
# announcement would lose the value it just put; write_through fills L1 after.
@pytest.mark.parametrize("write_mode", ["write_back", "write_through"])
def test_own_announcements_do_not_evict_own_l1(make_cache, write_mode):
    mine = make_cache("services", write_mode=write_mode)
    other = make_cache("services")  # a different sender on the same channel
    value, marker = noise(700, 4), noise(700, 5)

    mine.put("X", value)  # announced on the channel; our own listener must ignore it
    mine.put("marker", marker)
    mine.invalidate("never-mine")  # also announced, also ignored
    other.invalidate("marker")  # published after ours: pub/sub keeps the order
    wait_until(lambda: "marker" not in mine.tier("l1"), "the other cache's invalidation of marker")

    # By now our listener has read our own announcements too, and ignored them.
    assert "X" in mine.tier("l1")
    assert mine.tier("l1").get("X") == value

    # The same announcement from another sender does evict (the control case).
    other.put("X", noise(700, 6))
    wait_until(lambda: "X" not in mine.tier("l1"), "the other cache's put of X")


@pytest.mark.parametrize("redis_down", ["at construction", "after construction"])
def test_invalidation_missed_while_redis_was_down_drops_l1(
    pg_url, private_redis, make_cache, redis_down
):
    """Pub/sub keeps no history: whatever this cache's L1 took in while it was not
    subscribed may be stale, so (re)subscribing must drop L1 - the first time too."""
    writer = make_cache("embedded", postgres_url=pg_url)  # no L2: cannot announce anything
    writer.put("X", b"old")
    if redis_down == "at construction":
        private_redis.stop()
    reader = make_cache(
        "embedded", postgres_url=pg_url, redis_url=private_redis.url, breaker_reset_s=0.2
    )
    if redis_down == "after construction":
        assert reader.wait_subscribed(5)
        private_redis.stop()
    assert reader.get("X") == b"old"
    assert "X" in reader.tier("l1")

    writer.invalidate("X")  # nobody is listening: the message cannot reach the reader
    private_redis.start()

    wait_until(lambda: reader.get("X") is None, "the reader to stop serving the stale X")


# -- a reader racing an invalidation must not undo it ---------------------------------
RACE_ROUNDS = 300


@pytest.mark.slow
@pytest.mark.parametrize("reader_l1", [False, True], ids=["reader without L1", "reader with L1"])
def test_invalidation_is_not_undone_by_a_concurrent_reader(
    other_process, make_cache, redis_client, redis_prefix, reader_l1
):
    """Another process reads K in a loop while this one puts and invalidates it.

    Without fences, a read that fetched K from L3 just before the invalidation
    deleted it writes K back into L2 (fresh TTL) and into its own L1 after the
    announcement arrived: the invalidation is undone for everyone, or for that
    process, until a TTL ends.
    """
    cache = make_cache("services", s3_bucket=None, object_store_path=None, l1_enabled=False)
    other = other_process(l1_enabled=reader_l1)
    cache.put("K", noise(600, 0))
    assert other.ask("spin", "K") == ("spin",)
    back_in_l2 = left_in_l1 = 0
    for round_no in range(RACE_ROUNDS):
        cache.put("K", noise(600, round_no + 1))
        cache.invalidate("K")
        if reader_l1:
            left_in_l1 += other.ask("l1_gone", "K") != ("l1_gone", True)
        else:
            other.ask("read", "unrelated")  # a round trip: the reader's in-flight read ends
        back_in_l2 += bool(redis_client.get(redis_prefix + "K"))  # b"" is the fence
    reads = other.ask("halt")[1]
    assert reads > RACE_ROUNDS  # the reader really raced the invalidations
    assert (back_in_l2, left_in_l1) == (0, 0), (
        f"of {RACE_ROUNDS} invalidations, {back_in_l2} were undone in L2 and "
        f"{left_in_l1} left the old value in the reader's L1"
    )
    assert other.ask("read", "K") == ("read", None, False)


# -- Redis missed a write: every process must stop reading the old copy ---------------
def test_writes_that_missed_a_frozen_redis_reach_other_processes(
    pg_url, private_redis, make_cache, other_process
):
    """This process's put and invalidate skip a paused Redis (breaker open), then it
    closes without another Redis call. The old copies are still in Redis; another
    process must not read them (it learns of them from L3's change log)."""
    prefix = "esper:debt:"
    writer = make_cache(
        "embedded",
        postgres_url=pg_url,
        redis_url=private_redis.url,
        redis_prefix=prefix,
        redis_timeout_s=0.1,
        breaker_reset_s=60,
    )
    writer.put("k", b"old")
    writer.put("gone", b"old")
    reader = other_process(redis_url=private_redis.url, redis_prefix=prefix, l1_enabled=False)
    assert reader.ask("read", "k") == ("read", b"old", False)
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        writer.put("trip", b"x")  # times out: the writer's L2 breaker opens
        assert "l2" not in writer.put("k", b"new")
        writer.invalidate("gone")
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    writer.close()  # no Redis call after the pause: only L3 can carry the news

    assert reader.ask("await", "k", b"new") == ("await", b"new")
    assert reader.ask("await", "gone", None) == ("await", None)


# -- embedded: no Redis, one SQLite file, several processes -------------------------------
def test_embedded_invalidation_reaches_another_process(tmp_path):
    config = {
        "sqlite_path": str(tmp_path / "l3.sqlite3"),
        "object_store_path": str(tmp_path / "objects"),
    }
    cache = PersistentKernelCache(CacheConfig(**config))
    other = OtherProcess(config)
    try:
        assert_invalidate_and_put_reach(cache, other)
    finally:
        other.stop()
        cache.close()
    assert other.process.exitcode == 0


# -- access counts ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["services", "embedded"])
def test_a_bad_id_does_not_cost_the_access_counts_of_the_others(make_cache, backend):
    cache = make_cache(backend, s3_bucket=None)
    cache.put("a", b"1")
    cache.put("b", b"2")
    for _ in range(3):
        cache.get("b")
    cache.get("a")
    with pytest.raises(InvalidKernelId):
        cache.get("bad\x00id")  # PostgreSQL refuses NUL in text: it must not reach the flush
    assert cache.hottest(2) == ["b", "a"]
    assert cache.tier("l3").metadata("b") is not None
    counts = dict(sql(cache, "SELECT id, access_count FROM kernel_cache"))
    assert counts == {"a": 1, "b": 3}


# -- a load in flight and the L1 drops made meanwhile -----------------------------------------
@pytest.fixture
def l1_slots():
    from esper_assets.storage.cache.slots import build_slots

    config = CacheConfig(l3_enabled=False, l4_enabled=False, l2_enabled=False)
    return build_slots(config, None, threading.Event())


def test_a_drop_of_another_id_does_not_cost_a_load_its_place_in_l1(l1_slots):
    epoch = l1_slots.l1_epoch  # a load starts
    l1_slots.drop_local("other")  # an invalidation of another id arrives meanwhile
    l1_slots.fill_l1({"k": b"loaded"}, epoch)
    assert l1_slots.l1.get("k") == b"loaded"


@pytest.mark.parametrize("drop", ["that id", "everything", "too many ids to remember"])
def test_a_drop_made_during_a_load_keeps_what_it_dropped_out_of_l1(l1_slots, drop, monkeypatch):
    from esper_assets.storage.cache import slots as slots_module

    monkeypatch.setattr(slots_module, "MAX_REMEMBERED_DROPS", 3)
    epoch = l1_slots.l1_epoch
    if drop == "that id":
        l1_slots.drop_local("k")
    elif drop == "everything":
        l1_slots.drop_all_local()
    else:
        for i in range(5):  # "k" among the first, forgotten when the memory overflows
            l1_slots.drop_local("k" if i == 0 else f"x{i}")
    l1_slots.fill_l1({"k": b"stale", "j": b"other"}, epoch)
    assert l1_slots.l1.get("k") is None
    assert (l1_slots.l1.get("j") is None) == (drop != "that id")
