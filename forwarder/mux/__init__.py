"""Multiplexing (`multiplex: true`): many clients' requests pipelined over a few shared node connections.

With one node connection per client, each request costs the node (and the NAT's kernel) a read, a write and two
TCP segments of its own. Here a request goes to the node at once when the node is idle; requests that arrive, from
any client, while it works on earlier ones wait for its next reply and then go in one write, and the node answers
them all in one write too; natfwd splits the replies back by counting them (forwarder/protocols/framing.py).
twemproxy and Envoy's Redis proxy do the same.

A `SharedConnection` (shared.py) is one shared node connection: requests leave in arrival order, and a FIFO of
(session, replies owed) routes the replies back. A `Session` (session.py) is one client's end: it reads the client's
socket (its owner's, forwarder/muxclient.py, which has no transport), frames requests, and writes replies. A client whose
request cannot share a connection (SELECT, AUTH, MULTI, blocking or unknown commands, memcached noreply) or who
pipelines many requests itself is *pinned*: once every reply it is owed has arrived, its owner gives it a node
connection of its own and the ordinary relay takes over, with the bytes not yet sent going first. A `MuxPool`
(pool.py) holds a forward's shared connections in one worker.

Connection state stays the client's own. A pinned client's own connection first replays the state it set while
shared (HELLO 3, CLIENT SETINFO...; own.py), so a RESP3 client stays RESP3. A login is never lent: a shared
connection never logs in, AUTH pins, and a client that joins a connection already in use has it RESET first (and
greeted again), so it starts with the access a new connection has (Redis 6.2+; older nodes pin such clients).
"""

from forwarder.mux.own import Prepare
from forwarder.mux.pool import MuxPool, new_pool
from forwarder.mux.session import Session
from forwarder.mux.shared import Hooks

__all__ = ["Hooks", "MuxPool", "Prepare", "Session", "new_pool"]
