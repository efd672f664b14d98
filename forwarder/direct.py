"""Plain forwards' clients without transports: a non-blocking connect, then raw mode from the first byte."""

from __future__ import annotations

import _socket
import errno
import os
import socket
from typing import Any

from forwarder import accesslog, rawmode, sockets
from forwarder import config as config_mod
from forwarder.connection import ClientHalf, ConnectionState, NodeHalf, Route
from forwarder.deadlines import Entry
from forwarder.poller import FAILED
from forwarder.rawmode import COPY_READ, RAW_AFTER_READS, PyRaw
from forwarder.relay import EARLY_LIMIT, Half
from forwarder.resources import Resources

DIRECT = True  # tests set this to False to run plain forwards through the transports (ClientHalf)
INLINE = True  # tests set this to False to accept in Python, and relay in DirectClient, with the C relay built
_NODE_TYPE = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)  # non-blocking from socket(): no ioctl
_TCP_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_SO_ERROR = (socket.SOL_SOCKET, socket.SO_ERROR)
_EINPROGRESS = errno.EINPROGRESS
_AGAIN = sockets.AGAIN
_os_read = os.read
_os_write = os.write
_os_close = os.close
EARLY_DRAIN_READS = 4  # at most 256 KiB read and dropped from a client whose node connection failed


