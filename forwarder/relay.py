"""The hot path: a pair of buffered protocols per connection that relay bytes between a client and a node.

Buffer ownership is the one rule that matters here. A read lands in a pooled buffer; after `write()` the peer
transport either sent it all (the buffer goes back to the pool) or kept a *reference* to the unsent tail (uvloop and
Python 3.12+ selector transports both do that without copying), in which case the buffer now belongs to the
transport and we simply drop it. A buffer is never reused while a transport may still read from it.

Busy plain-TCP connections then leave the transports behind (raw mode, forwarder/rawmode.py). Python keeps the
control plane: byte counts (`Half.sync_counts`), closing when raw mode reports a connection done (`raw_close`,
`raw_failed`), and aborts (`Half.stop_raw`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from forwarder import rawmode
from forwarder.rawmode import RAW_AFTER_READS, PyRaw
from forwarder.resources import BUFFER_SIZE as BUFFER_SIZE
from forwarder.resources import POOL_LIMIT, Resources

if TYPE_CHECKING:
    from forwarder._crelay import Link

# uvloop's default low-water mark is 16 bytes, which turns every drain into a pause/resume flap; these keep a few
# buffers in flight per direction and bound memory per connection to about HIGH_WATER per direction.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
EARLY_LIMIT = 64 * 1024  # bytes held from a client while its node connection is made; reading pauses beyond


class Half(asyncio.BufferedProtocol):
    """One direction's reader and the other direction's writer: reads from its own transport, writes to the peer's.

    `verbatim` is raw mode's eligibility rule (rawmode.eligible): a subclass that overrides buffer_updated looks at
    the bytes (the rewriting halves do), so raw mode must never bypass it.
    """

    verbatim: ClassVar[bool] = True

    __slots__ = ("transport", "peer", "pool", "view", "nbytes", "eof", "reading_paused", "closed", "on_closed", "early",
                 "raw", "reads_left", "link", "link_first")  # fmt: skip

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.verbatim = cls.buffer_updated is Half.buffer_updated

    def __init__(self, pool: Resources) -> None:
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
        self.raw: PyRaw | None = None  # set while this half's direction runs in raw mode
        self.reads_left = RAW_AFTER_READS  # reads until we try raw mode; negative once it cannot apply
        self.link: Link | None = None  # set (on both halves) while the C relay thread moves this connection's bytes
        self.link_first = False  # whether our socket is the link's fd0 (its first count is then ours)

    # --- reading -----------------------------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        view = self.view
        if view is None:
            free = self.pool.free  # Resources.take, inlined: this runs before every read
            view = self.view = free.pop() if free else self.pool.take()
        return view

    def buffer_updated(self, nbytes: int) -> None:
        view = self.view
        assert view is not None and self.peer is not None
        self.nbytes += nbytes
        transport = self.peer.transport
        if transport is None or self.early is not None:  # held bytes go first, when release_early sends them
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
            free = self.pool.free  # Resources.give, inlined: this runs after every read
            if len(free) < POOL_LIMIT:
                free.append(view)
            reads_left = self.reads_left - 1
            self.reads_left = reads_left
            if not reads_left:
                rawmode.take_over(self)

    def hold(self, view: memoryview, nbytes: int) -> None:
        """Keep bytes that arrive before the peer is connected; stop reading only once EARLY_LIMIT are held.

        Reading on (rather than pausing at the first bytes) is what notices a client that resets or half-closes
        while the node connection is still being made. uvloop starts reading right after connection_made whatever
        the protocol asked there, so the client side cannot simply be paused at accept anyway.
        """
        if self.early is None:
            self.early = bytearray()
        self.early += view[:nbytes]
        # The bytes are copied now: give the buffer back, or every client that speaks first (all of them, for
        # memcached and Redis) keeps a 64 KiB buffer for as long as it stays idle afterwards.
        self.view = None
        self.pool.give(view)
        if len(self.early) >= EARLY_LIMIT:
            self.pause_reading()

    def release_early(self) -> None:
        """The peer is connected now: send what was held back, and the EOF if one came meanwhile; read on."""
        early = self.early
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        if early is not None:
            self.early = None
            peer.transport.write(bytes(early))
        if not self.eof:
            self.resume_reading()
        elif not self.pass_eof(peer) and self.transport is not None:
            self.transport.close()  # as returning False from eof_received would have

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.closed:
            return False
        if self.early is not None:
            return True  # a request, then EOF, before the node is connected: release_early passes both on
        if peer.transport is None:
            return False
        return self.pass_eof(peer)

    def pass_eof(self, peer: Half) -> bool:
        """Half-close the connected peer after our EOF; False when the whole connection should close instead."""
        assert peer.transport is not None
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

    # --- raw mode: the control plane (rawmode.py moves the bytes) ---------------------------------------------
    def raw_eof(self) -> None:
        """Raw mode: our side sent EOF. Pass it on (half-close); close everything once both directions are done."""
        self.eof = True
        raw = self.raw
        peer = self.peer
        assert raw is not None and peer is not None
        raw.stop_reading()
        if peer.eof or peer.closed:
            self.raw_close()
            return
        raw.shutdown_peer()

    def raw_close(self) -> None:
        """Raw mode, both directions done: close both connections (the transports then report connection_lost)."""
        self.stop_raw()
        for half in (self, self.peer):
            if half is not None and half.transport is not None and not half.closed:
                half.transport.close()

    def raw_failed(self) -> None:
        """Raw mode, a socket error (reset, broken pipe): drop both connections, as a transport would."""
        self.abort()
        if self.peer is not None:
            self.peer.abort()

    def to_thread(self) -> None:
        """PyRaw's handoff to the C relay thread: used by connections that never had transports (DirectClient)."""

    def sync_counts(self) -> None:
        """Bring both halves' byte counts up to date while the relay thread moves their bytes (metrics, idle)."""
        link = self.link
        if link is not None:
            self.take_counts(link.counts())

    def take_counts(self, counts: tuple[int, int]) -> None:
        first, second = counts if self.link_first else counts[::-1]
        self.nbytes = first
        if self.peer is not None:
            self.peer.nbytes = second

    def stop_raw(self) -> None:
        """Leave raw mode for both directions (duplicates closed, callbacks removed); a no-op outside it."""
        link = self.link
        if link is not None:
            self.take_counts(link.stop())  # closes both duplicates; the thread will not touch them again
            for half in (self, self.peer):
                if half is not None:
                    half.link = None
            self.pool.unlink(link)
        for half in (self, self.peer):
            if half is not None and half.raw is not None:
                raw = half.raw
                half.raw = None
                raw.stop()

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
            raw = self.raw
            if self.link is not None:
                pass  # the relay thread reads, and applies its own backpressure
            elif raw is None:
                self.transport.pause_reading()
            else:
                raw.stop_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed and self.link is None:
            raw = self.raw
            if raw is None:
                self.reading_paused = False
                self.transport.resume_reading()
            elif not raw.writing:  # while raw mode waits for the peer's socket, reading stays paused
                self.reading_paused = False
                if not self.eof:
                    raw.start()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check; and no typing.cast(),
        # which is a function call at run time, once per half of every connection.
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:  # called already: by ClientHalf._connect when the loop would not (uvloop, after a cancel)
            return
        if self.link is not None or self.raw is not None or (self.peer is not None and self.peer.raw is not None):
            self.stop_raw()
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
        # Raw mode first: while our duplicates stay open, closing the transport's descriptor does not close the
        # socket (connection_lost would, a loop iteration later).
        self.stop_raw()
        if self.transport is not None and not self.closed:
            self.transport.abort()
