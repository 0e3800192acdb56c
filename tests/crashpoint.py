"""``python -m tests.crashpoint [--after N] POINT COMMAND…``: cascade-gateway dying at a point.

The crash tests' launcher. It installs a fault hook (:mod:`orchestrator.faults`) that
SIGKILLs this process the (N+1)-th time the engine passes ``POINT``, then runs
``cascade-gateway COMMAND…`` (``worker`` in the tests) in this same process. The hook exists
only here: nothing in the product can arm a fault point.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from gateway.cli import main as cascade_gateway
from orchestrator import faults


def kill_at(point: str, after: int) -> faults.FaultHook:
    """A hook that lets ``point`` pass ``after`` times, then SIGKILLs the process there."""
    passes = 0

    def hook(name: str) -> None:
        nonlocal passes
        if name != point:
            return
        passes += 1
        if passes > after:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.crashpoint", description=__doc__)
    parser.add_argument("point", choices=faults.POINTS)
    parser.add_argument(
        "--after", type=int, default=0, help="let the point pass this many times first"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="cascade-gateway's arguments")
    args = parser.parse_args(argv)
    faults.install(kill_at(args.point, args.after))
    return cascade_gateway(args.command)


if __name__ == "__main__":
    sys.exit(main())
