"""A multiplexed forward's client: its session shares node connections; pinned, it gets one of its own."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from forwarder import accesslog
from forwarder.connection import ConnectionState, Route
from forwarder.direct import DirectClient, DirectNode
from forwarder.mux import Prepare, Session
from forwarder.mux.own import node_socket


class MuxClient(DirectClient):
    """A client on a multiplexed forward, with no transport: its session (forwarder/mux/) reads and writes its
    socket, and its requests share the route's node connections.

    Its DirectNode has no socket while it shares: it counts the replies written to the client. A pinned client
    gets a node connection of its own (its state replayed first, when it set some) and is relayed from then on as
    any DirectClient is, the bytes its session had not sent going first.
    """

    __slots__ = ("session",)

    def __init__(self, state: ConnectionState, route: Route, sock: Any, fd: int, client_ip: str) -> None:
        super().__init__(state, route, sock, fd, client_ip)
        self.session: Session | None = None

    @property
    def connecting(self) -> bool:
        return self.connect_task is not None

    def join(self) -> None:
        """Admitted: join a shared connection of the route's pool."""
        node = DirectNode(self.state.pool)
        self.peer = node
        node.peer = self
        session = self.session = self.state.mux_pool(self.route).join(self, node, self.fd)
        session.start(b"")

    # --- the session's owner (mux.session.Owner) -------------------------------------------------------------
    def mux_pin(self, rest: bytes, prepare: Prepare | None = None) -> None:
        self.session = None
        if self.closed:
            return
        if rest:  # counted in nbytes when the session read them
            self.early = bytearray(rest)
        self.connect_task = self.state.loop.create_task(self._pin(prepare))

    def mux_close(self, *, abort: bool) -> None:
        if abort:  # its socket failed, or it took none of its replies for mux_stall_timeout_s
            self.ended = self.ended or accesslog.CLIENT_RESET
        self.abort()

    async def _pin(self, prepare: Prepare | None) -> None:
        """Connect the client's own node connection, then relay it."""
        loop = self.state.loop
        started = loop.time()
        try:
            if prepare is not None:  # bounded by the connect timeout itself
                node_sock = await prepare()
            else:
                async with asyncio.timeout(self.route.config.connect_timeout_s):
                    node_sock = await node_socket(loop, self.target)
        except (OSError, TimeoutError) as exc:
            self.connect_task = None
            self._node_failed(self.target, exc)
            return
        self.connect_task = None
        if self.closed:
            node_sock.close()
            return
        self._pinned(node_sock, loop.time() - started)

    def _pinned(self, node_sock: socket.socket, seconds: float) -> None:
        node = self.peer
        assert isinstance(node, DirectNode)
        node.sock = node_sock
        node_fd = self.node_fd = node_sock.fileno()
        self.state.metrics.upstream_connect.observe(seconds)
        self.state.poller.add_reader(node_fd, self._from_node)
        self.relay()

    def abort(self) -> None:
        if self.closed:
            return
        session = self.session
        if session is not None:
            self.session = None
            # Closing the socket (below) takes it out of the poller: the session's callbacks go with no epoll_ctl.
            self.state.poller.closing(self.fd)
            session.detach()
        task = self.connect_task
        if task is not None:
            self.connect_task = None
            task.cancel()
        super().abort()
