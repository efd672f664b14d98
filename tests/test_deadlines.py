"""forwarder.deadlines: connect timeouts behind one loop timer fire in deadline order, once, and never once cancelled."""

from __future__ import annotations

import asyncio

import pytest
from relaykit import LOOPS, run

from forwarder.deadlines import Deadlines


@pytest.mark.parametrize("loop_name", LOOPS)
def test_deadlines_fire_in_order_across_timeouts_and_cancelled_ones_never(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        fired: list[tuple[str, float]] = []
        start = loop.time()

        def at(name: str) -> None:
            fired.append((name, loop.time() - start))

        deadlines.add(start, 0.30, lambda: at("a"))
        cancelled = deadlines.add(start, 0.30, lambda: at("cancelled"))
        deadlines.add(start, 0.30, lambda: at("b"))
        # A shorter timeout added later is due first: the timer is armed again, earlier.
        deadlines.add(start, 0.10, lambda: at("short"))
        Deadlines.cancel(cancelled)
        await asyncio.sleep(0.2)
        assert [name for name, _ in fired] == ["short"]
        deadlines.add(loop.time(), 0.05, lambda: at("later-short"))  # a queue that emptied gets a new head
        await asyncio.sleep(0.4)
        assert [name for name, _ in fired] == ["short", "later-short", "a", "b"]
        times = dict(fired)
        assert times["short"] >= 0.09 and times["a"] >= 0.29 and times["b"] >= 0.29  # never early (1 ms clock)
        assert deadlines.timer is None and not deadlines.queues  # nothing left behind, no timer armed

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_cancelled_heads_leave_the_queue_when_the_next_entry_is_added(loop_name: str) -> None:
    """Connections whose connect completed must not pile up until their deadline: a queue holds only the live ones
    behind its head."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        for _ in range(1000):
            Deadlines.cancel(deadlines.add(loop.time(), 5.0, lambda: None))
        assert len(deadlines.queues[5.0]) == 1
        deadlines.close()
        assert deadlines.timer is None

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_callback_may_cancel_another_entry_due_at_the_same_time(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        fired: list[str] = []
        now = loop.time()
        second = deadlines.add(now, 0.05, lambda: fired.append("second"))

        def first() -> None:
            fired.append("first")
            Deadlines.cancel(second)

        deadlines.queues[0.05].appendleft([now + 0.05, first])
        await asyncio.sleep(0.15)
        assert fired == ["first"]

    run(loop_name, main)
