"""Listeners that accept by themselves: plain forwards in batches, TLS ones admitting a client before any TLS byte."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("natfwd.server")

# Connections taken per readiness callback: enough to empty a burst, few enough to let established traffic run.
ACCEPT_BATCH = 64
# Out of descriptors or memory, the listener stays readable: stop watching it for this long instead of spinning.
ACCEPT_BACKOFF_S = 0.1
# Errors about the one connection being accepted (it was reset, or a firewall refused it): just take the next.
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


class _Listener:
    """What both listeners share: watching `sock`, pausing after an accept error, resuming, closing."""

    def __init__(self, sock: socket.socket, backlog: int) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.resume: asyncio.TimerHandle | None = None
        sock.listen(backlog)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        raise NotImplementedError

    def _pause(self, exc: OSError) -> None:
        # EMFILE, ENFILE, ENOBUFS...: the client waits in the backlog until connections had a chance to close.
        log.warning("accept failed, pausing accepts", extra={"error": str(exc), "pause_s": ACCEPT_BACKOFF_S})
        self.loop.remove_reader(self.sock.fileno())
        self.resume = self.loop.call_later(ACCEPT_BACKOFF_S, self._resume)

    def _resume(self) -> None:
        self.resume = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; connections already accepted live on."""
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        elif self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class PlainListener(_Listener):
    """Accepts on `sock` up to ACCEPT_BATCH connections per readiness callback, as HAProxy's accept loop does, and
    hands each one's descriptor and address to `accepted`, which owns the descriptor from then on.

    With `c_accept` (the C extension's accept: a non-blocking descriptor, the client's IP and its pending error),
    each one goes to `c_accepted(fd, ip, error)` instead.

    No transport, protocol or task is made here: a plain forward's connection needs none of them to be relayed.
    """

    def __init__(
        self,
        sock: socket.socket,
        backlog: int,
        accepted: Callable[[int, Any], None],
        c_accept: Callable[[int], tuple[int, str, int] | None] | None = None,
        c_accepted: Callable[[int, str, int], None] | None = None,
    ) -> None:
        self.accepted = accepted
        self.c_accept = c_accept
        self.c_accepted = c_accepted
        # Accepted sockets inherit TCP_NODELAY from the listening socket (Linux): set once here, not per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, backlog)

    def _accept(self) -> None:
        if self.c_accept is not None:
            self._c_accept()
            return
        # The bare accept4(): socket.accept() wraps each descriptor in Python code.
        accept = self.sock._accept  # type: ignore[attr-defined]
        accepted = self.accepted
        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                self._pause(exc)
                return
            accepted(fd, address)

    def _c_accept(self) -> None:
        accept = self.c_accept
        accepted = self.c_accepted
        assert accept is not None and accepted is not None
        fd = self.sock.fileno()
        for _ in range(ACCEPT_BATCH):
            try:
                new = accept(fd)
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                self._pause(exc)
                return
            if new is None:
                return
            accepted(*new)


class TlsListener(_Listener):
    """Accepts on `sock`, asks `admit(client_ip)` first, and only then hands the socket to the TLS handshake.

    `loop.create_server(ssl=...)` reads the ClientHello before our protocol exists, so every client, allowed or not,
    would cost a handshake. Here a refused client is closed unread; `failed(client_ip, error)` hears of every
    handshake that fails or times out, and `gone(client_ip)` of every client that reset before it was accepted.
    """

    def __init__(
        self,
        sock: socket.socket,
        backlog: int,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        handshake_timeout_s: float,
        admit: Callable[[str], bool],
        failed: Callable[[str, str], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        gone: Callable[[str], None] | None = None,
    ) -> None:
        self.protocol_factory = protocol_factory
        self.context = context
        self.handshake_timeout_s = handshake_timeout_s
        self.admit = admit
        self.failed = failed
        self.spawn = spawn
        self.gone = gone
        super().__init__(sock, backlog)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                self._pause(exc)
                return
            client_ip = str(address[0])
            try:
                conn.getpeername()
            except OSError:  # it reset while queued: gone, neither refused nor a failed handshake
                conn.close()
                if self.gone is not None:
                    self.gone(client_ip)
                continue
            if not self.admit(client_ip):
                conn.close()
                continue
            conn.setblocking(False)
            self.spawn(self._handshake(conn, client_ip))

    async def _handshake(self, conn: socket.socket, client_ip: str) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.protocol_factory, conn, ssl=self.context, ssl_handshake_timeout=self.handshake_timeout_s
            )
        except Exception as exc:  # whatever ends one client's handshake concerns that client only
            # The loop owns `conn` from the call on and has closed it: closing it here could close a reused fd.
            self.failed(client_ip, str(exc) or type(exc).__name__)
