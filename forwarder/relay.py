"""The hot path: a pair of buffered protocols per connection that splice bytes between a client and a node.

Buffer ownership is the one rule that matters here. A read lands in a pooled buffer; after `write()` the peer
transport either sent it all (the buffer goes back to the pool) or kept a *reference* to the unsent tail (uvloop and
Python 3.12+ selector transports both do that without copying), in which case the buffer now belongs to the
transport and we simply drop it. A buffer is never reused while a transport may still read from it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from forwarder.protocols import Rewriter

log = logging.getLogger("natfwd.relay")

BUFFER_SIZE = 64 * 1024
# uvloop's default low-water mark is 16 bytes, which turns every drain into a pause/resume flap; these keep a few
# buffers in flight per direction and bound memory per connection to about HIGH_WATER per direction.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
POOL_LIMIT = 1024


class BufferPool:
    """Free list of equally sized memoryviews over bytearrays, shared by every connection of one event loop.

    Buffers are taken only while a socket is readable, so an idle connection holds none (8000 idle connections
    cost no buffer memory at all).
    """

    __slots__ = ("free", "size")

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self.size = size
        self.free: list[memoryview] = []

    def take(self) -> memoryview:
        free = self.free
        return free.pop() if free else memoryview(bytearray(self.size))

    def give(self, view: memoryview) -> None:
        if len(self.free) < POOL_LIMIT:
            self.free.append(view)


class Half(asyncio.BufferedProtocol):
    """One direction's reader and the other direction's writer: reads from its own transport, writes to the peer's."""

    __slots__ = ("transport", "peer", "pool", "view", "nbytes", "eof", "reading_paused", "closed", "on_closed", "early")

    def __init__(self, pool: BufferPool) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pool = pool
        self.view: memoryview | None = None
        self.nbytes = 0  # bytes read from this side; the metrics sweeper takes deltas of it
        self.eof = False
        self.reading_paused = False
        self.closed = False
        self.on_closed: Callable[[], None] | None = None
        self.early: bytearray | None = None  # bytes read before the peer connection existed

    # --- reading -----------------------------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        view = self.view
        if view is None:
            view = self.view = self.pool.take()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self.view
        assert view is not None and self.peer is not None
        self.nbytes += nbytes
        transport = self.peer.transport
        if transport is None:
            self.hold(view, nbytes)
            return
        if self.peer.closed:
            return
        transport.write(view[:nbytes])
        if transport.get_write_buffer_size():
            # The transport kept a reference to the unsent tail: hand the buffer over, never reuse it.
            self.view = None
        else:
            self.view = None
            self.pool.give(view)

    def hold(self, view: memoryview, nbytes: int) -> None:
        """Keep bytes that arrive before the peer is connected, and stop reading until it is.

        uvloop starts reading right after connection_made whatever the protocol asked there, so the client side
        cannot simply be paused at accept.
        """
        if self.early is None:
            self.early = bytearray()
        self.early += view[:nbytes]
        # The bytes are copied now: give the buffer back, or every client that speaks first (all of them, for
        # memcached and Redis) keeps a 64 KiB buffer for as long as it stays idle afterwards.
        self.view = None
        self.pool.give(view)
        self.pause_reading()

    def release_early(self) -> None:
        """The peer is connected now: send what was held back and start reading again."""
        early = self.early
        peer = self.peer
        if early is not None and peer is not None and peer.transport is not None:
            self.early = None
            peer.transport.write(bytes(early))
        self.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return False
        if peer.eof or not peer.transport.can_write_eof():
            # Both directions are done (or TLS, which cannot half-close): close() still flushes pending writes.
            peer.transport.close()
            return False
        try:
            peer.transport.write_eof()
        except (OSError, RuntimeError):
            peer.transport.close()
            return False
        return True  # keep our transport open: the other direction may still be sending

    # --- flow control: our transport's write buffer is the peer's reads, so pause/resume the peer ---------------
    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so this is a cast, not an isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        view = self.view
        if view is not None:
            self.view = None
            self.pool.give(view)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            # Flushes what we already relayed to the peer, then closes it.
            peer.transport.close()
        if self.on_closed is not None:
            self.on_closed()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class RewritingHalf(Half):
    """A node-side half whose replies pass through a protocol rewriter (Auto Discovery, Redis Cluster redirects).

    Rewriting allocates per chunk, which is why only forwards that need it use this class.
    """

    __slots__ = ("rewriter", "observes_requests")

    def __init__(self, pool: BufferPool, rewriter: Rewriter, *, observes_requests: bool) -> None:
        super().__init__(pool)
        self.rewriter = rewriter
        self.observes_requests = observes_requests

    def buffer_updated(self, nbytes: int) -> None:
        view = self.view
        assert view is not None and self.peer is not None
        self.nbytes += nbytes
        transport = self.peer.transport
        if transport is None:
            if self.observes_requests:
                self.rewriter.from_client(bytes(view[:nbytes]))
            self.hold(view, nbytes)
            return
        if self.peer.closed:
            return
        # The rewriter copies what it holds back, so the view is free again once it returns.
        if self.observes_requests:
            self.rewriter.from_client(bytes(view[:nbytes]))
            transport.write(view[:nbytes])
            if transport.get_write_buffer_size():
                self.view = None
                return
        else:
            out = self.rewriter.from_node(bytes(view[:nbytes]))
            if out:
                transport.write(out)
        self.view = None
        self.pool.give(view)

    def eof_received(self) -> bool:
        if not self.observes_requests and self.peer is not None and self.peer.transport is not None:
            rest = self.rewriter.flush()
            if rest and not self.peer.closed:
                self.peer.transport.write(rest)
        return super().eof_received()


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Both uvloop and asyncio already set TCP_NODELAY on TCP transports; this makes it explicit and loop-proof."""
    sock: Any = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
