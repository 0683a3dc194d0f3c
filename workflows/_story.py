"""A pay order's story as the Temporal UI can show it, at no cost in history events.

The UI (2.54, shipped with the ``temporal`` CLI) labels a local activity in its timeline
by its activity type only; the summary we give it shows in the Event History table and
the event's details, not on the timeline. Timers and regular activities are labelled
with their summaries. So each timer's summary carries the steps taken since the previous
wait ("trade closed at the gateway; pay order PAY_EXPIRED; settlement window until ..."),
and the whole story is the workflow's current details (the UI's User Metadata tab, and
``temporal workflow metadata``). Neither adds an event: a timer's summary rides on its
TimerStarted event, and current details are answered by the worker on a query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


def when(t: datetime) -> str:
    """A timestamp as the story prints it: UTC, to the second."""
    return f"{t:%Y-%m-%d %H:%M:%S} UTC"


@dataclass
class Story:
    """The steps of one pay order, in order, with the time each happened (workflow time)."""

    steps: list[tuple[datetime, str]] = field(default_factory=list)
    _untold: list[str] = field(default_factory=list)
    _last_wait: str | None = None

    def tell(self, at: datetime, step: str) -> None:
        """Record a step; the next wait's summary repeats it for the timeline."""
        self.steps.append((at, step))
        self._untold.append(step)

    def wait(self, at: datetime, what: str, until: datetime) -> str:
        """Record a wait and return its timer's summary: the steps since the last wait,
        then what the order waits for. A wait restarted to the same second is told once."""
        waiting = f"{what} until {when(until)}"
        summary = "; ".join([*self._untold, waiting])
        self._untold.clear()
        if waiting != self._last_wait:
            self.steps.append((at, waiting))
            self._last_wait = waiting
        return summary

    def markdown(self, headline: str) -> str:
        """The story as Temporal markdown: a headline, then one numbered line per step."""
        lines = [f"**{headline}**", ""]
        lines += [f"{i}. `{when(at)}` {step}" for i, (at, step) in enumerate(self.steps, 1)]
        return "\n".join(lines)
