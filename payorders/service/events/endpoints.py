"""``GET /v1/events`` (scope ``read``): the pull feed of order events. The app's lifespan
puts an ``EventFeed`` at ``app.state.event_feed``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import AfterValidator

from payorders.core.tokens import Scope
from payorders.service.auth import ScopedRoute, requires
from payorders.service.events.feed import DEFAULT_LIMIT, MAX_LIMIT, EventFeed, outbox_id
from payorders.service.events.schemas import EventFeedOut

router = APIRouter(route_class=ScopedRoute)


def _event_id(value: str | None) -> str | None:
    if value is not None:
        outbox_id(value)  # raises ValueError naming the rule: a 422
    return value


@router.get("/v1/events", response_model=EventFeedOut, dependencies=[requires(Scope.READ)])
async def list_events(
    request: Request,
    after: Annotated[
        str | None,
        Query(description="an event id, e.g. evt_0000000000000123; omitted: from the first"),
        AfterValidator(_event_id),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> EventFeedOut:
    """Order events after ``after``, oldest first, at most ``limit``: the same bodies
    the relay POSTs to the order service. Ids grow in commit order, so a reader that
    passes back ``next_after`` misses none."""
    feed: EventFeed = request.app.state.event_feed
    return EventFeedOut.model_validate(await feed.after(after, limit))
