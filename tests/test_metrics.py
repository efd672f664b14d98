"""What an operator scrapes and reads: process metrics and build info (one worker or several), connection duration,
the access log, and refusals that cost a bounded number of log lines."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, free_port, round_trip, wait_for, write_config
from servekit import Serve, serving

from forwarder import __version__, accesslog, fastseries, metrics

PROCESS_METRICS = ("process_open_fds", "process_max_fds", "process_resident_memory_bytes", "process_cpu_seconds_total")


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `name` in Prometheus text, with its labels."""
    found = []
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        found.append((labels, float(match.group(3))))
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_scrape_shows_process_metrics_build_info_and_connection_duration(
    tmp_path: Path, start_memcached: Callable[..., Node], workers: int
) -> None:
    node = start_memcached()
    port, metrics_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        [(port, node.address)],
        extra=f"workers: {workers}\nmetrics: {{listen: 127.0.0.1:{metrics_port}}}\n",
    )
    with serving(cfg, [port], metrics_port) as serve:
        for _ in range(3):
            round_trip(port, b"version\r\n", b"\r\n")
        # Every connection is counted when it closes (serving's own readiness probes too, so at least 3).
        wait_for(
            lambda: serve.metric("natfwd_connection_duration_seconds_count", forward=str(port)) >= 3,
            "the closed connections' durations",
            timeout_s=20.0,
        )
        text = serve.metrics()

        build = samples(text, "natfwd_build_info")
        assert build == [({"version": __version__, "extensions": metrics.loaded_extensions()}, 1.0)]
        assert samples(text, "python_info")
        buckets = samples(text, "natfwd_connection_duration_seconds_bucket")
        assert {labels["le"] for labels, _ in buckets} >= {"0.01", "3600.0", "+Inf"}
        assert all(labels["forward"] == str(port) for labels, _ in buckets)

        for name in PROCESS_METRICS:
            found = samples(text, name)
            assert found, f"{name} is not exported with workers: {workers}"
            # A worker just forked may not have used a CPU tick yet.
            assert all(value > 0 or name == "process_cpu_seconds_total" for _, value in found), (name, found)
        open_fds = samples(text, "process_open_fds")
        if workers == 1:
            # One process reports on itself, without labels.
            assert [labels for labels, _ in open_fds] == [{}]
        else:
            # The supervisor reports itself and each worker, per process (each has its own open-file limit).
            roles = sorted(labels["process"] for labels, _ in open_fds)
            assert roles == ["supervisor"] + ["worker"] * workers
            pids = {int(labels["pid"]) for labels, _ in open_fds}
            children = Path(f"/proc/{serve.proc.pid}/task/{serve.proc.pid}/children").read_text().split()
            assert pids == {serve.proc.pid, *map(int, children)}
            # A worker holds its listener, its node connections and the event loop: more than the supervisor's few.
            worker_fds = [value for labels, value in open_fds if labels["process"] == "worker"]
            assert all(value >= 3 for value in worker_fds)
            limits = samples(text, "process_max_fds")
            assert {labels["pid"] for labels, _ in limits} == {str(pid) for pid in pids}


def access_lines(serve: Serve) -> list[str]:
    return [line for line in serve.log().splitlines() if "connection closed" in line]


