"""A node connection of the multiplexer's own making: a shared one, or a pinned client's, its state replayed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from forwarder import config as config_mod
from forwarder import sockets
from forwarder.protocols.framing import Framer, FramingError

NODE_READ = 64 * 1024  # below glibc's mmap threshold (128 KiB): a bigger read costs mmap, mremap and munmap each
# A shared connection is probed after this much silence, so one the node (or a firewall on the way) dropped without a
# word is found and replaced while idle, not by the next clients' requests.
KEEPALIVE_IDLE_S = 30
# The bytes a node may send in reply to a pinned client's replayed state before natfwd gives up on it.
REPLAY_REPLIES_MAX = 1024 * 1024
Prepare = Callable[[], Awaitable[socket.socket]]  # opens a pinned client's own node connection, its state replayed


class ReplayError(ConnectionError):
    """A pinned client's own node connection could not be put in the state the client set while shared."""


async def node_socket(
    loop: asyncio.AbstractEventLoop, target: config_mod.Target, *, keepalive: bool = False
) -> socket.socket:
    """A connected, non-blocking TCP socket to `target`; OSError when it cannot be made."""
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sockets.set_nodelay(sock)
        if keepalive:
            sockets.set_keepalive(sock, KEEPALIVE_IDLE_S)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def own_connection(
    loop: asyncio.AbstractEventLoop,
    target: config_mod.Target,
    framer: Framer,
    timeout_s: float,
    requests: list[bytes],
    hello: bool,
) -> socket.socket:
    """A pinned client's own node connection, with `requests` (the state it set while shared; `hello`: the first
    is its lane's HELLO; or memcached's no-op, which keeps the connection in the text protocol the client spoke)
    sent and their replies read and dropped, before any byte of the client's goes.

    Raises OSError or TimeoutError when the node cannot be reached in `timeout_s`, and ReplayError when it
    refuses the HELLO (the client would go on in a protocol it did not ask for) or answers more than it was asked.
    """
    async with asyncio.timeout(timeout_s):
        sock = await node_socket(loop, target)
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
                    if requests[got] == framer.sentinel:  # memcached's no-op, whose reply is known to the byte
                        end = pos + len(framer.sentinel_reply)
                        if len(buf) < end:
                            break
                        if buf[pos:end] != framer.sentinel_reply:
                            raise ReplayError(f"the node answered its no-op with {bytes(buf[pos:end])!r}")
                        pos = end
                        got += 1
                        continue
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
