"""One client connection: admission, the node connection, and its plain, rewriting or multiplexed halves."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder import accesslog
from forwarder import config as config_mod
from forwarder.deadlines import Deadlines
from forwarder.mux import MuxPool, new_pool
from forwarder.poller import Poller
from forwarder.relay import Half
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

    __slots__ = ("loop", "poller", "deadlines", "pool", "metrics", "upstream_ssl", "active", "draining", "idle",
                 "refusals")  # fmt: skip

    def __init__(self, pool: Resources, metrics: Metrics, upstream_ssl: ssl.SSLContext | None) -> None:
        # Set by the worker's start(). Per connection, asyncio.get_running_loop() costs a getpid() system call
        # (Python 3.11 checks for a fork), and connection setup needs the loop several times.
        self.loop: asyncio.AbstractEventLoop
        self.poller: Poller  # set by the worker's start() too: the sockets of connections without transports
        self.deadlines: Deadlines  # and their connect timeouts
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
            pool = route.mux = new_pool(self.loop, self.poller, route.config, route.target, MuxHooks(self, route.port))
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

    # The class is picked per connection: a reload can turn rewriting on or off for a port.
    def make() -> ClientHalf:
        if route.rewriter is not None:
            return RewritingClientHalf(state, route)
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
                if node.transport is not None and not node.closed:
                    # uvloop closes the transport of a create_connection cancelled after connection_made without
                    # calling connection_lost, which the client's _finish waits for: it would stay live for good.
                    node.connection_lost(None)
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
