"""``ingest-mongo``: runs written by suitcase-mongo's own Serializer into a database on the
real MongoDB-wire server are imported, read back equal through the catalog, skipped
when already complete, and picked up again when they grew."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import event_model
import numpy as np
import pymongo
import pytest

from bluestream.catalog.core import open_catalog_async
from bluestream.settings import Settings
from bluestream.storage.sqlite import sqlite_path
from bluestream.tools.ingest_mongo import ingest_mongo
from helpers import assert_stored_events, read_stream_arrays, scalar_run, storage_digest
from test_catalog_support import assert_valid_order, canonical, re_runs
from test_tools_support import (  # noqa: F401  (fixtures)
    make_settings,
    metadata_uri_fixture,
    settings_fixture,
)

pytestmark = [pytest.mark.anyio, pytest.mark.mongo]

Docs = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def source_db(mongo_uri: str, tenant: str) -> Iterator[pymongo.database.Database[Any]]:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(mongo_uri)
    name = f"src_{tenant}"
    yield client[name]
    client.drop_database(name)
    client.close()


def write_with_suitcase(db: Any, docs: Docs) -> None:
    from suitcase.mongo_normalized import Serializer

    serializer = Serializer(db, db)  # no create_indexes(): text indexes upset the server
    for name, doc in docs:
        serializer(name, doc)


async def catalog_docs(settings: Settings, tenant: str) -> dict[str, Docs]:
    async with open_catalog_async(tenant, metadata=settings.storage.metadata,
                                  zarr_root=settings.storage.zarr_root) as cat:
        out = {}
        async for run in cat.values():
            out[run.uid] = [item async for item in run.documents()]
        return out


async def test_import_reads_back_equal_and_resumes(
        source_db: Any, mongo_uri: str, settings: Settings, tenant: str,
        tmp_path: Path) -> None:
    """Imported runs replay equal to the source (``canonical``: a multiset, so a
    document stored or replayed twice fails it, shown with the catalog's replay
    yielding each descriptor, event page or datum twice on a copy of the tree); an
    open run is completed on the next import; a third import skips everything and
    changes no stored byte or row (shown with a copy whose skip path writes an
    ``ingest_log`` entry: ``sqlite:ingest_log`` / ``mongo:ingest_log`` digests differ).
    """
    runs = list(re_runs().values())
    for docs in runs[:-1]:
        write_with_suitcase(source_db, docs)
    last = runs[-1]
    write_with_suitcase(source_db, last[:-1])  # the last run is still open: no stop yet

    progress: list[str] = []
    report = await ingest_mongo(f"{mongo_uri}/{source_db.name}", tenant=tenant,
                                settings=settings, on_reject=lambda r: progress.append(str(r)))
    assert report.ok, report.rejections
    assert (report.runs, report.imported, report.skipped) == (len(runs), len(runs), 0)
    stored = await catalog_docs(settings, tenant)
    assert set(stored) == {docs[0][1]["uid"] for docs in runs}
    for docs in runs[:-1]:
        back = stored[docs[0][1]["uid"]]
        assert_valid_order(back)
        assert canonical(back) == canonical(docs)
    assert canonical(stored[last[0][1]["uid"]]) == canonical(last[:-1])

    # Run again after the open run finished: complete runs are skipped, the open one
    # is imported again (idempotently) and now has its stop.
    write_with_suitcase(source_db, last[-1:])
    report = await ingest_mongo(mongo_uri, database=source_db.name, tenant=tenant,
                                settings=settings)
    assert report.ok, report.rejections
    assert (report.imported, report.skipped) == (1, len(runs) - 1)
    stored = await catalog_docs(settings, tenant)
    assert canonical(stored[last[0][1]["uid"]]) == canonical(last)

    # A third import finds every run complete: it changes no stored byte or row.
    before = storage_digest(settings.storage.metadata, tenant, settings.storage.zarr_root)
    report = await ingest_mongo(mongo_uri, database=source_db.name, tenant=tenant,
                                settings=settings)
    assert (report.imported, report.skipped, report.documents) == (0, len(runs), 0)
    assert storage_digest(settings.storage.metadata, tenant,
                          settings.storage.zarr_root) == before
    assert not progress


async def test_import_in_chunks_every_path(
        source_db: Any, mongo_uri: str, settings: Settings, tenant: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The importer reads the source a chunk of runs at a time (``$in`` queries split
    into parts) and holds the events of several runs at once, up to a bound; with every
    limit made tiny, each path is taken: runs grouped, a run longer than the bound
    streamed page by page, runs whose stop gives no counts (an open run, an old stop)
    streamed, and a group whose stop counts lied (more events than the stops said)
    streamed run by run instead of held. Every run reads back equal to the source,
    nothing twice; the next import skips every closed run and re-reads the open one."""
    import bluestream.tools.ingest_mongo as importer

    monkeypatch.setattr(importer, "CHUNK_RUNS", 3)
    monkeypatch.setattr(importer, "EVENTS_IN_MEMORY", 10)
    monkeypatch.setattr(importer, "IN_VALUES", 2)
    sizes = [1, 3, 4, 12, 5, 2, 3, 25, 6]
    runs = [scalar_run(n, scan_id=i + 1, t0=2_000_000.0 + 100 * i)
            for i, n in enumerate(sizes)]
    del runs[5][-1][1]["num_events"]  # an old stop without counts: streamed
    runs[7][-1][1]["num_events"] = {"primary": 1}  # says 1, holds 25: the group overflows
    open_run = runs[8][:-1]  # no stop yet: streamed, and read again next time
    # External data (resources and datums), held with other runs (4 events); the
    # streamed path with datums is test_import_reads_back_equal_and_resumes's open run.
    external = re_runs()["external"]
    n_external = sum(1 for n, _ in external if n == "event")
    for docs in [*runs[:8], open_run, external]:
        write_with_suitcase(source_db, docs)
    # Stored more than once in a source without unique indexes (bluesky-kafka's
    # at-least-once delivery): the newest run's start four more times (its copies share
    # a chunk with it, and then fill the last chunk of three alone), a start whose
    # copies fall into two chunks (the third oldest: the last of the first chunk, its
    # copy next), and a descriptor. Each run once.
    for _ in range(4):
        source_db.run_start.insert_one(dict(external[0][1]))
    source_db.run_start.insert_one(dict(runs[2][0][1]))
    source_db.event_descriptor.insert_one(dict(runs[3][1][1]))

    report = await ingest_mongo(f"{mongo_uri}/{source_db.name}", tenant=tenant,
                                settings=settings)
    assert report.ok, report.rejections
    # 15 start documents: 10 runs and 5 copies
    assert (report.runs, report.imported, report.skipped, report.duplicates) == (15, 10, 0, 5)
    assert "5 duplicate start document(s) (each run imported once)" in report.summary()
    assert report.events == sum(sizes) + n_external
    # written without create_indexes(): every lookup of a chunk would read a collection
    assert [w.split(": ")[0] for w in report.warnings] == [
        f"the source has no index on {name}" for name in (
            "event_descriptor.run_start", "run_stop.run_start", "event.descriptor",
            "datum.resource")]
    stored = await catalog_docs(settings, tenant)
    for docs in [*runs[:8], open_run, external]:
        back = stored[docs[0][1]["uid"]]
        assert_valid_order(back)
        assert canonical(back) == canonical(docs)
    span = await provenance_span(settings, tenant, open_run[0][1]["uid"])
    assert span == (0, 2)  # start, descriptor, one page of its 6 events

    # suitcase-mongo's indexes (a compound one serves its first key)
    source_db.event_descriptor.create_index([("run_start", -1), ("time", -1)])
    source_db.event.create_index([("descriptor", -1), ("time", 1)])
    source_db.run_stop.create_index("run_start", unique=True)
    source_db.datum.create_index("resource")
    report = await ingest_mongo(f"{mongo_uri}/{source_db.name}", tenant=tenant,
                                settings=settings)
    assert (report.imported, report.skipped, report.duplicates) == (1, 9, 5)
    assert report.warnings == []
    stored = await catalog_docs(settings, tenant)
    assert canonical(stored[open_run[0][1]["uid"]]) == canonical(open_run)
    # a resumed run's provenance spans the same offsets (counted from 0 for each run)
    assert await provenance_span(settings, tenant, open_run[0][1]["uid"]) == span


