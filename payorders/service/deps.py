"""What every route may depend on: the process's resources (``Deps``, built once by the
app's lifespan), a JSON body's content type, and a Temporal call that may find Temporal
unreachable."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from temporalio.client import Client
from temporalio.service import RPCError

from payorders.core.settings import Settings
from payorders.core.store import PayOrderStore
from payorders.gateways.port import Gateway
from payorders.pay_orders import PayOrders
from payorders.service.errors import ApiError

log = logging.getLogger("payorders.pay_orders")


@dataclass
class Deps:
    settings: Settings
    client: Client
    store: PayOrderStore
    gateway: Gateway
    orders: PayOrders


# The dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in a thread
# pool, a thread hand-off per dependency per request (about a tenth of the API's CPU).
async def _deps(request: Request) -> Deps:
    deps: Deps = request.app.state.deps
    return deps


DepsDep = Annotated[Deps, Depends(_deps)]


async def require_json(content_type: Annotated[str | None, Header()] = None) -> None:
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")


async def call_temporal(call: Callable[[], Awaitable[Any]]) -> Any:
    """Run a Temporal call; an unreachable Temporal is a 503 the caller may retry."""
    try:
        return await call()
    except RPCError as e:
        log.warning("temporal unavailable: %s", e.status.name if e.status else e)
        raise ApiError(503, "temporal_unavailable", "Temporal cannot be reached; retry") from e
    except RuntimeError as e:  # a lazy client that cannot connect
        log.warning("temporal unavailable: %s", e)
        raise ApiError(503, "temporal_unavailable", "Temporal cannot be reached; retry") from e