@pytest.mark.parametrize("multiplex", [False, True], ids=["plain", "multiplex"])
def test_access_log_writes_one_line_per_connection(
    tmp_path: Path, start_memcached: Callable[..., Node], multiplex: bool
) -> None:
    """With `multiplex: true` the SET shares a node connection and `quit` pins: the lines read the same."""
    node = start_memcached()
    port = free_port()
    extra = "access_log: true\n" + ("multiplex: true\n" if multiplex else "")
    cfg = write_config(tmp_path / "natfwd.yaml", [(port, node.address)], extra=extra)
    with serving(cfg, [port]) as serve:
        wait_for(lambda: len(access_lines(serve)) >= 1, "the readiness probe's access log line", timeout_s=20.0)
        probes = len(access_lines(serve))
        set_request = b"set k 0 0 5\r\nhello\r\n"
        round_trip(port, set_request, b"STORED\r\n")
        # `quit`: memcached closes first.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"quit\r\n")
            assert sock.recv(10) == b""
        wait_for(lambda: len(access_lines(serve)) >= probes + 2, "one access log line per connection", timeout_s=20.0)
        time.sleep(0.3)  # a stray extra line would show now
        lines = access_lines(serve)
    assert len(lines) == probes + 2, lines
    # In the order they closed, which need not be the order they were opened.
    by_end = {fields["end"]: fields for fields in (dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines[probes:])}
    stored = by_end["client_closed"]
    assert stored == {
        "client": "127.0.0.1",
        "forward": str(port),
        "node": node.address,
        "bytes_to_node": str(len(set_request)),
        "bytes_to_client": str(len(b"STORED\r\n")),
        "duration_s": stored["duration_s"],
        "end": "client_closed",
    }
    assert float(stored["duration_s"]) >= 0
    quit_ = by_end["node_closed"]
    assert (quit_["bytes_to_node"], quit_["bytes_to_client"]) == (str(len(b"quit\r\n")), "0")


def test_access_log_in_json_and_off_by_default(tmp_path: Path, start_memcached: Callable[..., Node]) -> None:
    node = start_memcached()
    port = free_port()
    cfg = write_config(tmp_path / "natfwd.yaml", [(port, node.address)], extra="access_log: true\n")
    with serving(cfg, [port], extra_args=("--log-format", "json")) as serve:
        # The readiness probe's line first: on a loaded machine it can come after the line of a connection made later.
        wait_for(lambda: len(access_lines(serve)) >= 1, "the readiness probe's access log line", timeout_s=20.0)
        probes = len(access_lines(serve))
        round_trip(port, b"version\r\n", b"\r\n")
        wait_for(lambda: len(access_lines(serve)) >= probes + 1, "the access log line", timeout_s=20.0)
        entries = [json.loads(line) for line in access_lines(serve)]
    assert len(entries) == probes + 1, entries
    entry = entries[-1]
    assert entry["msg"] == "connection closed" and entry["level"] == "info"
    assert (entry["client"], entry["forward"], entry["node"]) == ("127.0.0.1", port, node.address)
    assert entry["bytes_to_node"] == len(b"version\r\n") and entry["bytes_to_client"] > len(b"VERSION \r\n")
    assert isinstance(entry["duration_s"], float) and entry["end"] == "client_closed"

    quiet = write_config(tmp_path / "quiet.yaml", [(port, node.address)])
    with serving(quiet, [port]) as serve:
        round_trip(port, b"version\r\n", b"\r\n")
        serve.wait_log("forwarding")
        time.sleep(0.3)
        assert "connection closed" not in serve.log()


def test_a_flood_of_refusals_logs_a_bounded_number_of_lines(
    tmp_path: Path, start_memcached: Callable[..., Node]
) -> None:
    node = start_memcached()
    port, metrics_port = free_port(), free_port()
    # 127.0.0.1 is not allowed: every connection is refused at accept.
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        [(port, node.address)],
        allowed="198.51.100.27/32",
        extra=f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n",
    )
    flood = 500
    with serving(cfg, [port], metrics_port) as serve:
        for _ in range(flood):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.recv(1)  # wait for the abort, so the refusal is counted before the next connection
        total = serve.metric("natfwd_connections_rejected_total", forward=str(port), reason="not_allowed")
        assert total >= flood
        # The count of the lines left out comes when the window ends, even with no refusal after it.
        serve.wait_log("connection refusals not logged", timeout_s=accesslog.REFUSAL_WINDOW_S * 3)
        wait_for(lambda: _logged(serve) == total, "every refusal logged or counted", accesslog.REFUSAL_WINDOW_S * 3)
        refused_lines = serve.log().count("connection refused")
    assert refused_lines <= flood // 5, f"{refused_lines} lines for {flood} refusals: not rate-limited"
    assert refused_lines >= accesslog.REFUSALS_PER_WINDOW  # the first ones of a window are logged in full


