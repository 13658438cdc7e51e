"""AssetRepository.search_assets and AssetQuery: filters, JSON containment, ordering
and paging, text search, and SQL injection staying inert, on both backends.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from esper_assets.errors import (
    AssetNotFound,
    InvalidQuery,
)
from esper_assets.storage.repository import AssetQuery
from esper_assets_tests.storage.repository.conftest import (
    THRESHOLD,
    TICK,
    blob,
    count,
    create_spaced,
    everything,
    found,
    ids,
    meta,
    midpoint,
    objects,
)


# -- search -----------------------------------------------------------------------------
@pytest.fixture
def catalogue(repo) -> dict[str, str]:
    """Four assets with distinct created_at, sizes and compilation times."""
    k1, k2, b1 = create_spaced(
        repo,
        (
            meta(
                "conv-small",
                tags={"cnn", "fast"},
                properties={"arch": "ResNet", "model": {"layers": 12, "heads": 8}, "flag": True},
                compilation_time_ms=5.0,
            ),
            blob(10),
        ),
        (
            meta(
                "conv-large",
                tags={"cnn"},
                properties={"arch": "vgg", "model": {"layers": 24}, "flag": 1},
                compilation_time_ms=50.0,
            ),
            blob(2000),
        ),
        (
            meta(
                "attn-block",
                "blueprint",
                tags={"fast", "transformer"},
                properties={"arch": "Transformer", "model": {"layers": 12}, "flag": "1"},
                compilation_time_ms=1.0,
            ),
            blob(30),
        ),
    )
    time.sleep(TICK)
    c1 = repo.create_asset(
        meta("ckpt", "checkpoint", parent_id=k1, compilation_time_ms=10.0), blob(20)
    )
    repo.update_asset(b1, {"parent_id": k1})
    return {"k1": k1, "k2": k2, "b1": b1, "c1": c1}


def test_search_filters(repo, catalogue):
    k1, k2, b1, c1 = (catalogue[k] for k in ("k1", "k2", "b1", "c1"))
    q = AssetQuery()

    def check(query: AssetQuery, expected: set[str]) -> None:
        assert found(repo, query) == expected

    check(q, {k1, k2, b1, c1})
    check(q.with_type("kernel"), {k1, k2})
    check(q.with_type("kernel", "checkpoint"), {k1, k2, c1})

    check(q.with_tags(["cnn", "fast"]), {k1})
    check(q.with_tags(["cnn", "fast"], match="all"), {k1})
    check(q.with_tags(["cnn", "fast"], match="any"), {k1, k2, b1})
    check(q.with_tags(["transformer"], match="any"), {b1})
    check(q.with_tags(["nope"], match="any"), set())

    check(q.with_properties({"model": {"layers": 12}}), {k1, b1})
    check(q.with_properties({"model": {"layers": 12, "heads": 8}}), {k1})
    check(q.with_properties({"model": {"layers": 13}}), set())
    check(q.with_properties({"arch": "vgg"}), {k2})
    check(q.with_properties({"arch": "VGG"}), set())  # values match exactly
    check(q.with_properties({"flag": True}), {k1})
    check(q.with_properties({"flag": 1}), {k2})
    check(q.with_properties({"flag": "1"}), {b1})
    check(q.with_properties({"missing": 1}), set())

    t = {k: repo.get_metadata(v).created_at for k, v in catalogue.items()}
    check(q.created_after(midpoint(t["k2"], t["b1"])), {b1, c1})
    check(q.created_before(midpoint(t["k2"], t["b1"])), {k1, k2})
    check(
        q.created_after(midpoint(t["k1"], t["k2"])).created_before(midpoint(t["b1"], t["c1"])),
        {k2, b1},
    )
    check(q.created_after(datetime.now(UTC) + timedelta(days=1)), set())
    check(q.created_before(datetime.now(UTC) - timedelta(days=1)), set())

    check(q.with_parent(k1), {b1, c1})
    check(q.with_parent(k2), set())
    check(q.with_checksum(repo.get_metadata(k2).checksum), {k2})
    check(q.with_name("conv-small"), {k1})
    check(q.with_name("conv"), set())  # exact, not a pattern

    check(q.text("resnet"), {k1})  # property value, other case
    check(q.text("CONV"), {k1, k2})  # name
    check(q.text("TRANSFORMER"), {b1})
    check(q.text("zzz"), set())

    repo.deprecate_asset(c1, "superseded")
    check(q.with_state("deprecated"), {c1})
    check(q.with_state("active"), {k1, k2, b1})
    check(q.with_state("archived"), set())

    check(q.with_type("kernel").with_tags(["cnn"]).with_properties({"arch": "vgg"}), {k2})

    # The builder is immutable: each call returns a new query.
    base = AssetQuery().with_type("kernel")
    narrower = base.with_name("conv-small")
    assert narrower is not base
    check(base, {k1, k2})
    check(narrower, {k1})
    check(q, {k1, k2, b1, c1})


def test_property_containment_follows_json_rules(repo):
    lists = repo.create_asset(
        meta("lists", properties={"layers": [1, 2, 3], "items": [{"k": 1, "j": 2}, {"k": 3}]}),
        blob(),
    )
    scalar = repo.create_asset(meta("scalar", properties={"layers": 2, "n": None}), blob())
    q = AssetQuery()
    assert found(repo, q.with_properties({"layers": [2]})) == {lists}
    assert found(repo, q.with_properties({"layers": [3, 1]})) == {lists}
    assert found(repo, q.with_properties({"layers": [4]})) == set()
    assert found(repo, q.with_properties({"layers": 2})) == {scalar}
    assert found(repo, q.with_properties({"items": [{"k": 1}]})) == {lists}
    assert found(repo, q.with_properties({"items": [{"k": 2}]})) == set()
    assert found(repo, q.with_properties({"n": None})) == {scalar}
    assert found(repo, q.with_properties({"layers": 2.0})) == {scalar}  # JSON numbers
    with pytest.raises(InvalidQuery):
        q.with_properties({"x": float("nan")})
    with pytest.raises(InvalidQuery):
        q.with_properties(["not", "a", "dict"])


def test_search_order_limit_offset(repo):
    names = ["echo", "charlie", "alpha", "delta", "bravo"]
    sizes = [50, 10, 40, 20, 30]
    times = [3.0, 1.0, 5.0, 2.0, 4.0]
    created = create_spaced(
        repo,
        *[
            (meta(n, compilation_time_ms=c), blob(s))
            for n, s, c in zip(names, sizes, times, strict=True)
        ],
    )
    by_name = dict(zip(names, created, strict=True))
    q = AssetQuery()

    def order(query: AssetQuery) -> list[str]:
        return ids(repo.search_assets(query))

    alphabetical = [by_name[n] for n in sorted(names)]
    assert order(q.order_by("name")) == alphabetical
    assert order(q.order_by("name", ascending=False)) == alphabetical[::-1]
    assert order(q.order_by("size_bytes", ascending=False)) == [
        by_name[n] for n in ["echo", "alpha", "bravo", "delta", "charlie"]
    ]
    assert order(q.order_by("compilation_time_ms")) == [
        by_name[n] for n in ["charlie", "delta", "echo", "bravo", "alpha"]
    ]
    assert order(q.order_by("created_at")) == created
    assert order(q.order_by("created_at", ascending=False)) == created[::-1]

    assert order(q.order_by("name").limit(2)) == alphabetical[:2]
    assert order(q.order_by("name").offset(1).limit(2)) == alphabetical[1:3]
    assert order(q.order_by("name").offset(3)) == alphabetical[3:]
    assert order(q.order_by("name").offset(10)) == []
    assert order(q.limit(0)) == []
    assert len(order(q.limit(10000))) == 5

    versions = [repo.create_asset(meta("series"), blob()) for _ in range(3)]
    assert (
        order(q.with_name("series").order_by("version_number", ascending=False)) == (versions[::-1])
    )

    for aid, reads in ((by_name["bravo"], 3), (by_name["delta"], 1), (by_name["echo"], 2)):
        for _ in range(reads):
            repo.get_asset(aid)
    repo.flush_access()
    top = order(q.with_type("kernel").order_by("access_count", ascending=False).limit(3))
    assert top == [by_name["bravo"], by_name["echo"], by_name["delta"]]
    assert len(order(q.order_by("last_accessed"))) == 8


def test_bad_query_values_raise_at_build_time():
    q = AssetQuery()
    bad = [
        lambda: q.order_by("nope"),
        lambda: q.order_by("name; DROP TABLE assets"),
        lambda: q.order_by("checksum"),
        lambda: q.limit(-1),
        lambda: q.limit(10001),
        lambda: q.offset(-1),
        lambda: q.with_state("deleted"),
        lambda: q.with_type("model"),
        lambda: q.with_type("kernel", "model"),
        lambda: q.with_tags(["a"], match="some"),
    ]
    for build in bad:
        with pytest.raises(InvalidQuery):
            build()
    # The edges are allowed.
    q.limit(0)
    q.limit(10000)
    q.offset(0)
    for field in (
        "created_at",
        "name",
        "version_number",
        "size_bytes",
        "compilation_time_ms",
        "access_count",
        "last_accessed",
    ):
        q.order_by(field)
        q.order_by(field, ascending=False)


def test_text_search_finds_values_holding_quotes_and_backslashes(repo):
    quoted = repo.create_asset(meta("quoted", properties={"said": 'he said "hi"'}), blob())
    path = repo.create_asset(meta("path", properties={"dir": "C:\\tmp\\x"}), blob())
    repo.create_asset(meta("plain", properties={"k": "v"}), blob())
    q = AssetQuery()
    assert found(repo, q.text('said "hi"')) == {quoted}
    assert found(repo, q.text('"')) == {quoted}
    assert found(repo, q.text("C:\\tmp\\")) == {path}
    assert found(repo, q.text("\\")) == {path}


def test_text_search_ignores_json_syntax(repo):
    repo.create_asset(meta("plain", properties={"k": "v", "n": [1, {"x": 2}]}), blob())
    repo.create_asset(meta("empty"), blob())
    repo.create_asset(meta("swiss", properties={"city": "Zürich"}), blob())
    q = AssetQuery()
    for syntax in ("{", "}", ":", '":"', '","', '"'):
        assert found(repo, q.text(syntax)) == set(), f"text({syntax!r})"
    assert found(repo, q.text("\\")) == set()  # no backslash anywhere (\u00fc is an escape)


def test_text_search_finds_non_ascii_property_values(repo):
    swiss = repo.create_asset(meta("swiss", properties={"city": "Zürich"}), blob())
    assert found(repo, AssetQuery().text("zürich")) == {swiss}
    assert found(repo, AssetQuery().text("ürich")) == {swiss}


def test_text_search_folds_case_beyond_ascii(repo):
    swiss = repo.create_asset(meta("Zürich-Ökonomie", properties={"city": "ÅLESUND"}), blob())
    q = AssetQuery()
    assert found(repo, q.text("zürich-ökonomie")) == {swiss}
    assert found(repo, q.text("ZÜRICH")) == {swiss}
    assert found(repo, q.text("ålesund")) == {swiss}


# -- SQL injection ----------------------------------------------------------------------
EVIL = [
    "x'; DROP TABLE assets; --",
    "%",
    "_",
    "\\",
    "' OR '1'='1",
    "a%b_c\\d",
    "*",
    "[a]",
    "'",
    "$1",
    "%s",
    "?",
    "'); DELETE FROM assets; --",
]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_sql_injection_is_inert(repo, store):
    contents: dict[str, bytes] = {}
    for i, evil in enumerate(EVIL):
        payload = blob(THRESHOLD * 2 if i < 2 else 32)
        aid = repo.create_asset(
            meta(evil, asset_id=evil, tags={evil}, properties={evil: evil, "n": {evil: [evil]}}),
            payload,
        )
        assert aid == evil
        contents[evil] = payload
    plain = repo.create_asset(meta("plain-one", tags={"plain"}, properties={"k": "v"}), blob())
    child = repo.create_asset(
        meta("Plain Two", properties={"note": "hello world"}, parent_id="' OR '1'='1"), blob()
    )
    total = len(EVIL) + 2
    assert count(repo) == total
    catalogue = {m.asset_id: m for m in everything(repo)}

    q = AssetQuery()
    for evil in EVIL:
        context = f"needle {evil!r}"
        assert found(repo, q.with_name(evil)) == {evil}, context
        assert found(repo, q.with_tags([evil])) == {evil}, context
        assert found(repo, q.with_tags([evil, "plain"], match="any")) == {evil, plain}, context
        assert found(repo, q.with_tags([evil, "plain"], match="all")) == set(), context
        assert found(repo, q.with_properties({evil: evil})) == {evil}, context
        assert found(repo, q.with_properties({"n": {evil: [evil]}})) == {evil}, context
        expected_text = {
            aid
            for aid, m in catalogue.items()
            if any(evil.lower() in s.lower() for s in [m.name, *_strings(m.properties)])
        }
        assert found(repo, q.text(evil)) == expected_text, context
        assert found(repo, q.with_parent(evil)) == ({child} if evil == "' OR '1'='1" else set())
        try:
            by_checksum = found(repo, q.with_checksum(evil))
        except InvalidQuery:
            by_checksum = set()
        assert by_checksum == set(), context
        m, data = repo.get_asset(evil)
        assert (m.asset_id, m.name, data) == (evil, evil, contents[evil]), context
        with pytest.raises(AssetNotFound):
            repo.get_asset(evil + "-missing")
        with pytest.raises(InvalidQuery):
            q.order_by(evil)

    # Writes with hostile values in every field.
    repo.update_asset(EVIL[0], {"tags": set(EVIL), "properties": {e: e for e in EVIL}})
    assert found(repo, q.with_tags(EVIL)) == {EVIL[0]}
    repo.deprecate_asset(EVIL[4], reason=EVIL[0])
    assert EVIL[0] in str(repo.get_audit_log(EVIL[4])[-1]["details"])

    # The tables are intact: same rows, and writing and searching still work.
    assert count(repo) == total
    assert set(ids(everything(repo))) == set(catalogue)
    later = repo.create_asset(meta("after-the-attack", tags={"later"}), blob())
    assert found(repo, q.with_tags(["later"])) == {later}
    assert count(repo) == total + 1
    assert repo.get_usage_analytics()["total_assets"] == total + 1
    for evil in EVIL[:2]:
        assert f"assets/{evil}" in objects(store, "assets/")
