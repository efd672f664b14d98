"""The access log (one line per closed connection, `access_log: true`) and the rate-limited log of refusals."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forwarder.relay import Half

access = logging.getLogger("natfwd.access")

# How a connection ended, the `end` field of its access log line (HAProxy's termination state, in words).
CLIENT_CLOSED = "client_closed"  # the client closed (or half-closed) first
NODE_CLOSED = "node_closed"  # the node closed first
CLIENT_RESET = "client_reset"  # the client's side failed (reset, broken pipe) before either closed
CONNECT_FAILED = "connect_failed"  # the node connection could not be made (see natfwd_upstream_errors_total)
IDLE_TIMEOUT = "idle_timeout"  # natfwd closed it after idle_timeout_s without a byte
DRAIN = "drain"  # still open when the drain grace period ended: aborted

# Refusals: at most REFUSALS_PER_WINDOW lines per REFUSAL_WINDOW_S; the rest are counted and reported in one line.
REFUSALS_PER_WINDOW = 10
REFUSAL_WINDOW_S = 10.0


def how_ended(*, client_eof: bool, node_connected: bool, node_eof: bool, node_closed: bool, error: bool) -> str:
    """The `end` of a connection whose client side just closed, from what each side had done by then."""
    if node_connected and (node_closed or node_eof) and not client_eof:
        return NODE_CLOSED
    if error and not client_eof:
        return CLIENT_RESET
    return CLIENT_CLOSED


def ending(client: Half, exc: BaseException | None) -> str:
    """how_ended() for the client half of a connection, read at its connection_lost."""
    node = client.peer
    connected = node is not None and node.transport is not None
    return how_ended(
        client_eof=client.eof,
        node_connected=connected,
        node_eof=connected and node is not None and node.eof,
        node_closed=connected and node is not None and node.closed,
        error=exc is not None,
    )


def ending_at_eof(client: Half) -> str:
    """At the client's EOF: the node closed first when its EOF is already in, else the client did."""
    node = client.peer
    return NODE_CLOSED if node is not None and node.transport is not None and node.eof else CLIENT_CLOSED


def log_closed(
    *, client: str, forward: int, node: str, to_node: int, to_client: int, duration_s: float, end: str
) -> None:
    """Write one access log line; the format (text or JSON) is the process's --log-format."""
    access.info(
        "connection closed",
        extra={
            "client": client,
            "forward": forward,
            "node": node,
            "bytes_to_node": to_node,
            "bytes_to_client": to_client,
            "duration_s": round(duration_s, 6),
            "end": end,
        },
    )


class RefusalLog:
    """Logs refused connections, at most `limit` lines per `window_s`; the rest are counted, and the count is logged
    when the window ends, so a scan or a flood costs a bounded number of lines whatever its size.

    `clock` and `schedule` are the loop's time and call_later (by default, those of the running loop, found when
    first needed): the summary line comes at the end of the window even when no refusal follows.
    """

    def __init__(
        self,
        log: logging.Logger,
        limit: int = REFUSALS_PER_WINDOW,
        window_s: float = REFUSAL_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.log = log
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.schedule = schedule
        self.window_start = -window_s
        self.logged = 0
        self.suppressed = 0
        self.flush_pending = False

    def refused(self, forward: int, client: str, reason: str, error: str | None = None) -> None:
        now = self.clock()
        if now - self.window_start >= self.window_s:
            self.flush()
            self.window_start = now
            self.logged = 0
        if self.logged < self.limit:
            self.logged += 1
            extra: dict[str, object] = {"forward": forward, "client": client, "reason": reason}
            if error is not None:
                extra["error"] = error
            self.log.info("connection refused", extra=extra)
            return
        self.suppressed += 1
        if not self.flush_pending:
            self.flush_pending = True
            delay = self.window_s - (now - self.window_start)
            if self.schedule is not None:
                self.schedule(delay, self.flush)
            else:
                asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Log how many refusals were not logged since the last line about them (nothing when none were)."""
        self.flush_pending = False
        if self.suppressed:
            count, self.suppressed = self.suppressed, 0
            self.log.warning(
                "connection refusals not logged (rate limit)",
                extra={"suppressed": count, "limit": f"{self.limit} per {self.window_s:g}s"},
            )