def _logged(serve: Serve) -> int:
    log = serve.log()
    suppressed = sum(int(n) for n in re.findall(r"connection refusals not logged \(rate limit\) suppressed=(\d+)", log))
    return log.count("connection refused") + suppressed


# --- the pieces, without a server ---------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_refusal_log_keeps_to_its_limit_per_window_and_counts_the_rest() -> None:
    logger = logging.getLogger("natfwd.test-refusals")
    logger.setLevel(logging.INFO)
    records = _Records()
    logger.addHandler(records)
    now = [0.0]
    timers: list[tuple[float, Callable[[], None]]] = []
    refusals = accesslog.RefusalLog(
        logger, limit=3, window_s=10.0, clock=lambda: now[0], schedule=lambda delay, f: timers.append((delay, f))
    )
    try:
        for i in range(100):
            refusals.refused(11211, f"192.0.2.{i}", "not_allowed")
        assert [r.getMessage() for r in records.records] == ["connection refused"] * 3
        assert [r.__dict__["client"] for r in records.records] == ["192.0.2.0", "192.0.2.1", "192.0.2.2"]
        assert len(timers) == 1 and timers[0][0] == 10.0  # one flush, at the end of the window
        timers[0][1]()
        summary = records.records[-1]
        assert summary.getMessage() == "connection refusals not logged (rate limit)"
        assert summary.__dict__["suppressed"] == 97
        timers[0][1]()  # a second flush with nothing left out says nothing
        assert len(records.records) == 4

        now[0] = 12.0  # a new window: the next refusals are logged again
        for _ in range(5):
            refusals.refused(11212, "192.0.2.200", "limit", error="x")
        assert [r.getMessage() for r in records.records[4:]] == ["connection refused"] * 3
        now[0] = 30.0
        refusals.refused(11212, "192.0.2.201", "limit")  # the window's count comes before its first line
        assert [r.getMessage() for r in records.records[7:]] == [
            "connection refusals not logged (rate limit)",
            "connection refused",
        ]
        assert records.records[7].__dict__["suppressed"] == 2
    finally:
        logger.removeHandler(records)


@pytest.mark.parametrize(
    ("client_eof", "node_connected", "node_eof", "node_closed", "error", "end"),
    [
        (False, True, False, False, False, accesslog.CLIENT_CLOSED),
        (True, True, True, False, False, accesslog.CLIENT_CLOSED),  # the client's EOF came first
        (False, True, True, False, False, accesslog.NODE_CLOSED),
        (False, True, False, True, False, accesslog.NODE_CLOSED),
        (False, True, False, False, True, accesslog.CLIENT_RESET),
        (False, False, False, False, False, accesslog.CLIENT_CLOSED),  # left before the node answered
    ],
)  # fmt: skip
def test_how_a_connection_ended(
    client_eof: bool, node_connected: bool, node_eof: bool, node_closed: bool, error: bool, end: str
) -> None:
    got = accesslog.how_ended(
        client_eof=client_eof, node_connected=node_connected, node_eof=node_eof, node_closed=node_closed, error=error
    )
    assert got == end


def test_build_info_says_which_extensions_loaded() -> None:
    probe = [sys.executable, "-c", "from forwarder import metrics; print(metrics.loaded_extensions())"]
    off = subprocess.run(
        probe, capture_output=True, text=True, timeout=30, env={**os.environ, "NATFWD_NO_EXTENSIONS": "1"}
    )
    assert off.stdout.strip() == "none", off.stderr
    on = subprocess.run(probe, capture_output=True, text=True, timeout=30, env=_without("NATFWD_NO_EXTENSIONS"))
    built = [short for name, short in (("_crelay", "crelay"), ("protocols._cframing", "cframing")) if _built(name)]
    assert on.stdout.strip() == (",".join(built) or "none"), on.stderr


def _without(name: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != name}


def _built(name: str) -> bool:
    return importlib.util.find_spec(f"forwarder.{name}") is not None