class DirectClient(ClientHalf):
    """A plain forward's client with no transport on either side: a non-blocking connect watched with add_writer,
    then the bytes relayed from the first one without transports.

    While the node connection is being made, the client's bytes are held (up to EARLY_LIMIT) and a reset drops it.
    Then both directions start in lean copy mode: this object's own reader callbacks, one read and one write per
    message, as PyRaw.readable does, with no PyRaw objects. Most connections (a request or a few, then close)
    never leave it. The first write the peer's socket does not take whole, or a read that fills COPY_READ (bulk),
    hands both directions to PyRaw, which keeps the unsent rest and applies backpressure, or splices; after
    RAW_AFTER_READS messages the connection is offered to the C relay thread (to_thread).
    """

    __slots__ = ("sock", "expiry", "watching", "fd", "node_fd", "lean_reads")

    def __init__(self, state: ConnectionState, route: Route, sock: Any, fd: int, client_ip: str) -> None:
        # Every slot of Half and ClientHalf, set here rather than through two super().__init__ calls: this runs once
        # per connection.
        self.transport = None
        self.peer = None
        self.pool = state.pool
        self.view = None
        self.nbytes = 0
        self.eof = False
        self.reading_paused = False
        self.closed = False
        self.on_closed = None
        self.early = None
        self.raw = None
        self.reads_left = -1  # raw from the start
        self.link = None
        self.link_first = False
        self.state = state
        self.route = route
        self.connect_task = None
        self.connect_expired = False
        self.seen_to_node = 0
        self.seen_to_client = 0
        self.idle_s = 0.0
        self.accounted = True
        self.client_ip = client_ip
        self.started = 0.0
        self.target = route.target
        self.ended = ""
        self.sock = sock
        self.expiry: Entry | None = None  # the connect timeout, while connecting
        self.watching = False  # _read_early is the client's reader
        self.fd = fd
        self.node_fd = -1
        self.lean_reads = RAW_AFTER_READS  # messages until the connection is offered to the C relay thread

    @property
    def connecting(self) -> bool:
        return self.expiry is not None

    def connect(self, family: int, address: tuple[str, int]) -> None:
        """Start the node connection; `connected` runs once it is made (or failed)."""
        node = DirectNode(self.state.pool)
        self.peer = node
        node.peer = self
        try:
            node_sock = _socket.socket(family, _NODE_TYPE)
        except OSError as exc:  # no descriptor to spare
            self._node_failed(self.target, exc)
            return
        node.sock = node_sock
        try:
            node_sock.setsockopt(*_TCP_NODELAY)
            error = node_sock.connect_ex(address)
        except OSError as exc:
            self._node_failed(self.target, exc)
            return
        if error == 0:
            self.connected()
        elif error == _EINPROGRESS:
            state = self.state
            poller = state.poller
            poller.add_writer(node_sock.fileno(), self.connected)
            # Watch the client meanwhile: one that resets is dropped at once, and the connect with it. raw mode's
            # reader replaces this one later, so watching costs no extra registration.
            poller.add_reader(self.sock.fileno(), self._read_early)
            self.watching = True
            self.expiry = state.deadlines.add(self.started, self.route.config.connect_timeout_s, self._connect_expired)
        else:
            self._node_failed(self.target, OSError(error, os.strerror(error)))

    def _read_early(self) -> None:
        """While connecting: keep what the client sends (up to EARLY_LIMIT), and drop it if it resets."""
        try:
            data = self.sock.recv(rawmode.COPY_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.ended = accesslog.CLIENT_RESET
            self.abort()
            return
        if data:
            self.nbytes += len(data)
            if self.early is None:
                self.early = bytearray(data)
            else:
                self.early += data
            if len(self.early) < EARLY_LIMIT:
                return
        # An EOF (it stays readable: raw mode reads it again and passes it on), or enough held: stop watching.
        self.watching = False
        self.state.poller.remove_reader(self.sock.fileno())

    def connected(self) -> None:
        node = self.peer
        assert isinstance(node, DirectNode)
        node_sock = node.sock
        state = self.state
        poller = state.poller
        node_fd = self.node_fd = node_sock.fileno()
        expiry = self.expiry
        if expiry is not None:  # connect_ex said EINPROGRESS: the poller's writer callback called us
            expiry[1] = None  # Deadlines.cancel, inlined: this runs once per connection
            self.expiry = None
            # A connect that failed sets EPOLLERR; one that succeeded needs no SO_ERROR system call to say so.
            if poller.events & FAILED:
                error = node_sock.getsockopt(*_SO_ERROR)
                if error:
                    poller.remove_writer(node_fd)
                    self._node_failed(self.target, OSError(error, os.strerror(error)))
                    return
            poller.writer_to_reader(node_fd, self._from_node)
        else:
            poller.add_reader(node_fd, self._from_node)
        state.metrics.upstream_connect.observe(state.loop.time() - self.started)
        self.relay()

    def relay(self) -> None:
        """The node connection is made and watched: watch the client too, and send what it sent meanwhile."""
        poller = self.state.poller
        if self.watching:  # the lean reader replaces _read_early, with no epoll_ctl
            self.watching = False
            poller.replace_reader(self.fd, self._from_client)
        else:  # _read_early stopped at an EOF (which stays readable) or at EARLY_LIMIT; or not watched at all
            poller.add_reader(self.fd, self._from_client)
        early = self.early
        if early is not None:  # counted in nbytes as it arrived
            self.early = None
            self._send(self, bytes(early), self.node_fd)

    # --- lean copy mode ---------------------------------------------------------------------------------------
    def _from_client(self) -> None:
        try:
            data = _os_read(self.fd, COPY_READ)
        except _AGAIN:
            return
        except OSError:
            self.raw_failed()
            return
        if data:
            self.nbytes += len(data)
            self._send(self, data, self.node_fd)
        else:
            self.eof_from(self)

    def _from_node(self) -> None:
        node = self.peer
        assert node is not None
        try:
            data = _os_read(self.node_fd, COPY_READ)
        except _AGAIN:
            return
        except OSError:
            node.raw_failed()
            return
        if data:
            node.nbytes += len(data)
            self._send(node, data, self.fd)
        else:
            self.eof_from(node)

    def _send(self, half: Half, data: bytes, out_fd: int) -> None:
        """Write what `half`'s side sent to the other socket; PyRaw takes over unless it all went, and was small."""
        nbytes = len(data)
        try:
            sent = _os_write(out_fd, data)
        except _AGAIN:
            sent = 0
        except OSError:
            half.raw_failed()
            return
        if sent == nbytes and nbytes != COPY_READ:
            left = self.lean_reads - 1
            self.lean_reads = left
            if not left:
                self.to_thread()
            return
        self._to_pyraw(half, data, sent)

    def eof_from(self, half: Half) -> None:
        """`half`'s side sent EOF (lean copy mode, or PyRaw's raw_eof): pass it on (half-close); once both
        directions are done, close both.

        Closing takes a socket out of the epoll set: the last EOF of a connection costs no epoll_ctl.
        """
        half.eof = True
        node = self.peer
        assert isinstance(node, DirectNode)
        other: Half = node if half is self else self
        if half is self:
            self.ended = self.ended or (accesslog.NODE_CLOSED if node.eof else "")
        if other.eof or other.closed:
            self.abort()
            return
        raw = half.raw
        if raw is not None:
            raw.stop_reading()
        else:
            self.state.poller.remove_reader(self.fd if half is self else self.node_fd)
        try:
            (node.sock if half is self else self.sock).shutdown(socket.SHUT_WR)
        except OSError:
            half.raw_failed()

    def _to_pyraw(self, half: Half, data: bytes, sent: int) -> None:
        """Hand both directions to PyRaw, for good: `half`'s peer socket did not take all of `data` (PyRaw keeps
        the rest and stops reading until it does), or `data` filled COPY_READ (more is probably queued: PyRaw
        splices it)."""
        node = self.peer
        assert isinstance(node, DirectNode)
        poller = self.state.poller
        handoff = max(self.lean_reads, 0)
        raw = self.raw = PyRaw(self, poller, self.sock, node.sock, duplicate=False, handoff=handoff)
        node_raw = node.raw = PyRaw(node, poller, node.sock, self.sock, duplicate=False, handoff=handoff)
        for direction, reader in ((raw, self), (node_raw, node)):
            if not reader.eof:  # after an EOF the socket is no longer watched
                direction.reading = True
                poller.replace_reader(direction.fd, direction.readable)
        mine = raw if half is self else node_raw
        if sent < len(data):
            mine.tail = memoryview(data)[sent:]
            mine.wait_writable()
        elif self.pool.can_splice:
            mine.copying = False
            mine.splice_chunks()

    def _connect_expired(self) -> None:
        self.expiry = None
        self._stop_connecting()
        if self._client_gone():  # it left while we waited: nothing failed that concerns it
            self.ended = accesslog.CLIENT_RESET
            self.abort()
            return
        self._node_failed(self.target, TimeoutError())

    def _stop_connecting(self) -> None:
        """The connect timed out: stop watching the node's socket (closed with the connection)."""
        node = self.peer
        assert isinstance(node, DirectNode)
        self.state.poller.remove_writer(node.sock.fileno())

    def _client_gone(self) -> bool:
        """The client reset while its node connection was being made (nothing watches it until then)."""
        try:
            return bool(self.sock.getsockopt(*_SO_ERROR))  # the reset's error, even with its bytes still unread
        except OSError:
            return True

    def _node_failed(self, target: config_mod.Target, exc: BaseException) -> None:
        self.state.connect_failed("node connection failed", self.route.port, target, exc, client=self.client_ip)
        self.ended = accesslog.CONNECT_FAILED
        # Read what the client sent meanwhile: closing a socket with unread bytes sends a reset instead of a FIN.
        for _ in range(EARLY_DRAIN_READS):
            try:
                if not _os_read(self.fd, 65536):
                    break
            except OSError:
                break
        self.abort()

    def to_thread(self) -> None:
        """Hand both sockets to the C relay thread, when nothing waits in either direction."""
        node = self.peer
        if node is None or self.link is not None or self.closed:
            return
        mine = self.raw
        theirs = node.raw
        lean = mine is None and theirs is None
        # From PyRaw only when nothing waits to be sent (lean copy mode never holds bytes).
        if not lean and (mine is None or theirs is None or not (mine.quiet() and theirs.quiet())):
            return
        pool = self.pool
        if not pool.reserve_fds(2):  # unlink releases two
            return
        thread = rawmode._relay_thread(pool, self.state.loop)
        if thread is None:
            pool.release_fds(2)
            return
        try:
            link = thread.add(self.fd, self.node_fd, self.nbytes, node.nbytes)
        except (OSError, MemoryError):
            pool.release_fds(2)
            return
        # The descriptors are the thread's now (Link.stop closes them): ours stop watching them, and forget them.
        if lean:
            poller = self.state.poller
            poller.remove_reader(self.fd)
            poller.remove_reader(self.node_fd)
            self.sock.detach()
            assert isinstance(node, DirectNode)
            node.sock.detach()
        else:
            assert mine is not None and theirs is not None
            self.raw = node.raw = None
            mine.release().detach()
            theirs.release().detach()
        self.link = node.link = link
        self.link_first = True
        node.link_first = False
        pool.link(link, self)

    def raw_eof(self) -> None:
        self.eof_from(self)

    def raw_close(self) -> None:
        self.abort()

    def raw_failed(self) -> None:
        self.ended = self.ended or (accesslog.CLIENT_CLOSED if self.eof else accesslog.CLIENT_RESET)
        self.abort()

    def _closing(self) -> bool:
        """Mark the connection closed and drop its connect timer; False if it was closed already."""
        if self.closed:
            return False
        self.closed = True
        expiry = self.expiry
        if expiry is not None:  # still connecting
            expiry[1] = None  # Deadlines.cancel, inlined
            self.expiry = None
        return True

    def abort(self) -> None:
        """Close both sides now (raw mode's end, a failure, idle timeout, drain); safe to call twice."""
        if not self._closing():
            return
        self.watching = False
        node = self.peer
        node_sock = node.sock if isinstance(node, DirectNode) else None
        # Both sockets are closed below, which takes them out of the epoll set: their callbacks are dropped without
        # an epoll_ctl. (A socket detached for the relay thread has fileno -1, and none registered.)
        poller = self.state.poller
        poller.closing(self.sock.fileno())
        if node_sock is not None:
            poller.closing(node_sock.fileno())
        if node is not None:
            node.closed = True
            if self.link is not None or self.raw is not None or node.raw is not None:
                for raw in (self.raw, node.raw):
                    if raw is not None:
                        raw.reading = raw.writing = False  # unregistered above: PyRaw.stop must not do it again
                self.stop_raw()  # PyRaw.stop closes the sockets, Link.stop the thread's
        # Closing again is a no-op for a socket closed above or detached for the relay thread.
        self.sock.close()
        if node_sock is not None:
            node_sock.close()
        if self.accounted:
            self.accounted = False
            self.state.finished(self)
        if node is not None:
            node.peer = None  # no cycle left: both halves are freed now, not by the garbage collector


class DirectNode(NodeHalf):
    """The node side of a DirectClient: its socket; closing either side closes the connection."""

    __slots__ = ("sock",)

    def __init__(self, pool: Resources) -> None:
        # Every slot of Half, set here rather than through super().__init__: this runs once per connection.
        self.transport = None
        self.peer = None
        self.pool = pool
        self.view = None
        self.nbytes = 0
        self.eof = False
        self.reading_paused = False
        self.closed = False
        self.on_closed = None
        self.early = None
        self.raw = None
        self.reads_left = -1  # raw from the start
        self.link = None
        self.link_first = False
        self.sock: Any = None

    def raw_close(self) -> None:
        if self.peer is not None:
            self.peer.abort()

    def raw_eof(self) -> None:
        if isinstance(self.peer, DirectClient):
            self.peer.eof_from(self)

    def to_thread(self) -> None:
        if self.peer is not None:
            self.peer.to_thread()

    def raw_failed(self) -> None:
        client = self.peer
        if isinstance(client, DirectClient):
            client.ended = client.ended or accesslog.NODE_CLOSED
            client.abort()

    def abort(self) -> None:
        if self.peer is not None:
            self.peer.abort()


class InlineClient(DirectClient):
    """A direct connection relayed by the inline C relay (forwarder/_crelay.c, `Relay(threaded=False)`) from its
    node connect on: the connect's completion, every byte, the EOFs and the end are handled in C, in this thread,
    with no Python call; Python keeps admission, the connect timeout, byte counts (Link.counts) and the end's
    accounting, and hears of the rest through Resources.run_inline.

    It is DirectClient's lean copy mode with the Python taken out of each event; DirectClient remains the reference,
    and what runs without the C extensions. Two differences: the client is not watched while the connect is under
    way (the kernel holds its bytes; a reset is seen once connected, or at the connect timeout), and after
    RAW_AFTER_READS messages the connection moves to the relay thread (Relay.adopt) rather than from PyRaw.
    """

    __slots__ = ("in_thread",)

    def connect(self, family: int, address: tuple[str, int]) -> None:
        self.in_thread = False  # moved to the relay thread (Relay.adopt): its descriptors count in the budget
        state = self.state
        node = DirectNode(state.pool)
        self.peer = node
        node.peer = self
        relay = state.pool.inline
        assert relay is not None
        try:
            link = relay.connect(self.fd, family, address[0], address[1], RAW_AFTER_READS)
        except OSError as exc:  # the client's socket is still ours
            self._node_failed(self.target, exc)
            return
        self.link = node.link = link  # the client's descriptor is the relay's now: Link.stop closes it
        self.link_first = True
        state.pool.inline_links[link.id] = self
        if link.connecting:
            self.expiry = state.deadlines.add(self.started, self.route.config.connect_timeout_s, self._connect_expired)
        else:
            state.metrics.upstream_connect.observe(state.loop.time() - self.started)

    def link_connected(self, connect_ns: int) -> None:
        expiry = self.expiry
        if expiry is not None:
            expiry[1] = None  # Deadlines.cancel, inlined: this runs once per connection
            self.expiry = None
        self.state.metrics.upstream_connect.observe(connect_ns / 1e9)

    def link_connect_failed(self, error: int) -> None:
        self._node_failed(self.target, OSError(error, os.strerror(error)))

    def link_busy(self) -> None:
        self.to_thread()

    def link_ended(self, failed: bool, side: int) -> None:
        """Both directions saw EOF (`side`: whose came first), or a socket failed (`side`: which; -1 if neither)."""
        if side == 1:
            self.ended = self.ended or accesslog.NODE_CLOSED
        elif failed:
            self.ended = self.ended or accesslog.CLIENT_RESET
        self.abort()

    def _stop_connecting(self) -> None:
        """Nothing to do: Link.stop, at the end, drops the connect."""

    def _client_gone(self) -> bool:
        sock = _socket.socket(fileno=self.fd)  # a view of the relay's descriptor, let go below
        try:
            return bool(sock.getsockopt(*_SO_ERROR))
        except OSError:
            return True
        finally:
            sock.detach()

    def to_thread(self) -> None:
        """Move the connection from the inline relay to the relay thread, if it is quiet (nothing waits)."""
        link = self.link
        if link is None or self.closed:
            return
        pool = self.pool
        if not pool.reserve_fds(2):  # unlink releases two, as for DirectClient.to_thread
            return
        thread = rawmode._relay_thread(pool, self.state.loop)
        if thread is None or not thread.adopt(link):
            pool.release_fds(2)
            return
        del pool.inline_links[link.id]
        self.in_thread = True
        pool.link(link, self)

    def abort(self) -> None:
        if not self._closing():
            return
        node = self.peer
        link = self.link
        if link is not None:
            self.take_counts(link.stop())  # closes both sockets
            self.link = None
            if self.in_thread:
                self.pool.unlink(link)
            else:
                self.pool.inline_links.pop(link.id, None)
        else:  # the node connect failed before the relay took the client's descriptor
            _os_close(self.fd)
        if node is not None:
            node.closed = True
            node.link = None
        if self.accounted:
            self.accounted = False
            self.state.finished(self)
        if node is not None:
            node.peer = None  # no cycle left: both halves are freed now, not by the garbage collector
