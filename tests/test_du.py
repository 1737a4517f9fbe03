"""``du`` / ``storage_size``: bytes on disk (and in the object store) against the files
themselves, logical bytes against the data, on both metadata stores; and verify on S3."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pytest

import bluestream
from bluestream.catalog import Catalog
from bluestream.catalog.usage import StorageReport, Usage, human_bytes
from bluestream.layout import descriptor_path
from bluestream.storage.zarr_root import ZarrRoot
from helpers import image_run, scalar_run, stored_tail
from test_catalog_support import events_of, metadata_uri_fixture  # noqa: F401
from test_tools_support import cli_fixture  # noqa: F401
from test_verify import Stored

STRING_BYTES = 16  # numpy's StringDType element: what the report counts per string


@pytest.fixture
def stored(metadata_uri: str, zarr_root: Path, tenant: str) -> Stored:
    s = Stored(metadata_uri, zarr_root, tenant)
    s.add("long", scalar_run(1000, scan_id=1))
    s.add("short", scalar_run(10, scan_id=2))
    s.add("image", image_run(40, (64, 64), scan_id=3))
    return s


@pytest.fixture
def cat(stored: Stored) -> Iterator[Catalog]:
    catalog = bluestream.open_catalog(stored.tenant, metadata=stored.uri, zarr_root=stored.root)
    yield catalog
    catalog.close()


def files_under(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``, as ``du -b`` would add them up."""
    sizes = [os.stat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs]
    return sum(sizes), len(sizes)


def logical(docs: list[tuple[str, Any]]) -> dict[str | None, int]:
    """Uncompressed bytes per field computed from the documents (None: time, seq_num,
    uid): every event's values as numpy arrays of the descriptor's dtypes."""
    events = events_of(docs)
    desc = next(d for n, d in docs if n == "descriptor")
    out: dict[str | None, int] = {None: np.array([e["time"] for e in events]).nbytes
                                  + np.array([e["seq_num"] for e in events]).nbytes
                                  + STRING_BYTES * len(events)}
    for key, dk in desc["data_keys"].items():
        dtype = dk.get("dtype_numpy") or ("int64" if dk["dtype"] == "integer" else "float64")
        values = np.array([e["data"][key] for e in events], dtype=dtype)
        stamps = np.array([e["timestamps"][key] for e in events], dtype=np.float64)
        out[key] = values.nbytes + stamps.nbytes
    return out


def by_key(report: StorageReport) -> dict[tuple[str | None, ...], Usage]:
    return {(u.run, u.stream, u.field)[:("run", "stream", "field").index(report.by) + 1]: u
            for u in report.rows}


def test_bytes_on_disk_are_the_files(stored: Stored, cat: Catalog) -> None:
    runs = by_key(cat.storage_size("run"))
    for label in ("long", "short", "image"):
        uid = stored.uid(label)
        size, count = files_under(stored.root / stored.tenant / uid[:2] / uid)
        assert (runs[(uid,)].zarr_bytes, runs[(uid,)].zarr_objects) == (size, count), label
    assert runs[(stored.uid("short"),)].zarr_bytes == 0  # all in the tail: no group
    fields = by_key(cat.storage_size("field"))
    group = stored.group("long")
    # The stream's own arrays: time, seq_num, uid and the summaries of all its keys.
    own_arrays = ("time", "seq_num", "uid", "summary", "event_summary")
    assert (group / "summary").is_dir()  # the long run is summarised
    for key in ("f0", "counter"):  # data/<key>, timestamps/<key>, any <group>/<key>
        size = sum(files_under(sub / key)[0] for sub in group.iterdir()
                   if sub.name not in own_arrays and sub.is_dir())
        assert fields[(stored.uid("long"), "primary", key)].zarr_bytes == size
    own = sum(files_under(group / name)[0] for name in own_arrays) \
        + sum(p.stat().st_size for p in group.glob("*zarr.json")) \
        + sum(p.stat().st_size for p in group.glob("*/zarr.json")
              if p.parent.name not in own_arrays)
    assert fields[(stored.uid("long"), "primary", None)].zarr_bytes == own
    keys = {u.field for u in fields.values()} - {None}
    assert keys == {k for label in ("long", "short", "image")
                    for k in next(d for n, d in stored.runs[label]
                                  if n == "descriptor")["data_keys"]}
    total = cat.storage_size("run").total
    assert total.zarr_bytes == files_under(stored.root / stored.tenant)[0]


