"""One client's end of the multiplexer: frames its requests onto a shared connection and writes back its replies."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from functools import partial
from typing import Protocol

from forwarder import sockets
from forwarder.mux.own import Prepare, own_connection
from forwarder.mux.shared import SharedConnection
from forwarder.protocols import framing
from forwarder.protocols.framing import PIN as PINNED

log = logging.getLogger("natfwd.mux")

CLIENT_READ = 64 * 1024
# A request still unfinished by this much after a read pins its client: big values go over a connection of its own,
# where raw mode splices them, instead of being held and copied whole (and holding up every client behind them).
LARGE_REQUEST = 64 * 1024
# A read with this many requests pins its client when the scanners are framing.py's pure-Python ones: framing a
# pipeline request by request in Python costs more than sharing saves, and a connection of its own is cheaper. The
# C scanners frame a request for a small fraction of what sharing saves, so with them a pipeline never pins.
PIPELINE_PIN = 8 if framing.C is None else sys.maxsize
# A client that has had its shared connection to itself for this many reads in a row pins too (reason "alone"):
# with nobody to share with, a connection of its own goes through raw mode (the C relay thread where built), which
# costs a request less CPU than the multiplexer does. Large, so clients that start together never see it.
ALONE_PIN = 1000
# Replies queued for a client whose socket is full: beyond SESSION_HIGH its shared connection stops reading the node
# (every client on it waits) until the client has taken all but SESSION_LOW. Replies pass on as they arrive, a read
# at a time, so a client never has more than SESSION_HIGH and one read queued, however big the reply it asked for;
# all the clients of a shared connection together no more than shared.PIPE_QUEUED_HIGH and one read; and a shared
# connection itself holds no more than a reply line not all in (framing.REPLY_LINE_MAX). A slow client keeps its
# replies; the price is head-of-line blocking, as in any multiplexer, and a client that takes nothing for the pool's
# stall timeout (`mux_stall_timeout_s`) is reset so that the others go on.
SESSION_HIGH = 8 * 1024 * 1024
SESSION_LOW = 1024 * 1024
# A state-setting request longer than this is not kept for replay (a library's name and version are a few dozen
# bytes): what natfwd keeps per client stays a few KiB whatever the client sends.
STATE_REQUEST_MAX = 4096
_read = sockets.read
_write = sockets.write


class Counter(Protocol):
    nbytes: int


class Owner(Protocol):
    """What a session needs from the client connection that owns it, and its socket (muxclient.MuxClient)."""

    nbytes: int  # bytes read from the client

    # Give the client its own node connection, `rest` first; `prepare`, when given, opens it (state replayed).
    def mux_pin(self, rest: bytes, prepare: Prepare | None = None) -> None: ...
    # The session is over: detach it, then close (or reset) the client.
    def mux_close(self, *, abort: bool) -> None: ...


class Session:
    """One client's end of the multiplexer."""

    __slots__ = ("owner", "replied", "shared", "loop", "watch", "fd", "held", "out", "out_size", "blocking", "reading",
                 "writing", "owed", "eof", "closed", "leaving", "lane", "scan", "alone", "note", "state",
                 "reset_first", "taken_at", "stall_timer", "spoke")  # fmt: skip

    def __init__(self, owner: Owner, replied: Counter, shared: SharedConnection, fd: int) -> None:
        self.owner = owner
        self.replied = replied  # counts the bytes written to the client (for the metrics)
        self.shared = shared
        self.loop = shared.loop
        self.watch = shared.pool.watch  # tells when the client's socket can be read or written
        self.fd = fd  # the client's socket, which the owner opened and closes
        self.held: bytearray | None = None  # the start of an unfinished request
        self.out: deque[bytes | bytearray | memoryview] | None = None  # replies its socket did not take yet
        self.out_size = 0
        self.blocking = False  # its shared connection stopped reading the node for us (out_size passed SESSION_HIGH)
        self.reading = False
        self.writing = False
        self.owed = 0  # replies the client waits for
        self.eof = False
        self.closed = False
        # Set when the client must leave its shared connection, once every reply it is owed is out: (lane, bytes not yet sent).
        # Lane PINNED means a connection of its own; another lane, a shared connection speaking that protocol version.
        self.leaving: tuple[int, bytes] | None = None
        self.lane = shared.lane
        self.scan = shared.framer.requests
        self.alone = 0  # reads in a row with no other client on its shared connection
        self.note = shared.framer.state_hint  # spots reads that may set state while shared (None: the engine has none)
        self.state: dict[bytes, bytes] | None = None  # those the client sent, replayed once it is pinned
        # Whether the shared connection must reset (and greet again) before the client's first request: set when it was up when
        # the client came, so its login and state may be another client's.
        self.reset_first = shared.in_use()
        self.taken_at = 0.0  # when the client's socket last took bytes, while replies wait for it
        self.stall_timer: asyncio.TimerHandle | None = None
        self.spoke = False  # some of its requests went over a shared connection
        shared.sessions.add(self)

    def start(self, first: bytes) -> None:
        """Begin (or go on, on another lane's connection) with `first`: bytes read and counted, not yet framed."""
        if self.reset_first and self.shared.pool.resets is False:
            self.leave(PINNED, first, "no_reset")  # a connection in use cannot be made new for it: one of its own
            return
        if first:
            self.feed(first)
            if self.closed or self.leaving is not None or self in self.shared.waiting:
                return  # resumed when it may read again
        self.resume()

    def resume(self) -> None:
        if not self.reading and not self.closed and not self.eof and self.leaving is None:
            self.reading = True
            self.watch.add_reader(self.fd, self.readable)

    def pause(self) -> None:
        if self.reading:
            self.reading = False
            self.watch.remove_reader(self.fd)

    def readable(self) -> None:
        data = _read(self.fd, CLIENT_READ, self.failed)
        if data is None:
            return
        if not data:
            self.eof = True
            if self.held:
                self.leave(PINNED, bytes(self.held), "eof_mid_request")  # the node answers it as it would
            elif not self.owed and self.out is None:
                self.close(abort=False)  # the usual end: closing the socket unwatches it, with no epoll_ctl
            else:
                self.pause()
            return
        self.owner.nbytes += len(data)
        if self.held is None:
            # The usual case, whole requests that may share: a turn through feed() costs a call more.
            scanned = self.scan(data, self.lane)
            end, count, lane = scanned
            if end == len(data) and not lane and count < PIPELINE_PIN:
                if self.note is not None and self.note(data) is not None:
                    self.record(data, end)
                self.spoke = True
                self.shared.send(self, data, count)
                if len(self.shared.sessions) > 1:
                    self.alone = 0
                    return
                self.alone += 1
                if self.alone >= ALONE_PIN:
                    self.leave(PINNED, b"", "alone")
                return
            self.feed(data, scanned)
            return
        self.feed(data)

    def feed(self, data: bytes, scanned: tuple[int, int, int] | None = None) -> None:
        """Frame `data` after what is held; `scanned` is the scan of `data` alone, when nothing was held."""
        held = self.held
        buf: bytes | bytearray
        if held is None:
            buf = data
        else:
            held += data
            buf = held
        end, count, lane = scanned if scanned is not None else self.scan(buf, self.lane)
        reason = "command"
        if count >= PIPELINE_PIN:
            lane = PINNED
            reason = "pipelined"
        if count:
            if self.note is not None and self.note(buf) is not None:
                self.record(buf, end)
            self.spoke = True
            self.shared.send(self, buf if end == len(buf) and held is None else bytes(buf[:end]), count)
        if lane:
            self.leave(lane, bytes(buf[end:]), reason)
            return
        rest = len(buf) - end
        if not rest:
            self.held = None
        elif rest >= LARGE_REQUEST:
            self.leave(PINNED, bytes(buf[end:]), "large_request")
        elif held is None:
            self.held = bytearray(buf[end:])
        else:
            del held[:end]

    def record(self, buf: bytes | bytearray, end: int) -> None:
        """Keep the state-setting requests among the whole requests in buf[:end], for a connection of its own."""
        state_of = self.shared.framer.state
        assert state_of is not None
        found = state_of(buf, end)
        if found:
            state = self.state
            if state is None:
                state = self.state = {}
            for key, request in found:
                state.pop(key, None)  # the latest last, as the client sent them
                if len(request) <= STATE_REQUEST_MAX:
                    state[key] = request

    def replay(self) -> Prepare | None:
        """How to open the client's own node connection in the state it set while shared; None: a new one is."""
        framer = self.shared.framer
        requests = [greeting] if (greeting := framer.greeting(self.lane)) else []
        if self.state:
            requests.extend(self.state.values())
        if not requests and self.spoke and framer.sentinel:
            # memcached picks a connection's protocol from its first byte: a client that has spoken text keeps text,
            # as its own connection would (a binary request then gets ERROR), so a text no-op goes first.
            requests.append(framer.sentinel)
        if not requests:
            return None
        pool = self.shared.pool
        return partial(
            own_connection, pool.loop, pool.target, pool.framer, pool.connect_timeout_s, requests, bool(greeting)
        )

    def leave(self, lane: int, rest: bytes, reason: str) -> None:
        """Stop reading; once every reply the client is owed is out, move it to `lane` with `rest` first."""
        if lane == PINNED:
            self.shared.pool.hooks.pinned(reason)
        self.pause()
        self.held = None
        self.leaving = (lane, rest)
        self.maybe_leave()

    def deliver(self, data: bytes | bytearray, replies: int) -> None:
        """Replies from the node: write them to the client, or queue them behind what its socket did not take."""
        self.owed -= replies
        if self.closed:
            return
        self.replied.nbytes += len(data)
        out = self.out
        if out is not None:
            out.append(data)  # never a buffer anyone changes later: shared connections hand over copies or whole reads
            self.out_size += len(data)
            self.shared.queue(len(data))
            if self.out_size > SESSION_HIGH and not self.blocking:
                self.blocking = True
                self.shared.block()
            return
        sent = _write(self.fd, data, self.failed)
        if sent < 0:
            return
        if sent < len(data):
            self.out = deque((memoryview(data)[sent:],))
            self.out_size = len(data) - sent
            self.shared.queue(self.out_size)
            self.writing = True
            self.watch.add_writer(self.fd, self.writable)
            self.taken_at = self.loop.time()
            if self.stall_timer is None:
                self.stall_timer = self.loop.call_later(self.shared.pool.stall_timeout_s, self.check_stall)
            if self.out_size > SESSION_HIGH and not self.blocking:
                self.blocking = True
                self.shared.block()
            return
        if not self.owed and (self.eof or self.leaving is not None):
            self.maybe_leave()

    def writable(self) -> None:
        out = self.out
        assert out is not None
        size = self.out_size
        while out:
            chunk = out[0]
            sent = _write(self.fd, chunk, self.failed)
            if sent <= 0:
                if sent < 0:
                    return
                break
            self.out_size -= sent
            if sent < len(chunk):
                out[0] = memoryview(chunk)[sent:]
                break
            out.popleft()
        if self.out_size < size:
            self.taken_at = self.loop.time()
            self.shared.queue(self.out_size - size)
        if self.blocking and self.out_size <= SESSION_LOW:
            self.blocking = False
            self.shared.unblock()
        if out:
            return
        self.out = None
        self.writing = False
        self.watch.remove_writer(self.fd)
        self.maybe_leave()

    def check_stall(self) -> None:
        """While replies wait for the client: reset it once its socket has taken nothing for the stall timeout, so
        that the others on its shared connection go on (its replies are then read from the node and dropped)."""
        self.stall_timer = None
        if self.out is None or self.closed:
            return
        timeout = self.shared.pool.stall_timeout_s
        idle = self.loop.time() - self.taken_at
        if idle < timeout:
            self.stall_timer = self.loop.call_later(timeout - idle, self.check_stall)
            return
        log.info(
            "multiplexed client reset: it took none of its replies for mux_stall_timeout_s",
            extra={"target": str(self.shared.pool.target), "queued_bytes": self.out_size, "timeout_s": timeout},
        )
        self.close(abort=True)

    def maybe_leave(self) -> None:
        """After the last owed reply is out: close after the client's EOF, or move a leaving client on."""
        if self.owed or self.out is not None or self.closed:
            return
        leaving = self.leaving
        if leaving is None:
            if self.eof:
                self.close(abort=False)
            return
        lane, rest = leaving
        self.leaving = None
        if lane == PINNED:
            prepare = self.replay()
            self.detach()
            self.owner.mux_pin(rest, prepare)
            return
        old = self.move(lane)
        old.pool.left(old)
        self.start(rest)

    def move(self, lane: int) -> SharedConnection:
        """Go over a shared connection of `lane` from now on; returns the one left."""
        old = self.shared
        old.sessions.discard(self)
        self.shared = old.pool.connection(lane)
        self.shared.sessions.add(self)
        self.lane = lane
        self.reset_first = self.shared.in_use()
        return old

    def detach(self) -> None:
        """Leave the multiplexer: callbacks removed (the owner closes the socket); replies still owed are discarded."""
        if self.closed:
            return
        self.closed = True
        self.pause()
        if self.writing:
            self.writing = False
            self.watch.remove_writer(self.fd)
        if self.blocking:
            self.blocking = False
            self.shared.unblock()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if self.out_size:
            self.shared.queue(-self.out_size)
        self.out = None
        self.out_size = 0
        self.held = None
        self.shared.sessions.discard(self)
        self.shared.pool.left(self.shared)

    def failed(self, _exc: OSError) -> None:
        self.close(abort=True)

    def close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.owner.mux_close(abort=abort)  # which detaches us before it closes the socket
        self.detach()
