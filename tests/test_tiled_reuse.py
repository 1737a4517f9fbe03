"""What ``bluestream tiled`` reuses between requests, and what it spends CPU on.

- The streams of a closed run are built once and reused while the metadata store holds
  the same descriptors and ``event_stream`` records; a write to the run after its stop
  (a late event) is seen by the next request, and a run still open is built anew for
  every request.
- Image arrays read a block or a slice of rows straight from Zarr when the stream's rows
  are the array's rows (one descriptor, no hole), and through dask otherwise; both give
  the stored frames for every kind of selection.
- The ``internal`` table reads the columns asked for through the stream's own read and
  equals the local catalog's values, timestamps included.
- The probing blosc2 encoder compresses a body only when samples of it shrink below the
  threshold; otherwise it emits a valid, uncompressed blosc2 frame whose size makes
  Tiled send the original body. Small bodies are compressed as Tiled does.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from bluestream.catalog.core import AsyncCatalog, make_context
from helpers import envelopes, image_run, make_ingestor, scalar_run

pytest.importorskip("tiled.server")
blosc2 = pytest.importorskip("blosc2")

from bluestream.tiled.adapters import ArrayNode, RunNode, StreamCache, TableNode  # noqa: E402
from bluestream.tiled.server import ProbingBlosc2, use_probing_compression  # noqa: E402

Docs = list[tuple[str, dict[str, Any]]]


async def _ingest(metadata: str, zarr_root: Path, docs: Docs, offset: int, *,
                  tail_rows: int | None = None) -> None:
    ing, sink, registry = make_ingestor(
        metadata, zarr_root, **({} if tail_rows is None else {"tail_rows": tail_rows}))
    try:
        await ing.process(envelopes(docs, "reuse", start_offset=offset))
    finally:
        await registry.aclose()
    assert not sink.letters, sink.reasons


async def _run_node(metadata: str, zarr_root: Path, uid: str, cache: StreamCache
                    ) -> tuple[AsyncCatalog, RunNode]:
    cat = AsyncCatalog(make_context("reuse", metadata=metadata, zarr_root=str(zarr_root)))
    return cat, RunNode(await cat.lookup(uid), cache)


@pytest.mark.anyio
async def test_closed_runs_are_reused_until_their_records_change(tmp_path: Path) -> None:
    metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
    docs = scalar_run(10, fields=2)
    uid = str(docs[0][1]["uid"])
    events = [d for d in docs if d[0] == "event"]
    head = [d for d in docs if d[0] in ("start", "descriptor")]
    stop = [d for d in docs if d[0] == "stop"]
    await _ingest(metadata, zarr_root, head + events[:4] + stop, 0)
    cache = StreamCache()
    cat, run = await _run_node(metadata, zarr_root, uid, cache)
    try:
        first = await run.lookup_adapter(["primary"])
        assert await run.lookup_adapter(["primary"]) is first  # reused
        table = await first.lookup_adapter(["internal"])
        assert len((await table.read(["f0"]))["f0"]) == 4
        # Six events arrive after the stop: the records change, the next request sees
        # them (a new node), and that one is reused in turn.
        await _ingest(metadata, zarr_root, events[4:], len(head) + 5)
        second = await run.lookup_adapter(["primary"])
        assert second is not first
        table = await second.lookup_adapter(["internal"])
        df = await table.read(["seq_num", "f0", "ts_f1"])
        evs = [e for _, e in events]
        np.testing.assert_array_equal(df["seq_num"], [e["seq_num"] for e in evs])
        np.testing.assert_array_equal(df["f0"], [e["data"]["f0"] for e in evs])
        np.testing.assert_array_equal(df["ts_f1"], [e["timestamps"]["f1"] for e in evs])
        assert await run.lookup_adapter(["primary"]) is second
    finally:
        await cat.aclose()


@pytest.mark.anyio
async def test_concurrent_requests_share_one_build(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from bluestream.tiled import adapters

    metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
    docs = scalar_run(50, fields=2)
    await _ingest(metadata, zarr_root, docs, 0)
    builds = []
    load = adapters.StreamNode.load.__func__  # type: ignore[attr-defined]

    async def counted(cls: Any, run: Any, name: str) -> Any:
        builds.append(name)
        await anyio.sleep(0.05)  # long enough for the others to arrive
        return await load(cls, run, name)

    monkeypatch.setattr(adapters.StreamNode, "load", classmethod(counted))
    cat, run = await _run_node(metadata, zarr_root, str(docs[0][1]["uid"]), StreamCache())
    try:
        got: list[Any] = []

        async def one() -> None:
            got.append(await run.lookup_adapter(["primary"]))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        assert builds == ["primary"]
        assert all(node is got[0] for node in got)
    finally:
        await cat.aclose()


@pytest.mark.anyio
async def test_open_runs_are_built_for_every_request(tmp_path: Path) -> None:
    metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
    docs = scalar_run(6, fields=1)
    uid = str(docs[0][1]["uid"])
    open_part = [d for d in docs if d[0] != "stop"][:5]  # start, descriptor, 3 events
    await _ingest(metadata, zarr_root, open_part, 0)
    cache = StreamCache()
    cat, run = await _run_node(metadata, zarr_root, uid, cache)
    try:
        a = await run.lookup_adapter(["primary"])
        b = await run.lookup_adapter(["primary"])
        assert a is not b
        table = await b.lookup_adapter(["internal"])
        assert isinstance(table, TableNode)
        assert len(await table.read()) == 3
    finally:
        await cat.aclose()


@pytest.mark.anyio
async def test_the_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bluestream.tiled import adapters

    monkeypatch.setattr(adapters, "STREAM_CACHE_SIZE", 2)
    metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
    runs = [scalar_run(2, fields=1, scan_id=i) for i in range(3)]
    offset = 0
    for docs in runs:
        await _ingest(metadata, zarr_root, docs, offset)
        offset += len(docs)
    cache = StreamCache()
    cat = AsyncCatalog(make_context("reuse", metadata=metadata, zarr_root=str(zarr_root)))
    try:
        nodes = []
        for docs in runs:
            run = RunNode(await cat.lookup(str(docs[0][1]["uid"])), cache)
            nodes.append((run, await run.lookup_adapter(["primary"])))
        assert await nodes[2][0].lookup_adapter(["primary"]) is nodes[2][1]
        assert await nodes[0][0].lookup_adapter(["primary"]) is not nodes[0][1]  # evicted
    finally:
        await cat.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("hole", [False, True])
@pytest.mark.parametrize(("shape", "tail_rows"), [((6, 5), None), ((256, 256), 0)],
                         ids=["small-in-tail", "chunks-in-zarr"])
async def test_frames_read_directly_or_through_dask(tmp_path: Path, hole: bool,
                                                    shape: tuple[int, int],
                                                    tail_rows: int | None) -> None:
    """Small frames stay in the stream's tail (one block); 256x256 frames without a tail
    go to Zarr chunks of several frames (several blocks, slices across their edges)."""
    metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
    docs = image_run(40, shape)
    if hole:  # seq_num 7 never arrives: position 6 stays unwritten
        docs = [d for d in docs if not (d[0] == "event" and d[1]["seq_num"] == 7)]
    await _ingest(metadata, zarr_root, docs, 0, tail_rows=tail_rows)
    frames = np.stack([np.asarray(d["data"]["img"]) for n, d in docs if n == "event"])
    cat, run = await _run_node(metadata, zarr_root, str(docs[0][1]["uid"]), StreamCache())
    try:
        img = await (await run.lookup_adapter(["primary"])).lookup_adapter(["img"])
        assert isinstance(img, ArrayNode)
        assert (img._rows is None) is hole  # the direct reader only without holes
        n = len(frames)
        for sel in [(), (5,), (-1,), (np.int64(3),), (slice(2, 9),), (slice(None, None, 3),),
                    (slice(30, 99),), (slice(4, 4),), (7, slice(1, 4)), (slice(7, 17),),
                    (slice(1, 20), slice(None), 2), (Ellipsis, 0), (slice(None, None, -1),),
                    (-40 if not hole else -39,)]:
            got = await img.read(sel)
            np.testing.assert_array_equal(got, frames[sel] if sel else frames, str(sel))
        chunks = img.structure().chunks
        if not hole:  # (with a hole, dask's selection of the rows is one block)
            assert (len(chunks[0]) > 1) is (tail_rows == 0)
        start = 0
        for i, size in enumerate(chunks[0]):
            got = await img.read_block((i, 0, 0))
            np.testing.assert_array_equal(got, frames[start:start + size])
            start += size
        assert start == n
        np.testing.assert_array_equal(await img.read_block((0, 0, 0), (slice(1, 3),)),
                                      frames[1:3])
        with pytest.raises(IndexError):
            await img.read((n,))
    finally:
        await cat.aclose()


@pytest.mark.anyio
async def test_table_columns_alone(tmp_path: Path) -> None:
    """``internal/<column>``: a numeric column is an array node that reads the column; a
    text column is not one (KeyError: Tiled's 404), it is read through the table."""
    from test_catalog_support import mixed_run

    metadata, zarr_root = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "zarr"
    docs = mixed_run(1.7e9)
    await _ingest(metadata, zarr_root, docs, 0)
    cat, run = await _run_node(metadata, zarr_root, str(docs[0][1]["uid"]), StreamCache())
    try:
        table = await (await run.lookup_adapter(["primary"])).lookup_adapter(["internal"])
        assert isinstance(table, TableNode)
        with pytest.raises(KeyError):
            table["mode"]
        with pytest.raises(KeyError):
            table["no-such-column"]
        events = [d for n, d in docs if n == "event"]
        np.testing.assert_array_equal(await table["time"].read(), [e["time"] for e in events])
        df = await table.read(["mode"])
        assert df["mode"].tolist() == [e["data"]["mode"] for e in events]
    finally:
        await cat.aclose()


def _encode(body: bytes, below: float = 0.5) -> bytes:
    encoder = type("Probe", (ProbingBlosc2,), {"below": below})
    buf = io.BytesIO()
    f = encoder(buf)
    f.write(body)
    f.close()
    return buf.getvalue()


def test_noisy_bodies_go_out_uncompressed() -> None:
    rng = np.random.default_rng(1)
    body = rng.integers(0, 4096, size=(16, 256, 256), dtype=np.uint16).tobytes()  # 2 MiB
    out = _encode(body)
    assert blosc2.decompress(out) == body
    assert len(out) >= 0.9 * len(body)  # Tiled then sends the original body
    # With Tiled's own rule (compress when it saves 10 %) the same body is compressed.
    packed = _encode(body, below=0.95)
    assert blosc2.decompress(packed) == body
    assert len(packed) < 0.9 * len(body)


def test_compressible_and_small_bodies_are_compressed() -> None:
    smooth = np.tile(np.arange(256, dtype=np.uint16), 16 * 256).tobytes()  # 2 MiB
    out = _encode(smooth)
    assert blosc2.decompress(out) == smooth
    assert len(out) < 0.1 * len(smooth)
    small = np.random.default_rng(2).integers(0, 4096, 1000, dtype=np.uint16).tobytes()
    assert blosc2.decompress(_encode(small)) == small  # below 1 MiB: not probed


def test_compressed_at_least_as_tiled_compresses() -> None:
    """When it compresses, the output is no larger than what Tiled's own encoder makes
    of the same body as Tiled's server hands it over (a memoryview of 1-byte items) nor
    of bytes (blosc2's default item size): a column of int64 row numbers, noisy 12-bit
    frames."""
    from tiled.media_type_registration import BloscBuffer

    rows = np.arange(1 << 18, dtype=np.int64).tobytes()  # 2 MiB
    frames = np.random.default_rng(4).integers(0, 4096, (8, 256, 256), np.uint16).tobytes()
    for body in (rows, frames):
        for given in (memoryview(body).cast("B"), body):
            buf = io.BytesIO()
            BloscBuffer(buf).write(given)
            theirs = len(buf.getvalue())
            encoder = type("Probe", (ProbingBlosc2,), {"below": 0.95})
            mine = io.BytesIO()
            encoder(mine).write(given)
            ours = mine.getvalue()
            assert blosc2.decompress(ours) == body
            assert len(ours) <= 1.01 * theirs, (len(ours), theirs)
    assert len(_encode(rows)) < 0.2 * len(rows)  # compressible: compressed at 0.5 too
    odd = (bytes(range(251)) * 20_000)[:-1]  # 5,019,999 bytes: only 1 divides it
    assert blosc2.decompress(_encode(odd)) == odd


def test_below_zero_never_compresses() -> None:
    smooth = np.zeros(1 << 20, dtype=np.uint8).tobytes()
    for body in (smooth, smooth[:1000]):
        out = _encode(body, below=0.0)
        assert blosc2.decompress(out) == body
        assert len(out) >= len(body)


def test_timestamps_line_up_by_prefix() -> None:
    """The ts_ columns of a table read: the timestamps' rows are the data's when the
    first ones agree (a run that grew between the two reads has more), compared by time
    and, where both have it as a coordinate, seq_num."""
    import xarray as xr

    from bluestream.tiled.adapters import _rows_alike

    def ds(times: list[float], seqs: list[int] | None) -> Any:
        coords: dict[str, Any] = {"time": ("time", np.asarray(times))}
        if seqs is not None:
            coords["seq_num"] = ("time", np.asarray(seqs))
        return xr.Dataset({"x": ("time", np.zeros(len(times)))}, coords=coords)

    data = ds([1.0, 2.0], [1, 2])
    assert _rows_alike(data, ds([1.0, 2.0], [1, 2])) == 2
    assert _rows_alike(data, ds([1.0, 2.0, 3.0], [1, 2, 3])) == 2  # grew in between
    assert _rows_alike(data, ds([1.0], [1])) == 0
    assert _rows_alike(data, ds([1.0, 2.5], [1, 2])) == 0
    assert _rows_alike(data, ds([1.0, 2.0], [1, 3])) == 0
    assert _rows_alike(ds([1.0, 2.0], None), ds([1.0, 2.0], [1, 2])) == 2  # no seq_num
    assert _rows_alike(ds([], []), ds([], [])) == 0


def test_the_encoder_is_installed_under_tiled_s_name() -> None:
    from tiled.media_type_registration import default_compression_registry as registry

    before = {m: registry.dispatch(m, "blosc2") for m in
              ("application/octet-stream", "application/vnd.apache.arrow.file")}
    try:
        assert use_probing_compression(0.9) is False  # Tiled's own rule: left alone
        assert use_probing_compression(0.4) is True
        for media_type in before:
            encoder = registry.dispatch(media_type, "blosc2")
            assert issubclass(encoder, ProbingBlosc2) and encoder.below == 0.4
            assert next(iter(registry.encodings(media_type))) == "blosc2"  # still first
        with pytest.raises(ValueError, match="between 0 and 1"):
            use_probing_compression(1.5)
    finally:
        for media_type, encoder in before.items():
            registry.register(media_type, "blosc2", encoder)
