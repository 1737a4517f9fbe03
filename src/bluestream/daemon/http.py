"""A minimal HTTP/1.1 server on anyio for the daemon's health, metrics and status.

Probes and Prometheus ask a handful of fixed ``GET`` paths, one request per
connection. That needs about a hundred lines on anyio's TCP listener, not a web
framework: no new dependency, and it runs in the daemon's own task group (so it stops
with the daemon and shares its event loop, which is what ``/healthz`` vouches for).
Every connection is bounded in size and time; a slow or hostile client cannot hold
memory or a task for long.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import Listener, SocketAttribute, SocketStream

from bluestream.log import get_logger

__all__ = ["HttpServer", "Response", "json_response"]

log = get_logger("bluestream.http")

MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(data, indent=1, default=str) + "\n").encode(),
                    "application/json")


Handler = Callable[[], Awaitable[Response]]


class HttpServer:
    """Serves ``GET``/``HEAD`` on fixed paths; everything else gets 404 or 405."""

    def __init__(self, routes: Mapping[str, Handler], host: str, port: int) -> None:
        self.routes = dict(routes)
        self.host = host
        self.port = port
        self._listener: Listener[SocketStream] | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def bind(self) -> int:
        """Listen; return the bound port (port 0 picks a free one). Raises OSError
        (address in use, no such address) before anything else has started."""
        self._listener = await anyio.create_tcp_listener(local_host=self.host,
                                                         local_port=self.port)
        self.port = int(self._listener.extra(SocketAttribute.local_port))
        return self.port

    async def serve(self) -> None:
        """Serve until cancelled (binds first if :meth:`bind` was not called)."""
        if self._listener is None:
            await self.bind()
        assert self._listener is not None
        async with self._listener:
            await self._listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        async with stream:
            try:
                response, head_only = await self._respond(stream)
                await stream.send(_encode(response, head_only))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError,
                    anyio.EndOfStream, ConnectionError):
                pass  # the client went away; nothing to answer
            except Exception:  # one bad connection must not end the listener
                log.exception("http connection failed")

    async def _respond(self, stream: SocketStream) -> tuple[Response, bool]:
        head = b""
        with anyio.move_on_after(REQUEST_TIMEOUT_S) as scope:
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                head += await stream.receive(4096)
                if len(head) > MAX_HEAD_BYTES:
                    return Response(431, b"request head too large\n"), False
        if scope.cancelled_caught:
            return Response(408, b"request timeout\n"), False
        request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return Response(400, b"malformed request line\n"), False
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        handler = self.routes.get(path)
        if handler is None:
            known = ", ".join(sorted(self.routes))
            return Response(404, f"unknown path {path!r}; try {known}\n".encode()), False
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers={"Allow": "GET, HEAD"}), False
        try:
            return await handler(), method == "HEAD"
        except Exception as exc:  # a bug in one probe must not take the server down
            log.exception("http handler failed", path=path)
            return Response(500, f"internal error: {exc!r}\n".encode()), False


def _encode(r: Response, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {r.status} {_REASONS.get(r.status, 'Unknown')}",
             f"Content-Type: {r.content_type}",
             f"Content-Length: {len(r.body)}",
             "Cache-Control: no-store",
             "Connection: close",
             *(f"{k}: {v}" for k, v in r.headers.items())]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + r.body
