"""Admission on a plain listener: each accepted connection is checked, counted, and given the client class that
relays it (direct.py without transports, muxclient.py when multiplexed, connection.py's when it needs transports)."""

from __future__ import annotations

import _socket
import ipaddress
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from forwarder import config as config_mod
from forwarder import direct, rawmode
from forwarder.connection import ConnectionState, Route, connection_factory
from forwarder.direct import DirectClient, InlineClient
from forwarder.muxclient import MuxClient

_SOCK_STREAM = socket.SOCK_STREAM
_SO_ERROR = (socket.SOL_SOCKET, socket.SO_ERROR)
_os_close = os.close


class PlainRoute:
    """A plain listener's accepted connections (acceptor.PlainListener): admitted and relayed without transports.

    A multiplexed forward's client joins a shared node connection (muxclient.MuxClient). A forward that needs a
    transport at this moment (rewriting, upstream TLS, or a target named by DNS, which only the loop resolves
    without blocking) gets one: the socket is handed to the loop as `create_server` would have, and ClientHalf
    admits it as before.
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

    def c_accepted(self, fd: int, client_ip: str, error: int) -> None:
        """A connection from the C extension's accept (acceptor.PlainListener): relayed by the inline C relay, with
        no socket object; `accepted` takes the ones that need more."""
        state = self.state
        route = self.route
        if error:  # it reset while queued for accept: gone, not refused (and SO_ERROR, read, is clear now)
            state.reject(route, "reset", "")
            _os_close(fd)
            return
        if route.config.multiplex:
            if self._refused(client_ip):
                _os_close(fd)
                return
            self._multiplexed(_socket.socket(self.family, _SOCK_STREAM, 0, fd), fd, client_ip)  # non-blocking
            return
        node_address = self._node_address()
        pool = state.pool
        if node_address is None or (pool.inline is None and rawmode.inline_relay(pool, state.loop) is None):
            self.accepted(fd, (client_ip,))
            return
        if self._refused(client_ip):
            _os_close(fd)
            return
        conn = InlineClient(state, route, None, fd, client_ip)
        state.opened(conn)
        conn.connect(self.node_family, node_address)

    def _refused(self, client_ip: str) -> bool:
        """Count a connection the allowlist, the limit or a drain refuses, and say so."""
        state = self.state
        route = self.route
        if not route.config.is_allowed(client_ip):
            state.reject(route, "not_allowed", client_ip)
            return True
        if state.active >= route.config.max_connections:
            state.reject(route, "limit", client_ip)
            return True
        if state.draining:
            state.reject(route, "draining", client_ip)
            return True
        return False

    def _node_address(self) -> tuple[str, int] | None:
        """Where a connection without transports connects; None when the forward needs them now."""
        route = self.route
        node_address = self.node_address if route.target is self.target else self._direct_to(route.target)
        if not direct.DIRECT or route.rewriter is not None or self.state.upstream_ssl:
            return None
        return node_address

    def accepted(self, fd: int, address: Any) -> None:
        state = self.state
        route = self.route
        multiplex = route.config.multiplex
        node_address = None if multiplex else self._node_address()
        if node_address is None and not multiplex:
            self.spawn(self._with_transport(socket.socket(self.family, _SOCK_STREAM, 0, fd)))
            return
        # _socket.socket is the C type under socket.socket: no Python __init__ per connection.
        sock = _socket.socket(self.family, _SOCK_STREAM, 0, fd)
        # A client that reset while queued for accept is gone, not refused. Its socket's pending error says so, for
        # less than getpeername(), whose address Python would format only to be dropped.
        if sock.getsockopt(*_SO_ERROR):
            state.reject(route, "reset", "")  # counted before the client sees the close: a scrape then agrees with it
            sock.close()
            return
        client_ip: str = address[0]
        if self._refused(client_ip):
            sock.close()
            return
        sock.setblocking(False)
        if multiplex:
            self._multiplexed(sock, fd, client_ip)
            return
        assert node_address is not None
        conn = DirectClient(state, route, sock, fd, client_ip)
        state.opened(conn)
        conn.connect(self.node_family, node_address)

    def _multiplexed(self, sock: Any, fd: int, client_ip: str) -> None:
        """An admitted client of a multiplexed forward: it joins a shared node connection."""
        conn = MuxClient(self.state, self.route, sock, fd, client_ip)
        self.state.opened(conn)
        conn.join()

    async def _with_transport(self, sock: socket.socket) -> None:
        try:
            await self.state.loop.connect_accepted_socket(self.factory, sock)
        except OSError:  # the client left before its transport was made: nothing was admitted yet
            sock.close()
