"""The discrete-event core: a simulated clock, events and the loop that runs them in time order.

Modelled on microsoft/vidur (``vidur/simulator.py``, ``vidur/events/base_event.py``): a heap of events
ordered by (time, event-type order, id); the loop pops the earliest, sets the clock, and lets the event
handle itself. Two differences: handlers schedule follow-up events on the loop directly instead of
returning a list (no allocation per event on a path that runs millions of times), and an event can be
made stale by a workload's ``version`` counter (lazy deletion: a superseded event is popped and
ignored, never searched for in the heap).

Deterministic: ties in time are broken by each event's ``order`` (workload state changes first, then
heartbeats, then arbiter ticks, then sampling) and then by a sequence number, never by object identity.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, ClassVar


class SimClock:
    """The simulated clock the arbiter reads (``now()``); only the event loop moves it."""

    __slots__ = ("_now",)

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def _set(self, t_s: float) -> None:
        self._now = t_s


class Event:
    """Something that happens at ``time_s``. Subclasses set ``order`` and implement ``handle``.

    ``order`` ranks events at the same instant: lower first.
    """

    __slots__ = ("time_s",)
    order: ClassVar[int] = 50

    def __init__(self, time_s: float) -> None:
        self.time_s = time_s

    def handle(self, sim: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t={self.time_s:.3f})"


class EventLoop:
    """A time-ordered queue of events and the clock they move.

    Example::

        loop = EventLoop(SimClock())
        loop.schedule(SomeEvent(10.0))
        loop.run(until_s=100.0, context=sim)
    """

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, int, Event]] = []
        self._seq = itertools.count()
        self.handled = 0

    def schedule(self, event: Event) -> None:
        if event.time_s < self.clock.now():
            raise ValueError(f"{event!r} is in the past (now {self.clock.now():.3f})")
        heapq.heappush(self._heap, (event.time_s, event.order, next(self._seq), event))

    def __len__(self) -> int:
        return len(self._heap)

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run(
        self,
        until_s: float,
        context: Any,
        after_event: Callable[[], None] | None = None,
    ) -> None:
        """Handles events in order up to and including ``until_s``; the clock ends at ``until_s``.

        ``after_event`` runs after every event (the simulator uses it to ask for an event-driven tick).
        """
        heap = self._heap
        pop = heapq.heappop
        clock = self.clock
        while heap and heap[0][0] <= until_s:
            t, _, _, event = pop(heap)
            clock._set(t)
            event.handle(context)
            self.handled += 1
            if after_event is not None:
                after_event()
        if clock.now() < until_s:
            clock._set(until_s)
