"""The Zarr root on the real S3-compatible server of ``scripts/services``.

What is held here: scalar and image runs ingested with an ``s3://`` root read back
through the catalog exactly as on disk (values, dtypes, lazy dask, ``documents()``),
with rows both in the arrays and in the tails; a replay rewrites no object (every key
byte-identical) and adds no row; the tools (``ingest``, ``export``) take ``s3://``
roots, endpoint and credentials from a ``[storage.s3]`` table or from the standard AWS
variables; bad settings (unknown bucket, refused credentials, an endpoint that does not
answer) are a clear error at start, exit status 2, from ``check-config``, and from
``serve`` for the bucket and the credentials (an endpoint that does not answer is an
outage to the daemon: it logs it and waits, not ready); the secret never shows.

The SIGKILL loop (test_exactly_once), two daemons sharing a topic (test_scale_out) and
an S3 outage (test_outages) run with S3 roots in their own modules.

Shown to fail: with ``ArrayReader`` opening a ``LocalStore`` on the root's text instead
of the object store, the first test's catalog ``read()`` differs from what was ingested.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bluestream
from bluestream.settings import Settings
from bluestream.storage.zarr_root import ZarrRoot
from bluestream.tools.export import export_runs
from bluestream.tools.ingest import ingest_files
from conftest import S3_ACCESS_KEY_ID, S3_BUCKET, S3_SECRET_ACCESS_KEY
from helpers import (
    assert_stored_events,
    envelopes,
    image_run,
    make_ingestor,
    scalar_run,
    storage_digest,
    zarr_files,
)
from test_catalog_support import canonical
from test_tools_support import (  # noqa: F401  (fixtures)
    make_settings,
    metadata_uri_fixture,
    read_documents,
    write_suitcase,
)

pytestmark = [pytest.mark.anyio, pytest.mark.s3]


async def test_runs_on_s3_read_back_and_replay_identically(
        s3_root: ZarrRoot, metadata_uri: str, tenant: str) -> None:
    """Two scalar runs (one longer than a tail block: rows in arrays and tail), an image
    run; read through the catalog; the same documents again change no object."""
    runs = [scalar_run(300, fields=3, scan_id=1), scalar_run(5, fields=3, scan_id=2),
            image_run(24, (64, 48), scan_id=3)]
    docs = [d for run in runs for d in run]
    ing, sink, registry = make_ingestor(metadata_uri, s3_root)
    try:
        await ing.process(envelopes(docs, tenant))
    finally:
        await registry.aclose()
    assert not sink.letters, sink.reasons
    assert_stored_events(s3_root, tenant, docs, metadata_uri)
    objects = zarr_files(s3_root, tenant)
    assert any(key.endswith("/data/img/zarr.json") for key in objects), sorted(objects)[:5]

    cat = bluestream.open_catalog(tenant, metadata=metadata_uri, zarr_root=s3_root)
    try:
        for run_docs in runs:
            run = cat[run_docs[0][1]["uid"]]
            events = [d for n, d in run_docs if n == "event"]
            ds = run["primary"].read()
            for key in events[0]["data"]:
                want = np.stack([np.asarray(e["data"][key]) for e in events])
                np.testing.assert_array_equal(ds[key].values, want, err_msg=key)
            lazy = run["primary"].to_dask()
            key = next(iter(events[0]["data"]))
            np.testing.assert_array_equal(lazy[key].values, ds[key].values)
            assert canonical(list(run.documents())) == canonical(run_docs)
    finally:
        cat.close()

    before = storage_digest(metadata_uri, tenant, s3_root)
    ing, sink, registry = make_ingestor(metadata_uri, s3_root)
    try:
        await ing.process(envelopes(docs, tenant))
    finally:
        await registry.aclose()
    assert storage_digest(metadata_uri, tenant, s3_root) == before


async def test_tools_take_s3_roots(s3_root: ZarrRoot, metadata_uri: str, tenant: str,
                                   tmp_path: Path) -> None:
    """``ingest`` then ``export`` with the root on S3 gives the documents back; the
    same files ingested again change no object and no row."""
    runs = [scalar_run(40, fields=2, scan_id=1), image_run(6, (32, 32), scan_id=2)]
    src = tmp_path / "src"
    src.mkdir()
    files = write_suitcase(runs, "msgpack", src)
    settings: Settings = make_settings(metadata_uri, tmp_path / "unused")
    settings = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"zarr_root": str(s3_root), "tail_rows": 16})})
    report = await ingest_files(files, tenant=tenant, settings=settings)
    assert report.ok, report.rejections
    before = storage_digest(metadata_uri, tenant, s3_root)
    assert any(k.startswith("zarr:") for k in before)
    again = await ingest_files(files, tenant=tenant, settings=settings)
    assert again.ok and storage_digest(metadata_uri, tenant, s3_root) == before
    out = tmp_path / "export"
    exported = await export_runs([], tenant=tenant, settings=settings, fmt="jsonl",
                                 out=out, all_runs=True)
    assert exported.ok and len(exported.files) == len(runs)
    for docs in runs:
        back = read_documents(out / f"{docs[0][1]['uid']}.jsonl")
        assert canonical(back) == canonical(docs)


# -- settings ----------------------------------------------------------------------------

def _cli(args: list[str], env: dict[str, str], timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bluestream", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BLUESTREAM_", "AWS_"))}
    env.update(extra)
    return env


def _config(tmp_path: Path, *, root: str, endpoint: str, key: str = S3_ACCESS_KEY_ID,
            secret: str = S3_SECRET_ACCESS_KEY, extra: str = "") -> Path:
    path = tmp_path / "s3.toml"
    path.write_text(
        f'[kafka]\nbootstrap = "127.0.0.1:1"\n\n'
        f'[storage]\nmetadata = "sqlite:///{tmp_path}/m.db"\nzarr_root = "{root}"\n\n'
        f'[storage.s3]\nendpoint = "{endpoint}"\naccess_key_id = "{key}"\n'
        f'secret_access_key = "{secret}"\n{extra}')
    return path


def test_check_config_accepts_the_bucket_and_masks_the_secret(
        s3_endpoint: str, tmp_path: Path) -> None:
    config = _config(tmp_path, root=f"s3://{S3_BUCKET}/cfg", endpoint=s3_endpoint)
    done = _cli(["check-config", str(config)], _env())
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["storage"]["zarr_root"] == f"s3://{S3_BUCKET}/cfg"
    assert shown["storage"]["s3"]["secret_access_key"] == "***"
    assert S3_SECRET_ACCESS_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(("case", "expected"), [
    ("unknown-bucket", "bucket 'no-such-bucket-here' does not exist"),
    ("wrong-credentials", "refused the credentials"),
    ("unreachable", "is unreachable"),
    ("bad-url", "not a valid S3 bucket name"),
    ("empty-segment", "empty components"),
])
def test_bad_s3_settings_exit_2_with_a_clear_error(
        case: str, expected: str, s3_endpoint: str, tmp_path: Path) -> None:
    """The same verdict from ``check-config`` and from ``serve`` (which stops at start,
    before it touches Kafka: the bootstrap here answers nothing). An endpoint that does
    not answer: ``check-config`` exits 2, the daemon logs it and stays up (not ready)."""
    root, endpoint, secret = f"s3://{S3_BUCKET}/x", s3_endpoint, S3_SECRET_ACCESS_KEY
    if case == "unknown-bucket":
        root = "s3://no-such-bucket-here/x"
    elif case == "wrong-credentials":
        secret = "not-the-secret"
    elif case == "unreachable":
        endpoint = "http://127.0.0.1:9"  # discard: nothing listens
    elif case == "bad-url":
        root = "s3://Bad_Bucket/x"
    else:
        root = f"s3://{S3_BUCKET}/a//b"
    config = _config(tmp_path, root=root, endpoint=endpoint, secret=secret,
                     extra="\n[http]\nport = 0\n")
    commands = [["check-config", str(config)]]
    if case == "unreachable":
        _serve_waits_for_the_store(config, tmp_path)
    else:
        commands.append(["serve", "-c", str(config)])
    for args in commands:
        done = _cli(args, _env())
        assert done.returncode == 2, (args, done.stdout, done.stderr[-2000:])
        assert expected in done.stderr, (args, done.stderr[-2000:])
        assert "storage.zarr_root" in done.stderr
        assert secret not in done.stdout + done.stderr


def _serve_waits_for_the_store(config: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bluestream", "serve", "-c",
                                 str(config)], env=_env(BLUESTREAM_LOG_FORMAT="json"),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "object store unreachable at start" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(2)
        assert proc.poll() is None, log.read_text()[-2000:]  # up, waiting, not exited
        assert S3_SECRET_ACCESS_KEY not in log.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_credentials_from_the_standard_variables(s3_endpoint: str, tmp_path: Path) -> None:
    """No ``[storage.s3]`` table: AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY are what every S3 client reads, and so does bluestream."""
    env = _env(BLUESTREAM_ZARR_ROOT=f"s3://{S3_BUCKET}/from-env",
               BLUESTREAM_METADATA=f"sqlite:///{tmp_path}/m.db",
               AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY_ID,
               AWS_SECRET_ACCESS_KEY=S3_SECRET_ACCESS_KEY)
    done = _cli(["check-config"], env)
    assert done.returncode == 0, done.stderr
    wrong: dict[str, Any] = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    done = _cli(["check-config"], wrong)
    assert done.returncode == 2 and "refused the credentials" in done.stderr, done.stderr


def test_tools_refuse_an_unknown_bucket_at_start(s3_endpoint: str, tmp_path: Path) -> None:
    """``ingest``, ``ingest-mongo`` and ``export`` ask the object store before any work:
    one line naming the setting, exit status 2, nothing written."""
    env = _env(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY_ID,
               AWS_SECRET_ACCESS_KEY=S3_SECRET_ACCESS_KEY)
    src = tmp_path / "src"
    src.mkdir()
    files = write_suitcase([scalar_run(3, fields=1)], "jsonl", src)
    common = ["--tenant", "t1", "--metadata", f"sqlite:///{tmp_path}/m.db",
              "--zarr-root", "s3://no-such-bucket-here/x"]
    for args in (["ingest", str(files[0]), *common],
                 ["ingest-mongo", "mongodb://127.0.0.1:1/db", *common],
                 ["export", "--all", "--out", str(tmp_path / "out"), *common]):
        done = _cli(args, env)
        assert done.returncode == 2, (args, done.stdout, done.stderr[-2000:])
        assert "storage.zarr_root: bucket 'no-such-bucket-here' does not exist" in \
            done.stderr, (args, done.stderr[-2000:])
    assert not (tmp_path / "m.db").exists()
