"""Multiplexing (`multiplex: true`): many clients' requests pipelined over a few shared node connections.

With one node connection per client, each request costs the node (and the NAT's kernel) a read, a write and two
TCP segments of its own. Here a request goes to the node at once when the node is idle; requests that arrive, from
any client, while it works on earlier ones wait for its next reply and then go in one write, and the node answers
them all in one write too; natfwd splits the replies back by counting them (forwarder/protocols/framing.py).
twemproxy and Envoy's Redis proxy do the same.

A `Pipe` is one shared node connection: requests leave in arrival order, and a FIFO of (session, replies owed)
routes the replies back. A `Session` is one client's end: it reads the client's socket (a duplicate of its
transport's, as raw mode does), frames requests, and writes replies. A client whose request cannot share a
connection (SELECT, AUTH, MULTI, blocking or unknown commands, memcached noreply) or who pipelines many requests
itself is *pinned*: once every reply it is owed has arrived, its owner gives it a node connection of its own and
the ordinary relay takes over, with the bytes not yet sent going first.

Connection state stays the client's own. A pinned client's own connection first replays the state it set while
shared (HELLO 3, CLIENT SETINFO...; `own_connection`), so a RESP3 client stays RESP3. A login is never lent: a shared
connection never logs in, AUTH pins, and a client that joins a connection already in use has it RESET first (and
greeted again), so it starts with the access a new connection has (Redis 6.2+; older nodes pin such clients).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

from forwarder import config as config_mod
from forwarder import extensions
from forwarder.protocols import framing
from forwarder.protocols.framing import PIN as PINNED
from forwarder.protocols.framing import Framer, FramingError, framer

log = logging.getLogger("natfwd.mux")

CLIENT_READ = 64 * 1024
NODE_READ = 64 * 1024  # below glibc's mmap threshold (128 KiB): a bigger read costs mmap, mremap and munmap each
# A request still unfinished by this much after a read pins its client: big values go over a connection of its own,
# where raw mode splices them, instead of being held and copied whole (and holding up every client behind them).
LARGE_REQUEST = 64 * 1024
# A read with this many requests pins its client. With framing.py's pure-Python scanners a pipeline costs more to
# frame (1.3 us a request) than sharing saves, and a connection of its own is cheaper; the C scanners take 40 ns,
# and sharing took redis-benchmark -P 16 from 0.85-0.99 to 1.10-1.37x HAProxy (benchmarks/README.md): they never pin.
PIPELINE_PIN = 8 if framing.C is None else sys.maxsize
# A client that has had its shared connection to itself for this many reads in a row pins too (reason "alone"):
# with nobody to share with, a connection of its own goes through raw mode (the C relay thread where built), which
# costs a request a third of the CPU the multiplexer does. Large, so clients that start together never see it.
ALONE_PIN = 1000
# Replies queued for a client whose socket is full: beyond SESSION_HIGH the pipe stops reading the node (every client
# on it waits) until the client has taken all but SESSION_LOW. Replies pass on as they arrive, a read at a time, so
# a client never has more than SESSION_HIGH and one read queued, however big the reply it asked for, all the clients
# of a pipe together no more than PIPE_QUEUED_HIGH and one read, and a pipe itself holds no more than a reply line not
# all in (framing.REPLY_LINE_MAX). A slow client keeps its replies; the price is head-of-line blocking, as in any
# multiplexer, and a client that takes nothing for the pool's stall timeout (`mux_stall_timeout_s`) is reset so that
# the others go on.
SESSION_HIGH = 8 * 1024 * 1024
SESSION_LOW = 1024 * 1024
# The same for the replies queued for all the clients of one pipe together, so many slow clients cost no more.
PIPE_QUEUED_HIGH = 32 * 1024 * 1024
PIPE_QUEUED_LOW = 16 * 1024 * 1024
PIPE_HIGH = 1024 * 1024  # requests waiting to be written to the node; beyond, the sessions that add more stop reading
KEEPALIVE_IDLE_S = 30
_read = os.read
_write = os.write


# The bytes a node may send in reply to a pinned client's replayed state before natfwd gives up on it.
REPLAY_REPLIES_MAX = 1024 * 1024
# A state-setting request longer than this is not kept for replay (a library's name and version are a few dozen
# bytes): what natfwd keeps per client stays a few KiB whatever the client sends.
STATE_REQUEST_MAX = 4096
Prepare = Callable[[], Awaitable[socket.socket]]  # opens a pinned client's own node connection, its state replayed


class ReplayError(ConnectionError):
    """A pinned client's own node connection could not be put in the state the client set while shared."""


