"""Invalidation of other processes' L1 copies through Redis pub/sub.

A second, real process (multiprocessing "spawn") holds a value in its L1; this
process invalidates or replaces it; the other process must stop serving the old
value. Effects are awaited with bounded polling, never timed.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import time

import pytest

from esper_assets.storage import CacheConfig, PersistentKernelCache
from esper_assets_tests.conftest import wait_until

POLL_S, POLL_LIMIT_S = 0.05, 5.0


def noise(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _other_process(config: dict, commands, replies) -> None:
    """Runs in the spawned process: a cache of its own, driven by ``commands``.

    ("read", id)             -> ("read", value, id is in L1 now)
    ("await", id, expected)  -> ("await", last value seen): polls get(id) until it
                                returns ``expected`` or POLL_LIMIT_S have passed
    ("stop",)                -> closes the cache and returns
    """
    cache = PersistentKernelCache(CacheConfig(**config))
    try:
        if not cache._listener.wait_subscribed(10):
            replies.put(("error", "the invalidation listener never subscribed"))
            return
        replies.put(("ready",))
        while True:
            command = commands.get(timeout=60)
            if command[0] == "read":
                value = cache.get(command[1])
                replies.put(("read", value, command[1] in cache._l1))
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
        cache.close()


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
    """Start another process whose cache shares this test's L2 and L3."""
    started: list[OtherProcess] = []

    def start() -> OtherProcess:
        config = {
            "postgres_url": pg_url,
            "redis_url": redis_server_url,
            "redis_prefix": redis_prefix,
            "object_store_path": str(tmp_path / "objects"),
        }
        started.append(OtherProcess(config))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_invalidate_and_put_reach_another_process(other_process, make_cache):
    cache = make_cache("services", s3_bucket=None, object_store_path=None)
    x, y_old, y_new = noise(900, 1), noise(900, 2), noise(900, 3)
    cache.put("X", x)
    cache.put("Y", y_old)
    other = other_process()

    # invalidate: the other process's L1 copy goes, and nothing below has it either
    assert other.ask("read", "X") == ("read", x, True)
    cache.invalidate("X")
    assert other.ask("await", "X", None) == ("await", None)

    # a new value: the other process's L1 copy is replaced by the new value
    assert other.ask("read", "Y") == ("read", y_old, True)
    cache.put("Y", y_new)
    assert other.ask("await", "Y", y_new) == ("await", y_new)

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
    wait_until(lambda: "marker" not in mine._l1, "the other cache's invalidation of marker")

    # By now our listener has read our own announcements too, and ignored them.
    assert "X" in mine._l1
    assert mine._l1.get("X") == value

    # The same announcement from another sender does evict (the control case).
    other.put("X", noise(700, 6))
    wait_until(lambda: "X" not in mine._l1, "the other cache's put of X")


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
        assert reader._listener.wait_subscribed(5)
        private_redis.stop()
    assert reader.get("X") == b"old"
    assert "X" in reader._l1

    writer.invalidate("X")  # nobody is listening: the message cannot reach the reader
    private_redis.start()

    wait_until(lambda: reader.get("X") is None, "the reader to stop serving the stale X")
