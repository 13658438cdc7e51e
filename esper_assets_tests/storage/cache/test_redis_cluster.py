"""L2 on a Redis Cluster of three nodes started by the fixture (loopback, no replicas).

The same cache as on one server (values framed, fences, invalidation to other
processes' L1), with keys spread over the nodes' hash slots; and what a cluster adds:
a node killed and restarted, a frozen node, a slot that moved to another node.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis
from redis.crc import key_slot

from esper_assets.errors import ConfigError, EsperError
from esper_assets.settings import Settings
from esper_assets.storage.cache import framing
from esper_assets_tests.conftest import closed_port, wait_until
from esper_assets_tests.storage.cache.conftest import noise
from esper_assets_tests.storage.cache.test_cache_faults import RESET_S, manual_breaker
from esper_assets_tests.storage.cache.test_invalidation import (
    OtherProcess,
    assert_invalidate_and_put_reach,
)

L2_ONLY = {"l3_enabled": False, "l4_enabled": False, "l1_enabled": False}


@pytest.fixture
def on_cluster(make_cache, redis_cluster_url):
    """``on_cluster(prefix=..., **config)``: an embedded cache whose L2 is the cluster."""

    def build(prefix: str = "esper:cluster:", **overrides):
        return make_cache("embedded", redis_url=redis_cluster_url, redis_prefix=prefix, **overrides)

    return build


def node_of(cluster, name: str):
    """The fixture's node that owns ``name``'s hash slot (from CLUSTER SLOTS)."""
    slot = key_slot(name.encode())
    live = next(node for node in cluster.nodes if node.proc is not None)
    with redis.Redis(port=live.port) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    port = next(owner[1] for first, last, owner, *_ in ranges if first <= slot <= last)
    return next(node for node in cluster.nodes if node.port == port)


def ids_on_every_node(cluster, prefix: str, n: int = 30) -> dict[str, object]:
    """``n`` ids, grouped so that each node of the cluster owns some of them."""
    ids = {f"k{i}": node_of(cluster, f"{prefix}k{i}") for i in range(n)}
    assert {node.port for node in ids.values()} == {node.port for node in cluster.nodes}
    return ids


# -- configuration ---------------------------------------------------------------------------
def test_cluster_urls_are_checked_node_by_node(tmp_path):
    ok = "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001"
    assert Settings.from_env({"ESPER_HOME": str(tmp_path), "ESPER_REDIS_URL": ok}).redis_url == ok
    for bad, says in [
        ("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:port", "cluster node '10.0.0.2:port'"),
        ("redis+cluster://10.0.0.1:7000/2", "database 0 only"),
        ("redis+cluster://", "names no host"),
    ]:
        with pytest.raises(ConfigError, match=says) as caught:
            Settings.from_env({"ESPER_HOME": str(tmp_path), "ESPER_REDIS_URL": bad})
        assert "pw" not in str(caught.value)


# -- the cache on a cluster ------------------------------------------------------------------
def test_values_spread_over_the_nodes_and_read_back(on_cluster, redis_cluster):
    cache = on_cluster(**L2_ONLY)
    ids = ids_on_every_node(redis_cluster, "esper:cluster:")
    values = {kernel_id: noise(5000 + i, seed=i) for i, kernel_id in enumerate(ids)}
    cache.put_many(values)

    for kernel_id, node in ids.items():  # each frame is on the node that owns its slot
        with redis.Redis(port=node.port) as client:
            blob = client.get(f"esper:cluster:{kernel_id}")
        assert cache.codecs.decode(framing.unpack(blob)) == values[kernel_id]
    assert all(cache.get(kernel_id) == value for kernel_id, value in values.items())
    assert cache.get_many([*values, "never-stored"]) == values
    stats = cache.get_stats()["tiers"]["l2"]
    assert (stats["hits"], stats["errors"], stats["corruptions"]) == (2 * len(values), 0, 0)
    assert cache.tier("l2").size()["entries"] == len(values)


def test_a_large_value_and_a_fence_on_a_cluster(on_cluster):
    cache = on_cluster(l1_enabled=False)
    big = noise(1 << 20, seed=1)
    cache.put("big", big)
    assert cache.get("big") == big
    cache.invalidate("big")
    assert cache.get("big") is None
    assert cache.tier("l2").client.get("esper:cluster:big") == b""  # the fence
    assert cache.get_many(["big"]) == {}


def test_clear_empties_every_node(on_cluster, redis_cluster):
    cache = on_cluster()
    cache.put_many({kernel_id: b"v" * 300 for kernel_id in ids_on_every_node(redis_cluster, "x")})
    cache.tier("l2").clear()
    assert cache.tier("l2").size() == {"entries": 0, "stored_bytes": 0}


def test_invalidation_reaches_another_process_through_the_cluster(
    on_cluster, redis_cluster_url, pg_url
):
    cache = on_cluster(postgres_url=pg_url, prefix="esper:cluster-inv:")
    other = OtherProcess(
        {"postgres_url": pg_url, "redis_url": redis_cluster_url,
         "redis_prefix": "esper:cluster-inv:", "l4_enabled": False}
    )  # fmt: skip
    try:
        assert_invalidate_and_put_reach(cache, other)
    finally:
        other.stop()
    assert other.process.exitcode == 0


def test_each_cache_subscribes_and_hears_the_others(on_cluster):
    """Listeners subscribed through different nodes: the cluster forwards every message."""
    caches = [on_cluster() for _ in range(3)]
    for cache in caches:
        assert cache.wait_subscribed(5)
    caches[0].put("X", b"one")
    for cache in caches[1:]:  # once the put's own announcement has passed, X stays in L1
        wait_until(lambda c=cache: c.get("X") == b"one" and "X" in c.tier("l1"), "X in L1")
    caches[0].put("X", b"two")
    for cache in caches[1:]:
        wait_until(lambda c=cache: "X" not in c.tier("l1"), "the put to reach every L1")
        assert cache.get("X") == b"two"


# -- faults ---------------------------------------------------------------------------------
def test_a_killed_node_is_skipped_then_used_again_after_restart(make_cache, private_redis_cluster):
    cluster = private_redis_cluster
    cache = make_cache(
        "embedded", redis_url=cluster.url, redis_prefix="f:", breaker_reset_s=RESET_S
    )
    assert cache.wait_subscribed(5)
    clock = manual_breaker(cache, "l2")
    ids = ids_on_every_node(cluster, "f:")
    values = {kernel_id: noise(800, i) for i, kernel_id in enumerate(ids)}
    assert "l2" in cache.put_many(values)
    victim = cluster.nodes[0]

    victim.stop()

    cache.tier("l1").clear()
    assert cache.get_many(list(values)) == values  # from L2's live nodes and from L3
    cache.tier("l1").clear()
    assert all(cache.get(kernel_id) == value for kernel_id, value in values.items())
    l2 = cache.get_stats()["tiers"]["l2"]
    assert l2["errors"] >= 1 and l2["breaker"] == "open"
    assert cache.health()["l2"]["status"] == "unavailable"
    assert cache.put("while-down", b"durable") == ["l1", "l3"]
    assert cache.get("while-down") == b"durable"

    cluster.restart(victim)

    def l2_takes_every_put() -> bool:
        clock.advance(RESET_S)  # the breaker lets one probe through
        return "l2" in cache.put_many({kernel_id: b"back" for kernel_id in ids})

    wait_until(l2_takes_every_put, "puts to reach every node of the restarted cluster")
    assert cache.get_stats()["tiers"]["l2"]["breaker"] == "closed"
    assert cache.health()["l2"]["status"] == "healthy"
    cache.tier("l1").clear()
    hits = cache.get_stats()["tiers"]["l2"]["hits"]
    assert cache.get_many(list(ids)) == dict.fromkeys(ids, b"back")
    assert cache.get_stats()["tiers"]["l2"]["hits"] == hits + len(ids)


def test_one_dead_node_leaves_l2_to_the_others_keys(make_cache, private_redis_cluster):
    """After the dead node's first failure (raised: the breaker counts it) its keys read
    as misses for a breaker period without a call, while the live nodes' keys stay L2
    hits; writes to its keys fail at once (L2 debt); after a restart it serves again."""
    cluster = private_redis_cluster
    cache = make_cache(
        "embedded", redis_url=cluster.url, redis_prefix="p:", breaker_reset_s=RESET_S
    )
    clock = manual_breaker(cache, "l2")
    ids = ids_on_every_node(cluster, "p:")
    values = {kernel_id: noise(700, i) for i, kernel_id in enumerate(ids)}
    cache.put_many(values)
    dead = cluster.nodes[2]
    on_dead = [k for k, node in ids.items() if node.port == dead.port]
    on_live = [k for k in ids if k not in on_dead]
    dead.stop()

    cache.tier("l1").clear()
    assert cache.get(on_dead[0]) == values[on_dead[0]]  # fails in L2 (counted), L3 answers
    clock.advance(RESET_S)  # the breaker lets the next call through, and it succeeds
    before = dict(cache.get_stats()["tiers"]["l2"])
    cache.tier("l1").clear()
    assert cache.get_many(list(ids)) == values
    cache.tier("l1").clear()
    assert all(cache.get(k) == values[k] for k in ids)
    after = cache.get_stats()["tiers"]["l2"]
    assert after["breaker"] == "closed" and after["errors"] == before["errors"] == 1
    assert after["hits"] - before["hits"] == 2 * len(on_live)  # the live nodes still serve
    with pytest.raises(EsperError, match="down"):  # a put's L2 write fails at once...
        cache.tier("l2").put_many([(on_dead[0], b"x")])
    assert cache.put(on_live[0], b"new") == ["l1", "l2", "l3"]  # ...other keys' do not

    cluster.restart(dead)
    wait_until(lambda: "l2" in cache.put(on_dead[0], b"back"), "the node to take writes again")
    cache.tier("l1").clear()
    assert cache.get(on_dead[0]) == b"back"


def test_invalidations_still_arrive_with_a_node_down(make_cache, private_redis_cluster, pg_url):
    cluster = private_redis_cluster
    config = {"postgres_url": pg_url, "redis_url": cluster.url, "redis_prefix": "d:"}
    reader, writer = make_cache("embedded", **config), make_cache("embedded", **config)
    dead = cluster.nodes[0]
    dead.stop()

    def both_listen_on_live_nodes() -> bool:  # PUBSUB NUMSUB counts a node's own subscribers
        counts = 0
        for node in cluster.nodes[1:]:
            with redis.Redis(port=node.port) as client:
                counts += dict(client.pubsub_numsub("d:invalidate"))[b"d:invalidate"]
        return counts == 2

    wait_until(both_listen_on_live_nodes, "both listeners to subscribe through live nodes", 10)
    assert reader.wait_subscribed(5)  # and its L1 dropped for the gap, before the read below
    alive = next(k for k in (f"x{i}" for i in range(100))
                 if node_of(cluster, f"d:{k}").port != dead.port)  # fmt: skip
    writer.put(alive, b"old")  # once the put's own announcement has passed, it stays in L1
    wait_until(lambda: reader.get(alive) == b"old" and alive in reader.tier("l1"), "old in L1")

    assert "l2" in writer.put(alive, b"new")  # its node is alive: written and announced

    wait_until(lambda: alive not in reader.tier("l1"), "the put's announcement to reach the reader")
    assert reader.get(alive) == b"new"


def test_a_frozen_node_costs_a_bounded_wait_and_no_stale_read(make_cache, private_redis_cluster):
    cluster = private_redis_cluster
    cache = make_cache(
        "embedded", redis_url=cluster.url, redis_prefix="z:", redis_timeout_s=0.1,
        breaker_reset_s=RESET_S,
    )  # fmt: skip
    ids = ids_on_every_node(cluster, "z:")
    cache.put_many(dict.fromkeys(ids, b"old"))
    frozen = cluster.nodes[1]
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        cache.tier("l1").clear()
        assert cache.get_many(list(ids)) == dict.fromkeys(ids, b"old")  # L3 answers
        assert cache.get_stats()["tiers"]["l2"]["errors"] >= 1
        cache.put_many(dict.fromkeys(ids, b"new"))  # skips L2 (open breaker): debt
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    cluster.wait_ok()
    cache.tier("l1").clear()
    wait_until(lambda: cache.get_many(list(ids)) == dict.fromkeys(ids, b"new"), "new values")


def test_a_slot_moved_to_another_node_is_followed(make_cache, private_redis_cluster):
    """The key's slot changes owner: the old owner answers MOVED, the tier reads the slot
    map again and asks the new owner, which has no copy: a miss, L3 answers, and no
    error is counted. (A slot with keys cannot change owner, so its key goes first.)"""
    cluster = private_redis_cluster
    cache = make_cache("embedded", redis_url=cluster.url, redis_prefix="m:", l1_enabled=False)
    cache.put("moved", b"value")
    assert cache.get("moved") == b"value"  # the tier now knows the slot's first owner
    old = node_of(cluster, "m:moved")
    new = next(node for node in cluster.nodes if node.port != old.port)
    with redis.Redis(port=old.port) as client:
        client.delete("m:moved")
    with redis.Redis(port=new.port) as client:
        new_id = client.execute_command("CLUSTER", "MYID")
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as client:
            client.execute_command("CLUSTER", "SETSLOT", key_slot(b"m:moved"), "NODE", new_id)

    assert cache.get("moved") == b"value"  # MOVED, then a miss on the new owner: from L3
    stats = cache.get_stats()["tiers"]["l2"]
    assert (stats["errors"], stats["misses"]) == (0, 1)
    with redis.Redis(port=new.port) as client:  # the promotion went to the new owner
        assert client.get("m:moved")
    assert cache.get_many(["moved"]) == {"moved": b"value"}
    assert cache.get_stats()["tiers"]["l2"]["hits"] == stats["hits"] + 1


def test_a_cluster_down_at_construction_is_a_tier_that_fails(make_cache, tmp_path):
    url = f"redis+cluster://127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}"
    cache = make_cache("embedded", redis_url=url, breaker_reset_s=60)
    assert cache.put("k", b"v") == ["l1", "l3"]
    cache.tier("l1").clear()
    assert cache.get("k") == b"v"
    health = cache.health()["l2"]
    assert health["status"] == "unavailable" and "127.0.0.1" in health["error"]
