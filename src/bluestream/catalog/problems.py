"""What the integrity checks of :mod:`bluestream.catalog.integrity` report: one type for
every level, so that the metadata checks (level 1, there) and the per-stream checks
(levels 2-4, :mod:`bluestream.catalog.stream_check`) report alike and neither has to
import the other to do it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Problem"]


@dataclass(frozen=True)
class Problem:
    """One thing found wrong, named as precisely as it is known: the run, the stream
    and descriptor, the array (its path inside the descriptor's group) and the chunk
    (its key under the Zarr root), so that an operator can go and look."""

    level: int
    run: str
    message: str
    stream: str | None = None
    descriptor: str | None = None
    array: str | None = None
    chunk: str | None = None

    def __str__(self) -> str:
        where = [f"run {self.run}"]
        if self.stream is not None:
            where.append(f"stream {self.stream!r}")
        if self.descriptor is not None:
            where.append(f"descriptor {self.descriptor}")
        if self.array is not None:
            where.append(f"array {self.array}")
        if self.chunk is not None:
            where.append(f"chunk {self.chunk}")
        return f"level {self.level}: {' '.join(where)}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
