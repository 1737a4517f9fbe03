"""``ingest-mongo``: runs written by suitcase-mongo's own Serializer into a database on the
real MongoDB-wire server are imported, read back equal through the catalog, skipped
when already complete, and picked up again when they grew."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from bluestream.catalog.core import open_catalog_async
from bluestream.settings import Settings
from bluestream.tools.ingest_mongo import ingest_mongo
from test_catalog_support import assert_valid_order, canonical, re_runs
from test_tools_support import (  # noqa: F401  (fixtures)
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

    report = await ingest_mongo(mongo_uri, database=source_db.name, tenant=tenant,
                                settings=settings)
    assert (report.imported, report.skipped, report.documents) == (0, len(runs), 0)
    assert not progress
