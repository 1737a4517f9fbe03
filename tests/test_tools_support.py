"""Shared pieces of the tools tests (no tests here): settings per backend, suitcase
files from the RunEngine's documents, reading document files back, the CLI runner."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import msgpack_numpy
import pytest
import structlog
from typer.testing import CliRunner

from bluestream.cli import app
from bluestream.settings import Settings, load_settings

Doc = dict[str, Any]
Docs = list[tuple[str, Doc]]


def make_settings(metadata: str, zarr_root: Path, **env: str) -> Settings:
    return load_settings(None, environ={"BLUESTREAM_METADATA": metadata,
                                        "BLUESTREAM_ZARR_ROOT": str(zarr_root), **env})


@pytest.fixture(name="metadata_uri",
                params=["sqlite", pytest.param("mongo", marks=pytest.mark.mongo)])
def metadata_uri_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta.db'}"
    uri: str = request.getfixturevalue("mongo_uri")
    return uri


@pytest.fixture(name="settings")
def settings_fixture(metadata_uri: str, zarr_root: Path) -> Settings:
    return make_settings(metadata_uri, zarr_root)


def write_suitcase(runs: Sequence[Docs], fmt: str, directory: Path) -> list[Path]:
    """One file per run, written by suitcase-jsonl / suitcase-msgpack themselves.

    suitcase-jsonl writes documents as they come (single events stay events);
    suitcase-msgpack is a DocumentRouter and writes event_pages: both shapes are covered.
    """
    import suitcase.jsonl
    import suitcase.msgpack

    cls = {"jsonl": suitcase.jsonl.Serializer, "msgpack": suitcase.msgpack.Serializer}[fmt]
    paths = []
    for docs in runs:
        with cls(str(directory)) as serializer:
            for name, doc in docs:
                serializer(name, doc)
        paths.append(directory / f"{docs[0][1]['uid']}.{fmt}")
    return paths


def read_documents(path: Path) -> Docs:
    """What suitcase-era readers do: json.loads per line; msgpack-numpy's decode hook."""
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        with path.open("rb") as f:
            items = list(msgpack.Unpacker(f, object_hook=msgpack_numpy.decode, raw=False))
    return [(name, doc) for name, doc in items]


@contextmanager
def logging_restored() -> Iterator[None]:
    """Undo the logging set-up a command run in-process makes (handlers writing to the
    runner's captured streams, closed once it returns: later tests' logging would fail
    with "I/O operation on closed file")."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("aiokafka",)}
    try:
        yield
    finally:
        structlog.configure(**saved)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


@pytest.fixture(name="cli")
def cli_fixture() -> Iterator[Any]:
    """``cli(*args, input=None)`` runs ``bluestream`` in-process (see
    :func:`logging_restored`)."""
    runner = CliRunner()

    def invoke(*args: Any, input: str | None = None) -> Any:
        return runner.invoke(app, [str(a) for a in args], input=input,
                             catch_exceptions=False)

    with logging_restored():
        yield invoke
