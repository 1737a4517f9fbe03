"""The settings of every bluestream command, daemon and catalog: one typed model,
read from a TOML file, then ``BLUESTREAM_*`` environment overrides.

Errors name the key (``kafka.bootstrap``) and the problem, so an operator can fix the
file without reading code. Environment variables are flat aliases for the settings an
operator most often changes per host (see :data:`ENV_KEYS`).

MongoDB authentication and TLS are not separate settings: they travel in the URI
(``mongodb://user:pass@host/?authSource=admin&tls=true&tlsCAFile=/etc/ssl/ca.pem``),
exactly as every MongoDB tool takes them; the password is masked wherever the URI is
shown. Kafka security has its own keys (``kafka.security_protocol`` and friends).

On SIGHUP the daemon re-reads the file and the environment; :data:`RELOADABLE` keys take
effect at once, any other change is logged as needing a restart (:func:`changed_keys`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from bluestream.errors import ConfigError
from bluestream.limits import Limits
from bluestream.storage.backends import check_metadata_uri
from bluestream.storage.rules import mask_uri
from bluestream.storage.zarr_root import S3Options, ZarrRoot, check_root_value

__all__ = ["ENV_KEYS", "RELOADABLE", "Settings", "changed_keys", "load_settings"]

DEFAULT_TOPIC_PATTERN = r"^.*bluesky\.runengine\.documents$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap: str = "127.0.0.1:9092"
    topics: list[str] = Field(default_factory=list)
    topic_pattern: str | None = None
    group_id: str = "bluestream"
    client_id: str = "bluestream"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    dlq_suffix: str = ".dlq"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    session_timeout_ms: int = Field(default=30_000, ge=6_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    #: An offset commit that takes longer counts as a Kafka outage (abandon and retry).
    commit_timeout_s: float = Field(default=15.0, gt=0)

    @field_validator("topic_pattern")
    @classmethod
    def _pattern_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _readable_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file {v} does not exist (or is not a regular file)")
        return v

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaSettings:
        # Messages start with the key so that errors read "kafka.<key>: <problem>".
        proto = self.security_protocol
        if proto.startswith("SASL"):
            for key in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if not getattr(self, key):
                    raise ValueError(f"{key}: required when security_protocol is {proto}")
        else:
            for key in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: set, but security_protocol {proto} does not use "
                                     "SASL (use SASL_SSL or SASL_PLAINTEXT)")
        if not proto.endswith("SSL"):
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: set, but security_protocol {proto} does not use "
                                     "TLS (use SSL or SASL_SSL)")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_certfile: required when ssl_keyfile is set")
        if self.topics and self.topic_pattern:
            raise ValueError("topic_pattern: set together with topics; use one of them")
        if any(not t.strip() for t in self.topics):
            raise ValueError("topics: contains an empty topic name")
        return self

    def effective_pattern(self) -> str | None:
        """The regex to subscribe with, or None when an explicit topic list is given."""
        if self.topics:
            return None
        return self.topic_pattern or DEFAULT_TOPIC_PATTERN


class S3Settings(_Section):
    """The object store of an ``s3://`` Zarr root. Unset keys come from the standard
    variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``)."""

    #: ``http(s)://host:port`` of an S3-compatible server (MinIO, Ceph RGW, S3Proxy);
    #: unset: AWS itself.
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/\s]+/?$", v):
            raise ValueError("must be http://host:port or https://host[:port]")
        return v

    def options(self) -> S3Options:
        secret = self.secret_access_key
        return S3Options(endpoint=self.endpoint, region=self.region,
                         access_key_id=self.access_key_id,
                         secret_access_key=secret.get_secret_value() if secret else None)


class StorageSettings(_Section):
    #: ``mongodb://...`` or ``sqlite:///path``; the embedded SQLite store is the default.
    metadata: str = "sqlite:///data/bluestream.db"
    #: A local directory, or ``s3://bucket/prefix`` on an S3-compatible object store
    #: (see ``[storage.s3]``).
    zarr_root: str = "data/zarr"
    s3: S3Settings = S3Settings()
    #: fsync the Zarr files written by a batch, and their directories, before its
    #: metadata and offset commit (once per batch). false trades power-loss durability
    #: for speed; a process crash is still safe (the page cache survives it).
    fsync: bool = True
    #: A stream's newest rows, up to this many (one block), are kept in the metadata
    #: store and move to the Zarr arrays a block at a time: a live batch or a short run
    #: writes one record instead of a file per array. 0 writes every row to Zarr at once.
    tail_rows: int = Field(default=256, ge=0, le=65_536)
    mongo_server_selection_timeout_ms: int = Field(default=5_000, ge=100)

    @field_validator("metadata")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        return check_metadata_uri(v)

    @field_validator("zarr_root", mode="before")
    @classmethod
    def _root(cls, v: Any) -> Any:
        return check_root_value(os.fspath(v)) if isinstance(v, str | os.PathLike) else v

    def zarr(self) -> ZarrRoot:
        """The Zarr root, with the object store's options when it is ``s3://``."""
        return ZarrRoot.parse(self.zarr_root, self.s3.options())


