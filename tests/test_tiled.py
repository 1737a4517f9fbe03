"""Remote readers: ``bluestream tiled`` (a real Tiled server process on 127.0.0.1) read by
the stock client, ``tiled.client.from_uri`` with bluesky-tiled-plugins, on SQLite and on
MongoDB metadata.

What is held here: the client picks the Bluesky classes (catalog, run v3, stream v3);
``c[t][-1]`` is the newest run, ``c[t][scan_id]`` the newest with that scan id, a partial
uid finds its run; each query kind selects what the local catalog selects; ``read()`` of
scalars and of images equals the local catalog's; one frame is read alone; ``documents()``
gives the local replay; an open run grows between two reads; the API key is required;
unknown tenants, runs and streams are 404; queries bluestream cannot answer are 400.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

import bluestream
from helpers import envelopes, image_run, make_ingestor, scalar_run
from test_catalog_support import canonical

pytest.importorskip("tiled.client")
pytest.importorskip("bluesky_tiled_plugins")

from bluesky_tiled_plugins.queries import (
    Comparison,
    Contains,
    Eq,
    FullText,
    In,
    Key,
    NotEq,
    NotIn,
    PartialUID,
    Regex,
    ScanID,
    TimeRange,
)
from tiled.client import from_uri
from tiled.queries import KeyPresent, Like

KEY = "bluestreamtestkey"
Docs = list[tuple[str, dict[str, Any]]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ingest(metadata: str, zarr_root: Path, tenant: str, docs: Docs, offset: int) -> None:
    async def go() -> None:
        ing, sink, registry = make_ingestor(metadata, zarr_root)
        try:
            await ing.process(envelopes(docs, tenant, start_offset=offset))
        finally:
            await registry.aclose()
        assert not sink.letters, sink.reasons
    anyio.run(go)


class Server:
    def __init__(self, metadata: str, zarr_root: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLUESTREAM_")}
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bluestream", "tiled", "--metadata", metadata,
                 "--zarr-root", str(zarr_root), "--api-key", KEY, "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/api/v1/", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Tiled server did not answer in 60 s"
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mongo", marks=pytest.mark.mongo)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    """Three finished runs (two scalar ones sharing scan_id 7, an image run) in a fresh
    tenant, and a server over them."""
    import uuid

    tmp = tmp_path_factory.mktemp("tiled")
    if request.param == "sqlite":
        metadata = f"sqlite:///{tmp / 'meta.db'}"
    else:
        metadata = request.getfixturevalue("mongo_uri")
    tenant = "t" + uuid.uuid4().hex[:12]
    zarr_root = tmp / "zarr"
    t0 = time.time() - 100
    runs = {
        "a": scalar_run(20, fields=2, scan_id=7, t0=t0,
                        extra_md={"sample": "gold", "motors": ["m1", "m2"], "operator": "ann"}),
        "img": image_run(12, (8, 6), scan_id=8, t0=t0 + 10),
        "b": scalar_run(300, fields=2, scan_id=7, t0=t0 + 20,
                        extra_md={"sample": "silver", "motors": ["m3"]}),
    }
    offset = 0
    for docs in runs.values():
        _ingest(metadata, zarr_root, tenant, docs, offset)
        offset += len(docs)
    server = Server(metadata, zarr_root, tmp / "server.log")
    clients: list[Any] = []
    try:
        yield {"metadata": metadata, "zarr_root": zarr_root, "tenant": tenant,
               "runs": runs, "server": server, "offset": offset, "clients": clients}
    finally:
        for client in clients:
            client.context.close()
        server.stop()


def _client(served: dict[str, Any]) -> Any:
    client = from_uri(served["server"].url, api_key=KEY)
    served["clients"].append(client)
    return client


def _uid(docs: Docs) -> str:
    return str(docs[0][1]["uid"])


def test_lookups_like_databroker(served: dict[str, Any]) -> None:
    c = _client(served)
    assert served["tenant"] in list(c)
    cat = c[served["tenant"]]
    assert type(cat).__name__ == "CatalogOfBlueskyRuns"
    runs = served["runs"]
    assert len(cat) == 3
    newest = cat[-1]
    assert type(newest).__name__ == "BlueskyRunV3"
    assert newest.start["uid"] == _uid(runs["b"])
    assert cat[-3].start["uid"] == _uid(runs["a"])
    assert cat[7].start["uid"] == _uid(runs["b"])  # the newest of the duplicates
    assert cat[8].start["uid"] == _uid(runs["img"])
    assert cat[_uid(runs["img"])[:8]].start["uid"] == _uid(runs["img"])
    assert cat[_uid(runs["a"])].stop["exit_status"] == "success"
    assert list(cat) == [_uid(runs[k]) for k in ("a", "img", "b")]  # oldest first
    with pytest.raises(KeyError):
        cat[99]


@pytest.mark.parametrize(("query", "expected"), [
    (Eq("sample", "gold"), ["a"]),
    (NotEq("sample", "gold"), ["img", "b"]),  # as Mongo's $ne: a run without the key too
    (Comparison("gt", "scan_id", 7), ["img"]),
    (Key("scan_id") >= 7, ["a", "img", "b"]),
    (In("sample", ["gold", "silver"]), ["a", "b"]),
    (NotIn("sample", ["gold"]), ["img", "b"]),
    (Contains("motors", "m3"), ["b"]),
    (Regex("sample", "^go"), ["a"]),
    (FullText("silver"), ["b"]),
    (KeyPresent("operator"), ["a"]),
    (ScanID(8), ["img"]),
    (TimeRange(since=0, until=2e9), ["a", "img", "b"]),
    # keys of the stop document (the plugin sends them as "stop.<key>")
    (Comparison("gt", "stop.num_events.primary", 15), ["a", "b"]),
    (Eq("stop.exit_status", "fail"), []),
])
def test_each_query_kind(served: dict[str, Any], query: Any, expected: list[str]) -> None:
    """Each kind selects the runs the documents say (oldest first)."""
    cat = _client(served)[served["tenant"]]
    got = list(cat.search(query))
    assert got == [_uid(served["runs"][k]) for k in expected], query


def test_a_search_then_a_lookup_stays_within_the_search(served: dict[str, Any]) -> None:
    cat = _client(served)[served["tenant"]]
    gold = cat.search(Eq("sample", "gold"))
    assert gold[_uid(served["runs"]["a"])].start["sample"] == "gold"
    with pytest.raises(KeyError):
        gold[_uid(served["runs"]["b"])]
    newest_first = cat.sort(("start.time", -1))
    assert list(newest_first) == [_uid(served["runs"][k]) for k in ("b", "img", "a")]


def test_partial_uid_and_like(served: dict[str, Any]) -> None:
    cat = _client(served)[served["tenant"]]
    uid = _uid(served["runs"]["a"])
    assert list(cat.search(PartialUID(uid[:7]))) == [uid]
    assert list(cat.search(Like("start.uid", uid[:7] + "%"))) == [uid]
    assert list(cat.search(Like("sample", "s_lv%"))) == [_uid(served["runs"]["b"])]


def test_read_equals_the_local_read(served: dict[str, Any]) -> None:
    cat = _client(served)[served["tenant"]]
    local = bluestream.open_catalog(served["tenant"], metadata=served["metadata"],
                                    zarr_root=served["zarr_root"])
    try:
        for name in ("a", "img", "b"):
            uid = _uid(served["runs"][name])
            remote = cat[uid]["primary"].read()
            here = local[uid]["primary"].read()
            assert set(remote.data_vars) == set(here.data_vars), name
            np.testing.assert_array_equal(remote["time"].values, here["time"].values)
            for key in here.data_vars:
                np.testing.assert_array_equal(remote[key].values, here[key].values,
                                              err_msg=f"{name}:{key}")
                assert remote[key].dtype == here[key].dtype, (name, key)
    finally:
        local.close()


def test_timestamps_columns(served: dict[str, Any]) -> None:
    """TiledWriter's ``ts_<key>`` columns: the client's ``read([TIMESTAMPS])`` gives every
    key's event timestamps; a plain ``read()`` leaves them out."""
    from bluesky_tiled_plugins.clients.bluesky_event_stream import TIMESTAMPS

    cat = _client(served)[served["tenant"]]
    for name in ("a", "img"):
        docs = served["runs"][name]
        events = [d for n, d in docs if n == "event"]
        stream = cat[_uid(docs)]["primary"]
        ts = stream.read(variables=[TIMESTAMPS])
        assert set(ts.data_vars) == {f"ts_{k}" for k in events[0]["timestamps"]}, name
        for key in events[0]["timestamps"]:
            np.testing.assert_array_equal(ts[f"ts_{key}"].values,
                                          [e["timestamps"][key] for e in events])
        assert not any(str(v).startswith("ts_") for v in stream.read().data_vars)


