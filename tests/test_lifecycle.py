"""Living with stored runs, on both metadata stores: annotations (versioned, searchable,
the start document untouched), removal and pruning (two-phase, crash-safe, refusing
open runs), provenance (``run.provenance()``, ``bluestream provenance``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

import bluestream
from bluestream.catalog import Catalog
from bluestream.cli import app
from bluestream.errors import NotFound
from bluestream.queries import And, Annotation, Eq
from bluestream.storage.backends import open_metadata_store
from helpers import scalar_run
from test_catalog_support import (  # noqa: F401  (fixtures)
    Docs,
    cat_fixture,
    create_store,
    ingest,
    metadata_uri_fixture,
    store_docs_fixture,
)
from test_tools_support import logging_restored

#: More rows than a tail block (256): the run has Zarr arrays as well.
LONG = 600


@pytest.fixture(name="tail_rows")
def tail_rows_fixture() -> int:
    return 256


def _run(n: int, scan_id: int, **start: Any) -> Docs:
    docs = scalar_run(n, scan_id=scan_id)
    docs[0][1].update(start)
    return docs


def _cli(*args: Any, input: str | None = None) -> Any:
    with logging_restored():  # the command's logging set-up must not outlive it
        return CliRunner().invoke(app, [str(a) for a in args], input=input,
                                  catch_exceptions=False)


def _where(metadata_uri: str, zarr_root: Path, tenant: str) -> list[str]:
    return ["--tenant", tenant, "--metadata", metadata_uri, "--zarr-root", str(zarr_root)]


def _run_dir(zarr_root: Path, tenant: str, uid: str) -> Path:
    return zarr_root / tenant / uid[:2] / uid


async def _leftovers(metadata_uri: str, tenant: str, uid: str, descriptor: str) -> list[str]:
    """Metadata records of a run still stored, read through a writable store."""
    store = open_metadata_store(metadata_uri, tenant)
    await store.open()
    try:
        found = []
        for kind, key in (("start", uid), ("stop", uid), ("descriptor", descriptor)):
            if await store.get(kind, key) is not None:
                found.append(kind)
        if await store.streams(uid):
            found.append("event_stream")
        if await store.ingest_log(uid):
            found.append("ingest_log")
        if await store.annotations(uid):
            found.append("annotations")
        if await store.removal_marks():
            found.append("marks")
        return found
    finally:
        await store.close()


# -- annotations ------------------------------------------------------------------------

def test_annotations_are_versioned_and_searchable(cat: Catalog, store_docs: Any) -> None:
    a, b, c = _run(3, 1), _run(3, 2), _run(3, 3, plan_name="scan")
    for docs in (a, b, c):
        store_docs(docs)
    run_a, run_b = cat[a[0][1]["uid"]], cat[b[0][1]["uid"]]
    start_before = dict(run_a.start)
    assert run_a.annotate("quality", "good", author="ann", note="first look") == 1
    assert run_a.annotate("quality", "burned", author="bob") == 2
    assert run_a.annotate("dose", 2.5) == 1
    assert run_b.annotate("quality", "good") == 1

    assert run_a.annotations == {"quality": "burned", "dose": 2.5}
    history = run_a.annotation_history("quality")
    assert [(h["version"], h["value"], h["author"], h["note"]) for h in history] == [
        (1, "good", "ann", "first look"), (2, "burned", "bob", None)]
    assert history[0]["time"] <= history[1]["time"]
    # The original documents are never modified, and a fresh reader sees the same.
    assert cat[run_a.uid].start == start_before and "quality" not in start_before

    assert list(cat.search(Annotation("quality") == "good")) == [run_b.uid]
    assert sorted(cat.search(Annotation("quality").exists())) == sorted([run_a.uid,
                                                                         run_b.uid])
    assert list(cat.search(Annotation("dose") > 2)) == [run_a.uid]
    assert c[0][1]["uid"] in list(cat.search(Annotation("quality") != "good"))
    assert list(cat.search(And(Annotation("quality").exists(),
                               Eq("plan_name", "scan")))) == []
    assert len(cat.search(Annotation("quality") == "good")) == 1

    run_a.annotate("quality", None)  # cleared: a new version, nothing overwritten
    assert run_a.annotations == {"dose": 2.5}
    assert len(run_a.annotation_history("quality")) == 3
    with pytest.raises(ValueError, match="JSON"):
        run_a.annotate("quality", float("nan"))
    with pytest.raises(ValueError, match="annotation key"):
        run_a.annotate("bad key", 1)


def test_annotate_command(cat: Catalog, store_docs: Any, metadata_uri: str,
                          zarr_root: Path, tenant: str) -> None:
    docs = _run(2, 7)
    store_docs(docs)
    uid = docs[0][1]["uid"]
    where = _where(metadata_uri, zarr_root, tenant)
    out = _cli("annotate", uid[:8], "quality=good", "dose=3", "tags=[1, 2]", *where,
               "--author", "carol", "--note", "checked")
    assert out.exit_code == 0, out.output
    assert "quality = \"good\" (version 1)" in out.output
    assert cat[uid].annotations == {"quality": "good", "dose": 3, "tags": [1, 2]}
    out = _cli("annotate", "7", "quality=bad", *where)  # by scan_id
    assert out.exit_code == 0, out.output
    shown = _cli("annotate", uid, *where, "--history", "quality")
    assert [json.loads(line)["value"] for line in shown.output.splitlines()] == ["good",
                                                                                 "bad"]
    assert json.loads(_cli("annotate", "-1", *where).output)["quality"] == "bad"
    bad = _cli("annotate", uid, "novalue", *where)
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    missing = _cli("annotate", "fffff", "a=1", *where)
    assert missing.exit_code == 1 and "no run" in missing.output


# -- removal ----------------------------------------------------------------------------

def test_remove_deletes_arrays_then_metadata(cat: Catalog, store_docs: Any, metadata_uri: str,
                                             zarr_root: Path, tenant: str) -> None:
    gone, kept = _run(LONG, 1), _run(LONG, 2)
    store_docs(gone)
    store_docs(kept)
    uid, descriptor = gone[0][1]["uid"], gone[1][1]["uid"]
    cat[uid].annotate("quality", "bad")
    assert _run_dir(zarr_root, tenant, uid).is_dir()
    report = cat.remove(uid)
    assert report.ok and [d["uid"] for d in report.removed] == [uid]
    assert report.removed[0]["files"] > 0 and report.removed[0]["records"] > 0
    assert not _run_dir(zarr_root, tenant, uid).exists()
    assert list(cat) == [kept[0][1]["uid"]] and len(cat) == 1
    with pytest.raises(NotFound):
        cat[uid]
    assert anyio.run(_leftovers, metadata_uri, tenant, uid, descriptor) == []
    # The other run is untouched and reads whole.
    assert len(cat[kept[0][1]["uid"]]["primary"].read()["time"]) == LONG
    with pytest.raises(NotFound):  # unknown: nothing removed
        cat.remove(kept[0][1]["uid"], "ffffffff")
    assert len(cat) == 1


def test_open_runs_are_refused_unless_forced_and_settled(
        cat: Catalog, store_docs: Any) -> None:
    docs = _run(5, 1)
    open_run = [d for d in docs if d[0] != "stop"]
    store_docs(open_run)
    uid = docs[0][1]["uid"]
    report = cat.remove(uid)
    assert not report.ok and report.removed == []
    assert "open" in str(report.refused[0]) and uid in str(report.refused[0])
    assert uid in cat
    report = cat.remove(uid, force=True, settle=0.2)  # it wrote data just now
    assert not report.ok and "wrote data" in str(report.refused[0]) and uid in cat
    report = cat.remove(uid, force=True, settle=0.2, idle=0)  # quiet, not growing: removed
    assert report.ok and uid not in cat


def test_arrays_not_under_the_root_given_refuse_the_removal(
        cat: Catalog, store_docs: Any, metadata_uri: str, zarr_root: Path, tenant: str,
        tmp_path: Path) -> None:
    """A wrong Zarr root would delete the metadata and orphan the real arrays."""
    docs = _run(LONG, 1)
    store_docs(docs)
    uid = docs[0][1]["uid"]
    elsewhere = tmp_path / "not-the-root"
    elsewhere.mkdir()
    short = _run(3, 2)  # all its rows in the stream's tail: nothing of it in Zarr
    store_docs(short)
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=elsewhere) as wrong:
        report = wrong.remove(uid)
        assert wrong.remove(short[0][1]["uid"]).ok  # nothing to orphan: removed
    assert not report.ok and "wrong --zarr-root" in str(report.refused[0])
    assert [r.uid for r in report.refused] == [uid]
    assert uid in cat and _run_dir(zarr_root, tenant, uid).is_dir()
    assert short[0][1]["uid"] not in cat
    out = _cli("prune", "--tenant", tenant, "--metadata", metadata_uri, "--zarr-root",
               str(zarr_root), "--before", "not a date")
    assert out.exit_code == 2 and "--before" in out.output


@pytest.mark.anyio
async def test_a_run_still_being_written_is_refused_even_when_forced(
        metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    docs = _run(40, 1)
    head = [d for d in docs if d[0] in ("start", "descriptor")]
    events = [d for d in docs if d[0] == "event"]
    await ingest(metadata_uri, zarr_root, tenant, head + events[:5])
    async with bluestream.open_catalog_async(tenant, metadata=metadata_uri,
                                             zarr_root=zarr_root) as cat:
        report: Any = None

        async def remove() -> None:
            nonlocal report
            report = await cat.remove(docs[0][1]["uid"], force=True, settle=1.5, idle=0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(remove)
            await anyio.sleep(0.5)  # the run grows while the removal watches it
            await ingest(metadata_uri, zarr_root, tenant, events[5:10], start_offset=100)
        assert report is not None and not report.ok and report.removed == []
        assert "still being written" in str(report.refused[0])
        assert await cat.count() == 1


_KILLER = """
import os, signal, sys
import anyio
import bluestream

