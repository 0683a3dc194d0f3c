"""The API's HTTP edge, below every router: the one error answer and the body limit."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from payorders.service import metrics as api_metrics
from payorders.service.errors import ApiError


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    """``{"error": {"code": ..., "message": ..., **extra}}``; a missing token's 401 also
    says how to authenticate (``WWW-Authenticate: Bearer``)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 and code == "unauthorized" else None
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, before the application reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                api_metrics.note_error(scope, "too_large")
                await error_response(413, "too_large", f"body over {self.limit} bytes")(
                    scope, receive, send
                )
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "too_large", f"body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)
