"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on each request head.

uvicorn bounds an idle keep-alive connection (--keep-alive-timeout) and the size of a head
(h11_max_incomplete_event_size), but not the time a head takes: a client that sends its
request line and headers a byte at a time holds the connection open for as long as it likes,
and a few hundred such clients reach --limit-concurrency. Here each head must be complete
within --header-timeout seconds of its first byte (of the connection, for the first one),
or the connection is closed. The body's deadline (--body-timeout) is admission's
(lmstack/server/admission.py), which answers 408.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("lmstack.server")


class HeadDeadlineProtocol(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._awaiting_head():
            self._arm()  # the first byte of the next head on a kept-alive connection
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._late, cycle)

    def _late(self, cycle) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is cycle and self._awaiting_head():
            logger.info(
                '{"event": "header_timeout", "client": "%s", "header_timeout_s": %s}',
                ":".join(map(str, self.client or ())),
                self.header_timeout_s,
            )
            self.transport.close()


def head_deadline_protocol(header_timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this deadline."""
    return type(
        "HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout_s": header_timeout_s}
    )
