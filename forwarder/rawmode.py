"""Raw mode: which connections leave their transports behind, and what then moves their bytes (C thread or Python).

A busy plain-TCP connection goes raw after RAW_AFTER_READS reads: both directions then read and write duplicates of
the two sockets themselves, small messages with one `os.read` and one `os.write`, bulk socket -> pipe -> socket with
`os.splice`, so those bytes never enter Python at all. That saves the transports' per-chunk protocol machinery on
small messages and both copies on large ones. The unsent rest of a chunk stays in our pipe (or our own bytes
object), which nobody else can see; both transports stay paused and only report `connection_lost`.

Two implementations make the same calls by the same rules, and `start` chooses between them in one place: the C
relay thread (`_crelay.c`, one per event loop, started by the first connection to go raw), which needs neither the
event loop nor the GIL in between; and `PyRaw`, the reference and fallback, run from the loop's reader callbacks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, ClassVar, Protocol

from forwarder import extensions, sockets
from forwarder.poller import Watcher
from forwarder.resources import Resources

if TYPE_CHECKING:
    from forwarder._crelay import Link, Relay

log = logging.getLogger("natfwd.relay")

# A connection goes raw after this many reads on one side: short-lived and idle connections never pay for the
# two extra file descriptors raw mode takes (a duplicate of each socket).
RAW_AFTER_READS = 8
# Raw mode moves each chunk socket -> pipe -> socket with splice: up to a pipe's default capacity (16 pages) per
# splice, cut down to whole packets of the socket written (splice_chunk).
SPLICE_CHUNK = 64 * 1024
# TCP's size goal for one (GSO) packet: gso_max_size - 1 - MAX_TCP_HEADER (65536 - 1 - 320 on x86_64), rounded
# down to the MSS.
SEGMENT_BUDGET = 65536 - 1 - 320
SPLICE_BURST = 16  # chunks per readiness callback (1 MiB)
# Copy mode reads up to COPY_READ; a read that fills it switches the direction to splicing, and COPY_AFTER_SMALL
# splices in a row of less than BULK_MIN switch it back (below BULK_MIN a read and a write cost less CPU than two
# splices, and one short splice is usually just the end of a bulk message).
COPY_READ = 16 * 1024
BULK_MIN = 16 * 1024
COPY_AFTER_SMALL = 8
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_NO_SPLICE_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _no_splice(*args: object, **kwargs: object) -> int:
    raise OSError("os.splice is not available")  # never called: Resources.take_pipe gives no pipe without splice


_splice = getattr(os, "splice", _no_splice)  # Linux, Python 3.10+
_write = sockets.write
_os_read = os.read
_os_write = os.write
_AGAIN = sockets.AGAIN

CRELAY = extensions.load("_crelay")  # tests set this to None to run raw mode in Python


def splice_chunk(sock: socket.socket) -> int:
    """The most one splice moves for a direction that writes `sock`: a whole number of the packets TCP makes of it.

    TCP cuts each splice into packets on its own, so a splice that is not a whole number of them ends in a runt: a
    64 KiB splice at a 1448-byte MSS goes out as 45 full packets and one of 376 bytes. SPLICE_CHUNK where the MSS
    is unknown or beyond the budget.
    """
    try:
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    except OSError:
        return SPLICE_CHUNK
    if not 0 < mss <= SEGMENT_BUDGET:
        return SPLICE_CHUNK
    packet = SEGMENT_BUDGET // mss * mss
    return SPLICE_CHUNK // packet * packet


class RawHalf(Protocol):
    """What raw mode reads and sets on each half of a connection (relay.Half)."""

    # The eligibility rule: a half whose class relays its bytes verbatim (it does not override
    # Half.buffer_updated, as the rewriting halves do) may be bypassed; relay.Half sets it for every subclass.
    verbatim: ClassVar[bool]
    transport: asyncio.Transport | None
    pool: Resources
    view: memoryview | None
    nbytes: int
    eof: bool
    closed: bool
    reading_paused: bool
    early: bytearray | None
    raw: PyRaw | None
    reads_left: int
    link: Link | None
    link_first: bool

    @property
    def peer(self) -> RawHalf | None: ...
    def raw_eof(self) -> None: ...  # our side sent EOF
    def raw_failed(self) -> None: ...  # a socket error: drop both sides
    def raw_close(self) -> None: ...  # both directions done: close both sides
    def to_thread(self) -> None: ...  # busy enough for the C relay thread (PyRaw's `handoff`)


def eligible(half: RawHalf, peer: RawHalf) -> bool:
    """Whether the connection may ever go raw: both halves relay verbatim, over plain TCP (no TLS) on both sides.

    Nothing this checks changes during a connection.
    """
    return (
        half.verbatim
        and peer.verbatim
        and half.transport is not None
        and peer.transport is not None
        and sockets.plain_socket(half.transport) is not None
        and sockets.plain_socket(peer.transport) is not None
    )


def _quiet(half: RawHalf) -> bool:
    """Nothing held back, buffered in the transport, paused or ending: the stream can change hands without a gap."""
    transport = half.transport
    return (
        transport is not None
        and not half.closed
        and not half.eof
        and half.early is None
        and not half.reading_paused
        and not transport.get_write_buffer_size()
    )


def take_over(half: RawHalf) -> None:
    """Switch the whole connection to raw mode when it qualifies; it stays in transport mode otherwise.

    It qualifies when it is `eligible`, both halves are `_quiet`, and the descriptor budget allows two duplicates.
    Sets `half.reads_left` to when to try again: never (-1), or a few reads later.
    """
    peer = half.peer
    if peer is None or not eligible(half, peer):
        half.reads_left = -1  # never
        return
    if not (_quiet(half) and _quiet(peer)):
        half.reads_left = RAW_AFTER_READS  # not now: try again a few reads later
        return
    pool = half.pool
    if not pool.reserve_fds(2):
        half.reads_left = RAW_AFTER_READS * 64
        return
    assert half.transport is not None and peer.transport is not None
    try:
        mine = sockets.duplicate(half.transport)
        try:
            theirs = sockets.duplicate(peer.transport)
        except OSError:
            mine.close()
            raise
    except OSError:
        pool.release_fds(2)
        half.reads_left = -1
        return
    for each in (half, peer):
        if each.view is not None:
            pool.give(each.view)
            each.view = None
        assert each.transport is not None
        each.transport.pause_reading()
    peer.reads_left = -1
    start(half, peer, mine, theirs, asyncio.get_running_loop())


def start(
    half: RawHalf, peer: RawHalf, mine: socket.socket, theirs: socket.socket, loop: asyncio.AbstractEventLoop
) -> None:
    """Move the connection's bytes in the C relay thread where it runs, else in a PyRaw per direction."""
    thread = _relay_thread(half.pool, loop)
    if thread is not None:
        try:
            link: Link = thread.add(mine.fileno(), theirs.fileno(), half.nbytes, peer.nbytes)
        except (OSError, MemoryError) as exc:
            log.debug("relay thread refused a connection, raw mode in Python", extra={"error": str(exc)})
        else:
            mine.detach()  # the descriptors are the thread's now: Link.stop closes them
            theirs.detach()
            half.link = peer.link = link
            half.link_first = True
            peer.link_first = False
            half.pool.link(link, half)
            return
    half.raw = PyRaw(half, loop, mine, theirs)
    peer.raw = PyRaw(peer, loop, theirs, mine)
    half.raw.start()
    peer.raw.start()


