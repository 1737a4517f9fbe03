"""Query translation, without any server: the shapes of MongoDB filters, the safety of
the SQL (keys checked, values bound), and the errors users get for bad queries."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime
from typing import Any

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bluestream.errors import ConfigError
from bluestream.queries import (
    And,
    Comparison,
    Contains,
    Eq,
    FullText,
    In,
    Key,
    NotEq,
    NotIn,
    PartialUID,
    Query,
    Raw,
    Regex,
    ScanID,
    TimeRange,
)
from bluestream.storage.backends import open_metadata_store
from bluestream.storage.mongo import MongoMetadataStore
from bluestream.storage.mongo_query import to_mongo
from bluestream.storage.query_rules import epoch_seconds
from bluestream.storage.rules import mask_uri, search_text
from bluestream.storage.sqlite import SqliteMetadataStore, sqlite_path
from bluestream.storage.sqlite_query import json_path, register_functions, to_sql
from storage_conformance import QUERY_CASES, RUNS

# -- MongoDB filter shapes -----------------------------------------------------------------


@pytest.mark.parametrize(("query", "expected"), [
    (None, {}),
    (Eq("sample.name", "Si"), {"sample.name": {"$eq": "Si"}}),
    (Eq("x", {"$ne": 1}), {"x": {"$eq": {"$ne": 1}}}),  # a value is never an operator
    (NotEq("x", 1), {"x": {"$ne": 1}}),
    (In("x", (1, 2)), {"x": {"$in": [1, 2]}}),
    (NotIn("x", [1]), {"x": {"$nin": [1]}}),
    (ScanID(3, duplicates="all"), {"scan_id": {"$eq": 3}}),
    (ScanID(1, 2, duplicates="all"), {"scan_id": {"$in": [1, 2]}}),
    (TimeRange(since=10, until=20), {"time": {"$gte": 10.0, "$lt": 20.0}}),
    (TimeRange(until=20.5), {"time": {"$lt": 20.5}}),
    (TimeRange(), {}),
    (TimeRange(since="2024-03-01", timezone="UTC"), {"time": {"$gte": 1709251200.0}}),
    (PartialUID("abcde"), {"uid": {"$regex": "^abcde"}}),
    (PartialUID("a.c*e+f"), {"uid": {"$regex": r"^a\.c\*e\+f"}}),
    (PartialUID("abcde", "12345"),
     {"$or": [{"uid": {"$regex": "^abcde"}}, {"uid": {"$regex": "^12345"}}]}),
    (Contains("tags", 3), {"tags": {"$elemMatch": {"$eq": 3}}}),
    (Contains("note", "50% (Al)"),
     {"$or": [{"note": {"$elemMatch": {"$eq": "50% (Al)"}}},
              {"$and": [{"note": {"$not": {"$type": "array"}}},
                        {"note": {"$regex": r"50% \(Al\)"}}]}]}),
    (Regex("op", "^a"), {"$and": [{"op": {"$type": "string"}}, {"op": {"$regex": "^a"}}]}),
    (Regex("op", "^a", case_sensitive=False),
     {"$and": [{"op": {"$type": "string"}}, {"op": {"$regex": "^a", "$options": "i"}}]}),
    (Key("n") > 1, {"n": {"$gt": 1}}),
    (Key("n") >= 1, {"n": {"$gte": 1}}),
    (Key("n") < "b", {"n": {"$lt": "b"}}),
    (Key("n") <= 1.5, {"n": {"$lte": 1.5}}),
    (Key("n") == [1], {"n": {"$eq": [1]}}),
    (Key("n") != None, {"n": {"$ne": None}}),  # noqa: E711 - builds a query
    (FullText("Silicon  wafer"), {"$text": {"$search": '"silicon" "wafer"'}}),
    (Raw({"$where": "sleep(1)"}), {"$where": "sleep(1)"}),  # raw is the caller's own query
    (And(Eq("a", 1), And(Eq("b", 2), TimeRange())),
     {"$and": [{"a": {"$eq": 1}}, {"b": {"$eq": 2}}]}),
    (And(Eq("a", 1)), {"a": {"$eq": 1}}),
    (And(), {}),
    (And(FullText("a"), Eq("b", 1), FullText("c")),  # one $text per query in MongoDB
     {"$and": [{"b": {"$eq": 1}}, {"$text": {"$search": '"a" "c"'}}]}),
])
def test_to_mongo_shapes(query: Query | None, expected: dict[str, Any]) -> None:
    assert to_mongo(query) == expected


def test_to_mongo_full_text_fallback_renderer() -> None:
    def render(q: FullText) -> dict[str, Any]:
        return {"uid": {"$in": [q.text]}}

    assert to_mongo(And(FullText("a"), FullText("b")), full_text=render) == {
        "$and": [{"uid": {"$in": ["a"]}}, {"uid": {"$in": ["b"]}}]}


# -- errors users get --------------------------------------------------------------------

BAD_KEYS = ['a"; DROP TABLE run_start; --', "a') OR 1=1 --", "$where", "a..b", "", "a b",
            "a[0]", "x.$", "é"]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("make", [
    lambda k: Eq(k, 1), lambda k: NotEq(k, 1), lambda k: In(k, [1]), lambda k: NotIn(k, [1]),
    lambda k: Contains(k, "x"), lambda k: Regex(k, "x"), lambda k: Comparison("gt", k, 1),
    lambda k: Raw({k: 1}), lambda k: Raw({"$or": [{k: {"$gt": 1}}]}),
], ids=["eq", "ne", "in", "nin", "contains", "regex", "cmp", "raw", "raw-or"])
def test_unsafe_keys_are_rejected(key: str, make: Any) -> None:
    query = make(key)
    with pytest.raises(ValueError, match=r"invalid query key|operator '.*' is not supported"):
        to_sql(query)
    if not isinstance(query, Raw):
        with pytest.raises(ValueError, match="invalid query key"):
            to_mongo(query)


def test_values_are_bound_never_interpolated() -> None:
    evil = "x'); DROP TABLE run_start; --"
    sql, params = to_sql(And(Eq("plan_name", evil), Contains("tags", evil),
                             Regex("operator", re.escape(evil)), FullText(evil)))
    assert "DROP" not in sql and "'x'" not in sql
    assert evil in params
    with _table() as conn:
        assert conn.execute(f"SELECT uid FROM run_start WHERE {sql}", params).fetchall() == []
        assert conn.execute("SELECT count(*) FROM run_start").fetchone() == (len(RUNS),)


@pytest.mark.parametrize("partial", ["", "a", "abcd"])
def test_partial_uid_too_short(partial: str) -> None:
    for translate in (to_mongo, to_sql):
        with pytest.raises(ValueError, match="at least 5 characters"):
            translate(PartialUID("abcdef", partial))


@pytest.mark.parametrize(("raw", "operator"), [
    ({"tags": {"$size": 2}}, "$size"),
    ({"tags": {"$all": ["a"]}}, "$all"),
    ({"x": {"$elemMatch": {"$gt": 1}}}, "$elemMatch"),
    ({"x": {"$not": {"$gt": 1}}}, "$not"),
    ({"x": {"$type": "string"}}, "$type"),
    ({"$where": "this.x == 1"}, "$where"),
    ({"$nor": [{"x": 1}]}, "$nor"),
    ({"$text": {"$search": "x"}}, "$text"),
    ({"$expr": {"$gt": ["$a", "$b"]}}, "$expr"),
    ({"$and": [{"x": {"$mod": [2, 0]}}]}, "$mod"),
])
def test_raw_unsupported_operator_is_named(raw: dict[str, Any], operator: str) -> None:
    with pytest.raises(ValueError, match=f"operator '\\{operator}' is not supported"):
        to_sql(Raw(raw))


@pytest.mark.parametrize("raw", [
    {"x": {"$gt": 1, "y": 2}}, {"$or": []}, {"$and": {"x": 1}}, {"x": {"$options": "i"}},
    {"x": {"$in": 1}}, {"x": {"$regex": "("}}, {"x": {"$gt": None}},
])
def test_raw_malformed(raw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        to_sql(Raw(raw))


@pytest.mark.parametrize("query", [
    Regex("x", "(unclosed"), Comparison("between", "x", 1), Key("x") > None, Key("x") < [1],
    Key("x") >= True, FullText(" \t "), ScanID(), PartialUID(),
    TimeRange(since="last tuesday"), TimeRange(since=True),
    TimeRange(since="2024-01-01", timezone="Nowhere/Special"),
])
def test_bad_queries(query: Query) -> None:
    with pytest.raises(ValueError):
        to_mongo(query)
    with pytest.raises(ValueError):
        to_sql(query)


# -- time parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "zone", "expected"), [
    (1709251200, None, 1709251200.0),
    (1709251200.5, "Europe/Berlin", 1709251200.5),
    ("2024-03-01T00:00:00Z", None, 1709251200.0),
    ("2024-03-01T01:00:00+01:00", "UTC", 1709251200.0),
    ("2024-03-01", "UTC", 1709251200.0),
    ("2024-03-01 01:00", "Europe/Berlin", 1709251200.0),
    ("2024-03", "UTC", 1709251200.0),
    ("2024", "UTC", datetime(2024, 1, 1, tzinfo=UTC).timestamp()),
    (datetime(2024, 3, 1, tzinfo=UTC), "Europe/Berlin", 1709251200.0),
    (datetime(2024, 3, 1), "UTC", 1709251200.0),
    ("2024-03-01 12:00", None, datetime(2024, 3, 1, 12).astimezone().timestamp()),
    (None, "UTC", None),
])
def test_epoch_seconds(value: Any, zone: str | None, expected: float | None) -> None:
    assert epoch_seconds(value, zone) == expected


# -- SQL ---------------------------------------------------------------------------------------


def test_json_path() -> None:
    assert json_path("a.b-c.0.d_e") == '$."a"."b-c"[0]."d_e"'


def test_to_sql_none() -> None:
    assert to_sql(None) == ("1", [])


@pytest.mark.parametrize(("query", "expected"), [
    pytest.param(q, e, id=i) for i, q, e in QUERY_CASES
    # ScanID's "latest"/"error" need a lookup: the store resolves them (conformance suite)
    if not (isinstance(q, ScanID) and q.duplicates != "all")])
def test_shared_cases_translate_and_run(query: Query | None, expected: list[int]) -> None:
    """The conformance queries give the conformance answers on a bare table too."""
    sql, params = to_sql(query)
    assert sql.count("?") == len(params)
    with _table() as conn:
        rows = conn.execute(f"SELECT uid FROM run_start WHERE {sql} "
                            "ORDER BY time DESC, uid", params).fetchall()
    assert [r[0] for r in rows] == [RUNS[n]["uid"] for n in expected]
    bson.encode(to_mongo(query))


# -- property: any query built from the portable parts translates and runs ------------------

_keys = st.sampled_from(["plan_name", "sample.name", "tags", "num_points", "hints.dimensions",
                         "a-b.c_d.0", "missing"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=8))
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3),
                    st.dictionaries(st.sampled_from(["name", "x"]), _scalars, max_size=2))
_ordered = st.one_of(st.integers(-100, 100), st.floats(-1e6, 1e6), st.text(max_size=5))
_words = st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=6)


def _raw_strategy() -> st.SearchStrategy[dict[str, Any]]:
    op = st.one_of(
        st.tuples(st.sampled_from(["$eq", "$ne"]), _values),
        st.tuples(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), _ordered),
        st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(_values, max_size=3)),
        st.tuples(st.just("$exists"), st.booleans()),
        st.tuples(st.just("$regex"), st.sampled_from(["^a", "b$", "c.*d", r"\d"])),
    )
    field = st.builds(lambda k, o: {k: {o[0]: o[1]}}, _keys, op)
    plain = st.builds(lambda k, v: {k: v}, _keys, _scalars)
    leaf = st.one_of(field, plain)
    return st.recursive(leaf, lambda inner: st.builds(
        lambda name, items: {name: items}, st.sampled_from(["$and", "$or"]),
        st.lists(inner, min_size=1, max_size=3)), max_leaves=6)


_leaves: st.SearchStrategy[Query] = st.one_of(
    st.builds(Eq, _keys, _values), st.builds(NotEq, _keys, _values),
    st.builds(In, _keys, st.lists(_values, max_size=3)),
    st.builds(NotIn, _keys, st.lists(_values, max_size=3)),
    st.builds(Contains, _keys, _values),
    st.builds(Regex, _keys, st.sampled_from(["^s", "an$", "a|b", "(x)?y"]), st.booleans()),
    st.builds(FullText, st.lists(_words, min_size=1, max_size=3).map(" ".join)),
    st.builds(Comparison, st.sampled_from(["lt", "le", "gt", "ge"]), _keys, _ordered),
    st.builds(lambda ids: ScanID(*ids, duplicates="all"),
              st.lists(st.integers(0, 10), min_size=1, max_size=3)),
    st.builds(lambda p: PartialUID(p), st.text("0123456789abcdef-", min_size=5, max_size=9)),
    st.builds(TimeRange, st.one_of(st.none(), st.floats(0, 2e9)),
              st.one_of(st.none(), st.floats(0, 2e9))),
    st.builds(Raw, _raw_strategy()),
)
_queries = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=3).map(
    lambda qs: And(*qs)), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(_queries)
def test_any_portable_query_translates_and_runs(query: Query) -> None:
    sql, params = to_sql(query)
    assert sql.count("?") == len(params)
    with _table() as conn:
        uids = [r[0] for r in conn.execute(f"SELECT uid FROM run_start WHERE {sql}", params)]
        negated = conn.execute(f"SELECT count(*) FROM run_start WHERE NOT ({sql})",
                               params).fetchone()[0]
    assert set(uids) <= {d["uid"] for d in RUNS.values()}
    assert len(uids) + negated == len(RUNS)  # never NULL: negation is the complement
    bson.encode(to_mongo(query))


# -- URIs and the factory ------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "masked"), [
    ("mongodb://u:p@h:27017/db?authSource=admin", "mongodb://u:***@h:27017/db?authSource=admin"),
    ("mongodb://u:p@h1:1,h2:2/?replicaSet=rs", "mongodb://u:***@h1:1,h2:2/?replicaSet=rs"),
    ("mongodb+srv://u:p@ss@cluster.example.org/x", "mongodb+srv://u:***@cluster.example.org/x"),
    ("mongodb://u:a/b@h/db", "mongodb://u:***@h/db"),
    ("mongodb://u@h/db", "mongodb://u@h/db"),
    ("mongodb://h:27017", "mongodb://h:27017"),
    ("sqlite:///data/x.db", "sqlite:///data/x.db"),
    ("not a uri", "not a uri"),
    # review defect 1: the old masker cut at the first "@" and showed "***@ss@host".
    ("mongodb://bob:p@ss@host", "mongodb://bob:***@host"),
    ("mongodb://bob:p@ss@host/db?tls=true", "mongodb://bob:***@host/db?tls=true"),
    ("invalid URI mongodb://bob:p@ss@host: port", "invalid URI mongodb://bob:***@host: port"),
])
def test_mask_uri(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


@pytest.mark.parametrize(("uri", "cls"), [
    ("mongodb://u:p@127.0.0.1:27017", MongoMetadataStore),
    ("mongodb+srv://cluster.example.org", MongoMetadataStore),
    ("sqlite:///data/x.db", SqliteMetadataStore),
    ("sqlite:///:memory:", SqliteMetadataStore),
])
def test_factory_picks_backend(uri: str, cls: type) -> None:
    store = open_metadata_store(uri, "bl7")
    assert isinstance(store, cls)
    assert store.tenant == "bl7"
    assert "p@" not in store.uri


@pytest.mark.parametrize("uri", ["postgresql://u:pw@db/x", "sqlite://x.db", "file:///x", "x"])
def test_factory_unknown_scheme(uri: str) -> None:
    with pytest.raises(ConfigError, match="is not supported") as err:
        open_metadata_store(uri, "t")
    assert mask_uri(uri) in str(err.value) and "pw@" not in str(err.value)


@pytest.mark.parametrize(("uri", "path"), [
    ("sqlite:///rel/x.db", "rel/x.db"), ("sqlite:////abs/x.db", "/abs/x.db"),
    ("sqlite:///:memory:", ":memory:"),
])
def test_sqlite_path(uri: str, path: str) -> None:
    assert sqlite_path(uri) == path


def test_sqlite_path_empty() -> None:
    with pytest.raises(ConfigError):
        sqlite_path("sqlite:///")


def test_search_text_collects_every_string_value() -> None:
    doc = {"a": "Foo", "b": {"c": ["Bar", 1, {"d": "BAZ"}]}, "e": 2.5, "keys-not-values": None}
    assert search_text(doc) == "foo bar baz"


# -- helpers ---------------------------------------------------------------------------------


def _table() -> _Table:
    return _Table()


class _Table:
    """An in-memory run_start table with the columns to_sql reads, holding RUNS."""

    def __enter__(self) -> sqlite3.Connection:
        self.conn = sqlite3.connect(":memory:")
        register_functions(self.conn)
        # doc_key: a start's key is its uid (uid lookups go through the primary key)
        self.conn.execute("CREATE TABLE run_start (doc_key TEXT PRIMARY KEY, uid TEXT, "
                          "time REAL, scan_id INTEGER, search_text TEXT, query_doc TEXT)")
        self.conn.executemany("INSERT INTO run_start VALUES (?, ?, ?, ?, ?, ?)", [
            (d["uid"], d["uid"], d["time"], d["scan_id"], search_text(d), json.dumps(d))
            for d in RUNS.values()])
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

