"""One client connection: admission, the node connection, and its plain, rewriting or multiplexed halves."""

from __future__ import annotations

import _socket
import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from forwarder import accesslog, rawmode, sockets
from forwarder import config as config_mod
from forwarder.mux import MuxPool, Prepare, Session, new_pool
from forwarder.poller import Poller
from forwarder.rawmode import RAW_AFTER_READS, PyRaw
from forwarder.relay import EARLY_LIMIT, Half
from forwarder.resources import Resources
from forwarder.rewriting import ObservingClient, RewriterFactory, RewritingNodeHalf

if TYPE_CHECKING:
    from forwarder.metrics import ForwardMetrics, Metrics

log = logging.getLogger("natfwd.server")


@dataclass(slots=True)
class Route:
    """What one listen port does right now; reload swaps `target` and `config` for new connections only."""

    port: int
    target: config_mod.Target
    config: config_mod.Config
    metrics: ForwardMetrics
    connections: set[ClientHalf]
    rewriter: RewriterFactory | None = None  # set for cluster-aware forwards; None keeps the plain fast relay
    mux: MuxPool | None = None  # the shared node connections, with `multiplex: true`


class ConnectionState:
    """What connections share with their worker: the loop, the relay resources, the count of live connections and
    the drain flag, the upstream TLS context, and the reporting of refusals and failed node connections.

    The worker owns it and sets `loop` when it starts, `draining` when it drains, `upstream_ssl` on reload.
    """

    __slots__ = ("loop", "poller", "pool", "metrics", "upstream_ssl", "active", "draining", "idle", "refusals")

    def __init__(self, pool: Resources, metrics: Metrics, upstream_ssl: ssl.SSLContext | None) -> None:
        # Set by the worker's start(). Per connection, asyncio.get_running_loop() costs a getpid() system call
        # (Python 3.11 checks for a fork), and connection setup needs the loop several times.
        self.loop: asyncio.AbstractEventLoop
        self.poller: Poller  # set by the worker's start() too: the sockets of connections without transports
        self.pool = pool
        self.metrics = metrics
        self.upstream_ssl = upstream_ssl
        self.active = 0  # connections admitted and not yet finished
        self.draining = False  # new connections are refused
        self.idle = asyncio.Event()  # set whenever the last connection closes; drain waits on it
        self.refusals = accesslog.RefusalLog(log)

    # --- admission and accounting -----------------------------------------------------------------------------
    def allows(self, route: Route, client_ip: str) -> bool:
        """The allowlist check, at accept (with TLS: before the handshake); a refusal is counted and logged."""
        if route.config.is_allowed(client_ip):
            return True
        self.reject(route, "not_allowed", client_ip)
        return False

    def reject(self, route: Route, reason: str, client_ip: str, error: str | None = None) -> None:
        """Count (by reason) and log a connection refused or closed by us."""
        self.metrics.rejected.labels(str(route.port), reason).inc()
        self.refusals.refused(route.port, client_ip, reason, error)

    def opened(self, conn: ClientHalf) -> None:
        """An admitted connection: live until `finished`."""
        conn.started = self.loop.time()
        self.active += 1
        conn.route.connections.add(conn)
        conn.route.metrics.accepted.inc()
        conn.route.metrics.active.inc()

    def finished(self, conn: ClientHalf) -> None:
        """Both sides of an admitted connection are gone: its last bytes are counted, and it is live no more."""
        self.active -= 1
        if self.active == 0:
            self.idle.set()
        conn.route.connections.discard(conn)
        self.account(conn)
        self.closed(conn)
        conn.route.metrics.active.dec()

    def account(self, conn: ClientHalf) -> None:
        """Move a connection's byte counts since the last call into the counters (the sweep, and at the end)."""
        conn.sync_counts()
        node = conn.peer
        to_node = conn.nbytes - conn.seen_to_node
        to_client = (node.nbytes if node is not None else 0) - conn.seen_to_client
        if to_node:
            conn.seen_to_node += to_node
            conn.route.metrics.bytes_to_node.inc(to_node)
        if to_client:
            conn.seen_to_client += to_client
            conn.route.metrics.bytes_to_client.inc(to_client)

    def closed(self, conn: ClientHalf) -> None:
        """Observe an accounted connection's lifetime, and write its access log line with `access_log: true`."""
        duration_s = self.loop.time() - conn.started
        conn.route.metrics.duration.observe(duration_s)
        if conn.route.config.access_log:
            accesslog.log_closed(
                client=conn.client_ip,
                forward=conn.route.port,
                node=str(conn.target),
                to_node=conn.seen_to_node,
                to_client=conn.seen_to_client,
                duration_s=duration_s,
                end=conn.ended or accesslog.CLIENT_CLOSED,
            )

    # --- node connections -------------------------------------------------------------------------------------
    def connect_failed(
        self, message: str, port: int, target: config_mod.Target, exc: BaseException, **extra: object
    ) -> None:
        """Count (by reason) and log a node connection that could not be made."""
        reason = connect_failure_reason(exc)
        self.metrics.upstream_errors.labels(str(port), reason).inc()
        error = str(exc) or type(exc).__name__
        log.warning(message, extra={"forward": port, "target": str(target), **extra, "reason": reason, "error": error})

    def mux_pool(self, route: Route) -> MuxPool:
        """The route's shared node connections, new after a retarget (the old ones serve their clients out)."""
        pool = route.mux
        if pool is None:  # reload retires a pool whose target or settings changed
            pool = route.mux = new_pool(self.loop, route.config, route.target, MuxHooks(self, route.port))
        return pool


