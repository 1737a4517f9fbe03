"""One run: its metadata, its streams, its documents; live while it is open."""

from __future__ import annotations

import json
import time as _time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio

from bluestream.catalog._tasks import task_group
from bluestream.catalog.context import CatalogContext
from bluestream.catalog.loop_thread import LoopThread
from bluestream.catalog.provenance import provenance_of
from bluestream.catalog.replay import PAGE_BYTES, PAGE_EVENTS, follow, replay
from bluestream.catalog.stream import AsyncEventStream
from bluestream.storage.query_rules import check_annotation_key

if TYPE_CHECKING:
    import xarray

__all__ = ["AsyncBlueskyRun", "BlueskyRun", "EventStream"]

Doc = dict[str, Any]
Item = tuple[str, Doc]


def _stream_names(descriptors: Sequence[Doc]) -> list[str]:
    """Stream names in order of first appearance (descriptors sorted by time)."""
    ordered = sorted(descriptors, key=lambda d: (d.get("time", 0.0), d["uid"]))
    return list(dict.fromkeys(str(d.get("name", "primary")) for d in ordered))


#: Bytes of JSON an annotation value may take (annotations are labels, not data).
MAX_ANNOTATION_BYTES = 64 * 1024


def _annotation_value(value: Any) -> Any:
    """``value`` as plain JSON (numpy scalars and arrays become numbers and lists),
    or a ValueError saying why it cannot be an annotation."""
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"an annotation value must be JSON (str, number, bool, None, "
                         f"list, dict; no NaN): {exc}") from None
    if len(text) > MAX_ANNOTATION_BYTES:
        raise ValueError(f"an annotation value takes {len(text)} bytes of JSON, more than "
                         f"{MAX_ANNOTATION_BYTES}: store data as data, not as annotations")
    return json.loads(text)


def _fmt_time(t: Any) -> str:
    if not isinstance(t, int | float):
        return "?"
    return datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")


def run_repr(kind: str, start: Mapping[str, Any], stop: Mapping[str, Any] | None,
             streams: Sequence[str]) -> str:
    lines = [kind,
             f"  uid={start.get('uid')!r}",
             f"  scan_id={start.get('scan_id')!r}  plan_name={start.get('plan_name')!r}"]
    begin = _fmt_time(start.get("time"))
    if stop is None:
        lines.append(f"  {begin} -- (open)")
    else:
        lines.append(f"  {begin} -- {_fmt_time(stop.get('time'))}  "
                     f"exit_status={stop.get('exit_status')!r}")
    lines.append("  Streams:")
    lines.extend(f"    * {name}" for name in streams)
    return "\n".join(lines)


