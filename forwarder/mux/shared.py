"""A shared node connection of the multiplexer: requests out in arrival order, replies routed back by counting."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Protocol

from forwarder import config as config_mod
from forwarder import sockets
from forwarder.mux.own import NODE_READ, node_socket
from forwarder.poller import Watcher
from forwarder.protocols import framing
from forwarder.protocols.framing import Framer, FramingError

log = logging.getLogger("natfwd.mux")

# The replies queued for all the clients of one shared connection together: beyond PIPE_QUEUED_HIGH it stops reading
# the node until they are down to PIPE_QUEUED_LOW, so many slow clients cost no more than a few.
PIPE_QUEUED_HIGH = 32 * 1024 * 1024
PIPE_QUEUED_LOW = 16 * 1024 * 1024
PIPE_HIGH = 1024 * 1024  # requests waiting to be written to the node; beyond, the sessions that add more stop reading
BATCH_END = object()  # a fifo entry's owner for the sentinel after a client's requests (framing.Framer.sentinel)
_BATCH_END_ENTRY: list[object] = [BATCH_END, 1]  # never changed: one list serves every place in every fifo
_read = sockets.read
_write = sockets.write


class Hooks(Protocol):
    """What a shared connection reports to its worker: connect times and failures (metrics and logs)."""

    def connected(self, seconds: float) -> None: ...
    def connect_failed(self, target: config_mod.Target, exc: BaseException) -> None: ...
    def closed(self) -> None: ...  # a shared connection that was up is gone
    def pinned(self, reason: str) -> None: ...  # a client left for a connection of its own


class Client(Protocol):
    """What a shared connection needs of a client's end of the multiplexer (session.Session)."""

    shared: SharedConnection
    lane: int
    owed: int  # replies the client waits for
    out_size: int  # bytes of replies its socket has not taken
    blocking: bool  # it has this connection stop reading the node until it catches up
    reset_first: bool  # the connection must be RESET before its next request

    def deliver(self, data: bytes | bytearray, replies: int) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def move(self, lane: int) -> SharedConnection: ...
    def close(self, *, abort: bool) -> None: ...


class Pool(Protocol):
    """What a shared connection (and its clients) need of the pool that made it (pool.MuxPool)."""

    loop: asyncio.AbstractEventLoop
    watch: Watcher  # where the clients' sockets are watched
    target: config_mod.Target
    framer: Framer
    connect_timeout_s: float
    stall_timeout_s: float
    hooks: Hooks
    shared: list[SharedConnection]
    retired: bool
    resets: bool | None

    def connection(self, lane: int) -> SharedConnection: ...
    def left(self, conn: SharedConnection) -> None: ...


class SharedConnection:
    """One shared node connection: requests go out in arrival order, replies come back to whoever is owed them."""

    __slots__ = ("pool", "lane", "loop", "framer", "sock", "fd", "out", "out_size", "tail", "flushing", "fifo",
                 "held", "state", "sentinel", "sessions", "waiting", "blockers", "queued", "over", "closed",
                 "connect_task", "greeted")  # fmt: skip

    def __init__(self, pool: Pool, lane: int) -> None:
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
        self.sessions: set[Client] = set()
        self.waiting: list[Client] = []  # sessions paused while the node's socket is full
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
                sock = await node_socket(loop, target, keepalive=True)
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

    def send(self, session: Client, data: bytes | bytearray, count: int) -> None:
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
            # Flushing at the end of each loop turn would send about one client's requests a write.
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
        sent = _write(self.fd, data, self.failed)
        if sent < 0:
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
        sent = _write(self.fd, tail, self.failed)
        if sent <= 0:
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
        data = _read(self.fd, NODE_READ, self.failed)
        if data is None:
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
            # Every byte of a reply passes on as soon as it is here, whole replies or not: the connection keeps only a
            # line not all in. Any byte that fits no reply owed is a FramingError: the connection is out of step.
            while pos < n:
                if not state[2]:
                    if fifo:
                        entry = fifo[0]
                        session: Client | None = entry[0]  # type: ignore[assignment]
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

    def failed(self, exc: OSError) -> None:
        self.lost(str(exc))

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
            session.blocking = False  # this connection reads no more; what the client has queued still goes out
            session.move(session.lane)
            session.shared.queue(session.out_size)
            session.resume()  # it may have been waiting for this socket to drain

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.shared.remove(self)
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
    """The replies to what a shared connection sends on its own (RESET, HELLO 3): nobody's, but checked, since a connection that
    did not reset or switch protocol would serve its clients another's login or the wrong protocol."""

    __slots__ = ("shared", "reset", "hello", "pending")

    def __init__(self, shared: SharedConnection, reset: bool, hello: bool) -> None:
        self.shared = shared
        self.reset = reset  # RESET's reply is still to come
        self.hello = hello
        self.pending = bytearray()  # replies pass on a read at a time: the start of one cut across reads

    def deliver(self, data: bytes | bytearray, replies: int) -> None:
        pending = self.pending
        pending += data
        pos = 0
        replies_at = self.shared.framer.replies
        while replies and not self.shared.closed:
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
                self.shared.greeted = not reply.startswith(b"-")
        del pending[:pos]

    def reset_replied(self, reply: bytes) -> None:
        pool = self.shared.pool
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
        self.shared.lost("the node does not know RESET")
