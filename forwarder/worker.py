"""One worker process's event loop: listeners, reload, drain, the idle sweep, and the signals that drive them."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from forwarder import accesslog, direct, notify, rawmode, tls
from forwarder import config as config_mod
from forwarder.acceptor import PlainListener, TlsListener
from forwarder.connection import ConnectionState, Route, connection_factory
from forwarder.deadlines import Deadlines
from forwarder.errors import NatfwdError, bind_error
from forwarder.kernelpath import KernelPath
from forwarder.plainroute import PlainRoute
from forwarder.poller import Poller
from forwarder.resources import BUFFER_SIZE, Resources
from forwarder.rewriting import NodeMap, RateLimitedWarning, all_forwards, rewriter_factory
from forwarder.tracking import Tracker

if TYPE_CHECKING:
    from forwarder.metrics import Metrics

log = logging.getLogger("natfwd.server")
Listener = PlainListener | TlsListener  # both stop accepting on close() and leave live connections alone

LISTEN_BACKLOG = 4096
# Objects allocated between young-generation collections (CPython's default is 700). Each collection walks every
# live connection's objects, and connection churn allocates a few dozen per connection; most are freed by reference
# counting, so collecting less often costs little memory.
GC_YOUNG_THRESHOLD = 10_000
RESTART_ONLY = ("workers", "metrics", "cpu_affinity")  # keys a reload cannot change in a running worker
KERNEL_POLL_MIN_S = 0.5


class Worker:
    """One event loop's listeners and connections. Reload and drain are methods; signals are wired in `run`."""

    def __init__(
        self,
        cfg: config_mod.Config,
        config_path: str | None,
        metrics: Metrics,
        *,
        reuse_port: bool,
        incoming_cpu: int | None = None,
        count_reloads: bool = True,
        buffer_size: int = BUFFER_SIZE,
        program_kernel: bool = True,
    ) -> None:
        self.config = cfg
        self.config_path = config_path
        self.metrics = metrics
        self.reuse_port = reuse_port
        # cpu_affinity: the CPU this worker is pinned to. Its listeners ask the kernel (Linux 6.2 and later) for the
        # connections whose SYN that CPU received, so each connection is served on the CPU its packets arrive on.
        self.incoming_cpu = incoming_cpu
        self.count_reloads = count_reloads
        self.pool = Resources(buffer_size)
        self.pool.reserve_for_connections(cfg.max_connections)
        self.server_ssl = tls.server_context(cfg)
        self.state = ConnectionState(self.pool, metrics, tls.upstream_context(cfg))
        self.routes: dict[int, Route] = {}
        self.listeners: dict[int, Listener] = {}
        self.stopping = asyncio.Event()
        self._retired: list[Route] = []  # routes removed by reload whose connections still run
        self._tasks: set[asyncio.Task[object]] = set()
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self.nodes = NodeMap()  # the rewriters' node -> public address map, shared by every connection
        self.warn = RateLimitedWarning()
        self.tracker = Tracker(self)
        # data_path kernel/auto: the forwards the kernel serves. With workers: N only one worker programs nft; the
        # others leave those ports alone.
        self.kernel = KernelPath(metrics) if program_kernel else None
        self.started_with = cfg.data_path  # a reload cannot turn the kernel path on after userspace (config.reloadable)

    @property
    def active(self) -> int:
        """Connections admitted and not yet finished."""
        return self.state.active

    @property
    def draining(self) -> bool:
        return self.state.draining

    def spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run `coro` as a task of this worker; drain cancels the ones still running."""
        # Keep a reference: a bare create_task can be garbage collected mid-flight.
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _all_routes(self) -> list[Route]:
        return list(self.routes.values()) + self._retired

    @staticmethod
    def _relayed(cfg: config_mod.Config) -> tuple[config_mod.Forward, ...]:
        """The forwards this worker listens for: all but those the kernel serves."""
        kernel = {f.port for f in cfg.kernel_forwards}
        return tuple(f for f in all_forwards(cfg) if f.port not in kernel)

    async def _kernel_sync(self) -> None:
        """Once a tick: follow DNS answers into the kernel table (reloads and discovery apply at once), and read its
        counters and conntrack into the metrics."""
        assert self.kernel is not None
        while True:
            # Each round runs nft once: not more often than KERNEL_POLL_MIN_S, whatever idle_timeout_s makes the tick.
            await asyncio.sleep(max(self.sweep_interval_s(), KERNEL_POLL_MIN_S))
            if self.draining:
                return
            try:
                await self.kernel.apply(self.config, self.nodes.resolved)
            except NatfwdError as exc:
                log.error("cannot update the kernel path; retrying next tick", extra={"error": str(exc)})
            except Exception:  # the loop must outlive a surprise, or the kernel forwards stop following the nodes
                log.exception("kernel path update failed; retrying next tick")
            await self.kernel.poll()

    # --- the idle sweep ---------------------------------------------------------------------------------------
    def sweep_interval_s(self) -> float:
        idle = self.config.idle_timeout_s
        return 1.0 if idle == 0 else max(0.05, min(1.0, idle / 4))

    async def _sweep(self) -> None:
        """Once a tick: flush byte counters, and close connections idle longer than idle_timeout_s."""
        while True:
            interval = self.sweep_interval_s()
            await asyncio.sleep(interval)
            limit = self.config.idle_timeout_s
            self._retired = [r for r in self._retired if r.connections]
            for route in self._all_routes():
                for conn in list(route.connections):
                    before = conn.seen_to_node + conn.seen_to_client
                    self.state.account(conn)
                    if conn.seen_to_node + conn.seen_to_client != before or conn.connecting:
                        conn.idle_s = 0.0
                        continue
                    conn.idle_s += interval
                    if limit and conn.idle_s >= limit:
                        log.info("idle timeout", extra={"forward": route.port, "idle_s": round(conn.idle_s, 2)})
                        self.metrics.rejected.labels(str(route.port), "idle_timeout").inc()
                        conn.ended = accesslog.IDLE_TIMEOUT
                        conn.abort()
                        if conn.peer is not None:
                            conn.peer.abort()

    # --- listeners --------------------------------------------------------------------------------------------
    def _bind(self, address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if self.incoming_cpu is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU, self.incoming_cpu)
            if family == socket.AF_INET6 and address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise bind_error(address, port, exc) from exc
        return sock

    async def _open(self, forwards: tuple[config_mod.Forward, ...], cfg: config_mod.Config) -> dict[int, Listener]:
        """Bind every forward or none: on any failure the ones already opened are closed again."""
        opened: dict[int, Listener] = {}
        try:
            for forward in forwards:
                route = self.routes.get(forward.port)
                if route is None:
                    route = Route(forward.port, forward.target, cfg, self.metrics.forward(forward.port), set())
                    route.rewriter = rewriter_factory(cfg, forward.port, self.nodes, self.warn)
                sock = self._bind(cfg.listen_address, forward.port)
                if self.server_ssl is None:
                    opened[forward.port] = self._plain_listener(route, sock)
                else:
                    opened[forward.port] = self._tls_listener(route, sock, self.server_ssl, cfg.connect_timeout_s)
                self.routes.setdefault(forward.port, route)
        except BaseException:
            for server in opened.values():
                server.close()
            raise
        return opened

    def _plain_listener(self, route: Route, sock: socket.socket) -> Listener:
        try:
            plain = PlainRoute(self.state, route, sock.family, self.spawn)
            c_accept = getattr(rawmode.CRELAY, "accept", None) if direct.INLINE else None
            if c_accept is not None:  # made now, not by the first client: its descriptors are there from the start
                rawmode.inline_relay(self.pool, self.loop)
            return PlainListener(sock, LISTEN_BACKLOG, plain.accepted, c_accept, plain.c_accepted)
        except OSError as exc:
            sock.close()
            raise bind_error(self.config.listen_address, route.port, exc) from exc

    def _tls_listener(self, route: Route, sock: socket.socket, context: ssl.SSLContext, timeout_s: float) -> Listener:
        # The allowlist is checked before the handshake, so a client outside it costs no TLS work (connection_made
        # checks it again, harmlessly); the limit is checked after it, against connections that are live.
        state = self.state

        def admit(client_ip: str) -> bool:
            return state.allows(route, client_ip)

        def failed(client_ip: str, error: str) -> None:
            state.reject(route, "tls_handshake", client_ip, error=error)

        def gone(client_ip: str) -> None:
            state.reject(route, "reset", client_ip)

        try:
            return TlsListener(
                sock,
                LISTEN_BACKLOG,
                connection_factory(state, route),
                context,
                timeout_s,
                admit,
                failed,
                self.spawn,
                gone,
            )
        except OSError as exc:
            sock.close()
            raise bind_error(self.config.listen_address, route.port, exc) from exc

    async def start(self) -> None:
        self.loop = self.state.loop = asyncio.get_running_loop()
        self.state.poller = Poller(self.loop)
        self.state.deadlines = Deadlines(self.loop)
        gc.set_threshold(GC_YOUNG_THRESHOLD)
        self.config = await self.tracker.prepare(self.config)
        if self.kernel is not None:
            await self.kernel.apply(self.config, self.nodes.resolved)
        try:
            self.listeners = await self._open(self._relayed(self.config), self.config)
        except BaseException:
            if self.kernel is not None:
                await self.kernel.stop()
            raise
        self.spawn(self._sweep())
        if self.kernel is not None:
            self.spawn(self._kernel_sync())
        self.tracker.start()
        for port, route in sorted(self.routes.items()):
            log.info(
                "forwarding", extra={"listen": f"{self.config.listen_address}:{port}", "target": str(route.target)}
            )

    # --- reload -----------------------------------------------------------------------------------------------
    async def reload(self, new: config_mod.Config | None = None) -> bool:
        """Apply a new config: open new forwards, close removed ones, retarget changed ones.

        Live connections keep their node. Returns False (and keeps the old config) when the new config is invalid
        or a new port cannot be bound.
        """
        notify.reloading()
        try:
            if new is None:
                if self.config_path is None:
                    raise config_mod.ConfigError("no config file to reload from")
                new = config_mod.load(self.config_path)
            new = self.tracker.adopt(new)
            await self._apply(new)
        except (config_mod.ConfigError, NatfwdError) as exc:
            log.error("reload refused, still serving the previous config", extra={"error": str(exc)})
            if self.count_reloads:
                self.metrics.reloads.labels("failure").inc()
            notify.ready()
            return False
        if self.count_reloads:
            self.metrics.reloads.labels("success").inc()
        log.info("config reloaded", extra={"forwards": len(new.forwards)})
        notify.ready()
        return True

    async def apply_discovered(self, new: config_mod.Config) -> None:
        """The tracker found other nodes: serve `new`, whose forwards follow them (raises as `reload` refuses)."""
        await self._apply(new)

    async def _apply(self, new: config_mod.Config) -> None:
        """Serve `new`; raises ConfigError or NatfwdError, with nothing changed, when it cannot be served."""
        old = self.config
        upstream_ssl = _read_certificates(new)
        _warn_restart_only(old, new)
        new = self._kernel_by_restart(new)
        wanted = {f.port: f for f in self._relayed(new)}
        if self.kernel is not None:
            await self.kernel.apply(new, self.nodes.resolved)  # first: when it fails, nothing has changed
        try:
            closed, opened = await self._rebind(old, new, wanted)
        except NatfwdError:
            if self.kernel is not None:
                try:
                    await self.kernel.apply(old, self.nodes.resolved)
                except NatfwdError as exc:
                    log.error("cannot put the kernel path back as it was", extra={"error": str(exc)})
            raise
        self._retire(closed, opened, wanted)
        self.nodes.update(new)
        self.tracker.config_changed()
        self._retarget(old, new, wanted)
        self._reload_tls(old, new)
        self.state.upstream_ssl = upstream_ssl
        if new.max_connections != old.max_connections:
            self.pool.reserve_for_connections(new.max_connections)
        self.config = new

    def _kernel_by_restart(self, new: config_mod.Config) -> config_mod.Config:
        """`new`, kept on the relay when it turns the kernel path on in a serve started with data_path userspace."""
        kept = config_mod.reloadable(self.started_with, new)
        if kept is not new:
            log.warning(
                "data_path changed from userspace; that takes effect at the next restart, since the connections "
                "relayed so far are unknown to conntrack",
                extra={"key": "data_path", "value": new.data_path},
            )
        return kept

    async def _rebind(
        self, old: config_mod.Config, new: config_mod.Config, wanted: dict[int, config_mod.Forward]
    ) -> tuple[dict[int, Listener], dict[int, Listener]]:
        """Close the listeners `new` drops (all of them for a new listen_address) and open the ones it adds;
        returns both. If one cannot be opened, the closed ones are opened again and NatfwdError is raised."""
        rebind_all = new.listen_address != old.listen_address
        to_close = [p for p in self.listeners if rebind_all or p not in wanted]
        to_open = tuple(f for f in self._relayed(new) if rebind_all or f.port not in self.listeners)
        # Close first so a changed listen_address can take the same ports.
        closed = {p: self.listeners.pop(p) for p in to_close}
        for server in closed.values():
            server.close()
        try:
            opened = await self._open(to_open, new)
        except NatfwdError:
            reopen = tuple(config_mod.Forward(p, self.routes[p].target) for p in closed)
            self.listeners.update(await self._open(reopen, old))
            raise
        self.listeners.update(opened)
        return closed, opened

    def _retire(
        self, closed: dict[int, Listener], opened: dict[int, Listener], wanted: dict[int, config_mod.Forward]
    ) -> None:
        """Routes of closed forwards serve their live connections out; count and log the forwards that came and went."""
        for port in closed:
            if port not in wanted:
                route = self.routes.pop(port)
                self._retired.append(route)
                if route.mux is not None:
                    route.mux.retire()
                self.metrics.forward_changes.labels("closed").inc()
                log.info("forward closed; live connections continue", extra={"forward": port})
        for port in opened:
            if port not in closed:
                self.metrics.forward_changes.labels("opened").inc()
                log.info("forward opened", extra={"forward": port, "target": str(wanted[port].target)})

    def _retarget(self, old: config_mod.Config, new: config_mod.Config, wanted: dict[int, config_mod.Forward]) -> None:
        """Point every route at its new target and config, for new connections; live ones keep their node."""
        shared = (new.multiplex, new.engine, new.multiplex_connections, new.connect_timeout_s)
        shared_before = (old.multiplex, old.engine, old.multiplex_connections, old.connect_timeout_s)
        for port, forward in wanted.items():
            route = self.routes[port]
            if route.target != forward.target:
                log.info(
                    "forward retargeted", extra={"forward": port, "from": str(route.target), "to": str(forward.target)}
                )
                self.metrics.forward_changes.labels("retargeted").inc()
            route.target = forward.target
            route.config = new
            if route.mux is not None and (route.mux.target != forward.target or shared != shared_before):
                route.mux.retire()  # its clients keep it; new clients get a pool made from the new config
                route.mux = None
            route.rewriter = rewriter_factory(new, port, self.nodes, self.warn)

    def _reload_tls(self, old: config_mod.Config, new: config_mod.Config) -> None:
        """New handshakes get the new certificate chain; turning TLS on or off, or a new client CA, waits for a restart."""
        if self.server_ssl is not None and new.tls is not None:
            # Listeners keep their SSLContext; loading the new chain into it serves it to every new handshake.
            self.server_ssl.load_cert_chain(new.tls.cert, new.tls.key)
        if (old.tls is None) != (new.tls is None) or (old.tls and new.tls and old.tls.client_ca != new.tls.client_ca):
            log.warning("turning tls on or off, or changing tls.client_ca, takes effect at the next restart")

    # --- drain ------------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop accepting, let live connections finish within drain_timeout_s, then abort the rest."""
        self.state.draining = True
        for server in self.listeners.values():
            server.close()
        self.listeners.clear()
        if self.kernel is not None:
            await self.kernel.stop_accepting()
        grace = self.config.drain_timeout_s
        deadline = self.loop.time() + grace
        kernel_live = {"kernel_active": sum(self.kernel.live.values())} if self.kernel and self.kernel.table else {}
        log.info("draining", extra={"active": self.active, "grace_s": grace, **kernel_live})
        if self.active:
            self.state.idle.clear()
            try:
                await asyncio.wait_for(self.state.idle.wait(), grace)
            except TimeoutError:
                pass
        if self.kernel is not None:
            await self.kernel.wait_idle(deadline)  # the kernel's flows, within the same grace period
        remaining = [c for r in self._all_routes() for c in r.connections]
        for conn in remaining:
            conn.ended = conn.ended or accesslog.DRAIN
            conn.abort()
            if conn.peer is not None:
                conn.peer.abort()
        if remaining:
            log.info("grace period over, aborted connections", extra={"aborted": len(remaining)})
            await asyncio.sleep(0)
        for task in list(self._tasks):
            task.cancel()
        for route in self._all_routes():
            for conn in list(route.connections):
                self.state.account(conn)
        if self.kernel is not None:
            await self.kernel.stop()
        self.pool.close(self.loop)
        self.state.poller.close()
        self.state.deadlines.close()

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, reloading on SIGHUP; then drain. Raises NatfwdError if a port cannot be bound."""
        loop = asyncio.get_running_loop()
        # Before start: a signal that lands once a port is listening, but before start returns, must not kill the
        # process with its default action. SIGTERM then drains as usual; SIGHUP reloads once start is done.
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        early_reload: list[None] = []
        loop.add_signal_handler(signal.SIGHUP, early_reload.append, None)
        await self.start()
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload()))
        if early_reload:
            self.spawn(self.reload())
        if on_ready is not None:
            on_ready()
        await self.stopping.wait()
        log.info("stopping")
        notify.stopping()
        await self.drain()


def _read_certificates(new: config_mod.Config) -> ssl.SSLContext | None:
    """Re-read every certificate file a reload names, so that a broken one refuses the whole reload before anything
    changed; returns the new upstream context.

    The client-facing chain is loaded into a context of its own here only to check it: a load that fails halfway
    could leave the live context with the new certificate and the old key. _reload_tls loads it into the live one.
    """
    tls.server_context(new)
    return tls.upstream_context(new)


def _warn_restart_only(old: config_mod.Config, new: config_mod.Config) -> None:
    for key in RESTART_ONLY:
        if getattr(old, key) != getattr(new, key):
            log.warning(f"{key} changed; that takes effect at the next restart", extra={"key": key})


def new_event_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def run_worker(
    cfg: config_mod.Config,
    config_path: str | None,
    *,
    reuse_port: bool,
    export_metrics: bool,
    incoming_cpu: int | None = None,
    count_reloads: bool = True,
    program_kernel: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run one worker process to completion (returns after SIGTERM and drain); the entry point the CLI gives the
    supervisor. Raises NatfwdError when a port cannot be bound or, with kernel forwards and `program_kernel`, when
    nft cannot program them."""
    from prometheus_client import CollectorRegistry

    from forwarder import metrics as metrics_mod

    registry = CollectorRegistry()
    metrics = metrics_mod.Metrics(registry)
    if export_metrics and cfg.metrics is not None:
        metrics_mod.start_exporter(cfg.metrics.host, cfg.metrics.port, registry)
        log.info("metrics", extra={"url": f"http://{cfg.metrics.host}:{cfg.metrics.port}/metrics"})

    async def main() -> None:
        worker = Worker(
            cfg,
            config_path,
            metrics,
            reuse_port=reuse_port,
            incoming_cpu=incoming_cpu,
            count_reloads=count_reloads,
            program_kernel=program_kernel,
        )
        await worker.run(on_ready)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())