async def provenance_span(settings: Settings, tenant: str, run: str) -> tuple[int, int]:
    async with open_catalog_async(tenant, metadata=settings.storage.metadata,
                                  zarr_root=settings.storage.zarr_root) as cat:
        (source,) = (await (await cat.lookup(run)).provenance())["sources"]
    return int(source["offset_min"]), int(source["offset_max"])


# -- killed midway, resumed ------------------------------------------------------------------
KILL_RUNS = 12
KILL_EVENTS = 1500  # per run: two pages of the importer's 1000 events
#: Kinds the importer stores, their table/collection and the field that identifies one.
STORED_KINDS = {"start": ("run_start", "uid"), "stop": ("run_stop", "uid"),
                "descriptor": ("event_descriptor", "uid"),
                "event_stream": ("event_stream", "descriptor_uid")}


def big_source(db: Any) -> list[Docs]:
    """KILL_RUNS scalar runs written by suitcase-mongo's Serializer (events as pages,
    which it bulk-inserts one document per event), oldest first."""
    runs = [scalar_run(KILL_EVENTS, scan_id=i + 1, t0=1_000_000.0 + i * 10 * KILL_EVENTS)
            for i in range(KILL_RUNS)]
    serializer = _serializer(db)
    for docs in runs:
        events = [d for n, d in docs if n == "event"]
        for name, doc in docs:
            if name == "event":
                continue
            serializer(name, doc)
            if name == "descriptor":
                for i in range(0, len(events), 500):
                    serializer("event_page", event_model.pack_event_page(*events[i:i + 500]))
    return runs