class AsyncBlueskyRun:
    """A run, read with ``await``. ``metadata`` and ``streams`` are snapshots taken
    when the run was looked up; :meth:`refresh` renews them (reads never cache)."""

    def __init__(self, ctx: CatalogContext, start: Doc, stop: Doc | None,
                 descriptors: Sequence[Doc]) -> None:
        self._ctx = ctx
        self._start = start
        self._stop = stop
        self._descriptors = list(descriptors)

    @classmethod
    async def load(cls, ctx: CatalogContext, start: Doc) -> AsyncBlueskyRun:
        run = cls(ctx, start, None, [])
        await run.refresh()
        return run

    # -- metadata -------------------------------------------------------------------------
    @property
    def uid(self) -> str:
        return str(self._start["uid"])

    @property
    def start(self) -> Doc:
        return self._start

    @property
    def stop(self) -> Doc | None:
        return self._stop

    @property
    def metadata(self) -> dict[str, Doc | None]:
        return {"start": self._start, "stop": self._stop}

    @property
    def streams(self) -> list[str]:
        return _stream_names(self._descriptors)

    @property
    def descriptors(self) -> list[Doc]:
        return list(self._descriptors)

    @property
    def is_open(self) -> bool:
        return self._stop is None

    async def refresh(self) -> AsyncBlueskyRun:
        """Re-read the stop document and the descriptors (new streams of a live run)."""
        ctx = self._ctx
        await ctx.ensure_open()
        got: dict[str, Any] = {}

        async def stop() -> None:
            got["stop"] = await ctx.call("read stop", ctx.store.get, "stop", self.uid)

        async def descriptors() -> None:
            got["d"] = await ctx.call("read descriptors", ctx.store.find, "descriptor",
                                      run_start=self.uid)

        async with task_group() as tg:
            tg.start_soon(stop)
            tg.start_soon(descriptors)
        self._stop = got["stop"]
        self._descriptors = got["d"]
        return self

    def __repr__(self) -> str:
        return run_repr("AsyncBlueskyRun", self._start, self._stop, self.streams)

    # -- annotations and provenance -----------------------------------------------------
    async def annotate(self, key: str, value: Any, *, author: str | None = None,
                       note: str | None = None) -> int:
        """Add a new version of annotation ``key`` (``value`` None clears it); returns
        its version. Earlier versions stay; the start and stop documents are never
        modified. ``value``: JSON-compatible (str, number, bool, list, dict)."""
        check_annotation_key(key)
        value = _annotation_value(value)
        for what, text in (("author", author), ("note", note)):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"annotation {what} must be a string, not "
                                f"{type(text).__name__}")
        writer = await self._ctx.writer()
        return await self._ctx.call("store an annotation", writer.add_annotation, self.uid,
                                    key, value, time=_time.time(), author=author, note=note)

    async def annotations(self) -> dict[str, Any]:
        """Current value of each annotation (its newest version; cleared ones left out)."""
        await self._ctx.ensure_open()
        current: dict[str, Any] = {}
        for a in await self._ctx.call("read annotations", self._ctx.store.annotations,
                                      self.uid):
            current[str(a["key"])] = a["value"]  # versions ascending: the newest wins
        return {k: v for k, v in current.items() if v is not None}

    async def annotation_history(self, key: str) -> list[Doc]:
        """Every version of annotation ``key``, oldest first: ``version``, ``value``,
        ``time`` (epoch seconds), ``author``, ``note``."""
        check_annotation_key(key)
        await self._ctx.ensure_open()
        return await self._ctx.call("read annotations", self._ctx.store.annotations,
                                    self.uid, key)

    async def provenance(self) -> Doc:
        """Topics, partitions, offset ranges, hosts, processes and versions that wrote
        this run, and the files / databases of runs brought in by the import tools
        (see :mod:`bluestream.catalog.provenance`)."""
        await self._ctx.ensure_open()
        records = await self._ctx.call("read ingest_log", self._ctx.store.ingest_log, self.uid)
        return provenance_of(self.uid, records)

    # -- streams --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> AsyncEventStream:
        """The stream ``name`` (KeyError listing the run's streams if it has none such;
        call :meth:`refresh` first to see streams added since the lookup)."""
        if not isinstance(name, str):
            raise TypeError(f"streams are named by strings, not {type(name).__name__}")
        if name not in self.streams:
            raise KeyError(f"run {self.uid!r} has no stream {name!r}; its streams are "
                           f"{self.streams}")
        return AsyncEventStream(self._ctx, self.uid, name)

    def __contains__(self, name: object) -> bool:
        return name in self.streams

    # -- documents ------------------------------------------------------------------------
    def documents(self, *, pages: bool = True, page_events: int = PAGE_EVENTS,
                  page_bytes: int = PAGE_BYTES) -> AsyncIterator[Item]:
        """Every stored document, replayed in a valid order (events as event_page
        documents, or single events with ``pages=False``)."""
        return replay(self._ctx, self.uid, pages=pages, page_events=page_events,
                      page_bytes=page_bytes)

    def follow(self, *, pages: bool = True, poll_interval: float | None = None
               ) -> AsyncIterator[Item]:
        """Documents as they are stored, from the beginning; ends after the stop."""
        return follow(self._ctx, self.uid, pages=pages, poll_interval=poll_interval)

    async def events_async(self, stream: str = "primary", *,
                           poll_interval: float | None = None) -> AsyncIterator[Doc]:
        """Event pages of one stream as they are stored; ends after the run's stop
        once all were yielded."""
        async for page in AsyncEventStream(self._ctx, self.uid, stream).events_async(
                poll_interval=poll_interval):
            yield page

    async def _progress(self) -> tuple[bool, tuple[tuple[str, int, int], ...], int]:
        ctx = self._ctx
        stop = await ctx.call("read stop", ctx.store.get, "stop", self.uid)
        records = await ctx.call("read event_stream", ctx.store.streams, self.uid)
        state = tuple(sorted((str(r["descriptor_uid"]), int(r["length"]),
                              int(r.get("seq_num_min", 0))) for r in records))
        descriptors = await ctx.call("read descriptors", ctx.store.find, "descriptor",
                                     run_start=self.uid)
        return stop is not None, state, len(descriptors)

    async def wait(self, timeout: float | None = None, *,  # noqa: ASYNC109
                   poll_interval: float | None = None) -> bool:
        """Wait until new events, a new stream or the stop are stored; True if that
        happened within ``timeout`` seconds. Compares against the state at the call;
        returns False at once for a run that has already stopped."""
        await self._ctx.ensure_open()
        interval = self._ctx.poll_interval if poll_interval is None else poll_interval
        before = await self._progress()
        if before[0]:
            await self.refresh()
            return False
        deadline = None if timeout is None else _time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - _time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            await anyio.sleep(interval if remaining is None else min(interval, remaining))
            now = await self._progress()
            if now != before:
                await self.refresh()
                return True

    # -- completeness (catalog/integrity.py) --------------------------------------------
    async def complete(self, *, exact: bool = False) -> bool:
        """Whether the stop arrived and every stream holds the events the stop records
        (``stop["num_events"]``), judged from the stream records (``exact``: from the
        rows in the arrays). ``bluestream verify`` checks the stored values."""
        from bluestream.catalog.integrity import completeness

        return (await completeness(self._ctx, [self.uid], exact=exact))[self.uid].complete


