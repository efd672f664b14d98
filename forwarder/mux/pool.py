"""The shared connections of one forward in one worker, and the choice of one for each client."""

from __future__ import annotations

import asyncio
import logging

from forwarder import config as config_mod
from forwarder import extensions
from forwarder.mux.session import Counter, Owner, Session
from forwarder.mux.shared import Hooks, SharedConnection
from forwarder.poller import Watcher
from forwarder.protocols import framing
from forwarder.protocols.framing import Framer, framer

log = logging.getLogger("natfwd.mux")


class MuxPool:
    """The shared connections of one forward in one worker, to one target; clients are spread round-robin."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        watch: Watcher,
        target: config_mod.Target,
        framer: Framer,
        connections: int,
        connect_timeout_s: float,
        hooks: Hooks,
        stall_timeout_s: float,
    ) -> None:
        self.loop = loop
        self.watch = watch  # the clients' sockets are watched here (the worker's Poller)
        self.target = target
        self.framer = framer
        self.connections = connections
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s  # a client that takes none of its replies this long is reset
        self.hooks = hooks
        self.shared: list[SharedConnection] = []
        self.turn = 0
        self.retired = False  # the forward was retargeted or removed: close once the last client leaves
        self.resets: bool | None = None  # whether the node knows RESET; None until it has answered one

    def join(self, owner: Owner, replied: Counter, fd: int) -> Session:
        """A session for the client whose non-blocking socket is `fd` (the owner's, which it closes)."""
        return Session(owner, replied, self.connection(self.framer.first_lane), fd)

    def connection(self, lane: int) -> SharedConnection:
        """A shared connection of `lane`, round-robin once the lane has `connections` of them."""
        of_lane = [c for c in self.shared if c.lane == lane]
        if len(of_lane) < self.connections:
            conn = SharedConnection(self, lane)
            self.shared.append(conn)
            return conn
        self.turn += 1
        return of_lane[self.turn % len(of_lane)]

    def left(self, conn: SharedConnection) -> None:
        if self.retired and not conn.sessions:
            conn.close()

    def retire(self) -> None:
        self.retired = True
        for conn in list(self.shared):
            if not conn.sessions:
                conn.close()


def new_pool(
    loop: asyncio.AbstractEventLoop, watch: Watcher, cfg: config_mod.Config, target: config_mod.Target, hooks: Hooks
) -> MuxPool:
    if framing.C is None:
        extensions.warn_missing(log, "multiplexing's scanners", "about 2 us more per request")
    return MuxPool(
        loop,
        watch,
        target,
        framer(cfg.engine),
        cfg.multiplex_connections,
        cfg.connect_timeout_s,
        hooks,
        cfg.mux_stall_timeout_s,
    )
