"""The loads: what each measurement runs in the client namespace, and the parsers for the tools' output."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import IO, Literal

from forwarder.errors import NatfwdError

Engine = Literal["memcached", "redis"]
Tool = Literal["agent", "redis-benchmark", "memcslap"]
BIG_VALUE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Figure:
    """One number a load yields, as it appears in the table; `source` is its key in the tool's result."""

    id: str
    label: str
    unit: str
    source: str
    higher_is_better: bool = True


@dataclass(frozen=True, slots=True)
class Load:
    """One measurement recipe: a tool, its arguments, and the figures it yields."""

    id: str
    label: str
    engine: Engine
    tool: Tool
    figures: tuple[Figure, ...]
    args: dict[str, object] = field(default_factory=dict)


def _latency(prefix: str, client: str, conns: str) -> tuple[Figure, ...]:
    return (
        Figure(f"{prefix}-p50", f"{client} GET p50, {conns}", "µs", "p50_us", False),
        Figure(f"{prefix}-p99", f"{client} GET p99, {conns}", "µs", "p99_us", False),
    )


MANY = {"job": "many", "connections": 200, "threads": 4, "processes": 4}
LOADS: tuple[Load, ...] = (
    Load(
        "mc-1conn",
        "pymemcache GET, 1 connection",
        "memcached",
        "agent",
        _latency("mc-1conn", "pymemcache", "1 conn"),
        {"job": "latency"},
    ),
    Load(
        "redis-1conn",
        "redis-py GET, 1 connection",
        "redis",
        "agent",
        _latency("redis-1conn", "redis-py", "1 conn"),
        {"job": "latency"},
    ),
    Load(
        "mc-many",
        "pymemcache GET, 200 connections (4 processes x 4 threads)",
        "memcached",
        "agent",
        (
            Figure("mc-many-ops", "pymemcache GET, 200 conns", "ops/s", "ops"),
            Figure("mc-many-p99", "pymemcache GET p99, 200 conns", "µs", "p99_us", False),
        ),
        MANY,
    ),
    Load(
        "redis-many",
        "redis-py GET, 200 connections (4 processes x 4 threads)",
        "redis",
        "agent",
        (
            Figure("redis-many-ops", "redis-py GET, 200 conns", "ops/s", "ops"),
            Figure("redis-many-p99", "redis-py GET p99, 200 conns", "µs", "p99_us", False),
        ),
        MANY,
    ),
    Load(
        "mc-256k",
        "pymemcache SET+GET of 256 KiB, 1 connection",
        "memcached",
        "agent",
        (
            Figure("mc-256k-set", "pymemcache SET 256 KiB, 1 conn", "ops/s", "set_ops"),
            Figure("mc-256k-get", "pymemcache GET 256 KiB, 1 conn", "ops/s", "get_ops"),
        ),
        {"job": "bulk", "size": BIG_VALUE},
    ),
    Load(
        "rb-get-c1",
        "redis-benchmark GET, 1 connection",
        "redis",
        "redis-benchmark",
        (Figure("rb-get-c1", "redis-benchmark GET c1", "req/s", "GET"),),
        {"clients": 1},
    ),
    Load(
        "rb-get-c50",
        "redis-benchmark GET, 50 connections",
        "redis",
        "redis-benchmark",
        (Figure("rb-get-c50", "redis-benchmark GET c50", "req/s", "GET"),),
        {"clients": 50},
    ),
    Load(
        "rb-get-c50-p16",
        "redis-benchmark GET, 50 connections, pipeline 16",
        "redis",
        "redis-benchmark",
        (Figure("rb-get-c50-p16", "redis-benchmark GET c50 P16", "req/s", "GET"),),
        {"clients": 50, "pipeline": 16},
    ),
    Load(
        "rb-get-c50-new",
        "redis-benchmark GET, 50 clients, a new connection per request",
        "redis",
        "redis-benchmark",
        (Figure("rb-get-c50-new", "redis-benchmark GET c50, new conn each", "req/s", "GET"),),
        {"clients": 50, "keepalive": 0},
    ),
    Load(
        "rb-256k",
        "redis-benchmark SET and GET of 256 KiB values, 8 connections",
        "redis",
        "redis-benchmark",
        (
            Figure("rb-256k-set", "redis-benchmark SET 256 KiB c8", "req/s", "SET"),
            Figure("rb-256k-get", "redis-benchmark GET 256 KiB c8", "req/s", "GET"),
        ),
        {"clients": 8, "size": BIG_VALUE, "tests": "set,get", "dbnum": 1},
    ),
    Load(
        "ms-get-c50",
        "memcslap GET, 50 connections (50 threads)",
        "memcached",
        "memcslap",
        (Figure("ms-get-c50", "memcslap GET c50", "keys/s", "keys/s"),),
        {"concurrency": 50},
    ),
)
LOAD_IDS = tuple(load.id for load in LOADS)
FIGURES: dict[str, Figure] = {f.id: f for load in LOADS for f in load.figures}


