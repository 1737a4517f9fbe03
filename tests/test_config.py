"""Configuration errors: each bad key or value gives one line on stderr that names the
key and the problem, and exit status 2, for ``check-config`` and for ``serve`` alike
(in-process through the CLI, and as real processes for a few)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from bluestream.cli import app
from bluestream.settings import changed_keys, load_settings
from test_ops_support import daemon_env

#: (TOML text, text the error must contain)
BAD: dict[str, tuple[str, str]] = {
    "port-range": ("[http]\nport = 70000\n", "http.port: Input should be less than or equal"),
    "port-type": ("[http]\nport = \"eighty\"\n", "http.port: Input should be a valid integer"),
    "unknown-key": ("[kafka]\nbootstrapp = \"x:9092\"\n", "kafka.bootstrapp: unknown key"),
    "unknown-section": ("[kafak]\nbootstrap = \"x:9092\"\n", "kafak: unknown key"),
    "sasl-incomplete": ("[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\n",
                        "kafka.sasl_username: required when security_protocol is SASL_SSL"),
    "sasl-unused": ("[kafka]\nsasl_username = \"u\"\n",
                    "kafka.sasl_username: set, but security_protocol PLAINTEXT"),
    "ssl-missing-file": ("[kafka]\nsecurity_protocol = \"SSL\"\n"
                         "ssl_cafile = \"/nonexistent/ca.pem\"\n",
                         "kafka.ssl_cafile: file /nonexistent/ca.pem does not exist"),
    "protocol": ("[kafka]\nsecurity_protocol = \"TLS\"\n",
                 "kafka.security_protocol: Input should be"),
    "pattern-regex": ("[kafka]\ntopic_pattern = \"([\"\n",
                      "kafka.topic_pattern: not a valid regular expression"),
    "pattern-and-topics": ("[kafka]\ntopics = [\"a\"]\ntopic_pattern = \"b\"\n",
                           "kafka.topic_pattern: set together with topics"),
    "metadata-scheme": ("[storage]\nmetadata = \"postgres://db/x\"\n",
                        "storage.metadata: must start with mongodb://"),
    "mongo-uri": ("[storage]\nmetadata = \"mongodb://u:secret@host:99999\"\n",
                  "storage.metadata: not a valid MongoDB URI"),
    "log-level": ("[log]\nlevel = \"verbose\"\n", "log.level: Input should be 'debug'"),
    "negative-age": ("[limits]\npark_max_age_s = -1\n",
                     "limits.park_max_age_s: Input should be greater"),
    "commit-timeout": ("[kafka]\ncommit_timeout_s = 0\n",
                       "kafka.commit_timeout_s: Input should be greater"),
    "tenant-name": ("[tenants]\n\"a.b\" = \"no spaces\"\n", "tenants: tenant 'no spaces'"),
    "backoff": ("retry_backoff_max_s = 0.1\n", "retry_backoff_max_s: Input should be greater"),
    "not-toml": ("[kafka\nbootstrap = 1\n", "is not valid TOML"),
}
runner = CliRunner()


def _one_line_error(output: str, expected: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    assert expected in lines[0], output


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_the_key(case: str, command: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("BLUESTREAM_")]:
        monkeypatch.delenv(var)
    text, expected = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = runner.invoke(app, [command, "-c", str(path)])
    assert result.exit_code == 2, result.output
    _one_line_error(result.stderr, expected)
    assert "secret" not in result.stderr


def test_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-config"], env={"BLUESTREAM_HTTP_PORT": "abc"})
    assert result.exit_code == 2
    _one_line_error(result.stderr, "http.port: Input should be a valid integer, unable to "
                    "parse string as an integer (got 'abc') (from BLUESTREAM_HTTP_PORT)")


def test_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-config", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    _one_line_error(result.stderr, "nope.toml does not exist")


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bluestream", *args], env=env, text=True,
                          capture_output=True, timeout=120, check=False)


def test_real_processes_exit_2(tmp_path: Path) -> None:
    """``python -m bluestream check-config|serve -c bad.toml``, and problems ``serve``
    finds at start (a Zarr root that cannot exist, an HTTP port in use)."""
    env = daemon_env()
    jobs: list[tuple[list[str], str]] = []
    for case in ("port-range", "unknown-key", "sasl-incomplete"):
        text, expected = BAD[case]
        path = tmp_path / f"{case}.toml"
        path.write_text(text)
        jobs += [(["check-config", "-c", str(path)], expected),
                 (["serve", "-c", str(path)], expected)]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    zarr_bad = tmp_path / "zarr-bad.toml"
    zarr_bad.write_text(f"[storage]\nzarr_root = \"{blocker}/zarr\"\n"
                        f"metadata = \"sqlite:///{tmp_path}/m.db\"\n[http]\nenabled = false\n")
    jobs.append((["serve", "-c", str(zarr_bad)],
                 f"storage.zarr_root: cannot create {blocker}/zarr"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        port_bad = tmp_path / "port-bad.toml"
        port_bad.write_text(f"[storage]\nzarr_root = \"{tmp_path}/zarr\"\n"
                            f"metadata = \"sqlite:///{tmp_path}/m.db\"\n[http]\nport = {port}\n")
        jobs.append((["serve", "-c", str(port_bad)],
                     f"http.bind/http.port: cannot listen on 127.0.0.1:{port}"))
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda job: _run(job[0], env), jobs))
    for (args, expected), done in zip(jobs, results, strict=True):
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        _one_line_error(done.stderr, expected)


def test_good_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "good.toml"
    path.write_text(
        "[kafka]\nbootstrap = \"k1:9093,k2:9093\"\nsecurity_protocol = \"SASL_SSL\"\n"
        f"sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"bs\"\nssl_cafile = \"{ca}\"\n"
        "[storage]\nmetadata = \"mongodb://bs:pw@m1,m2/?replicaSet=rs0&tls=true\"\n")
    result = runner.invoke(app, ["check-config", "-c", str(path)],
                           env={"BLUESTREAM_KAFKA_SASL_PASSWORD": "hunter2",
                                "BLUESTREAM_GROUP_ID": "from-env"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kafka"]["sasl_password"] == "***"
    assert data["kafka"]["group_id"] == "from-env"
    assert data["storage"]["metadata"] == "mongodb://bs:***@m1,m2/?replicaSet=rs0&tls=true"
    assert "hunter2" not in result.stdout and ":pw@" not in result.stdout


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "bluestream.toml"
    settings = load_settings(example, environ={})
    assert settings.kafka.topics


def test_changed_keys_sees_secrets_and_tenants() -> None:
    a = load_settings(None, environ={})
    b = load_settings(None, environ={"BLUESTREAM_LOG_LEVEL": "debug",
                                     "BLUESTREAM_GROUP_ID": "other"})
    assert changed_keys(a, b) == ["kafka.group_id", "log.level"]
    assert changed_keys(a, a) == []


def test_kafka_security_reaches_the_clients(tmp_path: Path) -> None:
    """SASL/SCRAM over TLS with a CA and a client certificate: the options every client
    gets (consumer, dead-letter producer, dlq tool) carry them."""
    import ssl

    from aiokafka import AIOKafkaConsumer

    from bluestream.consumers.kafka_clients import kafka_client_options

    ca, cert, key = _self_signed(tmp_path)
    settings = load_settings(None, environ={
        "BLUESTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "BLUESTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "BLUESTREAM_KAFKA_SASL_USERNAME": "bs", "BLUESTREAM_KAFKA_SASL_PASSWORD": "pw",
        "BLUESTREAM_KAFKA_SSL_CAFILE": str(ca), "BLUESTREAM_KAFKA_SSL_CERTFILE": str(cert),
        "BLUESTREAM_KAFKA_SSL_KEYFILE": str(key)})
    opts = kafka_client_options(settings.kafka)
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("bs", "pw")
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED

    async def construct() -> None:  # the client accepts them (no connection is made)
        await AIOKafkaConsumer(**opts, group_id="g").stop()
    anyio.run(construct)


def _self_signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA certificate and key, made with openssl (skip without it)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=bluestream-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, cert, key
