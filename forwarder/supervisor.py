"""`workers: N`: a parent that forks N worker processes sharing the ports with SO_REUSEPORT and relays signals.

It never imports the worker: the CLI hands `run` the worker entry point (as uvicorn's Multiprocess takes `target`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Protocol

from forwarder import config as config_mod
from forwarder import notify, portstate
from forwarder.errors import NatfwdError

log = logging.getLogger("natfwd.supervisor")

RESPAWN_DELAY_S = 1.0


class WorkerEntry(Protocol):
    """Runs one worker process to completion (worker.run_worker); raises NatfwdError when it cannot start."""

    def __call__(
        self,
        cfg: config_mod.Config,
        config_path: str | None,
        *,
        reuse_port: bool,
        export_metrics: bool,
        incoming_cpu: int | None = None,
        count_reloads: bool = True,
        program_kernel: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> None: ...


def worker_cpus(cfg: config_mod.Config, allowed: Iterable[int]) -> list[int | None]:
    """Per worker, the CPU cpu_affinity pins it to (round-robin over the CPUs we may use), or None without it."""
    cpus = sorted(allowed)
    return [cpus[i % len(cpus)] if cfg.cpu_affinity and cpus else None for i in range(cfg.workers)]


def _fork_worker(
    target: WorkerEntry,
    cfg: config_mod.Config,
    config_path: str | None,
    index: int,
    cpu: int | None,
    barrier: notify.Barrier,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    # Child: restore default signal dispositions; the worker's event loop installs its own handlers.
    code = 0
    try:
        _die_with_parent()
        notify.detach()  # the supervisor alone tells systemd; a worker tells the supervisor through the barrier
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # before any thread starts (the relay thread inherits it)
            log.info("worker pinned", extra={"worker": index, "cpu": cpu})
        # One process programs nft (data_path kernel/auto): worker 0, respawned as worker 0 if it dies.
        target(
            cfg,
            config_path,
            reuse_port=True,
            export_metrics=False,
            incoming_cpu=cpu,
            count_reloads=False,
            program_kernel=index == 0,
            on_ready=barrier.worker_ready,
        )
    except NatfwdError as exc:
        log.error("worker failed", extra={"worker": index, "error": str(exc)})
        code = 1
    except BaseException:
        log.exception("worker crashed", extra={"worker": index})
        code = 1
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """A worker must not outlive a supervisor killed with SIGKILL (it would keep the ports): PR_SET_PDEATHSIG."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def run(cfg: config_mod.Config, config_path: str | None, target: WorkerEntry) -> None:
    """Fork `cfg.workers` workers, each running `target`, and supervise them until SIGTERM. Raises NatfwdError if
    the first start fails."""
    multiproc_dir = tempfile.mkdtemp(prefix="natfwd-metrics-")
    # Must be set before prometheus_client is first imported, in this process and so in every fork.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    if cfg.discovery is not None and cfg.discovery.state_file is None:
        # Each worker polls the cluster on its own; one file makes them agree on every node's port.
        os.environ[portstate.SHARED_FILE_ENV] = os.path.join(multiproc_dir, "ports.json")
    from prometheus_client import CollectorRegistry

    from forwarder import metrics as metrics_mod

    own = metrics_mod.Metrics(CollectorRegistry())  # the parent counts reloads once, not once per worker
    if cfg.metrics is not None:
        try:
            metrics_mod.start_exporter(cfg.metrics.host, cfg.metrics.port, metrics_mod.exporter_registry())
        except NatfwdError:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
            raise

    pending: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, on_signal)

    workers: dict[int, int] = {}  # pid -> index
    started_with = cfg.data_path  # a respawned worker gets what the workers' reloads kept (config.reloadable)
    cpus = worker_cpus(cfg, os.sched_getaffinity(0))  # as started: a reload changes neither workers nor pinning
    started = time.monotonic()
    barrier = notify.Barrier(cfg.workers)  # READY=1 only once every worker has bound every port
    for index in range(cfg.workers):
        workers[_fork_worker(target, cfg, config_path, index, cpus[index], barrier)] = index
    log.info("workers started", extra={"workers": cfg.workers, "pids": ",".join(map(str, workers))})

    stopping = False
    try:
        while workers:
            barrier.poll()
            if not pending:
                time.sleep(0.1)  # signal.pause() would race with a signal landing just before it
            while pending:
                signum = pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    notify.stopping()
                    log.info("stopping workers")
                    for pid in workers:
                        _kill(pid, signal.SIGTERM)
                elif signum == signal.SIGHUP and not stopping:
                    notify.reloading()
                    cfg = _reload(cfg, config_path, workers, own, started_with)
                    if barrier.done:  # else READY=1 still waits for the workers still binding
                        notify.ready()
            for pid, index, status in _reap(workers):
                metrics_mod.mark_worker_dead(pid)
                if stopping:
                    continue
                if time.monotonic() - started < RESPAWN_DELAY_S and status != 0:
                    # A worker that dies at once (port taken, bad permissions) would die again: give up.
                    for other in workers:
                        _kill(other, signal.SIGTERM)
                    _wait_all(workers)
                    raise NatfwdError(f"worker {index} exited with status {status} at start; see the log above")
                log.error("worker died; starting a new one", extra={"worker": index, "pid": pid, "status": status})
                time.sleep(RESPAWN_DELAY_S)
                workers[_fork_worker(target, cfg, config_path, index, cpus[index], barrier)] = index
    finally:
        barrier.close()
        for pid in workers:
            _kill(pid, signal.SIGTERM)
        if not workers:  # a worker still draining may yet write ports.json there
            shutil.rmtree(multiproc_dir, ignore_errors=True)


def _reload(
    cfg: config_mod.Config,
    config_path: str | None,
    workers: dict[int, int],
    own: object,
    started_with: config_mod.DataPath,
) -> config_mod.Config:
    from forwarder.metrics import Metrics

    assert isinstance(own, Metrics)
    if config_path is None:
        return cfg
    try:
        new = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        log.error("reload refused, still serving the previous config", extra={"error": str(exc)})
        own.reloads.labels("failure").inc()
        return cfg
    own.reloads.labels("success").inc()
    for pid in workers:
        _kill(pid, signal.SIGHUP)
    return config_mod.reloadable(started_with, new)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(workers: dict[int, int]) -> list[tuple[int, int, int]]:
    dead: list[tuple[int, int, int]] = []
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in workers:
            dead.append((pid, workers.pop(pid), os.waitstatus_to_exitcode(status)))
    return dead


def _wait_all(workers: dict[int, int]) -> None:
    for pid in list(workers):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        workers.pop(pid, None)