def test_logical_bytes_are_the_data(stored: Stored, cat: Catalog) -> None:
    fields = by_key(cat.storage_size("field"))
    for label in ("long", "short", "image"):
        uid = stored.uid(label)
        for key, n in logical(stored.runs[label]).items():
            assert fields[(uid, "primary", key)].logical_bytes == n, (label, key)
    image = fields[(stored.uid("image"), "primary", "img")]
    assert image.logical_bytes == 40 * 64 * 64 * 2 + 40 * 8
    assert image.events == 40


def test_every_grouping_adds_up(stored: Stored, cat: Catalog) -> None:
    reports = {by: cat.storage_size(by) for by in ("run", "stream", "field")}
    totals = {by: r.total for by, r in reports.items()}
    assert totals["run"] == totals["stream"] == totals["field"]
    assert totals["run"].events == 1050
    for report in reports.values():
        summed = sum((u.zarr_bytes for u in report.rows), 0)
        assert summed == report.total.zarr_bytes
        assert sum(u.metadata_bytes for u in report.rows) == report.total.metadata_bytes
        assert sum(u.logical_bytes for u in report.rows) == report.total.logical_bytes
    streams = by_key(reports["stream"])
    assert streams[(stored.uid("long"), "primary")].events == 1000
    assert (stored.uid("long"), None) in streams  # the run's own documents


def test_metadata_bytes_count_the_tail(stored: Stored, cat: Catalog) -> None:
    runs = by_key(cat.storage_size("run"))
    tail = stored_tail(stored.uri, stored.tenant, stored.descriptor("long"))
    assert tail is not None
    blob = len(tail.encode())
    long = runs[(stored.uid("long"),)].metadata_bytes
    assert blob < long < blob + 20_000
    assert 0 < runs[(stored.uid("image"),)].metadata_bytes < 20_000  # no tail: documents
    report = cat.storage_size("run")
    if stored.uri.startswith("sqlite:///"):
        assert report.metadata_file_bytes is not None and report.metadata_file_bytes > 0
    else:
        assert report.metadata_file_bytes is None


def test_one_run_and_the_command_line(stored: Stored, cat: Catalog, cli: Any) -> None:
    uid = stored.uid("long")
    report = cat.storage_size("stream", [uid[:8]])
    assert {u.run for u in report.rows} == {uid}
    args = ["du", "--tenant", stored.tenant, "--metadata", stored.uri, "--zarr-root",
            stored.root]
    result = cli(*args, "--run", uid, "--by", "field", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["by"] == "field" and data["total"]["events"] == 1000
    assert data["total"]["zarr_bytes"] == files_under(stored.root / stored.tenant / uid[:2]
                                                       / uid)[0]
    assert data["counted"]["zarr_bytes"].startswith("every object")
    text = cli(*args).stdout
    assert text.splitlines()[0].split() == ["RUN", "EVENTS", "ON", "DISK", "FILES",
                                            "METADATA", "LOGICAL"]
    assert "TOTAL (3 runs)" in text and human_bytes(cat.storage_size().total.zarr_bytes) in text
    assert cli(*args, "--by", "disk").exit_code == 2
    assert cli(*args, "--run", "ffffffff-0000").exit_code == 2


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 5e12)] == [
        "0 B", "999 B", "1.0 kB", "1.2 MB", "5.0 TB"]


# -- an object store --------------------------------------------------------------------------
@pytest.mark.s3
def test_du_and_verify_on_s3(tmp_path: Path, tenant: str, s3_root: ZarrRoot) -> None:
    uri = f"sqlite:///{tmp_path / 'meta.db'}"
    s = Stored(uri, s3_root, tenant)  # type: ignore[arg-type]
    s.add("long", scalar_run(1000, scan_id=1))
    uid = s.uid("long")
    store = s3_root.object_store()
    listed = [m for batch in obstore.list(store.store, prefix=f"{tenant}/{uid[:2]}/{uid}/")
              for m in batch]
    with bluestream.open_catalog(tenant, metadata=uri, zarr_root=s3_root) as cat:
        usage = by_key(cat.storage_size("run"))[(uid,)]
        assert (usage.zarr_bytes, usage.zarr_objects) == (sum(int(m["size"]) for m in listed),
                                                          len(listed))
        assert cat.verify(4) == []
        key = f"{descriptor_path(tenant, uid, s.descriptor('long'))}/data/f2/c/0"
        store.delete_sync(key)
        problems = cat.verify(3)
        assert [(p.level, p.array, p.chunk) for p in problems] == [(3, "data/f2", key)]
