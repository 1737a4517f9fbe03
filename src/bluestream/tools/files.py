"""Document files as suitcase writes them: JSON lines and msgpack, read and written.

- JSON lines (suitcase-jsonl): one ``[name, doc]`` JSON array per line, numpy values as
  lists, file ``<start uid>.jsonl``.
- msgpack (suitcase-msgpack): ``(name, doc)`` msgpack objects back to back, numpy values
  the msgpack-numpy way, file ``<start uid>.msgpack``.

Reading yields raw records with their position instead of decoded documents: the
ingest path then decodes each record exactly once (in the Ingestor, like a Kafka
message) and every error can name the file and the line (JSON lines) or the record
number (msgpack). Both record kinds are valid bluestream wire values as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import event_model
import msgpack

from bluestream.consumers.decode import decode_message, encode_message
from bluestream.errors import BluestreamError, DocumentError

__all__ = [
    "FORMATS",
    "PROVENANCE_SUFFIX",
    "DocumentWriter",
    "FileFormatError",
    "Format",
    "Record",
    "detect_format",
    "is_provenance_file",
    "iter_documents",
    "iter_records",
    "run_file_name",
]

Format = Literal["jsonl", "msgpack"]
FORMATS: tuple[Format, ...] = ("jsonl", "msgpack")
_SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                                ".msgpack": "msgpack", ".mpk": "msgpack", ".msg": "msgpack"}
_CHUNK = 1 << 20


class FileFormatError(BluestreamError):
    """A file cannot be split into records (truncated or corrupt msgpack, unreadable).

    Unlike a bad record, this ends the reading of that file: nothing after the error
    can be located reliably.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(frozen=True)
class Record:
    """One ``(name, doc)`` message of a file and where it is."""

    path: str  # as given by the user, for messages
    index: int  # 1-based line number (JSON lines) or record number (msgpack)
    value: bytes
    end: int  # byte offset just after the record (for progress)

    def where(self) -> str:
        return f"{self.path}:{self.index}"


def detect_format(path: str | os.PathLike[str]) -> Format:
    """By suffix; otherwise by the first byte (JSON lines start with ``[``)."""
    p = Path(path)
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is not None:
        return fmt
    with p.open("rb") as f:
        head = f.read(64).lstrip()
    return "jsonl" if head[:1] == b"[" else "msgpack"


def iter_records(path: str | os.PathLike[str], *, max_bytes: int = 1 << 30) -> Iterator[Record]:
    """The records of one file, in order. Raises FileFormatError where framing fails."""
    name = str(path)
    try:
        fmt = detect_format(path)
        with Path(path).open("rb") as f:
            if fmt == "jsonl":
                yield from _jsonl_records(name, f)
            else:
                yield from _msgpack_records(name, f, max_bytes)
    except OSError as exc:
        raise FileFormatError(name, f"cannot read: {exc.strerror or exc}") from None


def _jsonl_records(name: str, f: IO[bytes]) -> Iterator[Record]:
    pos = 0
    for lineno, line in enumerate(f, start=1):
        pos += len(line)
        if line.strip():  # blank lines (a trailing newline, say) are not records
            yield Record(name, lineno, line, pos)


def _msgpack_records(name: str, f: IO[bytes], max_bytes: int) -> Iterator[Record]:
    """Frame records with ``Unpacker.skip`` (no decoding), slicing the raw bytes."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(max_bytes, _CHUNK) * 2)
    buf = bytearray()
    base = start = 0  # file offsets of buf[0] and of the next record
    index = 0
    while chunk := f.read(_CHUNK):
        buf += chunk
        unpacker.feed(chunk)
        while True:
            try:
                unpacker.skip()
            except msgpack.OutOfData:
                break
            except Exception as exc:  # FormatError, StackError, BufferFull, ValueError ...
                raise FileFormatError(f"{name}:{index + 1}", f"not valid msgpack at byte "
                                      f"{start}: {type(exc).__name__}: {exc}") from None
            end = unpacker.tell()
            index += 1
            yield Record(name, index, bytes(buf[start - base:end - base]), end)
            start = end
        del buf[:start - base]
        base = start
    if buf:
        raise FileFormatError(f"{name}:{index + 1}", f"truncated: {len(buf)} bytes at byte "
                              f"{start} do not form a complete record")


def iter_documents(path: str | os.PathLike[str], *, max_bytes: int = 1 << 30
                   ) -> Iterator[tuple[Record, tuple[str, dict[str, Any]] | DocumentError]]:
    """Records with their decoded ``(name, doc)``, or the error that decoding raised."""
    for rec in iter_records(path, max_bytes=max_bytes):
        try:
            yield rec, decode_message(rec.value, max_bytes=max_bytes)
        except DocumentError as exc:
            yield rec, exc


#: ``bluestream export`` writes ``<uid>.provenance.json`` beside each run's documents;
#: ``bluestream ingest`` of an export directory passes over these.
PROVENANCE_SUFFIX = ".provenance.json"


def is_provenance_file(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(PROVENANCE_SUFFIX)


def run_file_name(start_uid: str, fmt: Format) -> str:
    """suitcase's default name: ``{start[uid]}`` plus the format's suffix."""
    return f"{start_uid}.{fmt}"


class DocumentWriter:
    """Writes one run's documents to a file suitcase's readers (or plain parsing) accept.

    The file appears under its final name only when closed without error, so an
    interrupted export never leaves a truncated file that looks complete.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: Format) -> None:
        self.path = Path(path)
        self.format = fmt
        self._tmp = self.path.with_name(self.path.name + ".part")
        self._file: IO[bytes] = self._tmp.open("wb")
        self.documents = 0
        self.bytes = 0

    def write(self, name: str, doc: dict[str, Any]) -> None:
        if self.format == "jsonl":
            data = (json.dumps([name, doc], cls=event_model.NumpyEncoder) + "\n").encode()
        else:
            data = encode_message(name, doc)
        self._file.write(data)
        self.documents += 1
        self.bytes += len(data)

    def close(self, *, keep: bool = True) -> None:
        if self._file.closed:
            return
        self._file.close()
        if keep:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(keep=exc_type is None)
