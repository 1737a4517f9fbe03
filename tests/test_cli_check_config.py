"""``bluestream check-config FILE``, the form people type (as ``promtool check config
FILE``), does what ``check-config -c FILE`` does; both at once must agree. Run as real
processes (``python -m bluestream``), as an operator runs it.

How it was checked that these fail without the fix: run against a copy of ``src`` with
the previous ``daemon/cli.py`` (``PYTHONPATH`` first), every case exited 2 with typer's
"Got unexpected extra argument(s)" and no settings: the valid-file cases failed on the exit
status, the invalid-file cases on the message not naming the key, the two-files case on the
message not saying the files differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_ops_support import daemon_env

GOOD = ("[kafka]\nbootstrap = \"k1:9093\"\n"
        "[storage]\nmetadata = \"mongodb://bs:p%40ss@m1:27017/?tls=true\"\n")


def _check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bluestream", "check-config", *args],
                          env=daemon_env(COLUMNS="200", **env), text=True,
                          capture_output=True, timeout=120, check=False)


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(name="good")
def good_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    return path


def test_file_argument_prints_the_masked_settings(good: Path) -> None:
    done = _check(str(good))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["kafka"]["bootstrap"] == "k1:9093"
    assert data["storage"]["metadata"] == "mongodb://bs:***@m1:27017/?tls=true"
    assert "ss@" not in done.stdout + done.stderr


def test_file_argument_and_option_agree(good: Path) -> None:
    by_option = _check("-c", str(good))
    by_argument = _check(str(good))
    assert by_option.returncode == by_argument.returncode == 0, by_argument.stderr
    assert by_option.stdout == by_argument.stdout


@pytest.mark.parametrize(("text", "expected"), [
    ("[kafka]\nbootstrapp = \"x:9092\"\n", "kafka.bootstrapp: unknown key"),
    ("[http]\nport = 70000\n", "http.port: Input should be less than or equal"),
    # An unescaped '@' in the password: invalid, and the message still masks it.
    ("[storage]\nmetadata = \"mongodb://bs:p@ss@m1:27017/?tls=true\"\n",
     "storage.metadata: not a valid MongoDB URI"),
], ids=["unknown-key", "port-range", "unescaped-password"])
def test_invalid_file_argument_exits_2_naming_the_key(tmp_path: Path, text: str,
                                                      expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = _check(str(path))
    assert done.returncode == 2, done.stderr
    assert expected in _error_line(done)
    assert "ss@" not in done.stdout + done.stderr
    assert done.stdout == ""


def test_missing_file_argument_exits_2(tmp_path: Path) -> None:
    done = _check(str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "nope.toml does not exist" in _error_line(done)


def test_two_different_files_is_a_usage_error(good: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(GOOD)
    done = _check(str(good), "-c", str(other))
    assert done.returncode == 2
    assert "different files" in done.stderr and done.stdout == ""


def test_the_same_file_twice_is_fine(good: Path) -> None:
    """Spelled differently (relative and absolute), it is still one file."""
    done = subprocess.run([sys.executable, "-m", "bluestream", "check-config", good.name,
                           "--config", str(good)], env=daemon_env(), cwd=good.parent,
                          text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kafka"]["bootstrap"] == "k1:9093"


def test_file_argument_wins_over_the_environment(good: Path, tmp_path: Path) -> None:
    """BLUESTREAM_CONFIG is a default, like the option it fills; an explicit FILE wins."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka]\nbootstrapp = \"x:9092\"\n")
    done = _check(str(good), BLUESTREAM_CONFIG=str(bad))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kafka"]["bootstrap"] == "k1:9093"
