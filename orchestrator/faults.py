"""Crash-test hooks: the process kills itself (SIGKILL) at a named point when told to.

``CASCADE_FAULT_POINT=<name>`` arms one point; ``CASCADE_FAULT_AFTER=<n>`` lets it pass
``n`` times first. Unset (always, outside the fault tests), a point costs one dict lookup.
Points: ``after_freeze``, ``after_provider_create``, ``after_balance_call``,
``after_state_write`` (committed, nothing published yet), ``after_publish``.
"""

from __future__ import annotations

import os
import signal

ENV = "CASCADE_FAULT_POINT"
_passes = {"count": 0}


def fault_point(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    _passes["count"] += 1
    if _passes["count"] > int(os.environ.get("CASCADE_FAULT_AFTER", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