BATCH_END = object()  # a fifo entry's owner for the sentinel after a client's requests (framing.Framer.sentinel)
_BATCH_END_ENTRY: list[object] = [BATCH_END, 1]  # never changed: one list serves every place in every fifo


class Counter(Protocol):
    nbytes: int


class Owner(Protocol):
    """What a session needs from the client connection that owns it (server.MuxClient)."""

    nbytes: int  # bytes read from the client

    # Give the client its own node connection, `rest` first; `prepare`, when given, opens it (state replayed).
    def mux_pin(self, rest: bytes, prepare: Prepare | None = None) -> None: ...
    def mux_close(self, *, abort: bool) -> None: ...  # the session is over: close (or reset) the client


class Hooks(Protocol):
    """What a pipe reports to its worker: connect times and failures (metrics and logs)."""

    def connected(self, seconds: float) -> None: ...
    def connect_failed(self, target: config_mod.Target, exc: BaseException) -> None: ...
    def closed(self) -> None: ...  # a shared connection that was up is gone
    def pinned(self, reason: str) -> None: ...  # a client left for a connection of its own


class Session:
    """One client's end of the multiplexer."""

    __slots__ = ("owner", "replied", "pipe", "loop", "sock", "fd", "held", "out", "out_size", "blocking", "reading",
                 "writing", "owed", "eof", "closed", "leaving", "lane", "scan", "alone", "note", "state",
                 "reset_first", "taken_at", "stall_timer")  # fmt: skip

    def __init__(self, owner: Owner, replied: Counter, pipe: Pipe, sock: socket.socket) -> None:
        self.owner = owner
        self.replied = replied  # counts the bytes written to the client (for the metrics)
        self.pipe = pipe
        self.loop = pipe.loop
        self.sock = sock  # our duplicate of the client's socket; the transport stays paused
        self.fd = sock.fileno()
        self.held: bytearray | None = None  # the start of an unfinished request
        self.out: deque[bytes | bytearray | memoryview] | None = None  # replies its socket did not take yet
        self.out_size = 0
        self.blocking = False  # the pipe stopped reading the node for us (out_size passed SESSION_HIGH)
        self.reading = False
        self.writing = False
        self.owed = 0  # replies the client waits for
        self.eof = False
        self.closed = False
        # Set when the client must leave its pipe, once every reply it is owed is out: (lane, bytes not yet sent).
        # Lane PINNED means a connection of its own; another lane, a pipe speaking that protocol version.
        self.leaving: tuple[int, bytes] | None = None
        self.lane = pipe.lane
        self.scan = pipe.framer.requests
        self.alone = 0  # reads in a row with no other client on the pipe
        self.note = pipe.framer.state_hint  # spots reads that may set state while shared (None: the engine has none)
        self.state: dict[bytes, bytes] | None = None  # those the client sent, replayed once it is pinned
        # Whether the pipe must reset (and greet again) before the client's first request: set when it was up when
        # the client came, so its login and state may be another client's.
        self.reset_first = pipe.in_use()
        self.taken_at = 0.0  # when the client's socket last took bytes, while replies wait for it
        self.stall_timer: asyncio.TimerHandle | None = None
        pipe.sessions.add(self)

    def start(self, first: bytes) -> None:
        """Begin with the bytes the transport read (and counted) before we took over, if any."""
        if self.reset_first and self.pipe.pool.resets is False:
            self.leave(PINNED, first, "no_reset")  # a connection in use cannot be made new for it: one of its own
            return
        if first:
            self.feed(first)
            if self.closed or self.leaving is not None or self in self.pipe.waiting:
                return  # resumed when it may read again
        self.resume()

    def resume(self) -> None:
        if not self.reading and not self.closed and not self.eof and self.leaving is None:
            self.reading = True
            self.loop.add_reader(self.fd, self.readable)

    def pause(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def readable(self) -> None:
        try:
            data = _read(self.fd, CLIENT_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(abort=True)
            return
        if not data:
            self.eof = True
            self.pause()
            if self.held:
                self.leave(PINNED, bytes(self.held), "eof_mid_request")  # the node answers it as it would
            elif not self.owed and self.out is None:
                self.close(abort=False)
            return
        self.owner.nbytes += len(data)
        if self.held is None:
            # The usual case, whole requests that may share: a turn through feed() costs a call more.
            scanned = self.scan(data, self.lane)
            end, count, lane = scanned
            if end == len(data) and not lane and count < PIPELINE_PIN:
                if self.note is not None and self.note(data) is not None:
                    self.record(data, end)
                self.pipe.send(self, data, count)
                if len(self.pipe.sessions) > 1:
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
            self.pipe.send(self, buf if end == len(buf) and held is None else bytes(buf[:end]), count)
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
        state_of = self.pipe.framer.state
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
        requests = [greeting] if (greeting := self.pipe.framer.greeting(self.lane)) else []
        if self.state:
            requests.extend(self.state.values())
        if not requests:
            return None
        return partial(own_connection, self.pipe.pool, requests, bool(greeting))

    def leave(self, lane: int, rest: bytes, reason: str) -> None:
        """Stop reading; once every reply the client is owed is out, move it to `lane` with `rest` first."""
        if lane == PINNED:
            self.pipe.pool.hooks.pinned(reason)
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
            out.append(data)  # never a buffer anyone changes later: pipes hand over copies or whole reads
            self.out_size += len(data)
            self.pipe.queue(len(data))
            if self.out_size > SESSION_HIGH and not self.blocking:
                self.blocking = True
                self.pipe.block()
            return
        try:
            sent = _write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(abort=True)
            return
        if sent < len(data):
            self.out = deque((memoryview(data)[sent:],))
            self.out_size = len(data) - sent
            self.pipe.queue(self.out_size)
            self.writing = True
            self.loop.add_writer(self.fd, self.writable)
            self.taken_at = self.loop.time()
            if self.stall_timer is None:
                self.stall_timer = self.loop.call_later(self.pipe.pool.stall_timeout_s, self.check_stall)
            if self.out_size > SESSION_HIGH and not self.blocking:
                self.blocking = True
                self.pipe.block()
            return
        if not self.owed and (self.eof or self.leaving is not None):
            self.maybe_leave()

    def writable(self) -> None:
        out = self.out
        assert out is not None
        size = self.out_size
        while out:
            chunk = out[0]
            try:
                sent = _write(self.fd, chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close(abort=True)
                return
            self.out_size -= sent
            if sent < len(chunk):
                out[0] = memoryview(chunk)[sent:]
                break
            out.popleft()
        if self.out_size < size:
            self.taken_at = self.loop.time()
            self.pipe.queue(self.out_size - size)
        if self.blocking and self.out_size <= SESSION_LOW:
            self.blocking = False
            self.pipe.unblock()
        if out:
            return
        self.out = None
        self.writing = False
        self.loop.remove_writer(self.fd)
        self.maybe_leave()

    def check_stall(self) -> None:
        """While replies wait for the client: reset it once its socket has taken nothing for the stall timeout, so
        that the others on its shared connection go on (its replies are then read from the node and dropped)."""
        self.stall_timer = None
        if self.out is None or self.closed:
            return
        timeout = self.pipe.pool.stall_timeout_s
        idle = self.loop.time() - self.taken_at
        if idle < timeout:
            self.stall_timer = self.loop.call_later(timeout - idle, self.check_stall)
            return
        log.info(
            "multiplexed client reset: it took none of its replies for mux_stall_timeout_s",
            extra={"target": str(self.pipe.pool.target), "queued_bytes": self.out_size, "timeout_s": timeout},
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

    def move(self, lane: int) -> Pipe:
        """Go over a pipe of `lane` from now on; returns the pipe left."""
        old = self.pipe
        old.sessions.discard(self)
        self.pipe = old.pool.pipe(lane)
        self.pipe.sessions.add(self)
        self.lane = lane
        self.reset_first = self.pipe.in_use()
        return old

    def detach(self) -> None:
        """Leave the multiplexer: callbacks removed, our duplicate closed; replies still owed are discarded."""
        if self.closed:
            return
        self.closed = True
        self.pause()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        if self.blocking:
            self.blocking = False
            self.pipe.unblock()
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if self.out_size:
            self.pipe.queue(-self.out_size)
        self.out = None
        self.out_size = 0
        self.held = None
        self.sock.close()
        self.pipe.sessions.discard(self)
        self.pipe.pool.left(self.pipe)

    def close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.detach()
        self.owner.mux_close(abort=abort)


class Pipe:
    """One shared node connection: requests go out in arrival order, replies come back to whoever is owed them."""

    __slots__ = ("pool", "lane", "loop", "framer", "sock", "fd", "out", "out_size", "tail", "flushing", "fifo",
                 "held", "state", "sentinel", "sessions", "waiting", "blockers", "queued", "over", "closed",
                 "connect_task", "greeted")  # fmt: skip

    def __init__(self, pool: MuxPool, lane: int) -> None:
        self.pool = pool
        self.lane = lane
        self.loop = pool.loop
        self.framer: Framer = pool.framer
        self.sock: socket.socket | None = None
        self.fd = -1  # until connected
        self.out: list[bytes | bytearray] = []  # requests not yet written
        self.out_size = 0
        self.tail: memoryview | None = None  # the part of a write the node's socket did not take
        self.flushing = False
        self.fifo: deque[list[object]] = deque()  # [session, replies owed], in request order
        self.held: bytearray | None = None  # a reply line not all in
        self.state = framing.scan_state()  # where the walk of the reply at the head of the fifo stopped
        self.sentinel = self.framer.sentinel
        self.sessions: set[Session] = set()
        self.waiting: list[Session] = []  # sessions paused while the node's socket is full
        self.blockers = 0  # sessions too far behind on their replies: while any, the node is not read
        self.queued = 0  # bytes of replies its sessions' sockets have not taken
        self.over = False  # queued passed PIPE_QUEUED_HIGH: one blocker more
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None  # connected at the first request, not before
        self.greeted = True  # False once the node refused the lane's greeting: it is sent again before the next batch
        self.greet(reset=False)  # a new connection has nothing to reset

    def greet(self, *, reset: bool) -> None:
        """Queue RESET (when `reset`) and the lane's greeting; their replies are nobody's, and are checked."""
        greeting = self.framer.greeting(self.lane)
        data = (self.framer.reset if reset else b"") + greeting
        if not data:
            return
        self.out.append(data)
        self.out_size += len(data)
        self.fifo.append([_Greeting(self, reset, bool(greeting)), int(reset) + int(bool(greeting))])

    def in_use(self) -> bool:
        """Whether the connection is up: a client that joins now did not see it made. (One that joins while it is
        being made counts it as new: the node makes it a login of its own at about the moment the client came.)"""
        return self.fd >= 0

    async def connect(self) -> None:
        target = self.pool.target
        loop = self.loop
        started = loop.time()
        try:
            async with asyncio.timeout(self.pool.connect_timeout_s):
                sock = await _node_socket(loop, target, keepalive=True)
        except (OSError, TimeoutError) as exc:
            self.connect_task = None
            self.pool.hooks.connect_failed(target, exc)
            self.fail()
            return
        self.connect_task = None
        if self.closed:
            sock.close()
            return
        self.pool.hooks.connected(loop.time() - started)
        self.sock = sock
        self.fd = sock.fileno()
        loop.add_reader(self.fd, self.readable)  # no session can be blocking yet: nothing was read
        if self.out:
            self.flush()

    def send(self, session: Session, data: bytes | bytearray, count: int) -> None:
        """Queue `count` whole requests of `session`; it stops reading while too much waits for the node."""
        fifo = self.fifo
        idle = not fifo
        if session.reset_first:  # its first request on a connection in use: make it new for the client first
            session.reset_first = False
            self.greet(reset=True)
        elif not self.greeted:
            self.greeted = True
            self.greet(reset=False)
        session.owed += count
        if self.out_size + len(data) > PIPE_HIGH:
            session.pause()
            self.waiting.append(session)
        self.out.append(data)
        self.out_size += len(data)
        if not idle and fifo[-1][0] is session:
            fifo[-1][1] += count  # type: ignore[operator]
        else:
            fifo.append([session, count])
        sentinel = self.sentinel
        if sentinel:  # after each client's requests: framing.MEMCACHED_PY says why
            self.out.append(sentinel)
            self.out_size += len(sentinel)
            fifo.append(_BATCH_END_ENTRY)
        if self.flushing:
            return
        if self.fd >= 0:
            if idle:
                self.flush()  # the node has nothing to do: waiting a loop turn would only add latency
            # Otherwise the node is busy: requests wait for its next reply (readable), then all go in one write.
            # Flushing at the end of each loop turn sent about one client's requests a write (benchmarks/README.md).
        elif self.connect_task is None and not self.closed:
            # The first request: connect now. Clients that only say HELLO 3 here never make this lane connect.
            self.connect_task = self.loop.create_task(self.connect())

    def flush(self) -> None:
        self.flushing = False
        if self.tail is not None or self.fd < 0 or not self.out:
            return
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_size = 0
        try:
            sent = _write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.lost(str(exc))
            return
        if sent < len(data):
            self.tail = memoryview(data)[sent:]
            self.loop.add_writer(self.fd, self.writable)
        elif self.waiting:
            self.resume_waiting()

    def resume_waiting(self) -> None:
        """The node's socket took everything: sessions that stopped reading for it read again."""
        waiting = self.waiting
        self.waiting = []
        for session in waiting:
            session.resume()

    def writable(self) -> None:
        tail = self.tail
        assert tail is not None
        try:
            sent = _write(self.fd, tail)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost(str(exc))
            return
        if sent < len(tail):
            self.tail = tail[sent:]
            return
        self.tail = None
        self.loop.remove_writer(self.fd)
        if self.out:
            self.flush()
        elif self.waiting:
            self.resume_waiting()

    def readable(self) -> None:
        try:
            data = _read(self.fd, NODE_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost(str(exc))
            return
        if not data:
            self.lost("the node closed the connection")
            return
        held = self.held
        buf: bytes | bytearray
        if held is None:
            buf = data
        else:
            held += data
            buf = held
        framer = self.framer
        scan = framer.scan
        fifo = self.fifo
        state = self.state
        pos = 0
        n = len(buf)
        try:
            # Every byte of a reply passes on as soon as it is here, whole replies or not: the pipe keeps only a
            # line not all in. Any byte that fits no reply owed is a FramingError: the connection is out of step.
            while pos < n:
                if not state[2]:
                    if fifo:
                        entry = fifo[0]
                        session: Session | None = entry[0]  # type: ignore[assignment]
                        if session is BATCH_END:
                            expected = framer.sentinel_reply
                            end = pos + len(expected)
                            if buf[pos:end] != expected:
                                if end <= n or not expected.startswith(buf[pos:n]):
                                    raise FramingError("the node's replies are out of step with the requests sent")
                                break  # the rest of it is still to come
                            pos = end
                            fifo.popleft()
                            continue
                        owed: int = entry[1]  # type: ignore[assignment]
                        end, got = scan(buf, pos, owed, state)
                        if end > pos:
                            if session is not None:
                                session.deliver(buf if end - pos == n else buf[pos:end], got)
                                if self.closed:  # the last client of a retired pool just left
                                    return
                            pos = end
                        if got == owed:
                            fifo.popleft()
                            continue
                        entry[1] = owed - got
                        if pos == n:
                            break
                    end = framer.skip_push(buf, pos, state)
                    if end < 0:
                        if fifo:
                            break  # a line not all in
                        raise FramingError("the node sent bytes nobody asked for")
                else:
                    end = framer.skip_push(buf, pos, state)
                pos = end
                if state[2]:
                    break  # the rest of the push is still to come
        except FramingError as exc:
            self.lost(str(exc))
            return
        if self.out and not self.flushing:  # what arrived while the node was busy, after this loop turn's reads
            self.flushing = True
            self.loop.call_soon(self.flush)
        if pos == n:
            self.held = None
        elif held is None:
            self.held = bytearray(memoryview(buf)[pos:])
        elif pos:
            del held[:pos]

    def queue(self, change: int) -> None:
        """Replies queued for the sessions changed by `change` bytes: stop reading the node past PIPE_QUEUED_HIGH,
        until they are down to PIPE_QUEUED_LOW."""
        self.queued += change
        if self.queued > PIPE_QUEUED_HIGH:
            if not self.over:
                self.over = True
                self.block()
        elif self.over and self.queued <= PIPE_QUEUED_LOW:
            self.over = False
            self.unblock()

    def block(self) -> None:
        self.blockers += 1
        if self.blockers == 1 and self.fd >= 0:
            self.loop.remove_reader(self.fd)

    def unblock(self) -> None:
        self.blockers -= 1
        if not self.blockers and self.fd >= 0:
            self.loop.add_reader(self.fd, self.readable)

    def lost(self, reason: str) -> None:
        log.warning(
            "shared node connection lost; clients waiting for replies are reset",
            extra={
                "target": str(self.pool.target),
                "reset": sum(1 for session in self.sessions if session.owed),
                "clients": len(self.sessions),
                "error": reason,
            },
        )
        self.fail()

    def fail(self) -> None:
        """Close the node connection. Clients waiting for replies are reset (those will never come, or can no longer
        be told apart); the others carry on over a new one, as a node that closes idle connections would want."""
        self.close()
        pool = self.pool
        for session in list(self.sessions):
            if session.owed or pool.retired:
                session.close(abort=True)
                continue
            session.blocking = False  # this pipe reads no more; what the client has queued still goes out
            session.move(session.lane)
            session.pipe.queue(session.out_size)
            session.resume()  # it may have been waiting for this pipe's socket to drain

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.pipes.remove(self)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.sock is not None:
            self.pool.hooks.closed()
            self.loop.remove_reader(self.fd)
            if self.tail is not None:
                self.loop.remove_writer(self.fd)
            self.sock.close()
            self.sock = None
            self.fd = -1
        self.out.clear()
        self.fifo.clear()
        self.waiting.clear()


class _Greeting:
    """The replies to what a pipe sends on its own (RESET, HELLO 3): nobody's, but checked, since a connection that
    did not reset or switch protocol would serve its clients another's login or the wrong protocol."""

    __slots__ = ("pipe", "reset", "hello", "pending")

    def __init__(self, pipe: Pipe, reset: bool, hello: bool) -> None:
        self.pipe = pipe
        self.reset = reset  # RESET's reply is still to come
        self.hello = hello
        self.pending = bytearray()  # replies pass on a read at a time: the start of one cut across reads

    def deliver(self, data: bytes | bytearray, replies: int) -> None:
        pending = self.pending
        pending += data
        pos = 0
        replies_at = self.pipe.framer.replies
        while replies and not self.pipe.closed:
            end, _got = replies_at(pending, pos, 1)
            reply = bytes(pending[pos:end])
            pos = end
            replies -= 1
            if self.reset:
                self.reset = False
                self.reset_replied(reply)
            elif self.hello:
                self.hello = False
                # Refused (NOAUTH while a password is needed): the connection stays RESP2, its clients are told
                # NOAUTH as they would be directly, and the greeting goes again before the next batch.
                self.pipe.greeted = not reply.startswith(b"-")
        del pending[:pos]

    def reset_replied(self, reply: bytes) -> None:
        pool = self.pipe.pool
        if reply == b"+RESET\r\n":
            pool.resets = True
            return
        if pool.resets is not False:
            log.warning(
                "the node does not know RESET (Redis before 6.2): clients that would join a shared connection in "
                "use get connections of their own, so that none of them uses another's login",
                extra={"target": str(pool.target), "error": reply[:200].decode("latin-1").strip()},
            )
        pool.resets = False
        # The requests behind it went over a connection whose login may be another's: their replies must not reach
        # the client. Known now, later clients that would join a connection in use are pinned instead (Session.start).
        self.pipe.lost("the node does not know RESET")


async def _node_socket(
    loop: asyncio.AbstractEventLoop, target: config_mod.Target, *, keepalive: bool = False
) -> socket.socket:
    """A connected, non-blocking TCP socket to `target`; OSError when it cannot be made."""
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            _keepalive(sock)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def own_connection(pool: MuxPool, requests: list[bytes], hello: bool) -> socket.socket:
    """A pinned client's own node connection, with `requests` (the state it set while shared; `hello`: the first
    is its lane's HELLO) sent and their replies read and dropped, before any byte of the client's goes.

    Raises OSError or TimeoutError when the node cannot be reached in connect_timeout_s, and ReplayError when it
    refuses the HELLO (the client would go on in a protocol it did not ask for) or answers more than it was asked.
    """
    loop = pool.loop
    framer = pool.framer
    async with asyncio.timeout(pool.connect_timeout_s):
        sock = await _node_socket(loop, pool.target)
        try:
            await loop.sock_sendall(sock, b"".join(requests))
            buf = bytearray()
            pos = got = 0
            while got < len(requests):
                data = await loop.sock_recv(sock, NODE_READ)
                if not data:
                    raise ReplayError("the node closed the connection while its state was replayed")
                buf += data
                if len(buf) > REPLAY_REPLIES_MAX:
                    raise ReplayError("the node's replies to the replayed state are too long")
                while got < len(requests):
                    push = framer.push(buf, pos)
                    if push:
                        if push < 0:
                            break
                        pos = push
                        continue
                    end, one = framer.replies(buf, pos, 1)
                    if not one:
                        break
                    if hello and not got and buf[pos] == 45:  # '-'
                        raise ReplayError(f"the node refused the client's HELLO: {bytes(buf[pos:end])[:200]!r}")
                    pos = end
                    got += 1
            if pos != len(buf):
                raise ReplayError("the node sent more than the replies to the replayed state")
        except FramingError as exc:
            sock.close()
            raise ReplayError(str(exc)) from None
        except BaseException:
            sock.close()
            raise
    return sock


def _keepalive(sock: socket.socket) -> None:
    """Probe a shared connection after KEEPALIVE_IDLE_S of silence: one the node (or a firewall on the way) dropped
    without a word is then found and replaced while idle, not by the next clients' requests."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux; macOS has only some of them
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class MuxPool:
    """The shared connections of one forward in one worker, to one target; clients are spread round-robin."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: config_mod.Target,
        framer: Framer,
        connections: int,
        connect_timeout_s: float,
        hooks: Hooks,
        stall_timeout_s: float = 5.0,
    ) -> None:
        self.loop = loop
        self.target = target
        self.framer = framer
        self.connections = connections
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s  # a client that takes none of its replies this long is reset
        self.hooks = hooks
        self.pipes: list[Pipe] = []
        self.turn = 0
        self.retired = False  # the forward was retargeted or removed: close once the last client leaves
        self.resets: bool | None = None  # whether the node knows RESET; None until it has answered one

    def join(self, owner: Owner, replied: Counter, sock: socket.socket) -> Session:
        return Session(owner, replied, self.pipe(self.framer.first_lane), sock)

    def pipe(self, lane: int) -> Pipe:
        """A pipe of `lane`, round-robin once the lane has `connections` of them."""
        pipes = [p for p in self.pipes if p.lane == lane]
        if len(pipes) < self.connections:
            pipe = Pipe(self, lane)
            self.pipes.append(pipe)
            return pipe
        self.turn += 1
        return pipes[self.turn % len(pipes)]

    def left(self, pipe: Pipe) -> None:
        if self.retired and not pipe.sessions:
            pipe.close()

    def retire(self) -> None:
        self.retired = True
        for pipe in list(self.pipes):
            if not pipe.sessions:
                pipe.close()


def new_pool(
    loop: asyncio.AbstractEventLoop, cfg: config_mod.Config, target: config_mod.Target, hooks: Hooks
) -> MuxPool:
    if framing.C is None:
        extensions.warn_missing(log, "multiplexing's scanners", "about 2 us more per request")
    return MuxPool(
        loop,
        target,
        framer(cfg.engine),
        cfg.multiplex_connections,
        cfg.connect_timeout_s,
        hooks,
        cfg.mux_stall_timeout_s,
    )