def _serializer(db: Any) -> Any:
    from suitcase.mongo_normalized import Serializer

    return Serializer(db, db)


def stored_rows(metadata_uri: str, tenant: str, *,
                timeout: float = 30.0) -> dict[str, tuple[int, int]]:
    """Per kind: (rows stored, distinct identifiers among them), read straight from the
    target store (not through the catalog, which could hide a duplicate); zeros while
    the store does not exist yet."""
    out = dict.fromkeys(STORED_KINDS, (0, 0))
    if metadata_uri.startswith("sqlite:///"):
        path = sqlite_path(metadata_uri)
        if not os.path.exists(path):
            return out
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
        try:
            for kind, (table, key) in STORED_KINDS.items():
                row = con.execute(f"SELECT count(*), count(DISTINCT {key}) FROM {table} "
                                  "WHERE tenant = ?", (tenant,)).fetchone()
                out[kind] = (int(row[0]), int(row[1]))
        except sqlite3.OperationalError as exc:  # tables not created yet
            if "no such table" not in str(exc):
                raise
            out = dict.fromkeys(STORED_KINDS, (0, 0))
        finally:
            con.close()
        return out
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(metadata_uri)
    try:
        db = client[tenant]
        for kind, (coll, key) in STORED_KINDS.items():
            out[kind] = (db[coll].count_documents({}), len(db[coll].distinct(key)))
    finally:
        client.close()
    return out


