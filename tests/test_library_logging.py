"""bluestream as a library prints nothing: its log calls go to the standard ``logging``
module under ``bluestream.*`` names (so only warnings reach stderr, through Python's
last-resort handler) until the application configures logging; the daemon's
``configure_logging`` still gives JSON lines with the bound context; an application's
own structlog configuration is used as it is, never replaced.

Every case runs in a fresh interpreter, because logging and structlog configuration is
process-wide and other tests in this session configure it.

How it was checked that these fail without the fix: run against the tree before it
(``PYTHONPATH`` pointing at a copy of ``src`` without ``bluestream.log``, the modules calling
``structlog.get_logger`` again), opening a catalog on MongoDB printed ``[debug] mongo
store opened ...`` on stdout (structlog's unconfigured default), so
``test_opening_a_catalog_prints_nothing[mongo]`` failed on stdout and both
``test_debug_lines_go_to_the_standard_logging`` cases found no line on stderr; the cases
using ``bluestream.log`` failed at its import, and the static check listed the seven modules
that called ``structlog.get_logger`` themselves. The SQLite case (it logs nothing) and the
application's-own-structlog case passed before too: they guard against a fix that prints
elsewhere or configures structlog behind the application's back.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import anyio
import pytest

from helpers import scalar_run
from test_catalog_support import ingest, metadata_uri_fixture  # noqa: F401  (fixture)
from test_ops_support import daemon_env

SRC = Path(__file__).resolve().parents[1] / "src" / "bluestream"
BYPASS = re.compile(r"structlog\.(get_logger|getLogger)\(|"
                    r"^from structlog import .*\b(get_logger|getLogger)\b", re.MULTILINE)

#: Opens the catalog given on the command line and checks it holds the one run stored;
#: ``{setup}`` is what the application did before (configure logging, or nothing).
OPEN = """\
import sys
{setup}
import bluestream
tenant, metadata, zarr_root = sys.argv[1:4]
with bluestream.open_catalog(tenant, metadata=metadata, zarr_root=zarr_root) as cat:
    uids = list(cat)
    assert len(uids) == 1, uids
    cat[uids[0]]
{after}
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=daemon_env(), text=True,
                          capture_output=True, timeout=120, check=False)


@pytest.fixture(name="stored")
def stored_fixture(metadata_uri: str, zarr_root: Path, tenant: str) -> tuple[str, str, str]:
    """One run written the way the daemon writes it: (tenant, metadata URI, Zarr root)."""
    anyio.run(partial(ingest, metadata_uri, zarr_root, tenant, scalar_run(3)))
    return tenant, metadata_uri, str(zarr_root)


def _open(stored: tuple[str, str, str], setup: str = "",
          after: str = "") -> subprocess.CompletedProcess[str]:
    done = _python(OPEN.format(setup=setup, after=after), *stored)
    assert done.returncode == 0, done.stderr
    return done


def test_opening_a_catalog_prints_nothing(stored: tuple[str, str, str]) -> None:
    done = _open(stored)
    assert done.stdout == ""
    assert done.stderr == ""


@pytest.mark.mongo
@pytest.mark.parametrize(("setup", "others_shown"), [
    ("import logging\nlogging.basicConfig(level=logging.DEBUG)", True),
    ("import logging\nlogging.basicConfig()\n"
     "logging.getLogger('bluestream').setLevel(logging.DEBUG)", False),
], ids=["basicConfig-debug", "bluestream-logger-debug"])
@pytest.mark.parametrize("metadata_uri", ["mongo"], indirect=True)
def test_debug_lines_go_to_the_standard_logging(stored: tuple[str, str, str], setup: str,
                                                others_shown: bool) -> None:
    """The application turns them on the usual ways: for everything, or for bluestream
    alone; the key-value pairs are in the message."""
    tenant = stored[0]
    done = _open(stored, setup)
    assert done.stdout == ""
    lines = [ln for ln in done.stderr.splitlines()
             if ln.startswith("DEBUG:bluestream.storage.mongo:mongo store opened")]
    assert len(lines) == 1, done.stderr
    assert f"tenant='{tenant}'" in lines[0] and "readonly=True" in lines[0]
    assert ("DEBUG:pymongo" in done.stderr) is others_shown, done.stderr


@pytest.mark.mongo
@pytest.mark.parametrize("metadata_uri", ["mongo"], indirect=True)
def test_an_applications_structlog_configuration_is_used_not_replaced(
        stored: tuple[str, str, str]) -> None:
    setup = ("import structlog\nfrom structlog.testing import LogCapture\ncap = LogCapture()\n"
             "structlog.configure(processors=[cap])\nbefore = structlog.get_config()")
    after = ("assert structlog.get_config() == before\n"
             "opened = [e for e in cap.entries if e['event'] == 'mongo store opened']\n"
             "assert len(opened) == 1 and opened[0]['log_level'] == 'debug', cap.entries\n"
             "assert opened[0]['tenant'] == tenant, opened")
    done = _open(stored, setup, after)
    assert done.stdout == "" and done.stderr == ""


def test_standard_logging_gets_context_exceptions_and_bound_values() -> None:
    code = """\
import logging, structlog
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from bluestream.log import get_logger
log = get_logger("bluestream.example")
with structlog.contextvars.bound_contextvars(topic="raw.docs"):
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("store failed", tenant="csx")
log.debug("not shown")
log.bind(run="r1").warning("parked", count=2)
"""
    done = _python(code)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "ERROR bluestream.example store failed tenant='csx' topic='raw.docs'"
    assert "Traceback" in lines[1] and lines[-2] == "ZeroDivisionError: division by zero"
    assert lines[-1] == "WARNING bluestream.example parked run='r1' count=2"
    assert "not shown" not in done.stderr


def test_only_warnings_reach_stderr_when_nothing_is_configured() -> None:
    code = """\
from bluestream.log import get_logger
log = get_logger("bluestream.example")
log.debug("d")
log.info("i", k=1)
log.warning("w", k=2)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == "w k=2\n"  # Python's last-resort handler: the message alone


def test_the_daemon_logs_json_lines_with_the_bound_context() -> None:
    code = """\
import logging, structlog
from bluestream.daemon.logs import configure_logging
from bluestream.log import get_logger
configure_logging("json", "debug")
log = get_logger("bluestream.example")
with structlog.contextvars.bound_contextvars(topic="raw.docs", partition=3):
    log.debug("batch", n=5)
configure_logging("json", "info")  # SIGHUP with a new level
log.debug("hidden")
log.info("shown")
logging.getLogger("aiokafka").warning("broker %s down", "k1")
"""
    done = _python(code)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in lines] == ["batch", "shown", "broker k1 down"]
    batch = lines[0]
    assert (batch["n"], batch["topic"], batch["partition"], batch["level"]) == \
        (5, "raw.docs", 3, "debug")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", batch["timestamp"])
    assert lines[2]["logger"] == "aiokafka" and lines[2]["level"] == "warning"


def test_no_module_bypasses_the_helper() -> None:
    """A module calling ``structlog.get_logger`` itself would print to stdout again."""
    offenders = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))
                 if p.name != "log.py" and BYPASS.search(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders
