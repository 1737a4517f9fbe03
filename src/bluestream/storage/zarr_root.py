"""Where the Zarr arrays live: a local directory or ``s3://bucket/prefix``.

A local root is written through :class:`~bluestream.storage.local_store.SyncingLocalStore`
(files and directories fsynced once per batch). An ``s3://`` root is written through
zarr's own object-store adapter (:class:`zarr.storage.ObjectStore` over obstore's
``S3Store``): a PUT is atomic (readers see the old object or the new one, never half of
one) and durable once acknowledged, so there is nothing to sync and nothing relies on a
rename or a directory fsync. :class:`S3ZarrStore` adds the blocking ``get_sync`` /
``set_sync`` calls the event store's one-thread writers use
(:mod:`~bluestream.storage.chunk_writer`, :mod:`~bluestream.storage.array_meta`): obstore
runs them in its own Rust runtime with the GIL released, so a batch's chunks still go out
in a worker thread without a hop per key.

Endpoint, region and credentials come from the ``[storage.s3]`` table where set, else from
the variables every S3 client reads (``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``). Requests are
path-style (``endpoint/bucket/key``), which MinIO, Ceph RGW, S3Proxy and AWS all accept.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import obstore
from obstore.exceptions import BaseError as ObjectStoreError
from obstore.exceptions import (
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, ObjectStore

from bluestream.errors import ConfigError, StorageUnavailable

if TYPE_CHECKING:
    from obstore.store import S3Config

__all__ = ["IO_ERRORS", "ObjectStoreError", "S3Options", "S3ZarrStore", "ZarrRoot", "brief",
           "check_access",
           "check_root_value", "probe_root"]

S3_SCHEME = "s3://"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_DEFAULT_REGION = "us-east-1"
#: What a request that failed on the way to or in the object store raises (obstore's
#: errors are not OSErrors; a missing key is a FileNotFoundError).
IO_ERRORS = (OSError, ObjectStoreError)


def check_root_value(value: str) -> str:
    """``value`` if it is a local path or a well-formed ``s3://bucket[/prefix]``; else
    ValueError saying why (no connection is made)."""
    if not value.strip():
        raise ValueError("must not be empty")
    if value.startswith(S3_SCHEME):
        bucket, _, prefix = value.removeprefix(S3_SCHEME).partition("/")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 lower-case "
                             "letters, digits, dots and hyphens)")
        if any(part in (".", "..") for part in prefix.split("/")):
            raise ValueError("the prefix must not contain '.' or '..' components")
        if "//" in prefix.strip("/"):
            raise ValueError("the prefix must not contain empty components ('//')")
    elif "://" in value:
        raise ValueError("must be a local directory or s3://bucket/prefix")
    return value


@dataclass(frozen=True)
class S3Options:
    """Where the object store is and how to sign requests; None: from the environment."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    def resolved(self, environ: Mapping[str, str] | None = None) -> S3Options:
        """These options with what is unset taken from the standard AWS variables."""
        env = os.environ if environ is None else environ

        def pick(own: str | None, *names: str) -> str | None:
            if own:
                return own
            return next((env[n] for n in names if env.get(n)), None)

        return S3Options(
            endpoint=pick(self.endpoint, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=pick(self.region, "AWS_REGION", "AWS_DEFAULT_REGION") or _DEFAULT_REGION,
            access_key_id=pick(self.access_key_id, "AWS_ACCESS_KEY_ID"),
            secret_access_key=pick(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
        )


@dataclass(frozen=True)
class ZarrRoot:
    """A Zarr root: ``local`` is its directory, or None for ``s3://bucket/prefix``."""

    local: Path | None
    bucket: str = ""
    prefix: str = ""
    s3: S3Options = S3Options()

    @classmethod
    def parse(cls, value: ZarrRoot | str | os.PathLike[str],
              s3: S3Options | None = None) -> ZarrRoot:
        if isinstance(value, ZarrRoot):
            return value
        text = check_root_value(os.fspath(value))
        if text.startswith(S3_SCHEME):
            bucket, _, prefix = text.removeprefix(S3_SCHEME).partition("/")
            return cls(None, bucket, prefix.strip("/"), (s3 or S3Options()).resolved())
        return cls(Path(text))

    @property
    def is_s3(self) -> bool:
        return self.local is None

    def __str__(self) -> str:
        if self.local is not None:
            return str(self.local)
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def join(self, key: str) -> str:
        """``key`` under this root, for messages."""
        return f"{self}/{key}" if key else str(self)

    def object_store(self, *, read_only: bool = False) -> S3ZarrStore:
        if self.local is not None:
            raise ValueError(f"{self} is a local directory, not an object store")
        s3 = self.s3
        config: dict[str, Any] = {"region": s3.region or _DEFAULT_REGION}
        if s3.endpoint:
            config["endpoint"] = s3.endpoint
        if s3.access_key_id:
            config["access_key_id"] = s3.access_key_id
        if s3.secret_access_key:
            config["secret_access_key"] = s3.secret_access_key
        allow_http = bool(s3.endpoint and s3.endpoint.startswith("http://"))
        inner = S3Store(
            self.bucket, prefix=self.prefix or None, config=cast("S3Config", config),
            client_options={"allow_http": allow_http, "connect_timeout": timedelta(seconds=5),
                            "timeout": timedelta(seconds=60)},
            # A few quick retries for a dropped connection; a longer outage is the
            # pipeline's (it backs off and rewrites the batch), and readiness must see it.
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=15),
                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                      "max_backoff": timedelta(seconds=2), "base": 2}},
        )
        return S3ZarrStore(inner, read_only=read_only)

    def open_store(self, *, read_only: bool = False) -> Store:
        """A zarr store on this root (local: zarr's ``LocalStore``)."""
        if self.local is not None:
            return LocalStore(str(self.local), read_only=read_only)
        return self.object_store(read_only=read_only)


class S3ZarrStore(ObjectStore[S3Store]):
    """zarr's ``ObjectStore`` on S3, with the blocking calls of a ``LocalStore``
    (``get_sync``, ``set_sync``, ``delete_sync``) for writers that run in one thread.
    A ``set_sync`` returns once the PUT was acknowledged: the object is durable."""

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None:
            raise NotImplementedError("byte ranges are read through the async API")
        proto = prototype or default_buffer_prototype()
        try:
            data = obstore.get(self.store, key).bytes()
        except FileNotFoundError:
            return None
        return proto.buffer.from_bytes(data)  # type: ignore[arg-type]

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_writable()
        obstore.put(self.store, key, value.as_buffer_like())

    def delete_sync(self, key: str) -> None:
        """One object deleted by a plain DELETE (signed by obstore): obstore deletes
        through the multi-object ``POST ?delete``, which some S3-compatible servers
        (S3Proxy) refuse with 501."""
        self._check_writable()
        url = obstore.sign(self.store, "DELETE", key, timedelta(minutes=5))
        request = urllib.request.Request(url, method="DELETE")
        try:
            with urllib.request.urlopen(request, timeout=60):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise OSError(f"DELETE {key} answered {exc.code} {exc.reason}") from exc

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(self.delete_sync, key)


def brief(exc: BaseException, limit: int = 300) -> str:
    """An error in one line: obstore's messages end with a multi-line debug dump of the
    request, which would fill logs and /readyz."""
    text = str(exc).split("Debug source:", 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unreachable(exc: BaseException) -> bool:
    """Whether the store did not answer at all (rather than refusing the request)."""
    text = str(exc)
    refused = ("NoSuchBucket", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied")
    return not isinstance(exc, PermissionDeniedError | UnauthenticatedError | NotFoundError
                          | FileNotFoundError) and not any(c in text for c in refused)


def _explain(root: ZarrRoot, exc: BaseException) -> str:
    """What went wrong reaching ``root``, in an operator's words."""
    text = str(exc)
    where = f"{root} (endpoint {root.s3.endpoint or 'AWS default'})"
    if "NoSuchBucket" in text or (isinstance(exc, NotFoundError | FileNotFoundError)
                                  and "bucket" in text.lower()):
        return f"bucket {root.bucket!r} does not exist at {where}"
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or any(
            code in text for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId",
                                      "AccessDenied")):
        return (f"the object store refused the credentials for {where} (check "
                "storage.s3.access_key_id / secret_access_key or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY)")
    return f"the object store at {where} is unreachable: {brief(exc)}"


def check_access(root: ZarrRoot, *, write: bool = False,
                 unreachable_is_outage: bool = False) -> None:
    """ConfigError unless the bucket exists and the credentials are accepted (list one
    key; ``write`` also puts the probe object). An endpoint that does not answer is a
    ConfigError too (a wrong address, as check-config sees it), or, with
    ``unreachable_is_outage``, StorageUnavailable (the daemon at start: it waits, not
    ready, as for any outage). Blocking."""
    if not root.is_s3:
        return
    store = root.object_store()
    try:
        next(iter(obstore.list(store.store, chunk_size=1)), None)
        if write:
            _probe_put(store)
    except IO_ERRORS as exc:
        message = f"storage.zarr_root: {_explain(root, exc)}"
        if unreachable_is_outage and _unreachable(exc):
            raise StorageUnavailable(message) from None
        raise ConfigError(message) from None


def _probe_put(store: S3ZarrStore) -> None:
    """PUT one byte to a key of this host's, overwritten by every probe (one object per
    host, outside every tenant; nothing to delete)."""
    obstore.put(store.store, f".bluestream-probe/{socket.gethostname()}", b"\0")


def probe_root(root: ZarrRoot, store: Store | None = None) -> None:
    """StorageUnavailable unless the root takes a write now (a readiness check).
    Blocking; local roots are probed by the daemon's own directory probe."""
    if not root.is_s3:
        raise ValueError("probe_root is for object-store roots")
    target = store if isinstance(store, S3ZarrStore) else root.object_store()
    try:
        _probe_put(target)
    except IO_ERRORS as exc:
        raise StorageUnavailable(f"Zarr root: {_explain(root, exc)}") from exc
