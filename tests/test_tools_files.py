"""Document files: framing of JSON lines and msgpack records (positions, big records
across read chunks, corruption), the writer, the progress line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgpack
import msgpack_numpy
import numpy as np
import pytest

from bluestream.consumers.decode import decode_message, encode_message
from bluestream.tools.files import (
    DocumentWriter,
    FileFormatError,
    detect_format,
    iter_documents,
    iter_records,
)
from bluestream.tools.progress import Progress
from helpers import image_run, scalar_run
from test_catalog_support import canonical, plain


def test_msgpack_records_keep_their_bytes_across_chunks(tmp_path: Path) -> None:
    docs = image_run(5, shape=(600, 600))  # 720 kB per event: records straddle 1 MiB reads
    blobs = [encode_message(n, d) for n, d in docs]
    path = tmp_path / "run.bin"  # no suffix: told apart by content
    path.write_bytes(b"".join(blobs))
    assert detect_format(path) == "msgpack"
    records = list(iter_records(path))
    assert [r.value for r in records] == blobs
    assert [r.index for r in records] == list(range(1, len(blobs) + 1))
    assert records[-1].end == path.stat().st_size
    _, doc = decode_message(records[3].value, max_bytes=1 << 30)
    np.testing.assert_array_equal(doc["data"]["img"], docs[3][1]["data"]["img"])


def test_corrupt_msgpack_stops_at_the_bad_record(tmp_path: Path) -> None:
    blobs = [encode_message(n, d) for n, d in scalar_run(2)]
    path = tmp_path / "run.msgpack"
    path.write_bytes(blobs[0] + blobs[1] + b"\xc1" + blobs[2])  # 0xc1: never used
    got = []
    with pytest.raises(FileFormatError) as info:
        got.extend(iter_records(path))
    assert len(got) == 2
    assert info.value.where == f"{path}:3"
    assert f"byte {len(blobs[0]) + len(blobs[1])}" in str(info.value)


def test_jsonl_positions_are_line_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    docs = scalar_run(2)
    path = tmp_path / "run.jsonl"
    path.write_text("\n" + "\n\n".join(json.dumps(list(d)) for d in docs) + "\n\n")
    got = list(iter_documents(path))
    assert [r.index for r, _ in got] == [2, 4, 6, 8, 10]
    assert [item[0] for _, item in got] == [n for n, _ in docs]  # type: ignore[index]


def test_writer_output_is_what_suitcase_readers_parse(tmp_path: Path) -> None:
    """Every document comes back, once, equal and in order, in both formats. Checking
    the names and one image was not enough: on a copy of the tree whose
    ``DocumentWriter.write`` writes the first event again in place of the second, that
    check passed; this one fails, ``{'repeated': {'event': [<uid>]}} != {'repeated':
    {}}`` (same counts, one uid twice)."""
    docs = image_run(2, shape=(4, 3))
    with DocumentWriter(tmp_path / "a.msgpack", "msgpack") as w:
        for name, doc in docs:
            w.write(name, doc)
    assert w.documents == len(docs)
    with (tmp_path / "a.msgpack").open("rb") as f:
        back = list(msgpack.Unpacker(f, object_hook=msgpack_numpy.decode, raw=False))
    assert [n for n, _ in back] == [n for n, _ in docs]
    assert canonical(back) == canonical(docs)
    assert [(n, plain(d)) for n, d in back] == [(n, plain(d)) for n, d in docs]
    for (_, got), (_, want) in zip(back[2:4], docs[2:4], strict=True):
        img = got["data"]["img"]
        assert img.dtype == np.uint16 and img.tolist() == want["data"]["img"].tolist()

    with DocumentWriter(tmp_path / "a.jsonl", "jsonl") as w:
        for name, doc in docs:
            w.write(name, doc)
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(n, d) for n, d in lines] == [(n, plain(d)) for n, d in docs]

    with pytest.raises(RuntimeError), DocumentWriter(tmp_path / "b.jsonl", "jsonl") as w:
        w.write(*docs[0])
        raise RuntimeError("interrupted")
    assert list(tmp_path.glob("b.jsonl*")) == []  # no partial file left behind


def test_progress_prints_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    p = Progress("ingest", 2000, unit="bytes", stream=stream, interval=0)
    p.update(1000, docs=3)
    p.write("error: x.jsonl:3: bad")
    p.update(1000, docs=5)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("ingest  50% 1.0 kB/2.0 kB") and "docs=3" in lines[0]
    assert lines[1] == "error: x.jsonl:3: bad"
    assert lines[-1].startswith("ingest 100% 2.0 kB/2.0 kB") and "docs=5" in lines[-1]