def test_one_frame_alone(served: dict[str, Any]) -> None:
    cat = _client(served)[served["tenant"]]
    docs = served["runs"]["img"]
    events = [d for n, d in docs if n == "event"]
    img = cat[_uid(docs)]["primary"]["img"]
    assert img.shape == (12, 8, 6)
    np.testing.assert_array_equal(img[5], np.asarray(events[5]["data"]["img"]))


def test_documents_are_the_local_replay(served: dict[str, Any]) -> None:
    cat = _client(served)[served["tenant"]]
    local = bluestream.open_catalog(served["tenant"], metadata=served["metadata"],
                                    zarr_root=served["zarr_root"])
    try:
        for name in ("a", "img"):
            uid = _uid(served["runs"][name])
            remote = [(n, dict(d)) for n, d in cat[uid].documents()]
            here = list(local[uid].documents())
            assert [n for n, _ in remote] == [n for n, _ in here]
            assert canonical(remote) == canonical(here)
            assert canonical(remote) == canonical(served["runs"][name])
    finally:
        local.close()


def test_an_open_run_grows_between_reads(served: dict[str, Any]) -> None:
    docs = scalar_run(10, fields=1, scan_id=50)
    head = [d for d in docs if d[0] in ("start", "descriptor")]
    events = [d for d in docs if d[0] == "event"]
    _ingest(served["metadata"], served["zarr_root"], served["tenant"], head + events[:4],
            served["offset"])
    served["offset"] += len(head) + 4
    cat = _client(served)[served["tenant"]]
    run = cat[_uid(docs)]
    assert "stop" not in run.metadata
    assert len(run["primary"].read()["time"]) == 4
    _ingest(served["metadata"], served["zarr_root"], served["tenant"], events[4:],
            served["offset"])
    served["offset"] += len(events) - 4
    again = _client(served)[served["tenant"]][_uid(docs)]
    assert len(again["primary"].read()["time"]) == 10