# --- parsers (pure) -------------------------------------------------------------------------------------------
def parse_redis_benchmark_csv(text: str) -> dict[str, float]:
    """`redis-benchmark --csv` output to {TEST: requests per second}; raises ValueError when there is none."""
    rates: dict[str, float] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] != "test":
            try:
                rates[row[0]] = float(row[1])
            except ValueError:
                continue
    if not rates:
        raise ValueError(f"no results in redis-benchmark output: {text.strip()[-200:]!r}")
    return rates


_MEMCSLAP_GET = re.compile(r"Time to get\s+(\d+) keys by\s+(\d+) threads:\s+([\d.]+) seconds")


def parse_memcslap(text: str) -> tuple[int, float]:
    """memcslap's report to (keys fetched, seconds spent fetching); raises ValueError when the line is missing."""
    match = _MEMCSLAP_GET.search(text)
    if match is None:
        raise ValueError(f"no 'Time to get' line in memcslap output: {text.strip()[-200:]!r}")
    return int(match.group(1)), float(match.group(3))


# --- runners --------------------------------------------------------------------------------------------------
def _netns_run(namespace: str, argv: list[str], timeout_s: float) -> str:
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise NatfwdError(f"{argv[0]} did not finish within {timeout_s:.0f} s") from None
    if result.returncode != 0:
        raise NatfwdError(f"{argv[0]} exited {result.returncode}: {(result.stderr or result.stdout).strip()[-300:]}")
    return result.stdout + result.stderr


def redis_benchmark_argv(host: str, port: int, requests: int, args: dict[str, object]) -> list[str]:
    argv = [
        "redis-benchmark",
        "-h",
        host,
        "-p",
        str(port),
        "-n",
        str(requests),
        "-c",
        str(args["clients"]),
        "-t",
        str(args.get("tests", "get")),
        "--csv",
    ]
    if "pipeline" in args:
        argv += ["-P", str(args["pipeline"])]
    if "size" in args:
        argv += ["-d", str(args["size"])]
    if "keepalive" in args:  # -k 0: every request opens and closes its own connection (PHP-style clients)
        argv += ["-k", str(args["keepalive"])]
    if "dbnum" in args:  # big values live in their own db, so the small-value GET tests never fetch them
        argv += ["--dbnum", str(args["dbnum"])]
    return argv


def requests_per_run(load: Load, count: int) -> int | None:
    """How many requests one run of a fixed-count load makes (`count` as calibrated); None for the agent's loads,
    which run for a duration."""
    if load.tool == "redis-benchmark":
        return count * len(str(load.args.get("tests", "get")).split(","))
    if load.tool == "memcslap":
        concurrency = int(str(load.args["concurrency"]))
        return max(1, count // concurrency) * concurrency
    return None


class Runner:
    """Runs loads against a host:port from the client namespace; owns the agent process."""

    def __init__(self, client_namespace: str, agent: subprocess.Popen[str]) -> None:
        self.namespace = client_namespace
        self.agent = agent

    def run(self, load: Load, host: str, port: int, duration_s: float, count: int) -> dict[str, float]:
        """Measure `load` once; `count` sizes the fixed-count tools. Raises NatfwdError if the tool fails."""
        timeout_s = max(60.0, duration_s * 30)
        if load.tool == "agent":
            return self._agent(load, host, port, duration_s)
        if load.tool == "redis-benchmark":
            text = _netns_run(self.namespace, redis_benchmark_argv(host, port, count, load.args), timeout_s)
            return _pick(load, parse_redis_benchmark_csv(text), text)
        concurrency = int(str(load.args["concurrency"]))
        per_thread = max(1, count // concurrency)  # requests_per_run() says the same
        argv = ["memcslap", "-s", f"{host}:{port}", "-t", "get", "-c", str(concurrency), "-e", str(per_thread)]
        text = _netns_run(self.namespace, argv, timeout_s)
        keys, seconds = parse_memcslap(text)
        return _pick(load, {"keys/s": keys / seconds}, text)

    def _agent(self, load: Load, host: str, port: int, duration_s: float) -> dict[str, float]:
        job = {**load.args, "engine": load.engine, "host": host, "port": port, "duration_s": duration_s}
        stdin: IO[str] | None = self.agent.stdin
        stdout: IO[str] | None = self.agent.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(job) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise NatfwdError(f"the client agent exited ({self.agent.poll()}); see its stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise NatfwdError(f"{load.id}: {reply['error']}")
        return _pick(load, reply["result"], line)


def _pick(load: Load, raw: dict[str, float], output: str) -> dict[str, float]:
    """The load's figures out of a tool's raw result; raises NatfwdError naming a figure the tool did not give."""
    try:
        return {figure.id: float(raw[figure.source]) for figure in load.figures}
    except KeyError as exc:
        raise NatfwdError(f"{load.id}: the tool gave no {exc} figure: {output.strip()[-200:]}") from None


def agent_argv(client_namespace: str) -> list[str]:
    return ["ip", "netns", "exec", client_namespace, sys.executable, "-m", "benchmarks.agent"]
