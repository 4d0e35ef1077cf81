"""The gates that hold a DB's writers, and the detached task that hosts a DB's task group on one event loop
(see the docstring of `buntsession.engine.db`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import anyio
import anyio.abc

__all__ = ["Gate", "Host", "running_loop"]

_get_ident = threading.get_ident


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None (under trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Gate:
    """Holds a DB's writers while something that must not interleave with appends runs (the end of a
    rewrite, cutting a failed append, opening and closing). Made and opened on one event loop."""

    __slots__ = ("event", "thread")

    def __init__(self) -> None:
        self.thread = _get_ident()
        self.event = anyio.Event()

    async def wait(self, still_closed: Callable[[], bool]) -> None:
        if _get_ident() == self.thread:
            await self.event.wait()
        else:  # another thread's loop owns the event: poll (only when two threads use one DB at once)
            while still_closed():  # noqa: ASYNC110
                await anyio.sleep(0.001)


class Host:
    """The detached task that hosts a DB's task group on one event loop (see `buntsession.engine.db`)."""

    __slots__ = ("cancel_soon", "done", "loop", "scope", "stopped", "tg", "thread")

    def __init__(self, cancel_soon: Callable[[Callable[[], object]], object]) -> None:
        self.thread = _get_ident()
        self.cancel_soon = cancel_soon
        """Runs a callable on the host's loop, from any thread."""
        self.scope: anyio.CancelScope | None = None
        self.tg: anyio.abc.TaskGroup | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # asyncio: the host's loop
        self.stopped = False
        self.done: anyio.Event | None = None

    def stop(self) -> None:
        """Cancel the host's task group (from any thread)."""
        self.stopped = True
        scope = self.scope
        if scope is None:
            return
        if _get_ident() == self.thread:
            scope.cancel()
        else:
            try:
                self.cancel_soon(scope.cancel)
            except RuntimeError:
                pass  # its loop has closed: nothing runs there any more
