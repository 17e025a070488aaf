"""How ``pmgen serve`` runs under uvicorn: idle connections close.

uvicorn closes a kept-alive connection after ``timeout_keep_alive`` seconds without a new request,
but waits forever for the first request head of a connection, or for the rest of a head that stops
half-way (slow loris). :class:`HeadTimeoutH11` adds that deadline: a connection must send a whole
request head within ``timeout_keep_alive`` seconds of opening, or of its previous answer. A head
that arrived but whose body stalls is the app's (:class:`pmgen.serve.guards.BodyGuard`: 408).

    uvicorn.Server(uvicorn_config(app, "127.0.0.1", 8000)).run()
"""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

KEEP_ALIVE_S = 5
"""Seconds an idle connection stays open: before its first request head is complete, and between requests."""


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, plus the deadline for a request head (see the module docstring)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head(None)

    def on_response_complete(self) -> None:
        answered = self.cycle  # taken first: a pipelined request starts its cycle inside super()
        super().on_response_complete()
        self._expect_head(answered)

    def _expect_head(self, cycle: Any) -> None:
        self.loop.call_later(self.timeout_keep_alive, self._head_deadline, cycle)

    def _head_deadline(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request head since
            self.transport.close()


def uvicorn_config(app: Any, host: str, port: int, *, log_level: str = "info",
                   keep_alive: int = KEEP_ALIVE_S) -> uvicorn.Config:
    """The uvicorn configuration of ``pmgen serve``: h11 with the head deadline, ``keep_alive`` seconds."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HeadTimeoutH11,
                          timeout_keep_alive=keep_alive)
