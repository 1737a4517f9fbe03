"""``bluestream demo``: the whole system on one laptop, in about half a minute.

Starts a local Kafka broker if none answers (``scripts/services up``), runs the daemon
in this process on the embedded store (SQLite + Zarr under ``--out``), publishes three
realistic runs with a bluesky RunEngine and bluesky-kafka's Publisher, waits until the
catalog shows their stop documents, then prints a table of the runs and writes a plot,
both read back through the catalog. It stops what it started, and only that.

Each demo uses a fresh topic ``demo-<random>.bluesky.runengine.documents`` (tenant
``demo-<random>``), so reruns never see each other's data but share one store.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from bluestream.errors import BluestreamError, StorageUnavailable
from bluestream.settings import Settings

__all__ = ["DemoError", "DemoOptions", "find_services_script", "run_demo"]

STEPS = 7


class DemoError(BluestreamError):
    """The demo cannot run (no broker, missing packages ...); the message says why."""


@dataclass
class DemoOptions:
    out: Path = Path("demo-output")
    start_services: bool = True
    keep_services: bool = False
    timeout: float = 120.0
    say: Callable[[str], None] = print
    services_script: Path | None = None
    #: Where the arrays go instead of ``out/zarr`` (a directory or ``s3://bucket/prefix``).
    zarr_root: str | None = None
    _started_services: bool = field(default=False, repr=False)


def find_services_script() -> Path | None:
    """``scripts/services`` of the source tree this package runs from, or of the cwd."""
    here = Path(__file__).resolve().parents[3] / "scripts" / "services"
    for candidate in (here, Path.cwd() / "scripts" / "services"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _reachable(hostport: str, timeout: float = 2.0) -> bool:
    host, _, port = hostport.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _is_local(hostport: str) -> bool:
    host = hostport.split(",")[0].strip().rpartition(":")[0]
    return host in ("127.0.0.1", "localhost", "::1", "")


async def _ensure_kafka(settings: Settings, opts: DemoOptions, step: str) -> Callable[[], None]:
    """Use the configured broker if it answers; else start the local services.

    Returns the cleanup to run at the end. ``scripts/services up`` starts Kafka and
    Mongo; the cleanup stops Kafka, and Mongo too unless it was running before.
    """
    bootstrap = settings.kafka.bootstrap
    if await _kafka_answers(settings):
        opts.say(f"{step} Kafka broker at {bootstrap} answers; using it")
        return lambda: None
    if not _is_local(bootstrap):
        raise DemoError(f"no Kafka broker answers at {bootstrap} (kafka.bootstrap / "
                        "BLUESTREAM_KAFKA_BOOTSTRAP); the demo starts a broker of its own "
                        "only on this host (127.0.0.1 / localhost)")
    if not opts.start_services:
        raise DemoError(f"no Kafka broker answers at {bootstrap}: start one "
                        "(scripts/services up), or run the demo without --no-services")
    script = opts.services_script or find_services_script()
    if script is None:
        raise DemoError(f"no Kafka broker answers at {bootstrap}, and scripts/services "
                        "(which starts one) was not found: run the demo from the "
                        "bluestream source tree, or start Kafka yourself")
    env = _services_env(bootstrap)
    mongo_was_up = _reachable(f"127.0.0.1:{env.get('BLUESTREAM_SERVICES_MONGO_PORT', '27017')}")
    opts.say(f"{step} no Kafka broker at {bootstrap}: starting the local services "
             f"({script} up; the first time downloads the Kafka jars) ...")
    proc = await anyio.run_process([str(script), "up"], check=False, stdout=None,
                                   stderr=None, env=env)
    opts._started_services = True  # perhaps only in part: clean up either way

    def stop() -> None:
        if opts.keep_services:
            opts.say(f"local services left running (--keep-services); stop them with "
                     f"`{script} down`")
        else:
            which = ["kafka"] if mongo_was_up else []  # leave a Mongo that ran before
            opts.say(f"stopping the local services the demo started "
                     f"({' '.join([str(script), 'down', *which])})")
            subprocess.run([str(script), "down", *which], check=False,
                           stdout=subprocess.DEVNULL, env=env)

    if proc.returncode != 0 or not await _kafka_answers(settings):
        stop()
        raise DemoError(f"{script} up failed (exit {proc.returncode}); see "
                        f"`{script} logs kafka`")
    return stop


def _services_env(bootstrap: str) -> dict[str, str]:
    """The environment for ``scripts/services``: start Kafka on the configured port.

    ``BLUESTREAM_KAFKA_BOOTSTRAP`` is removed: to the script it means "Kafka is
    external, do not start it", the opposite of what the demo asks for here.
    """
    env = {k: v for k, v in os.environ.items() if k != "BLUESTREAM_KAFKA_BOOTSTRAP"}
    port = bootstrap.split(",")[0].strip().rpartition(":")[2]
    if port.isdigit():
        env["BLUESTREAM_SERVICES_KAFKA_PORT"] = port
    return env


async def _kafka_answers(settings: Settings) -> bool:
    """A Kafka metadata round trip, not just a TCP connect (proxies accept those)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    from bluestream.consumers.kafka_clients import kafka_client_options

    if not _reachable(settings.kafka.bootstrap):
        return False
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a failed probe is an answer, not an error to log
    admin = AIOKafkaAdminClient(**kafka_client_options(settings.kafka),
                                request_timeout_ms=5_000)
    try:
        with anyio.move_on_after(10):
            await admin.start()
            return True
        return False
    except (KafkaError, OSError):
        return False
    finally:
        await admin.close()
        quiet.setLevel(level)


