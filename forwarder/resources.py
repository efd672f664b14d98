"""Per-process relay resources: pooled buffers, raw mode's pipes and descriptor budget, and the C relay thread."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from forwarder import fdlimit

if TYPE_CHECKING:
    from forwarder._crelay import Link, Relay

log = logging.getLogger("natfwd.relay")

BUFFER_SIZE = 64 * 1024
POOL_LIMIT = 1024  # free buffers kept for reuse
PIPE_POOL_LIMIT = 16  # empty pipes kept for reuse; a pipe is two descriptors
RELAY_PIPES = 32  # pipes the C relay thread may hold (64 descriptors, reserved when it starts)
INLINE_PIPES = 16  # pipes the inline C relay may hold (32 descriptors, reserved when it starts)
# What Relay.run() reports (forwarder/_crelay.c's REPORT_*).
REPORT_DONE, REPORT_FAILED, REPORT_CONNECTED, REPORT_CONNECT_FAILED, REPORT_BUSY = range(5)
CAN_SPLICE = hasattr(os, "splice")  # Linux, Python 3.10+


class LinkOwner(Protocol):
    """What the relay thread's reports reach: the half whose socket is the link's fd0 (relay.Half)."""

    def raw_close(self) -> None: ...  # both directions done
    def raw_failed(self) -> None: ...  # a socket error


class InlineOwner(Protocol):
    """What the inline relay's reports reach: the client half of a connection it relays (direct.InlineClient)."""

    def link_connected(self, connect_ns: int) -> None: ...
    def link_connect_failed(self, error: int) -> None: ...
    def link_busy(self) -> None: ...
    def link_ended(self, failed: bool, side: int) -> None: ...


