"""`python -m benchmarks.churn`: natfwd's and HAProxy's CPU and system calls per new connection, on loopback.

A new connection per request (`redis-benchmark -t get -k 0`) against a local redis-server, through natfwd (with and
without its C extensions) and HAProxy `nbthread 1`, in alternating rounds. What it reports is the proxy's own CPU
(user + system, from /proc) and, with `--strace`, its system calls per connection: counts that, unlike throughput,
a loaded machine does not move much. Needs redis-server, redis-benchmark and haproxy (strace for `--strace`); no
root, no namespaces.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cpu

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KINDS = ("natfwd", "natfwd-py", "haproxy")


@dataclass(frozen=True, slots=True)
class Result:
    """One measurement: a proxy's CPU over `connections` new connections, and the client's rate."""

    kind: str
    connections: int
    user_s: float
    sys_s: float
    rate: float

    @property
    def us_per_connection(self) -> float:
        return (self.user_s + self.sys_s) / self.connections * 1e6

    @property
    def user_us_per_connection(self) -> float:
        return self.user_s / self.connections * 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited {process.returncode}")
        try:
            socket.create_connection((HOST, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not accept within {timeout_s:g} s")


def natfwd_config(port: int, node_port: int) -> str:
    return (
        f"engine: redis\npublic_address: {HOST}\nlisten_address: {HOST}\nallowed_clients:\n  - 127.0.0.0/8\n"
        f"forwards:\n  - port: {port}\n    target: {HOST}:{node_port}\n"
        f"metrics:\n  listen: {HOST}:{free_port()}\nworkers: 1\n"
    )


def haproxy_config(port: int, node_port: int) -> str:
    return (
        "global\n    nbthread 1\n    maxconn 9000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n"
        "    timeout client 1h\n    timeout server 1h\n\n"
        f"listen redis\n    bind {HOST}:{port}\n    tcp-request connection reject unless {{ src 127.0.0.0/8 }}\n"
        f"    server node {HOST}:{node_port}\n"
    )


def start(kind: str, node_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "haproxy":
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, node_port))
        argv = ["haproxy", "-db", "-f", str(cfg)]
        env = None
    else:
        cfg = workdir / f"{kind}.yaml"
        cfg.write_text(natfwd_config(port, node_port))
        argv = [sys.executable, "-m", "forwarder", "serve", "--config", str(cfg)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NATFWD_NO_EXTENSIONS", None)
        if kind == "natfwd-py":
            env["NATFWD_NO_EXTENSIONS"] = "1"
    with open(workdir / f"{kind}.log", "ab") as log:  # the child keeps its own copy
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_port(port, process)
    return process, port


def churn(port: int, connections: int) -> float:
    """redis-benchmark GET, 50 clients, a new connection per request; returns requests per second."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "get", "-c", "50", "-k", "0"]
    result = subprocess.run([*argv, "-n", str(connections), "--csv"], capture_output=True, text=True, check=True)
    match = re.search(r'^"GET","([0-9.]+)"', result.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"redis-benchmark printed no GET rate: {result.stdout[-300:]} {result.stderr[-300:]}")
    return float(match.group(1))


def measure(kind: str, process: subprocess.Popen[bytes], port: int, connections: int) -> Result:
    before = cpu.tree([process.pid])
    rate = churn(port, connections)
    spent = cpu.tree([process.pid]) - before
    return Result(kind, connections, spent.user_s, spent.sys_s, rate)


def syscalls(process: subprocess.Popen[bytes], port: int, connections: int) -> dict[str, int]:
    """System calls of the proxy (every thread) while it serves `connections` new connections, by name."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out.name, "-p", str(process.pid)],
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)  # strace attaches to every thread
        churn(port, connections)
        time.sleep(0.5)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        return parse_strace_c(out.read())


def parse_strace_c(text: str) -> dict[str, int]:
    """`strace -c` table -> calls per system call name (errors included in the count)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def run(kinds: tuple[str, ...], connections: int, rounds: int, trace: bool, say: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="natfwd-churn-") as tmp:
        workdir = Path(tmp)
        node_port = free_port()
        redis = subprocess.Popen(
            ["redis-server", "--bind", HOST, "--port", str(node_port), "--save", "", "--appendonly", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            wait_port(node_port, redis)
            subprocess.run(["redis-benchmark", "-h", HOST, "-p", str(node_port), "-t", "set", "-n", "10", "-q"],
                           capture_output=True, check=True)  # fmt: skip
            for kind in kinds:
                started[kind] = start(kind, node_port, workdir)
                churn(started[kind][1], min(connections, 2000))  # warm-up
            results: dict[str, list[Result]] = {kind: [] for kind in kinds}
            for round_no in range(rounds):
                order = kinds if round_no % 2 == 0 else kinds[::-1]
                for kind in order:
                    process, port = started[kind]
                    result = measure(kind, process, port, connections)
                    results[kind].append(result)
                    say(f"round {round_no + 1} {kind:<10} {result.us_per_connection:6.1f} µs/conn "
                        f"(user {result.user_us_per_connection:5.1f})  {result.rate:8.0f} conn/s")  # fmt: skip
            say("")
            say("| proxy | µs CPU per connection (user), median | per round | conn/s, median |")
            say("|---|---:|---|---:|")
            for kind, runs in results.items():
                total = statistics.median(r.us_per_connection for r in runs)
                user = statistics.median(r.user_us_per_connection for r in runs)
                per = ", ".join(f"{r.us_per_connection:.1f}" for r in runs)
                rate = statistics.median(r.rate for r in runs)
                say(f"| {kind} | {total:.1f} ({user:.1f}) | {per} | {rate:.0f} |")
            if "haproxy" in results:
                base = results["haproxy"]
                for kind, runs in results.items():
                    if kind != "haproxy":
                        cost = [h.us_per_connection / r.us_per_connection for r, h in zip(runs, base, strict=True)]
                        say(f"HAProxy's CPU per connection over {kind}'s, paired median: {statistics.median(cost):.2f}")
            if trace:
                say("")
                for kind in kinds:
                    process, port = started[kind]
                    counts = syscalls(process, port, connections)
                    total_calls = sum(counts.values())
                    top = sorted(counts.items(), key=lambda kv: -kv[1])[:14]
                    shown = ", ".join(f"{name} {n / connections:.2f}" for name, n in top)
                    say(f"{kind}: {total_calls / connections:.1f} system calls per connection: {shown}")
        finally:
            for process, _ in started.values():
                process.terminate()
            for process, _ in started.values():
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            redis.terminate()
            redis.wait(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.churn", description=__doc__.split("\n\n")[1])
    parser.add_argument("--connections", type=int, default=20000, help="new connections per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--strace", action="store_true", help="also count each proxy's system calls per connection")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or args.connections < 100 or args.rounds < 1:
        print(f"python -m benchmarks.churn: error: bad --kinds {unknown} or --connections/--rounds", file=sys.stderr)
        return 2
    run(kinds, args.connections, args.rounds, args.strace, lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
