"""The tools' command-line wrappers, registered on the ``bluestream`` typer app.

They only parse options, load settings (the same TOML file + ``BLUESTREAM_*``
environment as the daemon, command-line options winning), print and set the exit
status; the work is in the ``bluestream.tools`` modules, imported lazily so that
``bluestream --help`` stays fast. Exit status: 0 all stored, 1 some documents were
rejected or the command failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import anyio
import typer

from bluestream.daemon.logs import configure_logging
from bluestream.errors import BluestreamError, ConfigError
from bluestream.gc_tuning import tune_gc
from bluestream.settings import load_settings
from bluestream.tiled.server import COMPRESS_BELOW

if TYPE_CHECKING:
    from bluestream.settings import Settings
    from bluestream.tools.progress import Progress
    from bluestream.tools.rejects import Rejection

__all__ = ["ConfigOpt", "MetadataOpt", "TenantOpt", "ZarrOpt", "fail", "register",
           "tool_settings"]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file; BLUESTREAM_* environment "
                 "variables override it.", envvar="BLUESTREAM_CONFIG"),
]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant (database / Zarr "
                                        "sub-tree) to store into or read from.")]
MetadataOpt = Annotated[str | None, typer.Option(
    "--metadata", help="Metadata store URI (sqlite:///path or mongodb://...); default "
    "storage.metadata / BLUESTREAM_METADATA.")]
ZarrOpt = Annotated[str | None, typer.Option(
    "--zarr-root", help="Zarr root: a directory or s3://bucket/prefix; default "
    "storage.zarr_root / BLUESTREAM_ZARR_ROOT.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")]


class FileFormat(StrEnum):
    jsonl = "jsonl"
    msgpack = "msgpack"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None, *, zarr_access: Literal["read", "write"] | None = None,
              **overrides: str | None) -> Settings:
    """The daemon's settings with command-line overrides applied, validated as one.
    ``zarr_access``: an ``s3://`` Zarr root is asked first whether it can be read (or
    written), so that an unknown bucket or refused credentials are one clear error."""
    names = {"metadata": "BLUESTREAM_METADATA", "zarr_root": "BLUESTREAM_ZARR_ROOT",
             "bootstrap": "BLUESTREAM_KAFKA_BOOTSTRAP"}
    environ: Mapping[str, str] = {**os.environ, **{names[k]: str(v) for k, v in
                                                   overrides.items() if v is not None}}
    try:
        settings = load_settings(config, environ=environ)
    except ConfigError as exc:
        _fail(str(exc), 2)
    configure_logging(settings.log.format, "error")  # problems are reported by the tools
    if zarr_access is not None:
        check_zarr_access(settings, zarr_access)
    return settings


#: For the other command modules of ``bluestream.tools``.
fail = _fail
tool_settings = _settings


def check_zarr_access(settings: Settings, access: Literal["read", "write"]) -> None:
    """Exit 2 with one line unless an ``s3://`` Zarr root can be read (or written):
    an unknown bucket, refused credentials, an endpoint that does not answer."""
    root = settings.storage.zarr()
    if not root.is_s3:
        return
    from bluestream.storage.zarr_root import check_access

    try:
        check_access(root, write=access == "write")
    except ConfigError as exc:
        _fail(str(exc), 2)


def _report(rejection: Rejection) -> None:
    typer.echo(f"error: {rejection}", err=True)


def _progress(what: str, total: float | None, unit: str, quiet: bool) -> Progress:
    from bluestream.tools.progress import Progress

    return Progress(what, total, unit=unit, enabled=not quiet)


def publish(files: Annotated[list[Path], typer.Argument(help="Document files (.jsonl as "
                                                        "suitcase-jsonl writes, .msgpack as "
                                                        "suitcase-msgpack writes).")],
            topic: Annotated[str, typer.Option("--topic", help="Kafka topic, e.g. "
                                               "csx.bluesky.runengine.documents")],
            bootstrap: Annotated[str | None, typer.Option(
                "--bootstrap", "-b", help="Kafka bootstrap servers; default "
                "kafka.bootstrap / BLUESTREAM_KAFKA_BOOTSTRAP.")] = None,
            quiet: QuietOpt = False, config: ConfigOpt = None) -> None:
    """Publish documents from files to Kafka in the bluesky-kafka wire format."""
    from bluestream.tools.publish import publish_files

    settings = _settings(config, bootstrap=bootstrap)
    progress = _progress("publish", None, "docs", quiet)
    try:
        report = anyio.run(lambda: publish_files(files, topic=topic, settings=settings,
                                                 progress=progress, on_reject=_report))
    except BluestreamError as exc:
        _fail(str(exc))
    typer.echo(report.summary(topic))
    if not report.ok:
        raise typer.Exit(1)


def ingest(files: Annotated[list[Path], typer.Argument(help="Document files (.jsonl or "
                                                       ".msgpack), stored in order.")],
           tenant: TenantOpt, metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
           batch_size: Annotated[int, typer.Option(min=1, help="Documents per write "
                                                   "batch.")] = 2000,
           quiet: QuietOpt = False, config: ConfigOpt = None) -> None:
    """Store documents from files directly (no Kafka), as the daemon would; idempotent."""
    from bluestream.tools.ingest import ingest_files

    tune_gc()
    settings = _settings(config, zarr_access="write", metadata=metadata, zarr_root=zarr_root)
    total = sum(p.stat().st_size for p in files if p.is_file())
    progress = _progress("ingest", total, "bytes", quiet)
    try:
        report = anyio.run(lambda: ingest_files(files, tenant=tenant, settings=settings,
                                                progress=progress, on_reject=_report,
                                                batch_records=batch_size))
    except BluestreamError as exc:
        _fail(str(exc))
    typer.echo(report.summary(f"ingested into tenant {tenant!r} from "))
    if not report.ok:
        raise typer.Exit(1)


def ingest_mongo(uri: Annotated[str, typer.Argument(help="MongoDB URI of the suitcase-mongo "
                                                    "database (may name the database).")],
                 tenant: TenantOpt,
                 database: Annotated[str | None, typer.Option(
                     "--database", "-d", help="Source database (run_start, event, ...); "
                     "default: the one in the URI.")] = None,
                 assets_database: Annotated[str | None, typer.Option(
                     help="Database with resource and datum, if separate.")] = None,
                 metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
                 quiet: QuietOpt = False, config: ConfigOpt = None) -> None:
    """Import runs from a suitcase-mongo "normalized" database; resumable, idempotent."""
    from bluestream.tools.ingest_mongo import ingest_mongo as _ingest_mongo

    tune_gc()
    settings = _settings(config, zarr_access="write", metadata=metadata, zarr_root=zarr_root)
    progress = _progress("ingest-mongo", None, "runs", quiet)
    try:
        report = anyio.run(lambda: _ingest_mongo(
            uri, database=database, assets_database=assets_database, tenant=tenant,
            settings=settings, progress=progress, on_reject=_report,
            on_warning=lambda m: typer.echo(f"warning: {m}", err=True)))
    except BluestreamError as exc:
        _fail(str(exc))
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


def export(tenant: TenantOpt,
           runs: Annotated[list[str] | None, typer.Argument(
               help="Runs: uid, uid prefix (>= 5 characters), scan_id, or -1 (newest).",
               show_default=False)] = None,
           fmt: Annotated[FileFormat, typer.Option("--format", "-f")] = FileFormat.jsonl,
           out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")
                          ] = Path("."),
           all_runs: Annotated[bool, typer.Option("--all", help="Export every run of the "
                                                  "tenant.")] = False,
           metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
           quiet: QuietOpt = False, config: ConfigOpt = None) -> None:
    """Write runs out as documents, one <uid>.jsonl / <uid>.msgpack file per run."""
    from bluestream.tools.export import export_runs

    unknown = [r for r in runs or [] if r.startswith("-") and not r[1:].isdigit()]
    if unknown:
        _fail(f"no such option: {unknown[0]} (see bluestream export --help)", 2)
    if not runs and not all_runs:
        _fail("name at least one RUN, or give --all", 2)
    settings = _settings(config, zarr_access="read", metadata=metadata, zarr_root=zarr_root)
    progress = _progress("export", None, "docs", quiet)

    def missing(key: str, why: str) -> None:
        typer.echo(f"error: {why}", err=True)

    try:
        report = anyio.run(lambda: export_runs(runs or [], tenant=tenant, settings=settings,
                                               fmt=fmt.value, out=out, all_runs=all_runs,
                                               progress=progress, on_missing=missing))
    except BluestreamError as exc:
        _fail(str(exc))
    for path in report.files:
        typer.echo(str(path))
    typer.echo(report.summary(), err=True)
    if not report.ok:
        raise typer.Exit(1)


def tiled(tenant: Annotated[list[str] | None, typer.Option(
              "--tenant", "-t", help="Serve this tenant (repeatable); default: every tenant "
              "of the metadata store, each a top-level container.")] = None,
          host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
          api_key: Annotated[str | None, typer.Option(
              "--api-key", help="Tiled's single-user API key (letters and digits); "
              "default: a random one, printed.", envvar="TILED_SINGLE_USER_API_KEY")] = None,
          public: Annotated[bool, typer.Option(
              "--public", help="Anonymous read-only access (no key needed to read).")
                            ] = False,
          compress_below: Annotated[float, typer.Option(
              "--compress-below", help="Compress an array or table response (blosc2, "
              "when the client accepts it) only if a sample of it shrinks below this "
              "share of its size. 0.5 pays on a 1 Gb/s link; 0.9 is Tiled's own rule "
              "(compress whenever it saves 10 %); 0 never compresses.")] = COMPRESS_BELOW,
          metadata: MetadataOpt = None, zarr_root: ZarrOpt = None,
          config: ConfigOpt = None) -> None:
    """Serve the stored runs through a stock Tiled server (needs the "tiled" extra).

    Clients: tiled.client.from_uri("http://HOST:PORT", api_key=KEY) with
    bluesky-tiled-plugins installed; c["csx"][-1]["primary"].read().
    """
    try:
        from bluestream.tiled.server import serve
    except ImportError as exc:
        _fail(f"bluestream tiled needs the Tiled server: pip install 'bluestream[tiled]' "
              f"({exc})", 2)
    settings = _settings(config, zarr_access="read", metadata=metadata, zarr_root=zarr_root)
    try:
        serve(host=host, port=port, say=lambda text: typer.echo(text, err=True),
              metadata=settings.storage.metadata, zarr_root=settings.storage.zarr_root,
              tenants=tenant or [], api_key=api_key, public=public,
              compress_below=compress_below, config=None if config is None else str(config))
    except ValueError as exc:
        _fail(str(exc), 2)


def demo(out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the embedded "
                                           "store and the plot.")] = Path("demo-output"),
         services: Annotated[bool, typer.Option(help="Start the local Kafka "
                                                "(scripts/services up) if none answers.")
                             ] = True,
         keep_services: Annotated[bool, typer.Option(help="Leave services the demo started "
                                                     "running.")] = False,
         timeout: Annotated[float, typer.Option(help="Seconds to wait for each stage.")
                            ] = 120.0,
         zarr_root: ZarrOpt = None,
         config: ConfigOpt = None) -> None:
    """Publish a few simulated runs through Kafka, store and read them back, plot them.

    The arrays go under OUT/zarr unless --zarr-root names another root (a directory, or
    s3://bucket/prefix: scripts/services serves s3://bluestream with the credentials
    bluestream / bluestream-secret, given as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    with AWS_ENDPOINT_URL=http://127.0.0.1:9000)."""
    from bluestream.tools.demo import DemoOptions, run_demo

    settings = _settings(config)
    configure_logging("console", "warning")
    # aiokafka logs transient errors of a broker that just started (no group coordinator
    # yet) at error level; the demo checks the outcome end to end instead.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    def say(text: str) -> None:
        print(text, flush=True)

    if zarr_root is not None:  # validated (and checked against the object store) first
        _settings(config, zarr_access="write", zarr_root=zarr_root)
    opts = DemoOptions(out=out, start_services=services, keep_services=keep_services,
                       timeout=timeout, say=say, zarr_root=zarr_root)
    try:
        anyio.run(run_demo, settings, opts)
    except BluestreamError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    """Add the tools' commands to ``app`` (the ``bluestream`` command)."""
    app.command("publish")(publish)
    app.command("ingest")(ingest)
    app.command("ingest-mongo")(ingest_mongo)
    # "-1" (the newest run) must reach RUNS instead of being taken for an option.
    app.command("export", context_settings={"ignore_unknown_options": True})(export)
    app.command("demo")(demo)
    app.command("tiled")(tiled)