def test_tenants_listed_and_new_ones_found(served: dict[str, Any]) -> None:
    """A tenant that starts after the server is found by name at once (a lookup lists
    nothing) and shows in the listing within seconds (the list is kept 2 s)."""
    import uuid

    client = _client(served)
    assert served["tenant"] in list(client)
    fresh = "t" + uuid.uuid4().hex[:12]
    with pytest.raises(KeyError):  # not there yet: 404 (remembered for 2 s)
        client[fresh]
    docs = scalar_run(3, fields=1, scan_id=60)
    _ingest(served["metadata"], served["zarr_root"], fresh, docs, 0)
    deadline = time.monotonic() + 10
    while True:  # found once the 404 is no longer remembered
        try:
            assert client[fresh][-1].start["uid"] == _uid(docs)
            break
        except KeyError:
            assert time.monotonic() < deadline, "a new tenant was not found"
            time.sleep(0.5)
    while fresh not in list(client):
        assert time.monotonic() < deadline, "a new tenant did not show in the listing"
        time.sleep(0.5)


def test_the_api_key_is_required(served: dict[str, Any]) -> None:
    url = served["server"].url
    assert httpx.get(f"{url}/api/v1/metadata/{served['tenant']}").status_code == 401
    headers = {"Authorization": f"Apikey {KEY}"}
    assert httpx.get(f"{url}/api/v1/metadata/{served['tenant']}",
                     headers=headers).status_code == 200


def test_unknown_names_are_404_and_bad_queries_4xx(served: dict[str, Any]) -> None:
    url = served["server"].url
    headers = {"Authorization": f"Apikey {KEY}"}
    t, uid = served["tenant"], _uid(served["runs"]["a"])
    for path in ("no-such-tenant", "not%20a%20tenant", f"{t}/{'0' * 36}",
                 f"{t}/{uid}/no-such-stream",
                 f"{t}/{uid}/primary/no-such-key"):
        r = httpx.get(f"{url}/api/v1/metadata/{path}", headers=headers)
        assert r.status_code == 404, (path, r.status_code, r.text[:300])
    bad = [{"filter[regex][condition][key]": "start.sample",
            "filter[regex][condition][pattern]": "([",
            "filter[regex][condition][case_sensitive]": "true"},
           {"filter[eq][condition][key]": "stop",  # a whole document, not a key
            "filter[eq][condition][value]": '"success"'}]
    for params in bad:
        r = httpx.get(f"{url}/api/v1/search/{t}", params=params, headers=headers)
        assert 400 <= r.status_code < 500, (params, r.status_code, r.text[:300])
