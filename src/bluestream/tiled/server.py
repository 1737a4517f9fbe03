"""``bluestream tiled``: a stock Tiled server over every tenant (or those named)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ProbingBlosc2", "serve", "server_config", "use_probing_compression"]

_KEY_RE = re.compile(r"[A-Za-z0-9]+")
#: Compress array and table bodies that shrink below this share of their size (see
#: :class:`ProbingBlosc2`): at most half, what pays on a 1 Gb/s link.
COMPRESS_BELOW = 0.5


class ProbingBlosc2:
    """Tiled's ``blosc2`` encoding of array and table bodies, which first compresses
    three samples of the body (its start, middle and end, 256 KiB each) and compresses
    the whole body only when they shrink below :attr:`below` of their size. Otherwise
    it emits blosc2's uncompressed form (a copy with a frame header; valid blosc2 every
    client decodes), whose size makes Tiled send the original body as it is (Tiled
    sends a compressed body only below 90 % of the original).

    Why: Tiled's own encoder compresses every body in full. Measured here on noisy
    12-bit 512x512 uint16 frames, blosc2 costs ~2-3 ms per MB on the server and as much
    on the client for a body 14 % smaller (25 % with the item size used here);
    compression saves time only when the bytes
    saved take longer on the wire than that, i.e. for ratio r on a link slower than
    about (1 - r) / 5 ms per MB: 50 MB/s at r = 0.75, 100 MB/s (1 Gb/s) at r = 0.5.
    ``below`` 0 never compresses (small bodies neither). Same interface as Tiled's
    ``BloscBuffer`` (``write`` per body or chunk, one frame each; ``close``)."""

    SAMPLE = 256 * 1024
    below = COMPRESS_BELOW

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, body: Any) -> None:
        import blosc2

        view = memoryview(body).cast("B")
        n, k = len(view), self.SAMPLE
        # The item size is the shuffle filter's unit. Tiled's serializers hand over
        # bytes as a memoryview of items of 1 byte, which Tiled's encoder compresses as
        # such (noisy 12-bit frames: 14 % smaller); with 8 (blosc2's default, and a
        # multiple of every numeric item) 25 %, a column of int64 row numbers 99.8 %
        # instead of 87 %. The largest of 8, 4, 2, 1 that divides the body (blosc2
        # refuses a length it does not divide); a larger item size given is kept.
        itemsize = int(getattr(body, "itemsize", 1) or 1)
        typesize = itemsize if itemsize > 1 else next(t for t in (8, 4, 2, 1) if n % t == 0)
        clevel = 1
        if self.below <= 0:
            clevel = 0
        elif n > 4 * k:
            k -= k % typesize
            samples = (view[:k], view[(n // 2) - (n // 2) % typesize:][:k], view[n - k:])
            packed = sum(len(blosc2.compress(bytes(s), typesize=typesize)) for s in samples)
            if packed > self.below * 3 * k:
                clevel = 0
        self._file.write(blosc2.compress(view, typesize=typesize, clevel=clevel))

    def close(self) -> None:
        pass


def use_probing_compression(below: float = COMPRESS_BELOW) -> bool:
    """Put :class:`ProbingBlosc2` (compressing bodies that shrink below ``below`` of
    their size) in place of Tiled's ``blosc2`` encoder for arrays and tables in this
    process; the encoding keeps its name and its place in Tiled's order of preference.
    ``below`` >= 0.9 is Tiled's own behaviour (its encoder is left in place). False when
    blosc2 is not installed (Tiled then has no such encoder)."""
    from tiled.media_type_registration import default_compression_registry
    from tiled.utils import modules_available

    if not 0.0 <= below <= 1.0:
        raise ValueError(f"--compress-below must be between 0 and 1, not {below}")
    if not modules_available("blosc2") or below >= 0.9:
        return False
    encoder = type("ProbingBlosc2", (ProbingBlosc2,), {"below": below})
    for media_type in ("application/octet-stream", "application/vnd.apache.arrow.file"):
        default_compression_registry.register(media_type, "blosc2", encoder)
    return True


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

    use_probing_compression(options.pop("compress_below", COMPRESS_BELOW))
    key = options.pop("api_key", None)
    if key is None and not options.get("public"):
        key = secrets.token_hex(16)
        say(f"no --api-key given: this server's API key is {key}")
    app = build_app_from_config(server_config(api_key=key, **options))
    access = "anonymous read access" if options.get("public") else "API key required"
    say(f"Tiled server on http://{host}:{port} ({access}); tenants: "
        f"{', '.join(options.get('tenants') or []) or 'all'}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
