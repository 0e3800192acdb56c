"""Our cascade against the same cascade on Temporal and on DBOS (``python -m bench peers``).

Only the registration lives here, so that importing the package (the benchmark registry does,
and so do the peers' own processes) imports neither the peers' SDKs nor the bench machinery;
see :mod:`bench.peers.run` and ``bench/peers/README.md``.
"""

from __future__ import annotations

from bench.registry import Report, benchmark


@benchmark(
    "peers",
    "ours vs Temporal vs DBOS, the same cascade on one sandbox, 3 interleaved rounds "
    "(~30 min; installs the peers group)",
    default=False,
)
def peers() -> Report:
    from bench.peers.run import run  # noqa: PLC0415 — heavy, and only when asked for

    return run()
