"""What the event feed's route answers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class EventFeedOut(BaseModel):
    events: list[dict[str, Any]] = Field(
        description="the order events after `after`, in id order (commit order), with the"
        " bodies the relay pushes"
    )
    next_after: str | None = Field(
        description="the last event's id (the given `after` when there was none): pass it as"
        " `after` next time"
    )