metadata, zarr_root, tenant, uid, phase = sys.argv[1:]

def hook(name, _run):
    if name == phase:
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    async with bluestream.open_catalog_async(tenant, metadata=metadata,
                                             zarr_root=zarr_root) as cat:
        await cat.remove(uid, hook=hook)

anyio.run(main)
"""


@pytest.mark.parametrize("phase", ["mark", "arrays"])
def test_removal_killed_between_phases_finishes_on_rerun(
        phase: str, cat: Catalog, store_docs: Any, metadata_uri: str, zarr_root: Path,
        tenant: str, tmp_path: Path) -> None:
    docs, kept = _run(LONG, 1), _run(3, 2)
    store_docs(docs)
    store_docs(kept)
    uid, descriptor = docs[0][1]["uid"], docs[1][1]["uid"]
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(_KILLER))
    proc = subprocess.run([sys.executable, str(script), metadata_uri, str(zarr_root), tenant,
                           uid, phase], env={**os.environ}, capture_output=True,
                          timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # Killed after marking: readers no longer see the run, though it is still stored.
    assert list(cat) == [kept[0][1]["uid"]]
    assert _run_dir(zarr_root, tenant, uid).exists() == (phase == "mark")
    assert "start" in anyio.run(_leftovers, metadata_uri, tenant, uid, descriptor)
    # The same command again finishes the job.
    out = _cli("remove", uid, *_where(metadata_uri, zarr_root, tenant), "--yes")
    assert out.exit_code == 0, out.output
    assert f"finished an interrupted removal: {uid}" in out.output
    assert not _run_dir(zarr_root, tenant, uid).exists()
    assert anyio.run(_leftovers, metadata_uri, tenant, uid, descriptor) == []
    assert list(cat) == [kept[0][1]["uid"]]


def test_prune_command(cat: Catalog, store_docs: Any, metadata_uri: str, zarr_root: Path,
                       tenant: str) -> None:
    old_count = _run(3, 1, plan_name="count", time=1_000_000.0)
    old_scan = _run(LONG, 2, plan_name="scan", time=1_000_100.0)
    new = _run(3, 3, plan_name="count")
    for docs in (old_count, old_scan, new):
        store_docs(docs)
    where = _where(metadata_uri, zarr_root, tenant)
    before = "1970-02-01T00:00:00+00:00"
    dry = _cli("prune", *where, "--before", before, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert old_count[0][1]["uid"] in dry.output and old_scan[0][1]["uid"] in dry.output
    assert new[0][1]["uid"] not in dry.output and len(cat) == 3
    declined = _cli("prune", *where, "--before", before, input="n\n")
    assert declined.exit_code == 1 and "nothing removed" in declined.output
    assert len(cat) == 3
    query = json.dumps({"plan_name": "scan"})
    done = _cli("prune", *where, "--before", before, "--query", query, "--yes")
    assert done.exit_code == 0, done.output
    assert f"removed {old_scan[0][1]['uid']}" in done.output
    assert sorted(cat) == sorted([old_count[0][1]["uid"], new[0][1]["uid"]])
    assert not _run_dir(zarr_root, tenant, old_scan[0][1]["uid"]).exists()
    done = _cli("prune", *where, "--before", "1000050", "--yes")  # epoch seconds
    assert done.exit_code == 0 and list(cat) == [new[0][1]["uid"]]
    bad = _cli("prune", *where, "--before", before, "--query", "[1]")
    assert bad.exit_code == 2 and "JSON object" in bad.output


def test_remove_command_refuses_open_runs(cat: Catalog, store_docs: Any, metadata_uri: str,
                                          zarr_root: Path, tenant: str) -> None:
    docs = _run(3, 1)
    store_docs([d for d in docs if d[0] != "stop"])
    out = _cli("remove", "-1", *_where(metadata_uri, zarr_root, tenant), "--yes")
    assert out.exit_code == 1 and "refused" in out.output and "--force" in out.output
    assert len(cat) == 1


# -- provenance -------------------------------------------------------------------------

def test_provenance_names_topic_offsets_and_writers(
        cat: Catalog, metadata_uri: str, zarr_root: Path, tenant: str) -> None:
    docs = _run(4, 1)
    uid = docs[0][1]["uid"]
    anyio.run(lambda: ingest(metadata_uri, zarr_root, tenant, docs[:3], start_offset=10))
    anyio.run(lambda: ingest(metadata_uri, zarr_root, tenant, docs[2:], start_offset=12))
    prov = cat[uid].provenance()
    [source] = prov["sources"]
    assert (source["kind"], source["topic"], source["partition"]) == ("file", "file:test", 0)
    assert (source["offset_min"], source["offset_max"]) == (10, 12 + len(docs) - 3)
    assert prov["files"] == ["test"] and prov["topics"] == []
    ranges = sorted((w["offset_min"], w["offset_max"]) for w in source["writers"])
    assert ranges == [(10, 12), (12, 12 + len(docs) - 3)]  # both processes, each its part
    assert all(w["pid"] == os.getpid() and w["host"] for w in source["writers"])
    out = _cli("provenance", uid[:8], *_where(metadata_uri, zarr_root, tenant))
    assert out.exit_code == 0 and json.loads(out.output) == prov


def test_removed_runs_leave_other_tenants_alone(metadata_uri: str, zarr_root: Path,
                                                tenant: str) -> None:
    docs = _run(LONG, 1)
    other = tenant + "x"
    for t in (tenant, other):
        anyio.run(create_store, metadata_uri, t)
        anyio.run(lambda t=t: ingest(metadata_uri, zarr_root, t, docs))
    with bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert cat.remove(docs[0][1]["uid"]).ok
        assert len(cat) == 0
    with bluestream.open_catalog(other, metadata=metadata_uri, zarr_root=zarr_root) as cat:
        assert len(cat[-1]["primary"].read()["time"]) == LONG



def test_a_reader_of_an_older_file_sees_marks_made_after_it_opened(tmp_path: Path,
                                                                   tenant: str) -> None:
    """A catalog open for hours (Tiled, a notebook) on a file written before removal
    existed must stop listing a run as soon as it is marked removed."""
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'old.db'}"

    async def main() -> None:
        writer = open_metadata_store(uri, tenant)
        await writer.open()
        await writer.put_documents("start", [{"uid": "run-a", "time": 1.0},
                                             {"uid": "run-b", "time": 2.0}])
        await writer.close()
        con = sqlite3.connect(tmp_path / "old.db")
        con.execute("DROP TABLE run_removed")  # as written before removal existed
        con.commit()
        con.close()
        reader = open_metadata_store(uri, tenant, readonly=True)
        await reader.open()
        try:
            assert await reader.count(None) == 2
            writer = open_metadata_store(uri, tenant)  # a current writer adds the table
            await writer.open()
            await writer.mark_removed(["run-a"], {"time": 3.0})
            await writer.close()
            assert await reader.count(None) == 1
            assert [d["uid"] for d in await reader.search(None)] == ["run-b"]
            assert await reader.uids_with_prefix("run-") == ["run-b"]
        finally:
            await reader.close()

    anyio.run(main)
