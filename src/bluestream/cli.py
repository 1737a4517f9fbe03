"""The ``bluestream`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bluestream._version import __version__
from bluestream.daemon.logs import configure_logging
from bluestream.daemon.ops_cli import register as _register_ops
from bluestream.errors import ConfigError
from bluestream.settings import load_settings
from bluestream.tools.commands import check_zarr_access
from bluestream.tools.commands import register as _register_tools
from bluestream.tools.inspect_cli import register as _register_inspect
from bluestream.tools.manage_cli import register as _register_manage

__all__ = ["app", "main"]

app = typer.Typer(
    help="bluestream: ingest Bluesky documents from Kafka into MongoDB/SQLite + Zarr, "
    "and read them back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file; BLUESTREAM_* environment "
                 "variables override it.", envvar="BLUESTREAM_CONFIG"),
]


def _settings_or_exit(config: Path | None):  # type: ignore[no-untyped-def]
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the bluestream version."""
    typer.echo(__version__)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the ingestion daemon until SIGTERM/SIGINT (SIGHUP reloads the configuration).

    Exit status 2 when the configuration is invalid (the message names the key).
    """
    from bluestream.daemon.service import run_daemon

    settings = _settings_or_exit(config)
    configure_logging(settings.log.format, settings.log.level)
    raise typer.Exit(run_daemon(settings, config))


@app.command("check-config")
def check_config(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(
        metavar="FILE", help="TOML configuration file (the same as -c FILE).",
        show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Validate the configuration and print the effective settings (secrets masked).

    FILE and -c FILE are the same; giving both, naming different files, is an error.
    An s3:// Zarr root is also checked against the object store (the bucket exists, the
    credentials are accepted); exit status 2 when it is not.
    """
    source = ctx.get_parameter_source("config")  # typer's own click: compare by name
    from_env = source is not None and source.name == "ENVIRONMENT"
    if file is not None and config is not None and not from_env and \
            file.resolve() != config.resolve():
        raise typer.BadParameter(f"FILE {file} and --config {config} name different files; "
                                 "give one of them", param_hint="FILE / --config")
    # FILE wins over BLUESTREAM_CONFIG, as -c does.
    settings = _settings_or_exit(file if file is not None else config)
    check_zarr_access(settings, "read")
    typer.echo(json.dumps(settings.masked(), indent=2, default=str))


# publish, ingest, ingest-mongo, export, demo (bluestream.tools)
_register_tools(app)
_register_manage(app)
# status, dlq list|show|replay (operations)
_register_ops(app)
# verify, du; status --tenant (replaces the daemon-only status registered above)
_register_inspect(app)


def main() -> None:
    app()
