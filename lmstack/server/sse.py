"""Server-sent events for streamed completions: the response class and event encoding."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lmstack.server import protocol as p

DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream that always runs `on_close`, however the stream ends.

    Starlette cancels the stream when the client disconnects; closing the event generator
    and the Generation here also covers a stream that never started.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


def event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def error_event(message: str, kind: str = "server_error") -> str:
    error = p.ErrorInfo(message=message, type=kind)
    return f"data: {p.ErrorResponse(error=error).model_dump_json()}\n\n"
