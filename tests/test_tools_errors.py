"""Error paths of the command line tools: every rejected document is named by file and
line (or record), the rest is still stored, and the exit status says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import event_model
import pytest

import bluestream
from bluestream.consumers.decode import encode_message
from helpers import image_run, scalar_run
from test_tools_support import cli_fixture  # noqa: F401  (fixture)

Docs = list[tuple[str, dict[str, Any]]]


def jsonl(path: Path, docs: Docs, *, bad_lines: dict[int, str] | None = None) -> Path:
    """Write ``docs`` as JSON lines; ``bad_lines`` maps 1-based line numbers to text
    inserted before the document that would otherwise be on that line."""
    lines = [json.dumps([n, d], cls=event_model.NumpyEncoder) for n, d in docs]
    for lineno, text in sorted((bad_lines or {}).items()):
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def stored(tmp_path: Path, tenant: str) -> dict[str, tuple[int, bool]]:
    """uid -> (events in primary, has a stop), read through the catalog."""
    with bluestream.open_catalog(tenant, metadata=f"sqlite:///{tmp_path / 'm.db'}",
                                 zarr_root=tmp_path / "z") as cat:
        return {uid: (len(run["primary"]), run.stop is not None) for uid, run in cat.items()}


def store_opts(tmp_path: Path, tenant: str) -> list[str]:
    return ["--tenant", tenant, "--metadata", f"sqlite:///{tmp_path / 'm.db'}",
            "--zarr-root", str(tmp_path / "z"), "-q"]


def test_bad_line_is_named_and_the_rest_is_stored(cli: Any, tmp_path: Path,
                                                  tenant: str) -> None:
    docs = scalar_run(6)
    path = jsonl(tmp_path / "run.jsonl", docs, bad_lines={4: '["event", {"uid": "x"'})
    result = cli("ingest", path, *store_opts(tmp_path, tenant))
    assert result.exit_code == 1
    assert f"{path}:4: undecodable:" in result.stderr
    assert result.stderr.count("error:") == 1
    assert "9 of 10 documents stored" in result.stdout and "1 rejected" in result.stdout
    assert stored(tmp_path, tenant) == {docs[0][1]["uid"]: (6, True)}
    # Fix the line, ingest again: idempotent for what was there, the rest completes.
    jsonl(path, docs)
    result = cli("ingest", path, *store_opts(tmp_path, tenant))
    assert result.exit_code == 0, result.stderr
    assert "0 rejected" in result.stdout


def test_invalid_document_and_orphans_are_reported_at_the_end(cli: Any, tmp_path: Path,
                                                              tenant: str) -> None:
    docs = scalar_run(3)
    orphan = dict(docs[2][1], descriptor="no-such-descriptor", uid="orphan-event")
    bad_start = ["start", {"uid": "no-time"}]  # violates the schema
    path = jsonl(tmp_path / "run.jsonl", [*docs, ("event", orphan)],
                 bad_lines={2: json.dumps(bad_start)})
    result = cli("ingest", path, *store_opts(tmp_path, tenant))
    assert result.exit_code == 1
    err = result.stderr
    assert f"{path}:2: schema-violation:" in err
    assert f"{path}:8: unknown-descriptor: event refers to descriptor 'no-such-descriptor'" \
        in err
    assert "2 rejected" in result.stdout
    assert stored(tmp_path, tenant) == {docs[0][1]["uid"]: (3, True)}


def test_truncated_msgpack_and_missing_file(cli: Any, tmp_path: Path, tenant: str) -> None:
    docs = image_run(4, shape=(8, 8))
    blob = b"".join(encode_message(n, d) for n, d in docs)
    path = tmp_path / "run.msgpack"
    cut = len(blob) - len(encode_message(*docs[-1])) - 10  # inside the last event
    path.write_bytes(blob[:cut])
    missing = tmp_path / "nope.jsonl"
    result = cli("ingest", path, missing, *store_opts(tmp_path, tenant))
    assert result.exit_code == 1
    assert f"{path}:6: unreadable: truncated" in result.stderr  # record 6 = 4th event
    assert f"{missing}: unreadable: cannot read" in result.stderr
    assert stored(tmp_path, tenant) == {docs[0][1]["uid"]: (3, False)}  # open run


@pytest.mark.kafka
def test_publish_reports_undecodable_records(cli: Any, tmp_path: Path,
                                             kafka_bootstrap: str, topic: str) -> None:
    path = jsonl(tmp_path / "run.jsonl", scalar_run(2), bad_lines={3: "not json"})
    result = cli("publish", path, "--topic", topic, "--bootstrap", kafka_bootstrap, "-q")
    assert result.exit_code == 1
    assert f"{path}:3: undecodable" in result.stderr
    assert "published 5 documents (1 runs" in result.stdout


def test_unreachable_broker_and_bad_options(cli: Any, tmp_path: Path, tenant: str) -> None:
    path = jsonl(tmp_path / "run.jsonl", scalar_run(1))
    result = cli("publish", path, "--topic", "x.bluesky.runengine.documents",
                 "--bootstrap", "127.0.0.1:1", "-q")
    assert result.exit_code == 1
    assert "error: Kafka at 127.0.0.1:1 cannot be reached" in result.stderr
    result = cli("ingest", path, "--tenant", tenant, "--metadata", "postgres://x")
    assert result.exit_code == 2 and "storage.metadata" in result.stderr
    result = cli("export", "--tenant", tenant, "--metadata", f"sqlite:///{tmp_path}/m.db")
    assert result.exit_code == 2 and "--all" in result.stderr
    result = cli("export", "abcdef", "--tenant", tenant,
                 "--metadata", f"sqlite:///{tmp_path}/none.db", "--out", str(tmp_path))
    assert result.exit_code == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "msgpack"])
def test_cli_round_trip(cli: Any, tmp_path: Path, tenant: str, fmt: str) -> None:
    docs = scalar_run(5)
    path = jsonl(tmp_path / "in.jsonl", docs)
    assert cli("ingest", path, *store_opts(tmp_path, tenant)).exit_code == 0
    uid = docs[0][1]["uid"]
    result = cli("export", uid[:6], *store_opts(tmp_path, tenant), "--format", fmt,
                 "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "out" / f"{uid}.{fmt}")
    result = cli("export", "-1", *store_opts(tmp_path, tenant), "--format", fmt,
                 "--out", tmp_path / "newest")  # -1 is the newest run, not an option
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "newest" / f"{uid}.{fmt}")