async def _create_topic(settings: Settings, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    from bluestream.consumers.kafka_clients import kafka_client_options

    admin = AIOKafkaAdminClient(**kafka_client_options(settings.kafka))
    try:
        await admin.start()
        await admin.create_topics([NewTopic(topic, 1, 1)])
    except KafkaError as exc:
        raise DemoError(f"creating topic {topic!r} on Kafka at {settings.kafka.bootstrap} "
                        f"failed: {type(exc).__name__}: {exc}") from None
    finally:
        await admin.close()


def demo_settings(base: Settings, topic: str, out: Path,
                  zarr_root: str | None = None) -> Settings:
    """The daemon's settings: this demo's topic only, the embedded store under ``out``
    (the arrays under ``out/zarr`` unless ``zarr_root`` names another root)."""
    tenant = topic.split(".", 1)[0]
    return base.model_copy(update={
        "kafka": base.kafka.model_copy(update={
            "topics": [topic], "topic_pattern": None, "group_id": f"bluestream-{tenant}",
            "auto_offset_reset": "earliest"}),
        "storage": base.storage.model_copy(update={
            "metadata": f"sqlite:///{(out / 'bluestream.db').resolve()}",
            "zarr_root": zarr_root or str((out / "zarr").resolve())}),
        "http": base.http.model_copy(update={"enabled": False}),
        "tenants": {},
    })


async def _wait(predicate: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {limit_s:.0f} s waiting for {what}")
        await anyio.sleep(0.2)


async def run_demo(base: Settings, opts: DemoOptions) -> Path:
    """Run the demo; returns the path of the plot."""
    from bluestream.tools.demo_plans import missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise DemoError(f"the demo needs {', '.join(missing)}: "
                        "pip install 'bluestream[demo]'")
    tenant = f"demo-{secrets.token_hex(3)}"
    topic = f"{tenant}.bluesky.runengine.documents"
    cleanup = await _ensure_kafka(base, opts, f"[1/{STEPS}]")
    try:
        return await _run(demo_settings(base, topic, opts.out, opts.zarr_root), tenant,
                          topic, opts)
    finally:
        cleanup()


async def _run(settings: Settings, tenant: str, topic: str, opts: DemoOptions) -> Path:
    from bluestream.daemon.service import Daemon

    say = opts.say
    opts.out.mkdir(parents=True, exist_ok=True)
    say(f"[2/{STEPS}] starting the daemon in this process: topic {topic}, store "
        f"{settings.storage.metadata} + {settings.storage.zarr_root}")
    await _create_topic(settings, topic)
    daemon = Daemon(settings, handle_signals=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        async def assigned() -> bool:
            return daemon.ready and bool(daemon.source and daemon.source.state.assigned)

        try:
            await _wait(assigned, opts.timeout, "the daemon to join its consumer group")
            plot = await _publish_and_report(settings, tenant, topic, opts)
        finally:
            daemon.stop.set()
    say(f"daemon stopped: {int(daemon.counters.total('documents'))} documents, "
        f"{int(daemon.counters.total('events'))} events stored, "
        f"{int(daemon.counters.total('dead_lettered'))} dead-lettered")
    return plot


async def _publish_and_report(settings: Settings, tenant: str, topic: str,
                              opts: DemoOptions) -> Path:
    from bluestream.catalog.core import AsyncCatalog, open_catalog_async
    from bluestream.tools.demo_plans import run_demo_plans
    from bluestream.tools.demo_report import format_table, plot_runs, run_rows

    say = opts.say
    step = {"count": 3, "scan": 4, "images": 5}

    def announce(label: str, text: str) -> None:
        say(f"[{step[label]}/{STEPS}] {text}")

    runs = await anyio.to_thread.run_sync(run_demo_plans, topic, settings.kafka.bootstrap,
                                          announce)
    say(f"[6/{STEPS}] waiting until the daemon has stored all {len(runs)} runs ...")
    cat: AsyncCatalog | None = None

    async def stored() -> bool:
        nonlocal cat
        if cat is None:
            try:
                cat = await open_catalog_async(tenant, metadata=settings.storage.metadata,
                                               zarr_root=settings.storage.zarr()).open()
            except StorageUnavailable:  # the SQLite file is created with the first run
                return False
        for r in runs:
            if not await cat.contains(r.uid) or (await cat.lookup(r.uid)).stop is None:
                return False
        return True

    try:
        await _wait(stored, opts.timeout, "the runs' stop documents in the catalog")
        assert cat is not None
        say(f"[7/{STEPS}] reading back through the catalog (tenant {tenant!r}):\n")
        say(format_table(await run_rows(cat)))
        by_label = {r.label: r.uid for r in runs}
        plot = await plot_runs(await cat.lookup(by_label["scan"]),
                               await cat.lookup(by_label["images"]),
                               opts.out / f"{tenant}.png")
    finally:
        if cat is not None:
            await cat.aclose()
    say(f"\nplot written to {plot}")
    say(f"read the runs yourself:\n"
        f"  python -c \"import bluestream; cat = bluestream.open_catalog('{tenant}', "
        f"metadata='{settings.storage.metadata}', zarr_root='{settings.storage.zarr_root}'); "
        f"print(cat[-1]); print(cat[-1]['primary'].read())\"")
    return plot