def _fake_process(proc: Path, pid: int, ppid: int, rss_pages: int, open_fds: int) -> None:
    (proc / str(pid) / "fd").mkdir(parents=True)
    for fd in range(open_fds):
        (proc / str(pid) / "fd" / str(fd)).touch()
    # Fields after the command: state ppid ... utime(14) stime(15) ... starttime(22) vsize(23) rss(24).
    fields = ["S", str(ppid)] + ["0"] * 9 + ["250", "50"] + ["0"] * 6 + ["100", "4096", str(rss_pages)]
    (proc / str(pid) / "stat").write_text(f"{pid} (natfwd worker) {' '.join(fields)}\n")
    (proc / str(pid) / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max open files            1024                 4096                 files\n"
    )


def test_worker_process_collector_labels_each_process(tmp_path: Path) -> None:
    # A /proc of our own: the supervisor (this process), two workers, and an unrelated process; without the
    # task/PID/children file, so the collector finds the workers by their parent pid.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu 0 0 0 0\nbtime 1700000000\n")
    me = os.getpid()
    _fake_process(proc, me, 1, rss_pages=10, open_fds=5)
    _fake_process(proc, 4001, me, rss_pages=20, open_fds=7)
    _fake_process(proc, 4002, me, rss_pages=30, open_fds=9)
    _fake_process(proc, 4003, 1, rss_pages=40, open_fds=11)
    families = {family.name: family for family in metrics.WorkerProcessCollector(proc=str(proc)).collect()}
    open_fds = {(s.labels["pid"], s.labels["process"]): s.value for s in families["process_open_fds"].samples}
    assert open_fds == {(str(me), "supervisor"): 5, ("4001", "worker"): 7, ("4002", "worker"): 9}
    assert {s.value for s in families["process_max_fds"].samples} == {1024.0}
    cpu = {s.labels["pid"]: s.value for s in families["process_cpu_seconds"].samples}
    ticks = os.sysconf("SC_CLK_TCK")
    assert cpu == {pid: 300 / ticks for pid in (str(me), "4001", "4002")}
    rss = {s.labels["pid"]: s.value for s in families["process_resident_memory_bytes"].samples}
    assert rss["4002"] == 30 * os.sysconf("SC_PAGE_SIZE")


# --- the connection path's series (fastseries) against prometheus_client as the oracle ------------------------------


def _operations(accepted: Any, active: Any, sent: Any, duration: Any, connect: Any) -> None:
    """The same updates, applied to natfwd's series or to prometheus_client's children."""
    for port in ("11211", "6379"):
        accepted.labels(port).inc()
        accepted.labels(port).inc(2)
        active.labels(port).inc()
        active.labels(port).inc()
        active.labels(port).dec()
        sent.labels(port, metrics.DIRECTION_TO_NODE).inc(1234)
        sent.labels(port, metrics.DIRECTION_TO_CLIENT).inc(5)
        # On a bound, between bounds, past the last, and zero.
        for seconds in (0.01, 0.05, 7.0, 100000.0, 0.0, 3600.0):
            duration.labels(port).observe(seconds)
    for seconds in (0.0005, 0.0001, 0.003, 20.0):
        connect.observe(seconds)
    active.labels("6379").set(7)


def _sample_lines(text: str) -> list[str]:
    """Prometheus text with the `_created` samples' values (times) left out."""
    return sorted(re.sub(r"^(\S+_created\S*) .*$", r"\1", line) for line in text.splitlines())


