"""bluestream benchmarks: ``python -m benchmarks [--quick]`` (``make bench``).

Each scenario measures bluestream against a baseline taken in the same run (the raw
consume limit, a plain Zarr write, the incumbent bluesky-kafka + suitcase-mongo) and
prints absolute figures and ratios beside the targets of issue 12 (``common.GOALS``).
See README.md.
"""
