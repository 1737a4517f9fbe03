"""Files -> ``ingest`` -> ``export`` gives the same documents back, on SQLite and MongoDB;
an export ingested again stores the same runs; ingesting twice changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bluestream.settings import Settings
from bluestream.tools.export import export_runs
from bluestream.tools.files import iter_records
from bluestream.tools.ingest import ingest_files
from helpers import ingest_sessions, read_stream_arrays, storage_digest
from test_catalog_support import assert_valid_order, canonical, plain, re_runs
from test_tools_support import (  # noqa: F401  (fixtures)
    metadata_uri_fixture,
    read_documents,
    settings_fixture,
    write_suitcase,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("fmt", ["jsonl", "msgpack"])
async def test_ingest_then_export_gives_the_same_documents(
        fmt: str, settings: Settings, tenant: str, tmp_path: Path) -> None:
    """Ingest, ingest again (no stored byte or row changes), export (the same
    documents, each once), ingest the export elsewhere (stored alike).

    Shown to fail on a copy of the tree (``PYTHONPATH=<copy>/src``), where the former
    checks (``again.ok``, a ``canonical()`` that kept one document per uid / seq_num)
    passed: the replay yielding each descriptor twice, each event page twice, or each
    datum twice -> ``canonical`` differs in ``counts`` (``'descriptor': 2`` vs 1) and
    ``repeated``; the Ingestor's host name made unique per session -> the second
    ingest changes ``sqlite:ingest_log`` / ``mongo:ingest_log`` (the writing processes,
    which a replay adds to, are compared separately); each Zarr group
    stamped with the time of every write -> it changes ``zarr:.../zarr.json``.
    """
    runs = list(re_runs().values())
    src = tmp_path / "src"
    src.mkdir()
    files = write_suitcase(runs, fmt, src)
    # Blocks of 2 rows: events end up in the arrays and in tails, and batches of 7
    # records then of 2,000 move them at different times: the bytes must not differ.
    settings = settings.model_copy(update={
        "storage": settings.storage.model_copy(update={"tail_rows": 2})})

    report = await ingest_files(files, tenant=tenant, settings=settings, batch_records=7)
    assert report.ok, report.rejections
    assert (report.runs, report.documents) == (len(runs), sum(1 for f in files
                                                              for _ in iter_records(f)))
    # Ingesting the same files again is a replay: it changes no stored byte or row.
    before = storage_digest(settings.storage.metadata, tenant, settings.storage.zarr_root)
    assert any(k.startswith("zarr:") for k in before)
    assert not before.get("sqlite:event_tail", "1 rows").startswith("0 rows")
    again = await ingest_files(files, tenant=tenant, settings=settings)
    assert again.ok, again.rejections
    assert again.documents == report.documents
    assert storage_digest(settings.storage.metadata, tenant,
                          settings.storage.zarr_root) == before
    # ... but the second process is named in each run's provenance, as the first is.
    first_uid = runs[0][0][1]["uid"]
    writers = await ingest_sessions(settings.storage.metadata, tenant, first_uid)
    assert len(writers) == 2 and {w["pid"] for w in writers.values()} == {os.getpid()}

    out = tmp_path / "export"
    exported = await export_runs([], tenant=tenant, settings=settings, fmt=fmt,
                                 out=out, all_runs=True)
    assert exported.ok and len(exported.files) == len(runs)
    assert [p.name for p in exported.provenance] == \
        [f"{f.name.rsplit('.', 1)[0]}.provenance.json" for f in exported.files]
    prov = json.loads((out / f"{first_uid}.provenance.json").read_text())
    assert prov["run_start"] == first_uid and len(prov["files"]) == 1
    assert prov["files"][0] in {str(f) for f in files}
    assert len(prov["sources"][0]["writers"]) == 2
    for docs in runs:
        path = out / f"{docs[0][1]['uid']}.{fmt}"
        back = read_documents(path)
        assert_valid_order(back)
        assert canonical(back) == canonical(docs), path.name

    # The export, ingested into another tenant, is stored exactly like the original.
    copy = tenant + "c"
    report = await ingest_files(sorted(out.iterdir()), tenant=copy, settings=settings)
    assert report.ok, report.rejections
    out2 = tmp_path / "export2"
    await export_runs([], tenant=copy, settings=settings, fmt=fmt, out=out2,
                      all_runs=True)
    for path in sorted(out.glob(f"*.{fmt}")):  # same documents, order and page boundaries
        assert [(n, plain(d)) for n, d in read_documents(out2 / path.name)] == \
            [(n, plain(d)) for n, d in read_documents(path)], path.name
    root = settings.storage.zarr_root
    for docs in runs:
        run = docs[0][1]["uid"]
        for desc in (d for n, d in docs if n == "descriptor"):
            a = read_stream_arrays(root, tenant, run, desc["uid"],
                                       settings.storage.metadata)
            b = read_stream_arrays(root, copy, run, desc["uid"],
                                       settings.storage.metadata)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
                assert a[key].dtype == b[key].dtype, key


async def test_export_selects_runs_by_scan_id_uid_prefix_and_index(
        settings: Settings, tenant: str, tmp_path: Path) -> None:
    runs = list(re_runs().values())
    files = write_suitcase(runs, "jsonl", tmp_path)
    assert (await ingest_files(files, tenant=tenant, settings=settings)).ok
    uids = [docs[0][1]["uid"] for docs in runs]
    scan_id = str(runs[1][0][1]["scan_id"])
    out = tmp_path / "sel"
    missing: list[str] = []
    report = await export_runs([scan_id, uids[0][:8], "-1", "nosuchrun"], tenant=tenant,
                               settings=settings, fmt="msgpack", out=out,
                               on_missing=lambda key, why: missing.append(key))
    newest = max(runs, key=lambda d: d[0][1]["time"])[0][1]["uid"]
    assert sorted(p.name for p in report.files) == sorted(
        {f"{u}.msgpack" for u in (uids[1], uids[0], newest)})
    assert missing == ["nosuchrun"] and report.missing == ["nosuchrun"] and not report.ok
