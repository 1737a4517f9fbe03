"""The shipped systemd unit: ``systemd-analyze verify`` finds nothing to complain about,
the hardening scores well with ``systemd-analyze security``, and the settings the
daemon's notify support depends on are there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "bluestream@.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's bluestream (verify checks
    that the executable exists)."""
    exe = Path(sys.executable).with_name("bluestream")
    assert exe.exists(), exe
    text = UNIT.read_text().replace("/opt/bluestream/venv/bin/bluestream", str(exe))
    (tmp_path / UNIT.name).write_text(text)
    return tmp_path


@needs_analyze
def test_unit_verifies_cleanly(unit_dir: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "verify", str(unit_dir / "bluestream@csx.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


@needs_analyze
def test_unit_is_hardened(unit_dir: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager",
                           str(unit_dir / "bluestream@csx.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot score units offline: {done.stderr[-300:]}")
    assert float(m.group(1)) <= 2.0, done.stdout


def test_unit_speaks_the_notify_protocol() -> None:
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"].endswith("s")
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["RestartPreventExitStatus"] == "2"  # invalid configuration
    # The daemon's own shutdown deadline fits within the stop timeout.
    assert int(settings["TimeoutStopSec"].rstrip("s")) > 30