def connect_failure_reason(exc: BaseException) -> str:
    """The `reason` label of natfwd_upstream_errors_total for a failed node connection."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


def connection_factory(state: ConnectionState, route: Route) -> Callable[[], ClientHalf]:
    """The protocol factory of a route's listener."""

    # The class is picked per connection: a reload can turn rewriting or multiplexing on or off for a port.
    def make() -> ClientHalf:
        if route.rewriter is not None:
            return RewritingClientHalf(state, route)
        if route.config.multiplex:
            return MuxClient(state, route)
        return ClientHalf(state, route)

    return make


class NodeHalf(Half):
    """The node side of a connection."""

    __slots__ = ()


class ClientHalf(Half):
    """The client side: checks the allowlist at accept, then opens the node connection and pairs the halves."""

    __slots__ = (
        "state",
        "route",
        "connect_task",
        "connect_expired",
        "seen_to_node",
        "seen_to_client",
        "idle_s",
        "accounted",
        "client_ip",
        "started",
        "target",
        "ended",
    )

    def __init__(self, state: ConnectionState, route: Route) -> None:
        super().__init__(state.pool)
        self.state = state
        self.route = route
        self.connect_task: asyncio.Task[None] | None = None
        self.connect_expired = False  # the connect timer cancelled connect_task (the client did not leave)
        self.seen_to_node = 0
        self.seen_to_client = 0
        self.idle_s = 0.0
        self.accounted = False
        self.client_ip = ""
        self.started = 0.0  # loop time at accept: natfwd_connection_duration_seconds and the access log
        self.target = route.target  # the node it connects to, kept through a later retarget
        self.ended = ""  # how it ended, when natfwd ended it (accesslog.IDLE_TIMEOUT ...)

    def node_half(self) -> NodeHalf:
        return NodeHalf(self.state.pool)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        route = self.route
        state = self.state
        peer = transport.get_extra_info("peername")
        if not peer:  # the client reset while queued for accept: gone, not refused
            state.reject(route, "reset", "")
            self.transport.abort()
            return
        client_ip = peer[0]
        if not route.config.is_allowed(client_ip):  # state.allows, inlined: this runs for every connection
            state.reject(route, "not_allowed", client_ip)
            self.transport.abort()
            return
        if state.active >= route.config.max_connections:
            state.reject(route, "limit", client_ip)
            self.transport.abort()
            return
        if state.draining:
            state.reject(route, "draining", client_ip)
            self.transport.abort()
            return
        state.opened(self)
        self.accounted = True
        self.client_ip = client_ip
        node = self.node_half()
        self.peer = node
        node.peer = self
        self.open_node(node)

    def open_node(self, node: NodeHalf) -> None:
        """Connect this client's own node connection (MuxClient shares one instead)."""
        self.connect_task = self.state.loop.create_task(self._connect(node, self.route.target))

    async def _connect(self, node: NodeHalf, target: config_mod.Target, sock: socket.socket | None = None) -> None:
        state = self.state
        loop = state.loop
        route = self.route
        started = loop.time()
        # A timer that cancels this task, rather than asyncio.timeout(): that asks for the running loop twice per
        # connection, each a getpid() system call on Python 3.11, and this runs once per client connection.
        expired = loop.call_later(route.config.connect_timeout_s, self._connect_expired)
        try:
            try:
                upstream_ssl = state.upstream_ssl
                if sock is not None:  # connected already (MuxClient); config refuses multiplex with upstream_tls
                    assert upstream_ssl is None
                    await loop.create_connection(lambda: node, sock=sock)
                else:
                    await loop.create_connection(
                        lambda: node,
                        target.host,
                        target.port,
                        ssl=upstream_ssl,
                        # The name checked and sent as SNI is the target's host name (or its IP, checked against IP
                        # SANs).
                        server_hostname=target.host if upstream_ssl is not None else None,
                        ssl_handshake_timeout=route.config.connect_timeout_s if upstream_ssl is not None else None,
                    )
            except asyncio.CancelledError:
                node.abort()  # the client left, or the timer fired; the node connection may have completed meanwhile
                if not self.connect_expired:
                    raise
                raise TimeoutError from None
            finally:
                expired.cancel()
        except (OSError, TimeoutError) as exc:
            self._node_failed(target, exc)
            return
        finally:
            self.connect_task = None
        state.metrics.upstream_connect.observe(loop.time() - started)
        if self.closed:
            node.abort()
            return
        self.release_early()

    def _node_failed(self, target: config_mod.Target, exc: BaseException) -> None:
        """The client's own node connection could not be made: counted, logged, and the client closed."""
        self.state.connect_failed("node connection failed", self.route.port, target, exc, client=self.client_ip)
        self.ended = accesslog.CONNECT_FAILED
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _connect_expired(self) -> None:
        task = self.connect_task
        if task is not None:
            self.connect_expired = True
            task.cancel()

    def eof_received(self) -> bool:
        self.ended = self.ended or accesslog.ending_at_eof(self)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        task = self.connect_task
        if task is not None:
            task.cancel()
        self.ended = self.ended or accesslog.ending(self, exc)
        super().connection_lost(exc)
        self._finish()

    @property
    def connecting(self) -> bool:
        """The node connection is being made: the connection is not idle, whatever its byte counts say."""
        return self.connect_task is not None

    def _finish(self) -> None:
        node = self.peer
        if node is not None and node.transport is not None and not node.closed:
            node.on_closed = self._finish  # the connection ends when the node side is gone too
            return
        if self.accounted:
            self.accounted = False
            self.state.finished(self)


