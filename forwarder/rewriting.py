"""Cluster-aware forwards: the node address map, which forwards rewrite, and the relay halves that rewrite."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from forwarder import config as config_mod
from forwarder.protocols import Rewriter
from forwarder.protocols.memcached import AutoDiscoveryRewriter
from forwarder.protocols.redis_stream import ClusterRewriter
from forwarder.relay import Half
from forwarder.resources import Resources

log = logging.getLogger("natfwd.rewriting")

RewriterFactory = Callable[[], Rewriter]
WARN_INTERVAL_S = 60.0
WARN_BURST = 10  # warning lines per interval, all messages together
# A rewriter's work is linear in the bytes of one call, up to a few microseconds a byte for a hostile reply of
# tiny values: reads this small keep one call, and so the other connections' wait, short.
REWRITE_READ = 16 * 1024


def _key(host: str) -> str:
    return host.lower().rstrip(".")


class NodeMap:
    """The mapper every rewriter of one worker shares: node (host name or IP, port) -> (public_address, port).

    `update` swaps the whole table at once, so live connections see the new nodes too (a MOVED to a replaced
    node must name its new port, whenever the connection was opened). `resolved` caches the IPs of DNS-name
    targets; the tracker refreshes it.
    """

    __slots__ = ("table", "resolved")

    def __init__(self) -> None:
        self.table: dict[tuple[str, int], tuple[str, int]] = {}
        self.resolved: dict[str, tuple[str, ...]] = {}

    def __call__(self, host: str, port: int) -> tuple[str, int] | None:
        return self.table.get((_key(host), port))

    def update(self, cfg: config_mod.Config, resolved: Mapping[str, Sequence[str]] | None = None) -> None:
        """Rebuild from the config's node forwards (never the auto_discovery one) and the resolved IPs."""
        if resolved is not None:
            self.resolved = {_key(host): tuple(ips) for host, ips in resolved.items()}
        table: dict[tuple[str, int], tuple[str, int]] = {}
        for forward in cfg.forwards:
            public = (cfg.public_address, forward.port)
            target = forward.target
            table.setdefault((_key(target.host), target.port), public)
            if not target.is_ip:
                for ip in self.resolved.get(_key(target.host), ()):
                    table.setdefault((ip, target.port), public)
        self.table = table


class RateLimitedWarning:
    """The Warn callback all rewriters of one worker share: at most `burst` lines per `interval_s` window in all,
    each distinct message at most once a window. What it drops is counted, and the count is logged when the next
    window opens, so a flood (a config listing thousands of made-up nodes, fetched over and over) costs a few
    lines a minute and its memory is bounded by `burst` messages."""

    __slots__ = ("logger", "interval_s", "burst", "clock", "window_start", "seen", "suppressed")

    def __init__(
        self,
        logger: logging.Logger = log,
        interval_s: float = WARN_INTERVAL_S,
        burst: int = WARN_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.clock = clock
        self.interval_s = interval_s
        self.burst = burst
        self.window_start = -float("inf")
        self.seen: set[str] = set()  # messages logged in this window
        self.suppressed = 0  # messages dropped in this window

    def __call__(self, message: str) -> None:
        now = self.clock()
        if now - self.window_start >= self.interval_s:
            if self.suppressed:
                self.logger.warning(
                    "%d more rewriting warnings suppressed in the last %.0f s", self.suppressed, now - self.window_start
                )
            self.window_start = now
            self.seen.clear()
            self.suppressed = 0
        if message in self.seen or len(self.seen) >= self.burst:
            self.suppressed += 1
            return
        self.seen.add(message)
        self.logger.warning(message)


def all_forwards(cfg: config_mod.Config) -> tuple[config_mod.Forward, ...]:
    """The listeners a config asks for: its forwards, plus the auto_discovery port when configured."""
    if cfg.auto_discovery is None:
        return cfg.forwards
    return (*cfg.forwards, config_mod.Forward(cfg.auto_discovery.port, cfg.auto_discovery.target))


def rewriter_factory(
    cfg: config_mod.Config, port: int, nodes: NodeMap, warn: Callable[[str], None]
) -> RewriterFactory | None:
    """What rewrites connections on listen `port`, or None for a plain relay (the fast path)."""
    if cfg.auto_discovery is not None and port == cfg.auto_discovery.port:
        return lambda: AutoDiscoveryRewriter(nodes, warn)
    if cfg.engine == "redis-cluster":
        return lambda: ClusterRewriter(nodes)
    return None


class RewritingNodeHalf(Half):
    """The node side of a rewriting connection: replies go through `rewriter.from_node` before the client sees them.

    The rewriter copies anything it holds back, and what it returns is a fresh bytes object (or the copy made
    here), so the pooled buffer is free again as soon as the chunk is handed over.
    """

    __slots__ = ("rewriter",)

    def __init__(self, pool: Resources, rewriter: Rewriter) -> None:
        super().__init__(pool)
        self.rewriter = rewriter

    def get_buffer(self, sizehint: int) -> memoryview:
        return super().get_buffer(sizehint)[:REWRITE_READ]

    def buffer_updated(self, nbytes: int) -> None:
        view = self.view
        assert view is not None and self.peer is not None
        self.nbytes += nbytes
        out = self.rewriter.from_node(bytes(view[:nbytes]))
        self.view = None
        self.pool.give(view)
        transport = self.peer.transport
        if out and transport is not None and not self.peer.closed:
            transport.write(out)

    def eof_received(self) -> bool:
        rest = self.rewriter.flush()
        peer = self.peer
        if rest and peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.write(rest)
        return super().eof_received()


class ObservingClient(Half):
    """Mixin for the client side of a rewriting connection: shows every request chunk to the node half's rewriter.

    It adds no slots so it can be combined with connection.ClientHalf; the rewriter lives on the node half.
    """

    __slots__ = ()

    def buffer_updated(self, nbytes: int) -> None:
        view = self.view
        node = self.peer
        if view is not None and isinstance(node, RewritingNodeHalf):
            node.rewriter.from_client(bytes(view[:nbytes]))
        super().buffer_updated(nbytes)