def inline_relay(pool: Resources, loop: asyncio.AbstractEventLoop) -> Relay | None:
    """The loop's inline C relay (direct.InlineClient), or None without the C extension."""
    if CRELAY is None:
        return None
    return pool.inline_relay(loop, CRELAY.Relay)


def _relay_thread(pool: Resources, loop: asyncio.AbstractEventLoop) -> Relay | None:
    if CRELAY is None:
        extensions.warn_missing(log, "raw mode", "about 3 us more per request")
        return None
    return pool.relay_thread(loop, CRELAY.Relay)


class PyRaw:
    """Raw mode in Python for one direction: moves bytes from our socket to the peer's with no transport in between.

    `sock` and `out` are duplicates of the two sockets (uvloop refuses add_reader on a transport's own descriptor);
    both transports stay paused for reading and are never written to again, so nothing can reorder the stream.
    Small messages go through `os.read`/`os.write`, the cheapest calls Python has for them. A read that fills
    COPY_READ means bulk: the direction switches to splicing, socket -> pipe -> socket, so those bytes never enter
    Python; a run of splices that move less than BULK_MIN switches it back. The pipe comes from the loop's pool and
    goes back as soon as it is empty, so one pipe serves every connection unless a peer's socket is full. Without
    splice (not Linux) or without a pipe to spare, a direction keeps copying.
    """

    __slots__ = ("half", "pool", "loop", "sock", "out", "fd", "out_fd", "tail", "pipe", "in_pipe", "reading",
                 "writing", "pipes", "copying", "small_splices", "chunk", "duplicate", "handoff")  # fmt: skip

    def __init__(
        self,
        half: RawHalf,
        loop: Watcher,
        sock: socket.socket,
        out: socket.socket,
        *,
        duplicate: bool = True,
        handoff: int = 0,
    ) -> None:
        self.half = half
        self.pool = half.pool
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
        self.pipes = self.pool.pipes  # looked up once: each attribute hop on the hot path costs like a bytecode
        self.copying = True
        self.small_splices = 0  # splices in a row that moved less than BULK_MIN
        self.chunk = 0  # splice_chunk(out), asked for (a system call) at the first splice: most never splice
        # `sock` is a duplicate (reserved with reserve_fds) or, for a connection that never had transports, the
        # connection's own socket.
        self.duplicate = duplicate
        # Reads until the connection is offered to the C relay thread (half.to_thread); 0: never.
        self.handoff = handoff

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.fd, self.readable)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def failed(self, exc: OSError) -> None:
        self.half.raw_failed()

    def readable(self) -> None:
        if not self.copying:
            self.splice_chunks()
            return
        # One read and one write per message, as HAProxy does: for a small message that is less CPU than two
        # splices through a pipe. sockets.read and sockets.write, inlined: this runs for every message.
        try:
            data = _os_read(self.fd, COPY_READ)
        except _AGAIN:
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
            sent = _os_write(self.out_fd, data)
        except _AGAIN:
            sent = 0
        except OSError:
            self.half.raw_failed()
            return
        if sent != nbytes:
            self.tail = memoryview(data)[sent:]
            self.wait_writable()
        elif nbytes == COPY_READ and self.pool.can_splice:
            self.copying = False  # a full read: more is probably queued, and it is bulk
            self.splice_chunks()
        elif self.handoff:
            self.handoff -= 1
            if not self.handoff:
                self.half.to_thread()

    def splice_chunks(self) -> None:
        pipes = self.pipes
        if not self.chunk:
            self.chunk = splice_chunk(self.out)
        # A full chunk means more is probably queued: keep splicing instead of going back through epoll for each
        # chunk, up to SPLICE_BURST chunks so one bulk connection cannot starve the others.
        for _ in range(SPLICE_BURST):
            if pipes:
                pipe = pipes.pop()
            else:
                new = self.pool.take_pipe()
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
                    self.pool.splice_refused()  # closes the pooled pipes, this one too
                    self.copying = True  # for good: the pool hands out no pipe any more
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
                self.pool.give_pipe(pipe, empty=False)
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
        tail = self.tail
        if tail is not None:
            sent = _write(self.out_fd, tail, self.failed)
            if sent < 0:
                return None
            if sent < len(tail):
                self.tail = tail[sent:]
                return False
            self.tail = None
        pipe = self.pipe
        if pipe is not None:
            try:
                while self.in_pipe:
                    self.in_pipe -= _splice(pipe[0], self.out_fd, self.in_pipe, None, None, _SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.half.raw_failed()
                return None
            self.pipe = None
            self.pool.give_pipe(pipe, empty=True)
        return True

    def wait_writable(self) -> None:
        """Stop reading (that is the backpressure) until the peer's socket takes what waits."""
        self.stop_reading()
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

    def shutdown_peer(self) -> None:
        """Pass our EOF on: half-close the peer's socket; a failure drops both sides."""
        try:
            self.out.shutdown(socket.SHUT_WR)
        except OSError:
            self.half.raw_failed()

    def stop(self) -> None:
        """Unregister, close our duplicate, give back the buffer and pipe; safe to call twice."""
        self.stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.out_fd)
        pool = self.pool
        self.tail = None
        if self.pipe is not None:
            pool.give_pipe(self.pipe, empty=not self.in_pipe)
            self.pipe = None
            self.in_pipe = 0
        if self.fd >= 0:
            self.sock.close()  # our duplicate of this half's socket; the peer's raw closes the other one
            self.fd = -1
            if self.duplicate:
                pool.release_fds(1)

    def quiet(self) -> bool:
        """Nothing waits to be sent: the direction can change hands without a gap."""
        return self.tail is None and self.pipe is None and not self.writing

    def release(self) -> socket.socket:
        """Unregister and hand our socket (not a duplicate) over to the caller, who closes it from now on."""
        self.stop_reading()
        sock = self.sock
        self.fd = -1
        return sock