class EventStream:
    """Synchronous view of :class:`AsyncEventStream`."""

    def __init__(self, inner: AsyncEventStream, loop: LoopThread) -> None:
        self._inner = inner
        self._loop = loop

    @property
    def name(self) -> str:
        return self._inner.name

    def __repr__(self) -> str:
        return repr(self._inner)

    def read(self, fields: Sequence[str] | None = None, *, fill: bool = True,
             uids: bool = True) -> xarray.Dataset:
        """See :meth:`AsyncEventStream.read`."""
        return self._loop.call(lambda: self._inner.read(fields, fill=fill, uids=uids))

    def to_dask(self, fields: Sequence[str] | None = None, *, fill: bool = True,
                uids: bool = True) -> xarray.Dataset:
        return self._loop.call(lambda: self._inner.to_dask(fields, fill=fill, uids=uids))

    def timestamps(self, fields: Sequence[str] | None = None, *, lazy: bool = False,
                   uids: bool = True) -> xarray.Dataset:
        """The events' timestamps per data key (see :meth:`AsyncEventStream.timestamps`)."""
        return self._loop.call(lambda: self._inner.timestamps(fields, lazy=lazy, uids=uids))

    def summary(self, field: str, points: int | None = None) -> xarray.Dataset:
        """Statistical summaries of one numeric field, without reading it (see
        :meth:`AsyncEventStream.summary`)."""
        return self._loop.call(lambda: self._inner.summary(field, points))

    @property
    def config(self) -> dict[str, xarray.Dataset]:
        """Per device: its configuration readings, one row per event."""
        return self._loop.call(self._inner.config)

    @property
    def descriptors(self) -> list[Doc]:
        return self._loop.call(self._inner.descriptors)

    def __len__(self) -> int:
        return self._loop.call(self._inner.length)

    def events(self, *, poll_interval: float | None = None) -> Iterator[Doc]:
        """Event pages as they are stored (blocking); ends after the run's stop."""
        return self._loop.iterate(self._inner.events_async(poll_interval=poll_interval))


class BlueskyRun:
    """Synchronous view of :class:`AsyncBlueskyRun`, run on the catalog's loop thread.

    ``metadata`` re-reads the stop document while the run is open and ``streams`` the
    descriptors each time, so a live run shows its progress without re-lookup.
    """

    def __init__(self, inner: AsyncBlueskyRun, loop: LoopThread) -> None:
        self._inner = inner
        self._loop = loop

    @property
    def aio(self) -> AsyncBlueskyRun:
        """The asynchronous run behind this one (use it on the catalog's loop only)."""
        return self._inner

    @property
    def uid(self) -> str:
        return self._inner.uid

    def refresh(self) -> BlueskyRun:
        self._loop.call(self._inner.refresh)
        return self

    def annotate(self, key: str, value: Any, *, author: str | None = None,
                 note: str | None = None) -> int:
        """See :meth:`AsyncBlueskyRun.annotate`."""
        return self._loop.call(lambda: self._inner.annotate(key, value, author=author,
                                                            note=note))

    @property
    def annotations(self) -> dict[str, Any]:
        """Current annotation values (read from the store each time)."""
        return self._loop.call(self._inner.annotations)

    def annotation_history(self, key: str) -> list[Doc]:
        return self._loop.call(lambda: self._inner.annotation_history(key))

    def provenance(self) -> Doc:
        return self._loop.call(self._inner.provenance)

    @property
    def metadata(self) -> dict[str, Doc | None]:
        if self._inner.is_open:
            self.refresh()
        return self._inner.metadata

    @property
    def start(self) -> Doc:
        return self._inner.start

    @property
    def stop(self) -> Doc | None:
        return self.metadata["stop"]

    @property
    def streams(self) -> list[str]:
        if self._inner.is_open:
            self.refresh()
        return self._inner.streams

    @property
    def descriptors(self) -> list[Doc]:
        if self._inner.is_open:
            self.refresh()
        return self._inner.descriptors

    def __getitem__(self, name: str) -> EventStream:
        if self._inner.is_open and name not in self._inner.streams:
            self.refresh()
        return EventStream(self._inner[name], self._loop)

    def __getattr__(self, name: str) -> EventStream:
        """``run.primary`` as a shorthand for ``run["primary"]`` (databroker style)."""
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(str(exc)) from None

    def __contains__(self, name: object) -> bool:
        return name in self.streams

    def __repr__(self) -> str:
        inner = self._inner
        return run_repr("BlueskyRun", inner.start, inner.stop, inner.streams)

    def documents(self, *, pages: bool = True, page_events: int = PAGE_EVENTS,
                  page_bytes: int = PAGE_BYTES) -> Iterator[Item]:
        return self._loop.iterate(self._inner.documents(
            pages=pages, page_events=page_events, page_bytes=page_bytes))

    def follow(self, *, pages: bool = True, poll_interval: float | None = None
               ) -> Iterator[Item]:
        return self._loop.iterate(self._inner.follow(pages=pages, poll_interval=poll_interval))

    def wait(self, timeout: float | None = None, *,
             poll_interval: float | None = None) -> bool:
        return self._loop.call(lambda: self._inner.wait(timeout, poll_interval=poll_interval))

    @property
    def complete(self) -> bool:
        """See :meth:`AsyncBlueskyRun.complete` (read fresh at each access)."""
        return self._loop.call(self._inner.complete)