class Resources:
    """What every connection of one event loop shares: a free list of equally sized buffers, raw mode's empty pipes
    and descriptor budget, and the C relay thread with its table of connections.

    Buffers are taken only while a socket is readable, so an idle connection holds none. Descriptors beyond the
    connections' own (socket duplicates, pipes, the thread's pipes) are counted here, through reserve_fds and
    release_fds, so raw mode never takes what accept() needs.
    """

    __slots__ = ("free", "size", "pipes", "extra_fds", "fd_budget", "reserved_fds", "can_splice", "thread",
                 "thread_fds", "links", "no_thread", "inline", "inline_fds", "inline_links", "no_inline")  # fmt: skip

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self.size = size
        self.free: list[memoryview] = []
        # Empty pipes, ready for the next bulk read. Raw mode's hot loop pops and appends this list directly (a pipe
        # taken and emptied in one callback goes straight back); only take_pipe and give_pipe open and close pipes.
        self.pipes: list[tuple[int, int]] = []
        self.extra_fds = 0  # descriptors raw mode holds now: socket duplicates and pipes
        self.fd_budget = -1  # computed on first use, from the limit raise_fd_limit() left
        self.reserved_fds = 0  # descriptors the connections themselves may need at max_connections
        self.can_splice = CAN_SPLICE  # until the kernel refuses it once
        self.thread: Relay | None = None  # the C relay thread, started by the first connection to go raw
        self.thread_fds = 0  # descriptors reserved for the thread's pipes
        self.links: dict[int, LinkOwner] = {}  # the thread's connections by link id: the half whose socket is fd0
        self.no_thread = False  # the thread could not start once: raw mode stays in Python, no retry per connection
        self.inline: Relay | None = None  # the inline C relay (direct.InlineClient), made with the first plain listener
        self.inline_fds = 0  # descriptors reserved for its pipes
        self.inline_links: dict[int, InlineOwner] = {}  # its connections by link id
        self.no_inline = False  # it could not start once: plain connections stay in Python

    # --- buffers ----------------------------------------------------------------------------------------------
    def take(self) -> memoryview:
        free = self.free
        return free.pop() if free else memoryview(bytearray(self.size))

    def give(self, view: memoryview) -> None:
        if len(self.free) < POOL_LIMIT:
            self.free.append(view)

    # --- descriptors ------------------------------------------------------------------------------------------
    def reserve_for_connections(self, max_connections: int) -> None:
        """Keep what `max_connections` connections need out of raw mode's budget (at start, and after a reload)."""
        self.reserved_fds = fdlimit.fds_needed(max_connections)
        self.fd_budget = -1  # recomputed at the next reservation

    def cap_fds(self, budget: int) -> None:
        """Fix raw mode's budget at `budget` descriptors, whatever the limit (tests use it to exhaust the budget)."""
        self.fd_budget = budget

    def reserve_fds(self, count: int) -> bool:
        """Claim `count` descriptors for raw mode; False when that would eat into what accept() needs."""
        if self.fd_budget < 0:
            self.fd_budget = fdlimit.raw_budget(self.reserved_fds)
        if self.extra_fds + count > self.fd_budget:
            return False
        self.extra_fds += count
        return True

    def release_fds(self, count: int) -> None:
        """Give back `count` descriptors reserved with reserve_fds, once they are closed (or were never opened)."""
        self.extra_fds -= count

    # --- pipes ------------------------------------------------------------------------------------------------
    def take_pipe(self) -> tuple[int, int] | None:
        """An empty non-blocking pipe (read end, write end), or None without splice or descriptors to spare."""
        if self.pipes:
            return self.pipes.pop()
        if not self.can_splice or not self.reserve_fds(2):
            return None
        try:
            return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.release_fds(2)
            return None

    def give_pipe(self, pipe: tuple[int, int], *, empty: bool) -> None:
        """Return a pipe; one that still holds bytes (a connection died mid-transfer) is closed instead."""
        if empty and len(self.pipes) < PIPE_POOL_LIMIT:
            self.pipes.append(pipe)
            return
        os.close(pipe[0])
        os.close(pipe[1])
        self.release_fds(2)

    def splice_refused(self) -> None:
        """The kernel or a socket cannot splice: stop handing out pipes, and close the pooled ones."""
        self.can_splice = False
        while self.pipes:
            self.give_pipe(self.pipes.pop(), empty=False)

    # --- the C relay thread -----------------------------------------------------------------------------------
    def relay_thread(self, loop: asyncio.AbstractEventLoop, start: Callable[[int], Relay]) -> Relay | None:
        """This loop's relay thread, started with `start(pipe_limit)` on first use; None when it could not start."""
        if self.thread is None and not self.no_thread:
            made = self._made(RELAY_PIPES, start, "no relay thread, raw mode stays in Python")
            if made is None:
                self.no_thread = True
                return None
            self.thread, self.thread_fds = made
            loop.add_reader(self.thread.fileno(), self.collect)
        return self.thread

    def inline_relay(self, loop: asyncio.AbstractEventLoop, start: Callable[..., Relay]) -> Relay | None:
        """This loop's inline relay, made with `start(pipe_limit, threaded=False)` on first use; None when it could
        not be."""
        if self.inline is None and not self.no_inline:
            made = self._made(
                INLINE_PIPES,
                lambda pipes: start(pipes, threaded=False),
                "no inline relay, plain connections stay in Python",
            )
            if made is None:
                self.no_inline = True
                return None
            self.inline, self.inline_fds = made
            loop.add_reader(self.inline.fileno(), self.run_inline)
        return self.inline

    def _made(self, pipes: int, start: Callable[[int], Relay], failure: str) -> tuple[Relay, int] | None:
        """A relay from `start`, with descriptors for `pipes` pipes reserved if the budget has them (else none), and
        the descriptors it holds; None, the reservation released and `failure` logged, when it cannot start."""
        pipes = pipes if self.reserve_fds(2 * pipes) else 0
        try:
            relay = start(pipes)
        except OSError as exc:
            self.release_fds(2 * pipes)
            log.warning(failure, extra={"error": str(exc)})
            return None
        return relay, 2 * pipes

    def run_inline(self) -> None:
        """The inline relay's turn, from the loop: it moves what is ready, and its reports reach their owners."""
        assert self.inline is not None
        links = self.inline_links
        for link_id, kind, value in self.inline.run():
            if kind == REPORT_CONNECTED:
                owner = links.get(link_id)
                if owner is not None:
                    owner.link_connected(value)
            elif kind == REPORT_BUSY:
                owner = links.get(link_id)
                if owner is not None:
                    owner.link_busy()
            else:
                owner = links.pop(link_id, None)
                if owner is None:
                    continue  # stopped from this side meanwhile (an abort, a drain)
                if kind == REPORT_CONNECT_FAILED:
                    owner.link_connect_failed(value)
                else:
                    owner.link_ended(kind == REPORT_FAILED, value)

    def link(self, link: Link, owner: LinkOwner) -> None:
        """The thread moves a connection's bytes now; `owner` hears when it is done."""
        self.links[link.id] = owner

    def unlink(self, link: Link) -> None:
        """A connection left the thread (Link.stop closed both duplicates): its two descriptors are free."""
        self.links.pop(link.id, None)
        self.release_fds(2)

    def collect(self) -> None:
        """The thread reports finished connections: close them cleanly, or drop both sides after an error."""
        assert self.thread is not None
        for link_id, failed in self.thread.done():
            owner = self.links.pop(link_id, None)
            if owner is None:
                continue  # stopped from this side meanwhile (an abort, a drain)
            if failed:
                owner.raw_failed()
            else:
                owner.raw_close()

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the relay thread and the inline relay; their connections were closed before (drain)."""
        inline = self.inline
        if inline is not None:
            self.inline = None
            loop.remove_reader(inline.fileno())
            inline.close()
            self.release_fds(self.inline_fds)
            self.inline_fds = 0
        thread = self.thread
        if thread is not None:
            self.thread = None
            loop.remove_reader(thread.fileno())
            thread.close()
            self.release_fds(self.thread_fds)
            self.thread_fds = 0