def test_fast_series_export_what_prometheus_client_exports_for_the_same_updates() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    families = metrics.FastFamilies(None)
    ours = CollectorRegistry()
    ours.register(fastseries.LocalCollector(families.all()))
    _operations(
        families.accepted, families.active, families.bytes, families.duration, families.upstream_connect.labels()
    )

    oracle = CollectorRegistry()
    docs = {family.name: family.documentation for family in families.all()}
    accepted = Counter(families.accepted.name, docs[families.accepted.name], ["forward"], registry=oracle)
    active = Gauge(families.active.name, docs[families.active.name], ["forward"], registry=oracle)
    sent = Counter(families.bytes.name, docs[families.bytes.name], ["forward", "direction"], registry=oracle)
    duration = Histogram(
        families.duration.name,
        docs[families.duration.name],
        ["forward"],
        buckets=metrics.DURATION_BUCKETS,
        registry=oracle,
    )
    connect = Histogram(
        families.upstream_connect.name,
        docs[families.upstream_connect.name],
        buckets=metrics.CONNECT_BUCKETS,
        registry=oracle,
    )
    _operations(accepted, active, sent, duration, connect)

    got, want = generate_latest(ours).decode(), generate_latest(oracle).decode()
    assert _sample_lines(got) == _sample_lines(want)
    assert 'natfwd_connection_duration_seconds_bucket{forward="6379",le="0.01"} 2.0' in got  # 0.0 and 0.01 itself
    assert 'natfwd_bytes_total{direction="client_to_node",forward="11211"} 1234.0' in got


# Run in a process of its own: prometheus_client picks its multiprocess storage when it is first imported.
_MULTIPROCESS_ORACLE = """
import json, os, sys
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from forwarder import fastseries, metrics
sys.path.insert(0, sys.argv[1])
from test_metrics import _operations

directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
pids = []
for child in range(2):
    pid = os.fork()
    if pid == 0:
        fast = metrics.FastFamilies(directory)
        docs = {f.name: f.documentation for f in fast.all()}
        _operations(fast.accepted, fast.active, fast.bytes, fast.duration, fast.upstream_connect.labels())
        r = CollectorRegistry()
        _operations(
            Counter(fast.accepted.name, docs[fast.accepted.name], ["forward"], registry=r),
            Gauge(fast.active.name, docs[fast.active.name], ["forward"], registry=r, multiprocess_mode="livesum"),
            Counter(fast.bytes.name, docs[fast.bytes.name], ["forward", "direction"], registry=r),
            Histogram(fast.duration.name, docs[fast.duration.name], ["forward"], buckets=metrics.DURATION_BUCKETS,
                      registry=r),
            Histogram(fast.upstream_connect.name, docs[fast.upstream_connect.name], buckets=metrics.CONNECT_BUCKETS,
                      registry=r),
        )
        os._exit(0)
    pids.append(pid)
    os.waitpid(pid, 0)

def texts():
    ours, oracle = CollectorRegistry(), CollectorRegistry()
    ours.register(fastseries.FilesCollector(directory, metrics.FastFamilies(None).all()))
    multiprocess.MultiProcessCollector(oracle, path=directory)
    return generate_latest(ours).decode(), generate_latest(oracle).decode()

both = texts()
metrics.mark_worker_dead(pids[0])  # what the supervisor does when a worker dies: its gauges go, its counts stay
print(json.dumps([both, texts()]))
"""


