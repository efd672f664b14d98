"""The hot path: a pair of buffered protocols per connection that splice bytes between a client and a node.

Buffer ownership is the one rule that matters here. A read lands in a pooled buffer; after `write()` the peer
transport either sent it all (the buffer goes back to the pool) or kept a *reference* to the unsent tail (uvloop and
Python 3.12+ selector transports both do that without copying), in which case the buffer now belongs to the
transport and we simply drop it. A buffer is never reused while a transport may still read from it.

Busy plain-TCP connections then leave the transports behind ("raw mode", `_Raw`): after a few reads, both halves
read and write duplicates of the two sockets themselves, from `add_reader`/`add_writer` callbacks: small messages
with one `os.read` and one `os.write`, bulk socket -> pipe -> socket with `os.splice`, so those bytes never enter
Python at all. That saves uvloop's per-chunk protocol machinery on small messages and both copies on large ones. In
raw mode the unsent rest of a chunk stays in our pipe (or our own bytes object), which nobody else can see, and the
transports only report `connection_lost`.

Where the C extension was built, raw mode runs in a relay thread instead (`_crelay.c`, one per event loop, started
by the first connection to go raw): it makes the same calls by the same rules without the event loop or the GIL in
between, and `_Raw` is its reference and fallback. Python keeps the control plane: byte counts (`Half.sync_counts`),
closing when the thread reports a connection done (`BufferPool.collect`), and aborts (`Half.stop_raw`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from forwarder import extensions

if TYPE_CHECKING:
    from forwarder._crelay import Link, Relay

log = logging.getLogger("natfwd.relay")

BUFFER_SIZE = 64 * 1024
# uvloop's default low-water mark is 16 bytes, which turns every drain into a pause/resume flap; these keep a few
# buffers in flight per direction and bound memory per connection to about HIGH_WATER per direction.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
POOL_LIMIT = 1024
# A connection goes raw after this many reads on one side: short-lived and idle connections never pay for the
# two extra file descriptors raw mode takes (a duplicate of each socket).
RAW_AFTER_READS = 8
# Raw mode moves each chunk socket -> pipe -> socket with splice: up to a pipe's default capacity per read (16 KiB
# to 1 MiB measured; 64 KiB moved 256 KiB values fastest), cut down to what TCP sends as one packet (splice_chunk).
SPLICE_CHUNK = 64 * 1024
# TCP's size goal for one (GSO) packet: gso_max_size - 1 - MAX_TCP_HEADER (65536 - 1 - 320 on x86_64), rounded
# down to the MSS.
SEGMENT_BUDGET = 65536 - 1 - 320
SPLICE_BURST = 16  # chunks per readiness callback (1 MiB)
# Copy mode reads up to COPY_READ; a read that fills it switches the direction to splicing, and COPY_AFTER_SMALL
# splices in a row of less than BULK_MIN switch it back (splicing pays from about 16 KiB; below, read/write costs
# less CPU, and one short splice is usually just the end of a bulk message).
COPY_READ = 16 * 1024
BULK_MIN = 16 * 1024
COPY_AFTER_SMALL = 8
RAW_FD_SHARE = 8  # raw mode may always use 1/8 of RLIMIT_NOFILE; more when max_connections leaves more
PIPE_POOL_LIMIT = 16  # empty pipes kept for reuse; a pipe is two descriptors
EARLY_LIMIT = 64 * 1024  # bytes held from a client while its node connection is made; reading pauses beyond
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


def splice_chunk(sock: socket.socket) -> int:
    """The most one splice moves for a direction that writes `sock`: a whole number of the packets TCP makes of it.
    A 64 KiB splice left a runt, 65160 + 376 bytes at a 1500-byte MTU, so 9 packets per 256 KiB where the sender
    sent 5 (benchmarks/README.md). SPLICE_CHUNK where the MSS is unknown or beyond the budget."""
    try:
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    except OSError:
        return SPLICE_CHUNK
    if not 0 < mss <= SEGMENT_BUDGET:
        return SPLICE_CHUNK
    packet = SEGMENT_BUDGET // mss * mss
    return SPLICE_CHUNK // packet * packet


def _no_splice(*args: object, **kwargs: object) -> int:
    raise OSError("os.splice is not available")  # never called: take_pipe() gives no pipe without splice


_splice = getattr(os, "splice", _no_splice)  # Linux, Python 3.10+
_read = os.read
_write = os.write
_NO_SPLICE_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
RELAY_PIPES = 32  # pipes the C relay thread may hold (64 descriptors, reserved when it starts)


CRELAY = extensions.load("_crelay")  # tests set this to None to run raw mode in Python


class BufferPool:
    """Free list of equally sized memoryviews over bytearrays, shared by every connection of one event loop.

    Buffers are taken only while a socket is readable, so an idle connection holds none (8000 idle connections
    cost no buffer memory at all). The pool also keeps raw mode's spare pipes, and its file-descriptor budget.
    """

    __slots__ = ("free", "size", "pipes", "extra_fds", "fd_budget", "reserved_fds", "can_splice", "thread",
                 "thread_fds", "links", "no_thread")  # fmt: skip

    def __init__(self, size: int = BUFFER_SIZE) -> None:
        self.size = size
        self.free: list[memoryview] = []
        self.pipes: list[tuple[int, int]] = []  # empty pipes, ready for the next bulk read
        self.extra_fds = 0  # descriptors raw mode holds now: socket duplicates and pipes
        self.fd_budget = -1  # computed on first use: raise_fd_limit() runs before the first connection
        self.reserved_fds = 0  # descriptors the connections themselves may need at max_connections
        self.can_splice = True  # until the kernel refuses it once
        self.thread: Relay | None = None  # the C relay thread, started by the first connection to go raw
        self.thread_fds = 0  # descriptors reserved for the thread's pipes
        self.links: dict[int, Half] = {}  # the thread's connections by link id: the half whose socket is fd0
        self.no_thread = False  # the thread could not start once: raw mode stays in Python, no retry per connection

    def relay_thread(self, loop: asyncio.AbstractEventLoop) -> Relay | None:
        """The C relay thread for this loop (started on first use), or None without the extension."""
        if CRELAY is None:
            extensions.warn_missing(log, "raw mode", "about 3 us more per request")
            return None
        if self.thread is None and not self.no_thread:
            pipes = RELAY_PIPES if self.reserve_fds(2 * RELAY_PIPES) else 0
            try:
                thread: Relay = CRELAY.Relay(pipes)
            except OSError as exc:
                self.extra_fds -= 2 * pipes
                self.no_thread = True
                log.warning("no relay thread, raw mode stays in Python", extra={"error": str(exc)})
                return None
            self.thread_fds = 2 * pipes
            loop.add_reader(thread.fileno(), self.collect)
            self.thread = thread
        return self.thread

    def collect(self) -> None:
        """The thread reports finished connections: close them cleanly, or drop both sides after an error."""
        assert self.thread is not None
        for link_id, failed in self.thread.done():
            half = self.links.pop(link_id, None)
            if half is None:
                continue  # stopped from this side meanwhile (an abort, a drain)
            if failed:
                half.raw_failed()
            else:
                half.raw_close()

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the relay thread; its connections were closed before (drain)."""
        thread = self.thread
        if thread is not None:
            self.thread = None
            loop.remove_reader(thread.fileno())
            thread.close()
            self.extra_fds -= self.thread_fds
            self.thread_fds = 0

    def take(self) -> memoryview:
        free = self.free
        return free.pop() if free else memoryview(bytearray(self.size))

    def give(self, view: memoryview) -> None:
        if len(self.free) < POOL_LIMIT:
            self.free.append(view)

    def reserve_fds(self, count: int) -> bool:
        """Claim `count` descriptors for raw mode; False when that would eat into what accept() needs.

        Raw mode is an optimisation, so it gets what RLIMIT_NOFILE leaves beyond `reserved_fds` (what the
        connection limit needs), and never less than an eighth of the limit: under a limit too tight for both
        (natfwd warns at start), busy connections stay fast at the cost of at most that eighth of the capacity.
        """
        if self.fd_budget < 0:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = 1 << 20 if soft == resource.RLIM_INFINITY else soft
            self.fd_budget = max(limit - self.reserved_fds, limit // RAW_FD_SHARE)
        if self.extra_fds + count > self.fd_budget:
            return False
        self.extra_fds += count
        return True

    def take_pipe(self) -> tuple[int, int] | None:
        """An empty non-blocking pipe (read end, write end), or None without splice or descriptors to spare."""
        if self.pipes:
            return self.pipes.pop()
        if _splice is _no_splice or not self.can_splice or not self.reserve_fds(2):
            return None
        try:
            return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.extra_fds -= 2
            return None

    def give_pipe(self, pipe: tuple[int, int], *, empty: bool) -> None:
        """Return a pipe; one that still holds bytes (a connection died mid-transfer) is closed instead."""
        if empty and len(self.pipes) < PIPE_POOL_LIMIT:
            self.pipes.append(pipe)
            return
        os.close(pipe[0])
        os.close(pipe[1])
        self.extra_fds -= 2


class _Raw:
    """Raw mode for one direction: moves bytes from our socket to the peer's with no transport in between.

    `sock` and `out` are duplicates of the two sockets (uvloop refuses add_reader on a transport's own descriptor);
    both transports stay paused for reading and are never written to again, so nothing can reorder the stream.
    Small messages go through `os.read`/`os.write`, the cheapest calls Python has for them. A read that fills
    COPY_READ means bulk: the direction switches to splicing, socket -> pipe -> socket, so those bytes never enter
    Python; a run of splices that move less than BULK_MIN switches it back. The pipe comes from the loop's pool and goes
    back as soon as it is empty, so one pipe serves every connection unless a peer's socket is full. Without splice
    (not Linux) or without a pipe to spare, a direction keeps copying.
    """

    __slots__ = ("half", "loop", "sock", "out", "fd", "out_fd", "tail", "pipe", "in_pipe", "reading", "writing",
                 "pipes", "copying", "small_splices", "chunk")  # fmt: skip

    def __init__(self, half: Half, loop: asyncio.AbstractEventLoop, sock: socket.socket, out: socket.socket) -> None:
        self.half = half
        self.loop = loop
        self.sock = sock
        self.out = out
        self.fd = sock.fileno()
        self.out_fd = out.fileno()
        self.tail: memoryview | None = None  # copy mode: the unsent rest of a chunk (its own bytes object)
        self.pipe: tuple[int, int] | None = None  # splice mode: only while bytes wait in it for the peer's socket
        self.in_pipe = 0
        self.reading = False
        self.writing = False
        self.pipes = half.pool.pipes  # looked up once: each attribute hop on the hot path costs like a bytecode
        self.copying = True
        self.small_splices = 0  # splices in a row that moved less than BULK_MIN
        self.chunk = splice_chunk(out)

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.fd, self.readable)

    def readable(self) -> None:
        if not self.copying:
            self.splice_chunks()
            return
        # The same system calls as HAProxy (one read, one write per message), and 0.6 µs (lab) to 1.6 µs (loopback)
        # less CPU per request than two splices through a pipe: benchmarks/README.md, "Copy small, splice bulk".
        try:
            data = _read(self.fd, COPY_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.half.raw_failed()
            return
        nbytes = len(data)
        if not nbytes:
            self.half.raw_eof()
            return
        self.half.nbytes += nbytes
        try:
            sent = _write(self.out_fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.half.raw_failed()
            return
        if sent != nbytes:
            self.tail = memoryview(data)[sent:]
            self.wait_writable()
        elif nbytes == COPY_READ and self.half.pool.can_splice:
            self.copying = False  # a full read: more is probably queued, and it is bulk
            self.splice_chunks()

    def splice_chunks(self) -> None:
        pipes = self.pipes
        # A full chunk means more is probably queued: keep splicing instead of going back through epoll for each
        # 64 KiB, up to SPLICE_BURST chunks so one bulk connection cannot starve the others.
        for _ in range(SPLICE_BURST):
            if pipes:
                pipe = pipes.pop()
            else:
                new = self.half.pool.take_pipe()
                if new is None:
                    # No descriptors to spare for a pipe: copy. The socket is still readable, and epoll is
                    # level-triggered, so the chunk comes back as a copy on the next loop turn. Copying it from here
                    # could recurse: a full read switches back to splicing, which finds no pipe again.
                    self.copying = True
                    return
                pipe = new
            try:
                nbytes = _splice(self.fd, pipe[1], self.chunk, None, None, _SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                pipes.append(pipe)
                return
            except OSError as exc:
                pipes.append(pipe)
                if exc.errno in _NO_SPLICE_ERRNOS:  # a kernel or socket that cannot splice: nothing moved, copy instead
                    pool = self.half.pool
                    pool.can_splice = False
                    while pipes:
                        pool.give_pipe(pipes.pop(), empty=False)  # closes them
                    self.copying = True  # for good: pool.can_splice is False now
                    return
                self.half.raw_failed()
                return
            if not nbytes:
                pipes.append(pipe)
                self.half.raw_eof()
                return
            self.half.nbytes += nbytes
            try:
                sent = _splice(pipe[0], self.out_fd, nbytes, None, None, _SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.half.pool.give_pipe(pipe, empty=False)
                self.half.raw_failed()
                return
            if sent != nbytes:
                # The peer's socket is full: the rest stays in the pipe, which is ours until it drains.
                self.pipe = pipe
                self.in_pipe = nbytes - sent
                self.wait_writable()
                return
            pipes.append(pipe)  # empty again, and taken in this very callback: the pool cannot grow from here
            if nbytes >= BULK_MIN:
                self.small_splices = 0
                if nbytes < self.chunk:
                    return
                continue
            # The tail of a bulk message, or a stream of small ones: only a run of small splices means the latter.
            self.small_splices += 1
            if self.small_splices >= COPY_AFTER_SMALL:
                self.small_splices = 0
                self.copying = True
            return

    def flush(self) -> bool | None:
        """Send what waits (a tail, or bytes in the pipe): True when all is out, False when the peer's socket is
        full, None when the connection failed (and raw mode is over)."""
        try:
            tail = self.tail
            if tail is not None:
                sent = _write(self.out_fd, tail)
                if sent < len(tail):
                    self.tail = tail[sent:]
                    return False
                self.tail = None
            pipe = self.pipe
            if pipe is not None:
                while self.in_pipe:
                    self.in_pipe -= _splice(pipe[0], self.out_fd, self.in_pipe, None, None, _SPLICE_FLAGS)
                self.pipe = None
                self.half.pool.give_pipe(pipe, empty=True)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.half.raw_failed()
            return None
        return True

    def wait_writable(self) -> None:
        """Stop reading (that is the backpressure) until the peer's socket takes what waits."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        self.half.reading_paused = True
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.out_fd, self.writable)

    def writable(self) -> None:
        if not self.flush():
            return
        self.writing = False
        self.loop.remove_writer(self.out_fd)
        half = self.half
        half.reading_paused = False
        if not half.eof and not half.closed:
            self.start()

    def stop(self) -> None:
        """Unregister, close our duplicate, give back the buffer and pipe; safe to call twice."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.out_fd)
        pool = self.half.pool
        self.tail = None
        if self.pipe is not None:
            pool.give_pipe(self.pipe, empty=not self.in_pipe)
            self.pipe = None
            self.in_pipe = 0
        if self.fd >= 0:
            self.sock.close()  # our duplicate of this half's socket; the peer's raw closes the other one
            self.fd = -1
            pool.extra_fds -= 1


class Half(asyncio.BufferedProtocol):
    """One direction's reader and the other direction's writer: reads from its own transport, writes to the peer's."""

    __slots__ = ("transport", "peer", "pool", "view", "nbytes", "eof", "reading_paused", "closed", "on_closed", "early",
                 "raw", "reads_left", "link", "link_first")  # fmt: skip

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
        self.raw: _Raw | None = None  # set while this half's direction runs in raw mode
        self.reads_left = RAW_AFTER_READS  # reads until we try raw mode; negative once it cannot apply
        self.link: Link | None = None  # set (on both halves) while the C relay thread moves this connection's bytes
        self.link_first = False  # whether our socket is the link's fd0 (its first count is then ours)

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
            self.pool.give(view)
            reads_left = self.reads_left - 1
            self.reads_left = reads_left
            if not reads_left:
                self.take_over()

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

    # --- raw mode ----------------------------------------------------------------------------------------------
    def take_over(self) -> None:
        """Switch the whole connection to raw mode when it qualifies; it stays in transport mode otherwise.

        It qualifies when both sides are plain TCP (no TLS), neither half's class looks at the bytes (a subclass
        that overrides buffer_updated, like the rewriting halves, never goes raw), nothing is held back or
        buffered in a transport, and the descriptor budget allows two duplicates.
        """
        peer = self.peer
        if (
            peer is None
            or self.transport is None
            or peer.transport is None
            or type(self).buffer_updated is not Half.buffer_updated
            or type(peer).buffer_updated is not Half.buffer_updated
            or _plain_socket(self.transport) is None
            or _plain_socket(peer.transport) is None
        ):
            self.reads_left = -1  # never: these do not change during a connection
            return
        if (
            self.closed
            or peer.closed
            or self.eof
            or peer.eof
            or self.early is not None
            or peer.early is not None
            or self.reading_paused
            or peer.reading_paused
            or self.transport.get_write_buffer_size()
            or peer.transport.get_write_buffer_size()
        ):
            self.reads_left = RAW_AFTER_READS  # not now: try again a few reads later
            return
        if not self.pool.reserve_fds(2):
            self.reads_left = RAW_AFTER_READS * 64
            return
        try:
            mine = duplicate(self.transport)
            try:
                theirs = duplicate(peer.transport)
            except OSError:
                mine.close()
                raise
        except OSError:
            self.pool.extra_fds -= 2
            self.reads_left = -1
            return
        for half in (self, peer):
            if half.view is not None:
                half.pool.give(half.view)
                half.view = None
            assert half.transport is not None
            half.transport.pause_reading()
        loop = asyncio.get_running_loop()
        thread = self.pool.relay_thread(loop)
        if thread is not None:
            try:
                link: Link = thread.add(mine.fileno(), theirs.fileno(), self.nbytes, peer.nbytes)
            except (OSError, MemoryError) as exc:
                log.debug("relay thread refused a connection, raw mode in Python", extra={"error": str(exc)})
            else:
                mine.detach()  # the descriptors are the thread's now: Link.stop closes them
                theirs.detach()
                self.link = peer.link = link
                self.link_first = True
                peer.link_first = False
                self.pool.links[link.id] = self
                peer.reads_left = -1
                return
        self.raw = _Raw(self, loop, mine, theirs)
        peer.raw = _Raw(peer, loop, theirs, mine)
        peer.reads_left = -1
        self.raw.start()
        peer.raw.start()

    def raw_eof(self) -> None:
        """Raw mode: our side sent EOF. Pass it on (half-close); close everything once both directions are done."""
        self.eof = True
        raw = self.raw
        peer = self.peer
        assert raw is not None and peer is not None
        if raw.reading:
            raw.reading = False
            raw.loop.remove_reader(raw.fd)
        if peer.eof or peer.closed:
            self.raw_close()
            return
        try:
            raw.out.shutdown(socket.SHUT_WR)
        except OSError:
            self.raw_failed()

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
            self.pool.links.pop(link.id, None)
            self.pool.extra_fds -= 2
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
            elif raw.reading:
                raw.reading = False
                raw.loop.remove_reader(raw.fd)

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
        # uvloop's transports are not asyncio.Transport subclasses, so this is a cast, not an isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
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


def _plain_socket(transport: asyncio.BaseTransport) -> Any:
    """The transport's TCP socket, or None for TLS (raw mode would bypass the encryption) and non-TCP."""
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock: Any = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    return sock


def duplicate(transport: asyncio.BaseTransport) -> socket.socket:
    """A non-blocking duplicate of a plain transport's socket; raises OSError (EMFILE) when there is none to spare."""
    sock = socket.socket(fileno=os.dup(_plain_socket(transport).fileno()))
    sock.setblocking(False)
    return sock


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Both uvloop and asyncio already set TCP_NODELAY on TCP transports; this makes it explicit and loop-proof."""
    sock: Any = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