class RewritingNode(RewritingNodeHalf, NodeHalf):
    """The node side of a cluster-aware connection: replies pass through the connection's rewriter."""

    __slots__ = ()


class RewritingClientHalf(ObservingClient, ClientHalf):
    """The client side of a cluster-aware connection: requests are shown to the rewriter, then relayed unchanged."""

    __slots__ = ()

    def node_half(self) -> NodeHalf:
        factory = self.route.rewriter
        assert factory is not None  # connection_factory picks this class only for routes with a rewriter
        return RewritingNode(self.state.pool, factory())


class MuxClient(ClientHalf):
    """A client on a multiplexed forward: its requests share the route's node connections (forwarder/mux/).

    The transport stays for accounting, drain and close; once admitted, the session reads and writes a duplicate
    of its socket. A pinned client gets its own node connection, and from then on it is an ordinary ClientHalf
    (raw mode included): the transport resumes reading once the bytes the session had not sent are out.
    """

    __slots__ = ("session",)

    def __init__(self, state: ConnectionState, route: Route) -> None:
        super().__init__(state, route)
        self.session: Session | None = None

    def open_node(self, node: NodeHalf) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        self.reading_paused = True
        # uvloop reads once after connection_made whatever the protocol asked (those bytes land in `early`);
        # pausing again one loop turn later is what stops it, and only then may the session read the socket.
        self.state.loop.call_soon(self._join)

    def _join(self) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.pause_reading()
        first = bytes(self.early) if self.early is not None else b""
        self.early = None
        try:
            sock = sockets.duplicate(self.transport)
        except OSError:  # no descriptor to spare: a connection of its own needs none beyond the node's socket
            self.state.metrics.pinned.labels(str(self.route.port), "no_descriptor").inc()
            self.mux_pin(first)
            return
        assert self.peer is not None
        self.session = self.state.mux_pool(self.route).join(self, self.peer, sock)
        self.session.start(first)

    def mux_pin(self, rest: bytes, prepare: Prepare | None = None) -> None:
        self.session = None
        if self.closed or self.peer is None:
            return
        self.early = bytearray(rest)  # release_early sends them once connected, then resumes the transport
        if prepare is None:
            super().open_node(cast(NodeHalf, self.peer))
        else:  # the state the client set while shared is replayed on its own connection first
            self.connect_task = self.state.loop.create_task(self._connect_prepared(cast(NodeHalf, self.peer), prepare))

    async def _connect_prepared(self, node: NodeHalf, prepare: Prepare) -> None:
        try:
            sock = await prepare()
        except (OSError, TimeoutError) as exc:
            self.connect_task = None
            self._node_failed(self.route.target, exc)
            return
        await self._connect(node, self.route.target, sock)

    def mux_close(self, *, abort: bool) -> None:
        self.session = None
        if self.transport is not None and not self.closed:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()
        super().connection_lost(exc)

    def abort(self) -> None:
        self._detach()
        super().abort()

    def _detach(self) -> None:
        session = self.session
        if session is not None:
            self.session = None
            session.detach()