def test_with_workers_the_supervisor_sums_every_worker_as_prometheus_client_multiprocess_does(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_ORACLE, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    (live, live_oracle), (one_dead, one_dead_oracle) = json.loads(run.stdout)
    assert _sample_lines(live) == _sample_lines(live_oracle)
    assert _sample_lines(one_dead) == _sample_lines(one_dead_oracle)
    # Both workers' counts, summed; after one died its counts stay and its gauges are gone.
    assert 'natfwd_connections_accepted_total{forward="11211"} 6.0' in one_dead
    assert 'natfwd_connections_active{forward="11211"} 2.0' in live
    assert 'natfwd_connections_active{forward="11211"} 1.0' in one_dead
    assert "natfwd_upstream_connect_seconds_count 8.0" in one_dead


# A worker's prometheus_client file exists empty until it is sized: a scrape then, or forever after if the worker
# was killed in that moment, must still work.
_EMPTY_WORKER_FILE = """
import os
from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from forwarder import metrics

directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
Counter("natfwd_probe", "a worker's count", registry=None).inc(3)
open(os.path.join(directory, "counter_999999.db"), "wb").close()
try:
    multiprocess.MultiProcessCollector(CollectorRegistry(), path=directory).collect()
except Exception as exc:
    print("prometheus_client alone:", type(exc).__name__)
print(generate_latest(metrics.exporter_registry()).decode())
"""


def test_a_workers_empty_metrics_file_does_not_fail_the_scrape(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", _EMPTY_WORKER_FILE], capture_output=True, text=True, timeout=60, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("prometheus_client alone: ")  # the failure the exporter steers around
    assert "natfwd_probe_total 3.0" in run.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_connections_bytes_and_rejections_are_counted_per_forward(
    tmp_path: Path, start_memcached: Callable[..., Node], workers: int
) -> None:
    node = start_memcached()
    port, other_port, metrics_port = free_port(), free_port(), free_port()
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        [(port, node.address), (other_port, node.address)],
        extra=f"workers: {workers}\nmetrics: {{listen: 127.0.0.1:{metrics_port}}}\nmax_connections: 2\n",
    )
    request, reply = b"set k 0 0 5\r\nhello\r\n", b"STORED\r\n"
    with serving(cfg, [port, other_port], metrics_port) as serve:
        listening = 2 * workers  # one line per forward and worker
        serve.wait_log("forwarding listen=", count=listening)
        forward = {"forward": str(port)}
        # serving's readiness probe: a connection accepted, and counted once it has closed.
        wait_for(lambda: serve.metric("natfwd_connection_duration_seconds_count", **forward) >= 1, "the probe", 20.0)
        probes = serve.metric("natfwd_connections_accepted_total", **forward)
        for _ in range(10):
            assert round_trip(port, request, reply) == reply
            # A connection the client closed stays active until natfwd has closed the node's side too: on a loaded
            # machine the next ones could otherwise meet max_connections.
            wait_for(lambda: serve.metric("natfwd_connections_active", **forward) == 0, "the connection to close")
        # Counted when the connection is admitted, before the reply: no wait.
        assert serve.metric("natfwd_connections_accepted_total", **forward) == probes + 10
        wait_for(
            lambda: serve.metric("natfwd_bytes_total", direction="node_to_client", **forward) == 10 * len(reply),
            "the bytes of closed connections",
            timeout_s=20.0,
        )
        assert serve.metric("natfwd_bytes_total", direction="client_to_node", **forward) == 10 * len(request)
        assert serve.metric("natfwd_connection_duration_seconds_count", **forward) == probes + 10
        assert serve.metric("natfwd_upstream_connect_seconds_count") >= 10
        assert serve.metric("natfwd_connections_active", **forward) == 0
        other = {"forward": str(other_port)}
        assert serve.metric("natfwd_bytes_total", direction="client_to_node", **other) == 0

        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(request)
                assert sock.recv(100) == reply
            assert serve.metric("natfwd_connections_active", **forward) == 2
            # max_connections is per worker: with two, the third may land on the one with room.
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                extra.sendall(request)
                served = extra.recv(100) == reply
            except ConnectionResetError:  # refused at the limit: aborted
                served = False
            extra.close()
            if workers == 1:
                assert not served
                wait_for(
                    lambda: serve.metric("natfwd_connections_rejected_total", reason="limit", **forward) == 1,
                    "the refusal at the limit",
                )
            accepted = serve.metric("natfwd_connections_accepted_total", **forward)
            if workers > 1:
                # A worker killed with connections live: the supervisor drops its gauge and keeps its counts.
                time.sleep(1.0)  # a worker that dies in its first second stops the supervisor (a start failure)
                for pid in Path(f"/proc/{serve.proc.pid}/task/{serve.proc.pid}/children").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                wait_for(
                    lambda: serve.metric("natfwd_connections_active", **forward) == 0,
                    "the dead workers' connections no longer active",
                    timeout_s=20.0,
                )
                assert serve.metric("natfwd_connections_accepted_total", **forward) == accepted
                serve.wait_log("forwarding listen=", count=2 * listening, timeout_s=20.0)
                assert round_trip(port, request, reply) == reply
                assert serve.metric("natfwd_connections_accepted_total", **forward) == accepted + 1
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: serve.metric("natfwd_connections_active", **forward) == 0, "no connection left", 20.0)
