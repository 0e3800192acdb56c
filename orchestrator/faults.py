"""Named crash windows in the engine: no-ops unless a test harness installs a hook.

The engine calls ``fault_point(name)`` where a crash would leave half-done work behind
(:data:`POINTS`; ``after_state_write`` is committed with nothing published yet). Nothing
here reads the environment or touches a process: with no hook installed (always, outside the
crash tests) a point costs one loop over an empty list. The crash tests' launcher
(``tests/crashpoint.py``) installs a hook that SIGKILLs the worker at the point it is given.
"""

from __future__ import annotations

from collections.abc import Callable

POINTS = (
    "after_freeze",
    "after_provider_create",
    "after_balance_call",
    "after_state_write",
    "after_publish",
)
"""Every name the engine passes to :func:`fault_point`."""

FaultHook = Callable[[str], None]
"""Called with the point's name each time the engine passes it."""

_hooks: list[FaultHook] = []


def install(hook: FaultHook) -> None:
    """Make ``hook`` the one hook every fault point calls (replacing any earlier one)."""
    _hooks[:] = [hook]


def uninstall() -> None:
    """Back to no-ops."""
    _hooks.clear()


def fault_point(name: str) -> None:
    for hook in _hooks:
        hook(name)