class MuxHooks:
    """A pool's reports (mux.Hooks), counted and logged like a dedicated connection's."""

    __slots__ = ("state", "port")

    def __init__(self, state: ConnectionState, port: int) -> None:
        self.state = state
        self.port = port

    def connected(self, seconds: float) -> None:
        self.state.metrics.upstream_connect.observe(seconds)
        self.state.metrics.shared.labels(str(self.port)).inc()

    def closed(self) -> None:
        self.state.metrics.shared.labels(str(self.port)).dec()

    def pinned(self, reason: str) -> None:
        self.state.metrics.pinned.labels(str(self.port), reason).inc()

    def connect_failed(self, target: config_mod.Target, exc: BaseException) -> None:
        self.state.connect_failed("shared node connection failed", self.port, target, exc)


DIRECT = True  # tests set this to False to run plain forwards through the transports (ClientHalf)
_SOCK_STREAM = socket.SOCK_STREAM
_NODE_TYPE = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)  # non-blocking from socket(): no ioctl
_TCP_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_SO_ERROR = (socket.SOL_SOCKET, socket.SO_ERROR)
_EINPROGRESS = errno.EINPROGRESS
EARLY_DRAIN_READS = 4  # at most 256 KiB read and dropped from a client whose node connection failed


class PlainRoute:
    """A plain listener's accepted connections (acceptor.PlainListener): admitted and relayed without transports.

    A forward that needs a transport at this moment (rewriting, multiplexing, upstream TLS, or a target named by
    DNS, which only the loop resolves without blocking) gets one: the socket is handed to the loop as
    `create_server` would have, and ClientHalf admits it as before.
    """

    __slots__ = ("state", "route", "family", "factory", "spawn", "target", "node_family", "node_address")

    def __init__(
        self,
        state: ConnectionState,
        route: Route,
        family: int,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.state = state
        self.route = route
        self.family = family
        self.factory = connection_factory(state, route)
        self.spawn = spawn
        self.target: config_mod.Target | None = None  # the target node_address was worked out for
        self.node_family = 0
        self.node_address: tuple[str, int] | None = None

    def _direct_to(self, target: config_mod.Target) -> tuple[str, int] | None:
        """The node's socket address when `target` (the route's, new since the last connection) is an IP literal,
        else None."""
        self.target = target
        try:
            ip = ipaddress.ip_address(target.host)
        except ValueError:
            self.node_address = None
        else:
            self.node_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            self.node_address = (target.host, target.port)
        return self.node_address

    def accepted(self, fd: int, address: Any) -> None:
        state = self.state
        route = self.route
        node_address = self.node_address if route.target is self.target else self._direct_to(route.target)
        if (
            not DIRECT
            or node_address is None
            or route.rewriter is not None
            or route.config.multiplex
            or state.upstream_ssl
        ):
            self.spawn(self._with_transport(socket.socket(self.family, _SOCK_STREAM, 0, fd)))
            return
        # _socket.socket is the C type under socket.socket: no Python __init__ per connection.
        sock = _socket.socket(self.family, _SOCK_STREAM, 0, fd)
        # A client that reset while queued for accept is gone, not refused. Its socket's pending error says so, for
        # less than getpeername(), whose address Python would format only to be dropped.
        if sock.getsockopt(*_SO_ERROR):
            sock.close()
            state.reject(route, "reset", "")
            return
        client_ip: str = address[0]
        if not route.config.is_allowed(client_ip):
            sock.close()
            state.reject(route, "not_allowed", client_ip)
            return
        if state.active >= route.config.max_connections:
            sock.close()
            state.reject(route, "limit", client_ip)
            return
        if state.draining:
            sock.close()
            state.reject(route, "draining", client_ip)
            return
        sock.setblocking(False)
        conn = DirectClient(state, route, sock, client_ip)
        state.opened(conn)
        conn.connect(self.node_family, node_address)

    async def _with_transport(self, sock: socket.socket) -> None:
        try:
            await self.state.loop.connect_accepted_socket(self.factory, sock)
        except OSError:  # the client left before its transport was made: nothing was admitted yet
            sock.close()


class DirectClient(ClientHalf):
    """A plain forward's client with no transport on either side: a non-blocking connect watched with add_writer,
    then raw mode (PyRaw, handed to the C relay thread when the connection gets busy) from the first byte.

    While the node connection is being made, the client's bytes are held (up to EARLY_LIMIT) and a reset drops it.
    """

    __slots__ = ("sock", "expiry", "watching")

    def __init__(self, state: ConnectionState, route: Route, sock: Any, client_ip: str) -> None:
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
        self.expiry: asyncio.TimerHandle | None = None  # the connect timeout, while connecting
        self.watching = False  # _read_early is the client's reader

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
            self.expiry = state.loop.call_later(self.route.config.connect_timeout_s, self._connect_expired)
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
        loop = state.loop
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
            state.poller.remove_writer(node_sock.fileno())
        error = node_sock.getsockopt(*_SO_ERROR)
        if error:
            self._node_failed(self.target, OSError(error, os.strerror(error)))
            return
        state.metrics.upstream_connect.observe(loop.time() - self.started)
        # Busy connections are offered to the C relay thread; without it, that is where natfwd says so, once.
        handoff = RAW_AFTER_READS
        poller = state.poller
        raw = self.raw = PyRaw(self, poller, self.sock, node_sock, duplicate=False, handoff=handoff)
        node.raw = PyRaw(node, poller, node_sock, self.sock, duplicate=False, handoff=handoff)
        node.raw.start()
        early = self.early
        if early is not None:
            self.early = None
            data = bytes(early)
            sent = sockets.write(raw.out_fd, data, raw.failed)
            if sent < 0:
                return
            if sent < len(data):
                raw.tail = memoryview(data)[sent:]
                raw.reading = self.watching  # so that waiting for the node stops our reader
                self.watching = False
                raw.wait_writable()
                return
        self.watching = False
        raw.start()  # replaces _read_early as the client's reader

    def _connect_expired(self) -> None:
        self.expiry = None
        node = self.peer
        assert isinstance(node, DirectNode)
        self.state.poller.remove_writer(node.sock.fileno())
        if self._client_gone():  # it left while we waited: nothing failed that concerns it
            self.ended = accesslog.CLIENT_RESET
            self.abort()
            return
        self._node_failed(self.target, TimeoutError())

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
                if not self.sock.recv(65536):
                    break
            except OSError:
                break
        self.abort()

    def to_thread(self) -> None:
        """Hand both sockets to the C relay thread, when nothing waits in either direction."""
        node = self.peer
        mine = self.raw
        if node is None or mine is None or node.raw is None or self.link is not None:
            return
        theirs = node.raw
        pool = self.pool
        if not (mine.quiet() and theirs.quiet()) or not pool.reserve_fds(2):  # unlink releases two
            return
        thread = rawmode._relay_thread(pool, self.state.loop)
        if thread is None:
            pool.release_fds(2)
            return
        try:
            link = thread.add(mine.fd, theirs.fd, self.nbytes, node.nbytes)
        except (OSError, MemoryError):
            pool.release_fds(2)
            return
        self.raw = node.raw = None
        mine.release().detach()  # the descriptors are the thread's now: Link.stop closes them
        theirs.release().detach()
        self.link = node.link = link
        self.link_first = True
        node.link_first = False
        pool.link(link, self)

    def raw_eof(self) -> None:
        self.ended = self.ended or (accesslog.NODE_CLOSED if self.peer is not None and self.peer.eof else "")
        super().raw_eof()

    def raw_close(self) -> None:
        self.abort()

    def raw_failed(self) -> None:
        self.ended = self.ended or (accesslog.CLIENT_CLOSED if self.eof else accesslog.CLIENT_RESET)
        self.abort()

    def abort(self) -> None:
        """Close both sides now (raw mode's end, a failure, idle timeout, drain); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.expiry is not None:  # still connecting
            self.expiry.cancel()
            self.expiry = None
            node = self.peer
            if isinstance(node, DirectNode) and node.sock is not None:
                self.state.poller.remove_writer(node.sock.fileno())
        if self.watching:
            self.watching = False
            self.state.poller.remove_reader(self.sock.fileno())
        if self.link is not None or self.raw is not None:
            poller = self.state.poller
            for half in (self, self.peer):
                raw = half.raw if half is not None else None
                if raw is not None:
                    # PyRaw.stop closes the socket, which takes it out of the epoll set: no epoll_ctl to do that.
                    poller.forget(raw.fd, raw.out_fd)
                    raw.reading = raw.writing = False
            self.stop_raw()  # PyRaw.stop closes the sockets, Link.stop the thread's
        # Closing again is a no-op for a socket closed above or detached for the relay thread.
        self.sock.close()
        node = self.peer
        if isinstance(node, DirectNode) and node.sock is not None:
            node.sock.close()
        if node is not None:
            node.closed = True
        if self.accounted:
            self.accounted = False
            self.state.finished(self)


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
