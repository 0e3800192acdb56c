"""``python -m bench.cpuprofile OUT MODULE [ARGS...]``: run a module under cProfile, CPU clock.

cProfile's default clock is wall time, which charges an asyncio process's idle waits to
whatever coroutine frame was suspended (``connect_tcp``, ``fetch``...). A CPU clock
(``time.process_time``) charges only work, which is what "where does the time go" asks.
Only the main thread is traced: the event loop's. The stats are written when the module
returns, exits, or is interrupted (SIGINT).
"""

from __future__ import annotations

import contextlib
import cProfile
import runpy
import sys
import time


def main() -> None:
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        with contextlib.suppress(SystemExit, KeyboardInterrupt):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
