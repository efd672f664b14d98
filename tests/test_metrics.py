"""What an operator scrapes and reads: process metrics and build info (one worker or several), connection duration,
the access log, and refusals that cost a bounded number of log lines."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Node, free_port, round_trip, wait_for, write_config
from servekit import Serve, serving

from forwarder import __version__, accesslog, metrics

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


def test_access_log_writes_one_line_per_connection(tmp_path: Path, start_memcached: Callable[..., Node]) -> None:
    node = start_memcached()
    port = free_port()
    cfg = write_config(tmp_path / "natfwd.yaml", [(port, node.address)], extra="access_log: true\n")
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
        round_trip(port, b"version\r\n", b"\r\n")
        wait_for(lambda: len(access_lines(serve)) >= 2, "the access log lines", timeout_s=20.0)
        entries = [json.loads(line) for line in access_lines(serve)]
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
