"""``bluestream tiled``: a stock Tiled server over every tenant (or those named)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["serve", "server_config"]

_KEY_RE = re.compile(r"[A-Za-z0-9]+")


def server_config(*, metadata: str, zarr_root: str, tenants: Sequence[str] = (),
                  api_key: str | None, public: bool, config: str | None = None
                  ) -> dict[str, Any]:
    """The Tiled configuration (what a ``config.yml`` would say) of this server."""
    if api_key is not None and not _KEY_RE.fullmatch(api_key):
        raise ValueError("--api-key: letters and digits only (Tiled's rule)")
    return {
        "trees": [{"path": "/", "tree": "bluestream.tiled:tenants_tree",
                   "args": {"metadata": metadata, "zarr_root": zarr_root,
                            "tenants": list(tenants) or None, "config": config}}],
        "media_types": {"BlueskyRun": {
            "application/json-seq": "bluestream.tiled.exporter:json_seq"}},
        "authentication": {"single_user_api_key": api_key,
                           "allow_anonymous_access": public},
    }


def serve(*, host: str, port: int, say: Callable[[str], None], **options: Any) -> None:
    """Build the app and run it until interrupted (blocking)."""
    import uvicorn
    from tiled.server.app import build_app_from_config

    key = options.pop("api_key", None)
    if key is None and not options.get("public"):
        key = secrets.token_hex(16)
        say(f"no --api-key given: this server's API key is {key}")
    app = build_app_from_config(server_config(api_key=key, **options))
    access = "anonymous read access" if options.get("public") else "API key required"
    say(f"Tiled server on http://{host}:{port} ({access}); tenants: "
        f"{', '.join(options.get('tenants') or []) or 'all'}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