class LimitSettings(_Section):
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_shape_elements: int = Field(default=64 * 1024 * 1024, ge=1)
    max_seq_num: int = Field(default=100_000_000, ge=1)
    max_page_events: int = Field(default=100_000, ge=1)
    max_data_keys: int = Field(default=10_000, ge=1)
    park_max_count: int = Field(default=10_000, ge=0)
    park_max_age_s: float = Field(default=60.0, gt=0)
    park_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    #: Most records fetched and written as one batch (and one commit).
    batch_max_records: int = Field(default=20_000, ge=1)
    #: Most message bytes held in one batch; bounds memory with large images.
    batch_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: Most events (a page counts its rows) in one batch: bounds the decoded size when
    #: messages are event pages, which are small on the wire and large once decoded.
    #: The record count of the next fetch follows from the events per record seen.
    batch_max_events: int = Field(default=20_000, ge=1)

    def limits(self) -> Limits:
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_shape_elements=self.max_shape_elements,
            max_seq_num=self.max_seq_num,
            max_page_events=self.max_page_events,
            max_data_keys=self.max_data_keys,
        )


class HttpSettings(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    #: 0 picks a free port; the daemon logs it and writes it to ``url_file``.
    port: int = Field(default=8520, ge=0, le=65535)
    #: Where the daemon writes its ``http://host:port`` at start (read by ``status -c``).
    url_file: Path | None = None


class LogSettings(_Section):
    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    summary_interval_s: float = Field(default=60.0, gt=0)


class Settings(_Section):
    kafka: KafkaSettings = KafkaSettings()
    storage: StorageSettings = StorageSettings()
    limits: LimitSettings = LimitSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    #: Topic -> tenant. Unlisted topics map to their first dotted component.
    tenants: dict[str, str] = Field(default_factory=dict)
    #: Seconds between offset commits at most (a commit also follows every written batch).
    commit_interval_s: float = Field(default=1.0, gt=0)
    #: Seconds allowed for flushing and committing on SIGTERM.
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    #: Longest wait between retries after a Kafka or store outage (backoff doubles up
    #: to this from 0.5 s).
    retry_backoff_max_s: float = Field(default=30.0, ge=0.5)
    #: Seconds between active checks of Kafka, the metadata store and the Zarr root
    #: (readiness, ``STATUS=`` for systemd).
    health_check_interval_s: float = Field(default=5.0, gt=0)

    @field_validator("tenants")
    @classmethod
    def _safe_tenants(cls, v: dict[str, str]) -> dict[str, str]:
        for topic, tenant in v.items():
            if not _TENANT_RE.fullmatch(tenant):
                raise ValueError(f"tenant {tenant!r} for topic {topic!r} must match "
                                 f"{_TENANT_RE.pattern}")
        return v

    def tenant_for(self, topic: str) -> str:
        return tenant_for_topic(topic, self.tenants)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets shown as ``***``."""
        data = self.model_dump(mode="json")
        if self.kafka.sasl_password is not None:
            data["kafka"]["sasl_password"] = "***"
        if self.storage.s3.secret_access_key is not None:
            data["storage"]["s3"]["secret_access_key"] = "***"
        data["storage"]["metadata"] = mask_uri(self.storage.metadata)
        return data


_TENANT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")


def tenant_for_topic(topic: str, tenants: Mapping[str, str]) -> str:
    """Explicit map first; else the topic's first dotted component, made safe."""
    if topic in tenants:
        return tenants[topic]
    first = topic.split(".", 1)[0]
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", first)[:63] or "default"
    return safe if safe[0] != "-" else "_" + safe[1:]


#: Environment variable -> dotted settings key.
ENV_KEYS: dict[str, str] = {
    "BLUESTREAM_KAFKA_BOOTSTRAP": "kafka.bootstrap",
    "BLUESTREAM_TOPICS": "kafka.topics",
    "BLUESTREAM_TOPIC_PATTERN": "kafka.topic_pattern",
    "BLUESTREAM_GROUP_ID": "kafka.group_id",
    "BLUESTREAM_AUTO_OFFSET_RESET": "kafka.auto_offset_reset",
    "BLUESTREAM_KAFKA_SECURITY_PROTOCOL": "kafka.security_protocol",
    "BLUESTREAM_KAFKA_SASL_MECHANISM": "kafka.sasl_mechanism",
    "BLUESTREAM_KAFKA_SASL_USERNAME": "kafka.sasl_username",
    "BLUESTREAM_KAFKA_SASL_PASSWORD": "kafka.sasl_password",
    "BLUESTREAM_KAFKA_SSL_CAFILE": "kafka.ssl_cafile",
    "BLUESTREAM_KAFKA_SSL_CERTFILE": "kafka.ssl_certfile",
    "BLUESTREAM_KAFKA_SSL_KEYFILE": "kafka.ssl_keyfile",
    "BLUESTREAM_MONGO_URI": "storage.metadata",
    "BLUESTREAM_METADATA": "storage.metadata",
    "BLUESTREAM_ZARR_ROOT": "storage.zarr_root",
    "BLUESTREAM_FSYNC": "storage.fsync",
    "BLUESTREAM_HTTP_BIND": "http.bind",
    "BLUESTREAM_HTTP_PORT": "http.port",
    "BLUESTREAM_HTTP_ENABLED": "http.enabled",
    "BLUESTREAM_HTTP_URL_FILE": "http.url_file",
    "BLUESTREAM_LOG_FORMAT": "log.format",
    "BLUESTREAM_LOG_LEVEL": "log.level",
}
_LIST_KEYS = {"kafka.topics"}


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    data.setdefault(section, {})[key] = value


def load_settings(path: Path | str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (TOML) if given, apply environment overrides, validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    from_env: dict[str, str] = {}
    # BLUESTREAM_METADATA wins over BLUESTREAM_MONGO_URI when both are set.
    for var in sorted(ENV_KEYS, key=lambda v: v == "BLUESTREAM_METADATA"):
        if var in environ and environ[var] != "":
            value: Any = environ[var]
            dotted = ENV_KEYS[var]
            if dotted in _LIST_KEYS:
                value = [t.strip() for t in value.split(",") if t.strip()]
            section = data.get(dotted.partition(".")[0])
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"invalid configuration{_where(path)}: "
                                  f"{dotted.partition('.')[0]}: must be a table")
            _set_dotted(data, dotted, value)
            from_env[dotted] = var
    try:
        return Settings.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(_describe(exc, path, from_env)) from None


def _where(path: Path | str | None) -> str:
    return f" in {path}" if path is not None else ""


def _describe(exc: PydanticValidationError, path: Path | str | None,
              from_env: Mapping[str, str] | None = None) -> str:
    """One line naming every bad key, its problem and the offending value."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {_show(key, got)})"
        if err["type"] == "extra_forbidden":
            msg, shown = "unknown key", ""
        elif err["type"] == "value_error" and re.match(r"[a-z_]+: ", msg):
            # A section-level check whose message starts with the key it is about.
            sub, _, msg = msg.partition(": ")
            key = f"{key}.{sub}" if key != "(top level)" else sub
            shown = ""
        if from_env and key in from_env:
            shown += f" (from {from_env[key]})"
        lines.append(f"{key}: {msg}{shown}")
    text = f"invalid configuration{_where(path)}: " + "; ".join(lines)
    return " ".join(text.split())  # one line, whatever the messages contain


def _show(key: str, value: Any) -> str:
    if "password" in key or "secret" in key or key == "storage.metadata":
        return repr(mask_uri(str(value))) if key == "storage.metadata" else "***"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: Settings that a SIGHUP applies to the running daemon.
RELOADABLE = frozenset({"log.level", "log.summary_interval_s", "limits.park_max_count",
                        "limits.park_max_age_s"})


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose value differs between two settings (secrets compared too)."""
    def flat(s: Settings) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in s.model_dump(mode="python").items():
            if isinstance(value, dict) and name != "tenants":
                for k, v in value.items():
                    out[f"{name}.{k}"] = v
            else:
                out[name] = value
        for secret in ("kafka.sasl_password",):
            v = out.get(secret)
            out[secret] = v.get_secret_value() if isinstance(v, SecretStr) else v
        s3 = dict(out.get("storage.s3") or {})
        if isinstance(s3.get("secret_access_key"), SecretStr):
            s3["secret_access_key"] = s3["secret_access_key"].get_secret_value()
        out["storage.s3"] = s3
        return out

    a, b = flat(old), flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
