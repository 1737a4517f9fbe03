"""Operator commands: ``status`` (ask a running daemon) and ``dlq list|show|replay``.

Kept out of ``cli.py`` so the main command module stays a list of commands;
:func:`register` adds these to the application. The Kafka tooling is imported when a
``dlq`` command runs, so ``bluestream --help`` and ``status`` start fast.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import typer

from bluestream.errors import ConfigError
from bluestream.settings import Settings, load_settings

if TYPE_CHECKING:
    from bluestream.daemon.dlq_tool import DeadLetter

__all__ = ["dlq_app", "register", "status"]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (for Kafka connection and "
                 "security, or the daemon's HTTP address); BLUESTREAM_* environment "
                 "variables override it.", envvar="BLUESTREAM_CONFIG"),
]
TopicArg = Annotated[str, typer.Argument(
    help="Source topic (its dead-letter topic is <topic><kafka.dlq_suffix>) or the "
         "dead-letter topic itself.")]
PartitionOpt = Annotated[int | None, typer.Option(
    "--partition", "-p", help="Only this partition of the dead-letter topic.")]

EXIT_NOT_READY = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


# -- status -------------------------------------------------------------------------------

def status(
    config: ConfigOpt = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="The daemon's HTTP address, e.g. http://127.0.0.1:8520 (default: "
        "http.url_file if the daemon writes one, else http.bind and http.port of the "
        "configuration).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 5.0,
) -> None:
    """Ask a running daemon how it is: readiness, partitions, lag, counters, open runs.

    Exit status: 0 ready, 1 running but not ready, 2 configuration error, 3 no daemon answers.
    """
    base = (url or _url_from_config(_settings(config))).rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/status", timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        typer.echo(f"error: no bluestream daemon answers at {base}: {why}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    typer.echo(json.dumps(data, indent=2) if as_json else _format_status(base, data))
    raise typer.Exit(0 if data.get("ready") else EXIT_NOT_READY)


def _url_from_config(s: Settings) -> str:
    h = s.http
    if h.url_file is not None and h.url_file.is_file():
        return h.url_file.read_text(encoding="utf-8").strip()
    if not h.enabled:
        typer.echo("error: http.enabled is false in this configuration: the daemon serves "
                   "no status", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if h.port == 0:
        typer.echo("error: http.port is 0 (a free port chosen at start): pass --url (the "
                   "daemon logs it as 'http listening') or set http.url_file", err=True)
        raise typer.Exit(EXIT_CONFIG)
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(h.bind, h.bind)
    return f"http://{host}:{h.port}"


def _format_status(base: str, d: dict[str, Any]) -> str:
    up = int(d.get("uptime_s", 0))
    head = f"bluestream {d.get('version')} at {base}, up {up // 3600}h{up % 3600 // 60:02d}m: "
    lines = [head + ("READY" if d.get("ready") else "NOT READY")]
    lines += [f"  - {r}" for r in d.get("not_ready", [])]
    assigned = d.get("assigned", [])
    lines.append(f"group {d.get('group')}: {len(assigned)} partitions assigned")
    lag, committed = d.get("lag", {}), d.get("committed", {})
    if assigned:
        width = max(len(a) for a in assigned)
        lines.append(f"  {'partition':<{width}}  {'committed':>10}  {'lag':>8}")
        lines += [f"  {a:<{width}}  {committed.get(a, '-')!s:>10}  {lag.get(a, '-')!s:>8}"
                  for a in assigned]
    for name, c in d.get("checks", {}).items():
        lines.append(f"check {name}: " + ("ok" if c.get("ok") else f"FAILING: {c.get('error')}"))
    counters = d.get("counters", {})
    for name in ("documents", "events", "dead_lettered", "errors"):
        if counters.get(name):
            parts = ", ".join(f"{k or 'all'}={v:g}" for k, v in sorted(counters[name].items()))
            lines.append(f"{name}: {parts}")
    runs = d.get("open_runs", [])
    lines.append(f"open runs: {len(runs)}" + (f" ({', '.join(runs[:10])}"
                                               f"{', ...' if len(runs) > 10 else ''})"
                                               if runs else ""))
    if d.get("parked"):
        lines.append(f"parked documents: {d['parked']}")
    if d.get("last_error"):
        lines.append(f"last error: {d['last_error']}")
    return "\n".join(lines)


# -- dlq ----------------------------------------------------------------------------------

dlq_app = typer.Typer(
    help="Inspect the dead-letter topic <topic>.dlq and replay records after a fix.",
    no_args_is_help=True)


def _read(settings: Settings, topic: str, partition: int | None,
          select: dict[int, set[int]] | None = None) -> list[DeadLetter]:
    from bluestream.daemon.dlq_tool import DlqError, dlq_topic_for, read_dead_letters

    dlq = dlq_topic_for(topic, settings.kafka.dlq_suffix)
    try:
        return anyio.run(lambda: read_dead_letters(settings, dlq, partition=partition,
                                                   select=select))
    except DlqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _parse_offsets(values: list[str], partition: int | None) -> dict[int, set[int]]:
    """``OFFSET`` (in ``--partition``, default 0) or ``PARTITION:OFFSET``."""
    out: dict[int, set[int]] = {}
    for v in values:
        p_text, _, o_text = v.rpartition(":")
        try:
            p = int(p_text) if p_text else (partition or 0)
            o = int(o_text)
        except ValueError:
            raise typer.BadParameter(f"{v!r}: expected OFFSET or PARTITION:OFFSET",
                                     param_hint="--offset / OFFSET") from None
        out.setdefault(p, set()).add(o)
    return out


@dlq_app.command("list")
def dlq_list(
    topic: TopicArg,
    config: ConfigOpt = None,
    partition: PartitionOpt = None,
    reason: Annotated[list[str] | None, typer.Option(
        "--reason", "-r", help="Only records with this reason (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    copies: Annotated[bool, typer.Option(
        "--copies", help="Show every copy of a source record dead-lettered more than once "
        "(a batch retried after an outage sends its rejects again).")] = False,
) -> None:
    """List dead letters: partition:offset, time, reason, source record, size, error.

    Each source record is listed once (its newest dead letter) unless --copies."""
    from bluestream.daemon.dlq_tool import summary_line, unique_by_source

    settings = _settings(config)
    letters = [d for d in _read(settings, topic, partition)
               if not reason or d.reason in reason]
    hidden = 0
    if not copies:
        letters, hidden = unique_by_source(letters)
    if as_json:
        for d in letters:
            typer.echo(json.dumps(d.as_dict()))
        return
    width = max(20, shutil.get_terminal_size((160, 20)).columns - 110)
    typer.echo(f"{'P:OFFSET':<10} {'TIME':<21} {'REASON':<22} {'SOURCE':<48} {'BYTES':>9}  ERROR")
    for d in letters:
        typer.echo(summary_line(d, width))
    reasons: dict[str, int] = {}
    for d in letters:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    typer.echo(f"{len(letters)} dead letters" + (": " + ", ".join(
        f"{r} {n}" for r, n in sorted(reasons.items())) if reasons else "")
        + (f" ({hidden} repeated copies not shown; --copies shows them)" if hidden else ""))


@dlq_app.command("show")
def dlq_show(
    topic: TopicArg,
    offset: Annotated[str, typer.Argument(help="OFFSET or PARTITION:OFFSET of the record.")],
    config: ConfigOpt = None,
    partition: PartitionOpt = None,
) -> None:
    """Show one dead letter: headers (the full error) and the decoded document.

    A value that does not decode is shown as its first bytes.
    """
    from bluestream.daemon.dlq_tool import dlq_topic_for, show_text

    settings = _settings(config)
    select = _parse_offsets([offset], partition)
    letters = _read(settings, topic, None, select)
    if not letters:
        typer.echo(f"error: no record at {offset} in "
                   f"{dlq_topic_for(topic, settings.kafka.dlq_suffix)}", err=True)
        raise typer.Exit(1)
    typer.echo(show_text(letters[0], settings.limits.max_message_bytes))


@dlq_app.command("replay")
def dlq_replay(
    topic: TopicArg,
    offsets: Annotated[list[str] | None, typer.Option(
        "--offset", "-o", help="OFFSET or PARTITION:OFFSET to replay (repeatable).")] = None,
    replay_all: Annotated[bool, typer.Option(
        "--all", help="Replay every dead letter (narrowed by --reason / --partition).")] = False,
    reason: Annotated[list[str] | None, typer.Option(
        "--reason", "-r", help="Only records with this reason (repeatable).")] = None,
    config: ConfigOpt = None,
    partition: PartitionOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be replayed; "
                                          "publish nothing.")] = False,
) -> None:
    """Re-publish dead letters to their source topic, after the cause was fixed.

    Same key and headers, plus dlq-replay-of. Replaying twice is harmless: ingestion is
    idempotent. Records whose value was too large for the DLQ are fetched from the
    source topic while its retention keeps them.
    """
    from bluestream.daemon.dlq_tool import DlqError, replay, unique_by_source
    if bool(offsets) == replay_all:
        raise typer.BadParameter("give --offset (repeatable) or --all, not both",
                                 param_hint="--offset / --all")
    settings = _settings(config)
    select = _parse_offsets(offsets, partition) if offsets else None
    letters = [d for d in _read(settings, topic, partition if select is None else None,
                                select)
               if not reason or d.reason in reason]
    if select is None:
        letters, _ = unique_by_source(letters)  # each source record once
    else:
        found = {(d.partition, d.offset) for d in letters}
        for p, offs in sorted(select.items()):
            for o in sorted(offs):
                if (p, o) not in found:
                    typer.echo(f"warning: no (matching) record at {p}:{o}", err=True)
    try:
        result = anyio.run(lambda: replay(settings, letters, dry_run=dry_run))
    except DlqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for d, where in result.replayed:
        typer.echo(f"replayed {d.partition}:{d.offset} ({d.reason}) -> {where}")
    for d, why in result.failed:
        typer.echo(f"FAILED {d.partition}:{d.offset} ({d.reason}): {why}", err=True)
    typer.echo(f"{len(result.replayed)} replayed{' (dry run)' if dry_run else ''}, "
               f"{len(result.failed)} failed")
    raise typer.Exit(1 if result.failed else 0)


def register(app: typer.Typer) -> None:
    """Add ``status`` and ``dlq`` to the ``bluestream`` application."""
    app.command("status")(status)
    app.add_typer(dlq_app, name="dlq")
