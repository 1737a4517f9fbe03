"""Defects found by the code review (issue 11), each with a test that failed before its fix.

How each was shown to fail before the fix is said in the test's docstring. Defects with
tests elsewhere: 1 (mask_uri) in test_queries.py and test_cli_check_config.py, 4 (ScanID
duplicates) in storage_conformance.py, 6 (library logging) in test_library_logging.py,
7 (check-config FILE) in test_cli_check_config.py, 8 (fsync) in test_durability.py,
10 (dead letters shown once) in test_ops_dlq.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import anyio
import pytest

import bluestream
from bluestream.errors import NotFound, StorageUnavailable
from bluestream.storage.backends import open_metadata_store
from helpers import envelopes, make_ingestor, scalar_run
from test_catalog_support import create_store, metadata_uri_fixture  # noqa: F401

pytestmark = pytest.mark.anyio

Doc = dict[str, Any]


async def _ingest(metadata_uri: str, zarr_root: Path, tenant: str,
                  *batches: list[tuple[str, Doc]]) -> list[str]:
    """Ingest each batch as one ``process`` call; the dead-letter reasons, in order."""
    ing, sink, registry = make_ingestor(metadata_uri, zarr_root)
    offset = 0
    try:
        for docs in batches:
            await ing.process(envelopes(docs, tenant, start_offset=offset))
            offset += len(docs)
    finally:
        await registry.aclose()
    return sink.reasons


# -- 2: one equality rule ------------------------------------------------------------------
@pytest.mark.parametrize("cached", [True, False], ids=["router-path", "store-path"])
async def test_a_resent_start_differing_only_int_vs_float_is_the_same_conflict_both_ways(
        metadata_uri: str, zarr_root: Path, tenant: str, cached: bool) -> None:
    """``scan_id: 1`` re-sent as ``1.0``: the router's replay check (a start it has in its
    cache) and the store's check (a new ingestor, the start only in the store) must agree.
    Before the fix the router called them equal (``1 == 1.0``) and dropped the re-sent
    start as a replay, while the store answered CONFLICT: one document, two fates."""
    run = scalar_run(2, scan_id=1)
    resent = copy.deepcopy(run[0][1])
    resent["scan_id"] = 1.0
    if cached:  # the same ingestor sees the original and the re-sent start
        reasons = await _ingest(metadata_uri, zarr_root, tenant, [*run, ("start", resent)])
    else:  # a restarted daemon: only the store knows the original
        await _ingest(metadata_uri, zarr_root, tenant, run)
        reasons = await _ingest(metadata_uri, zarr_root, tenant, [("start", resent)])
    assert reasons == ["conflicting-start"]
    # An exact replay is still a no-op on both paths.
    assert await _ingest(metadata_uri, zarr_root, tenant, run, run) == []


# -- 3: non-finite times ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["start", "descriptor", "stop", "event-time",
                                   "event-timestamp", "page-time", "page-timestamp"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_times_are_dead_lettered(tmp_path: Path, zarr_root: Path,
                                                  tenant: str, where: str,
                                                  value: float) -> None:
    """NaN/inf in any ``time`` and in event timestamps is refused with ``bad-time``.
    Before the fix a start with ``time: NaN`` was stored (it broke sorting and
    TimeRange) and so were NaN timestamps."""
    run = scalar_run(3)
    docs = copy.deepcopy(run)
    names = [n for n, _ in docs]
    if where in ("start", "descriptor", "stop"):
        docs[names.index(where)][1]["time"] = value
    elif where == "event-time":
        docs[2][1]["time"] = value
    elif where == "event-timestamp":
        docs[2][1]["timestamps"]["f0"] = value
    else:
        events = [d for n, d in docs if n == "event"]
        page = {"descriptor": events[0]["descriptor"], "uid": [e["uid"] for e in events],
                "seq_num": [e["seq_num"] for e in events],
                "time": [e["time"] for e in events],
                "data": {k: [e["data"][k] for e in events] for k in events[0]["data"]},
                "timestamps": {k: [e["timestamps"][k] for e in events]
                               for k in events[0]["data"]},
                "filled": {}}
        if where == "page-time":
            page["time"][1] = value
        else:
            page["timestamps"]["counter"][1] = value
        docs = [docs[0], docs[1], ("event_page", page), docs[-1]]
    reasons = await _ingest(f"sqlite:///{tmp_path}/m.db", zarr_root, tenant, docs)
    assert "bad-time" in reasons, reasons
    if where == "start":  # everything of the run waits for it, then dies with it
        assert reasons[0] == "bad-time"
    else:
        assert reasons == ["bad-time"]


# -- 5: readers open read-only --------------------------------------------------------------
def test_opening_a_catalog_writes_nothing_and_names_the_tenants(
        metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    """A mistyped tenant is a clear error listing the tenants that exist, and creates
    nothing. Before the fix ``open_catalog`` created tables/indexes, and on MongoDB a
    mistyped tenant created an empty database (so the next open "worked", empty)."""
    anyio.run(create_store, metadata_uri, tenant)
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert len(cat) == 0
    typo = tenant + "x"
    for _ in range(2):  # the first attempt must not create what the second would find
        with pytest.raises(NotFound) as err:
            bluestream.open_catalog(typo, metadata=metadata_uri, zarr_root=zarr_root)
        assert f"tenant {typo!r} does not exist" in str(err.value)
        assert tenant in str(err.value)

    async def tenants() -> list[str]:
        store = open_metadata_store(metadata_uri, tenant)
        await store.open()
        try:
            return await store.tenants()
        finally:
            await store.close()

    assert tenant in anyio.run(tenants) and typo not in anyio.run(tenants)


def test_a_read_only_sqlite_catalog_never_creates_the_file(tmp_path: Path,
                                                          zarr_root: Path) -> None:
    path = tmp_path / "nothing-here.db"
    with pytest.raises(StorageUnavailable, match="does not exist"):
        bluestream.open_catalog("csx", metadata=f"sqlite:///{path}", zarr_root=zarr_root)
    assert not path.exists()


def test_a_read_only_sqlite_store_refuses_to_write(tmp_path: Path, zarr_root: Path,
                                                   tenant: str) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    anyio.run(create_store, uri, tenant)

    async def write_readonly() -> None:
        store = open_metadata_store(uri, tenant, readonly=True)
        await store.open()
        try:
            await store.put_documents("start", [scalar_run(1)[0][1]])
        finally:
            await store.close()

    with pytest.raises(Exception, match=r"readonly|read-only"):
        anyio.run(write_readonly)


# -- 9: orphans cost one lookup per batch, not one per document ----------------------------
async def test_early_events_of_an_unknown_descriptor_cost_one_lookup_per_batch(
        tmp_path: Path, zarr_root: Path, tenant: str) -> None:
    """2,000 events whose descriptor has not arrived: one store lookup for it per
    batch. Before the fix every event asked the store again (2,000 lookups)."""
    run = scalar_run(2000)
    start, descriptor, events = run[0], run[1], run[2:-1]
    ing, sink, registry = make_ingestor(f"sqlite:///{tmp_path}/m.db", zarr_root)
    lookups: list[tuple[str, str]] = []
    real = ing._load

    async def counting(tenant_: str, kind: str, key: str) -> Doc | None:
        lookups.append((kind, key))
        return await real(tenant_, kind, key)

    ing.index._load = counting
    try:
        await ing.process(envelopes([start], tenant))
        await ing.process(envelopes(events, tenant, start_offset=1))
        assert lookups.count(("descriptor", descriptor[1]["uid"])) == 1
        assert len(ing.parked) == 2000
        await ing.process(envelopes([descriptor, run[-1]], tenant, start_offset=2001))
        assert len(ing.parked) == 0 and not sink.letters
        assert ing.counters.total("events") == 2000
    finally:
        await registry.aclose()
