"""User-facing tools around the daemon: move documents between files, Kafka, an
existing suitcase-mongo database and bluestream storage, and a self-contained demo.

Each tool is a plain ``async`` function with a report object as its result, so the
command line (``bluestream publish | ingest | ingest-mongo | export | demo``, see
:mod:`bluestream.tools.commands`) is a thin wrapper and tests call the same code.
Heavy imports (zarr, aiokafka, pymongo, bluesky) happen inside the tools, not here.
"""

__all__: list[str] = []