def import_command(source: str, tenant: str, metadata_uri: str, zarr_root: Path,
                   config: Path) -> list[str]:
    return [sys.executable, "-m", "bluestream", "ingest-mongo", source, "--tenant", tenant,
            "--metadata", metadata_uri, "--zarr-root", str(zarr_root), "-c", str(config),
            "--quiet"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_import_killed_midway_resumes_with_nothing_twice(
        source_db: Any, mongo_uri: str, metadata_uri: str, tenant: str, zarr_root: Path,
        tmp_path: Path) -> None:
    """``bluestream ingest-mongo`` (a subprocess) is SIGKILLed while the target store
    shows some runs complete and, as a rule, the next one begun: its events partly
    stored, no stop. Run again, it reports resuming (the complete runs skipped, the
    rest imported) and every run, descriptor and event is stored exactly once: counted
    per kind in the store itself (rows and distinct uids), the Zarr arrays holding each
    source event once at its seq_num, the catalog's replay equal to the source's
    documents (a multiset: copies count). A third run changes no stored byte or row.

    ``limits.batch_max_bytes`` at its minimum makes every page its own batch, so a run
    is written in several steps and a kill can land inside one; the importer is frozen
    (SIGSTOP) while the store is looked at, so it is killed in the state seen.
    Shown to fail on a copy of the tree with ``PYTHONPATH=<copy>/src``: (1)
    ``_complete`` always False (starting over instead of resuming): ``(12, 12, 0) ==
    (12, 8, 4)`` on the summary "12 imported, 0 already complete"; (2) the Zarr writer
    appending a page whose rows are already stored instead of writing it by position
    (an importer without idempotent writes): the killed run's uid array holds 3000 rows,
    1501 distinct; (3) ``_complete`` true once the start is stored: ``(12, 7, 5) ==
    (12, 8, 4)``, and with that check removed, ``{'stop': (11, 11)} != {'stop': (12,
    12)}`` (the run killed midway never gets its stop).
    """
    runs = big_source(source_db)
    total = len(runs)
    config = tmp_path / "import.toml"
    config.write_text("[limits]\nbatch_max_bytes = 1024\n")
    cmd = import_command(f"{mongo_uri}/{source_db.name}", tenant, metadata_uri, zarr_root,
                         config)
    log = tmp_path / "import.log"

    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        # The importer is frozen (SIGSTOP) while the store is read, so what is read is
        # what it is killed on, however fast this machine is. Killed once a third of
        # the runs are complete and the next one has events stored but no stop, or
        # (should every look miss that window) once half are complete. The deadline is
        # for a loaded machine; each look is on the store's contents.
        deadline = time.monotonic() + 600
        while True:
            proc.send_signal(signal.SIGSTOP)
            try:
                rows = stored_rows(metadata_uri, tenant, timeout=1.0)
            except sqlite3.OperationalError as exc:  # frozen while it held a lock, or
                # while it was updating the WAL index ("locking protocol"): look again
                if "locked" not in str(exc) and "locking protocol" not in str(exc):
                    raise
                rows = dict.fromkeys(STORED_KINDS, (0, 0))
            streams, stops = rows["event_stream"][0], rows["stop"][0]
            if (stops >= total // 3 and streams > stops) or stops >= total // 2:
                break
            proc.send_signal(signal.SIGCONT)
            assert proc.poll() is None, (
                f"the import ended before it could be killed midway ({stops} of {total} "
                f"runs stored): {log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"no progress: {rows}"
            time.sleep(0.02)  # let it run a little between looks
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = stored_rows(metadata_uri, tenant)
    complete = at_kill["stop"][0]
    assert 0 < complete < total, at_kill  # midway, or the test proves nothing

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = re.search(r"(\d+) run\(s\) in the source: (\d+) imported, (\d+) already "
                        r"complete \(skipped\)", again.stdout)
    assert summary, again.stdout
    assert tuple(map(int, summary.groups())) == (total, total - complete, complete), (
        f"resuming after {complete} complete runs: {again.stdout}")

    rows = stored_rows(metadata_uri, tenant)
    assert rows == dict.fromkeys(STORED_KINDS, (total, total)), rows
    for docs in runs:
        run, desc = docs[0][1]["uid"], docs[1][1]["uid"]
        arrays = read_stream_arrays(zarr_root, tenant, run, desc, metadata_uri)
        uids = arrays["uid"].tolist()
        assert len(uids) == len(set(uids)) == KILL_EVENTS, run
        assert uids == [d["uid"] for n, d in docs if n == "event"]
        np.testing.assert_array_equal(arrays["seq_num"], np.arange(1, KILL_EVENTS + 1))
        assert_stored_events(zarr_root, tenant, docs, metadata_uri)
    stored = anyio.run(catalog_docs, make_settings(metadata_uri, zarr_root), tenant)
    assert sorted(stored) == sorted(docs[0][1]["uid"] for docs in runs)
    for docs in runs:
        back = stored[docs[0][1]["uid"]]
        assert_valid_order(back)
        assert canonical(back) == canonical(docs)
        assert sum(len(d["seq_num"]) for n, d in back if n == "event_page") == KILL_EVENTS

    before = storage_digest(metadata_uri, tenant, zarr_root)
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"0 imported, {total} already complete" in third.stdout, third.stdout
    assert storage_digest(metadata_uri, tenant, zarr_root) == before
