"""Waiting in a test for something that happens elsewhere (a worker, a server, a poller thread).

A test awaits the event rather than sleeping and hoping: it polls a cheap check until the check's
value is done, and fails at the deadline with an AssertionError that says what it waited for and
what the check saw last. One helper for every such wait, so that every timeout reads alike.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}; last seen: {last!r}")


# Without ``done``, the value's truthiness decides, so a check answering None until the event
# happens types as the value it then answers.
@overload
async def wait_until(
    check: Callable[[], Awaitable[T | None]], *, timeout: float, what: str, interval: float = ...
) -> T: ...


@overload
async def wait_until(
    check: Callable[[], T | None], *, timeout: float, what: str, interval: float = ...
) -> T: ...


@overload
async def wait_until(
    check: Callable[[], Awaitable[T]],
    *,
    done: Callable[[T], object],
    timeout: float,
    what: str,
    interval: float = ...,
) -> T: ...


@overload
async def wait_until(
    check: Callable[[], T],
    *,
    done: Callable[[T], object],
    timeout: float,
    what: str,
    interval: float = ...,
) -> T: ...


async def wait_until(
    check: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    done: Callable[[Any], object] = bool,
    interval: float = 0.02,
) -> Any:
    """Call ``check`` (a function or a coroutine function) until ``done`` holds for its value,
    sleeping ``interval`` in between; return that value.

    ``done`` defaults to truthiness. Fails when a check that ends after the deadline (``timeout``
    seconds from the start) is still not done, naming ``what`` and that check's value.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if done(value):
            return value
        if loop.time() > deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)


def wait_until_sync(
    check: Callable[[], T],
    *,
    timeout: float,
    what: str,
    done: Callable[[T], object] = bool,
    interval: float = 0.02,
) -> T:
    """:func:`wait_until` for synchronous tests (the event happens in a thread or a process)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)
