"""Long polls (``GET /v1/generations/{id}?wait=``) parked on the event loop instead of on threads.

A parked wait holds no worker thread: it sleeps on an :class:`asyncio.Event` of its generation, which
the model worker sets (from its thread) whenever that generation changes, then reads the store again
(also every :data:`RECHECK_S` seconds, as a safety net). One client (IP address) parks at most
``per_client`` waits at a time; one more gets 429 with ``Retry-After``.

    waits = Waits(per_client=16)
    waits.bind(asyncio.get_running_loop())      # once, on the server's loop
    waits.changed("g1")                         # from any thread: wake the waits on g1
    with waits.slot("127.0.0.1"):               # TooMany beyond the client's bound
        await waits.sleep(waits.event("g1"), 5.0)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import contextmanager, suppress
from typing import Iterator

from pmgen.serve.errors import TooMany, problem

RECHECK_S = 5.0
"""A parked wait reads the store at least this often, woken or not."""


class Waits:
    """The parked long polls of one server: per-generation wake-ups and the per-client bound."""

    def __init__(self, per_client: int = 16):
        if per_client < 1:
            raise ValueError(f"waits per client must be >= 1, got {per_client}")
        self.per_client = per_client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._clients: Counter[str] = Counter()
        self.parked = 0
        """Waits parked now, over all clients."""

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the waits run on (the server's); :meth:`changed` hands wake-ups to it."""
        self._loop = loop

    def changed(self, gen_id: str) -> None:
        """Wake every wait on ``gen_id``; safe from any thread (a no-op before :meth:`bind`)."""
        if self._loop is not None:
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(self._wake, gen_id)

    def _wake(self, gen_id: str) -> None:
        event = self._events.pop(gen_id, None)
        if event is not None:
            event.set()

    def event(self, gen_id: str) -> asyncio.Event:
        """The event the next change of ``gen_id`` sets; take it *before* reading the store."""
        return self._events.setdefault(gen_id, asyncio.Event())

    @staticmethod
    async def sleep(event: asyncio.Event, seconds: float) -> None:
        """Until ``event`` is set or ``seconds`` have passed."""
        with suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """One parked wait of ``client``; :class:`TooMany` (429) when it has ``per_client`` already."""
        if self._clients[client] >= self.per_client:
            msg = f"{self.per_client} waits of this client are parked already; retry when one returns"
            raise TooMany(msg, [problem("wait", msg)], headers={"Retry-After": "1"})
        self._clients[client] += 1
        self.parked += 1
        try:
            yield
        finally:
            self.parked -= 1
            self._clients[client] -= 1
            if not self._clients[client]:
                del self._clients[client]
