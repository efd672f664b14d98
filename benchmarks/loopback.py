"""`python -m benchmarks.loopback`: natfwd's and HAProxy's CPU and system calls per request, on loopback.

redis-benchmark against a local redis-server, through natfwd (with and without its C extensions) and HAProxy
`nbthread 1`, in alternating rounds; by default a new connection per request (`-t get -c 50 -k 0`). What it reports
is each proxy's own CPU per request (user + system, from /proc) and, with `--strace`, its system calls per request:
figures that, unlike throughput, a loaded machine does not move much. Needs redis-server, redis-benchmark and
haproxy (strace for `--strace`); no root, no namespaces.
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
KINDS = ("natfwd", "natfwd-py", "haproxy", "natfwd-mux", "natfwd-mux-py")  # -py: NATFWD_NO_EXTENSIONS=1
BASE = "-base"  # a natfwd kind with this suffix runs the checkout given with --against
# redis-benchmark arguments per load: the lab's loads (benchmarks/loads.py), on loopback.
LOADS = {
    "new": ["-t", "get", "-c", "50", "-k", "0"],
    "c50": ["-t", "get", "-c", "50"],
    "p16": ["-t", "get", "-c", "50", "-P", "16"],
    "256k": ["-t", "set,get", "-c", "8", "-d", "262144", "--dbnum", "1"],
}


@dataclass(frozen=True, slots=True)
class Result:
    """One measurement: a proxy's CPU over `requests` requests, and the client's rate (requests per second)."""

    kind: str
    requests: int
    user_s: float
    sys_s: float
    rate: float

    @property
    def us_per_request(self) -> float:
        return (self.user_s + self.sys_s) / self.requests * 1e6

    @property
    def user_us_per_request(self) -> float:
        return self.user_s / self.requests * 1e6


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


def natfwd_config(port: int, node_port: int, multiplex: bool = False) -> str:
    return (
        f"engine: redis\npublic_address: {HOST}\nlisten_address: {HOST}\nallowed_clients:\n  - 127.0.0.0/8\n"
        f"forwards:\n  - port: {port}\n    target: {HOST}:{node_port}\n"
        f"metrics:\n  listen: {HOST}:{free_port()}\nworkers: 1\n" + ("multiplex: true\n" if multiplex else "")
    )


def haproxy_config(port: int, node_port: int) -> str:
    return (
        "global\n    nbthread 1\n    maxconn 9000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n"
        "    timeout client 1h\n    timeout server 1h\n\n"
        f"listen redis\n    bind {HOST}:{port}\n    tcp-request connection reject unless {{ src 127.0.0.0/8 }}\n"
        f"    server node {HOST}:{node_port}\n"
    )


def start(
    kind: str, node_port: int, workdir: Path, root: Path = REPO, against: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind.endswith(BASE):
        assert against is not None
        root = against
        kind = kind.removesuffix(BASE)
    if kind == "haproxy":
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, node_port))
        argv = ["haproxy", "-db", "-f", str(cfg)]
        env = None
    else:
        cfg = workdir / f"{kind}-{port}.yaml"
        cfg.write_text(natfwd_config(port, node_port, multiplex=kind.startswith("natfwd-mux")))
        argv = [sys.executable, "-m", "forwarder", "serve", "--config", str(cfg)]
        env = dict(os.environ, PYTHONPATH=str(root))
        env.pop("NATFWD_NO_EXTENSIONS", None)
        if kind.endswith("-py"):
            env["NATFWD_NO_EXTENSIONS"] = "1"
    with open(workdir / f"{kind}-{port}.log", "ab") as log:  # the child keeps its own copy
        # cwd=root: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root
        )
    wait_port(port, process)
    return process, port


def bench(port: int, load: str, count: int) -> tuple[int, float]:
    """Run `load` with `count` requests per test; returns the requests made and their overall rate."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), *LOADS[load]]
    result = subprocess.run([*argv, "-n", str(count), "--csv"], capture_output=True, text=True, check=True)
    rates = [float(m) for m in re.findall(r'^"(?:GET|SET)","([0-9.]+)"', result.stdout, re.MULTILINE)]
    if not rates:
        raise RuntimeError(f"redis-benchmark printed no rate: {result.stdout[-300:]} {result.stderr[-300:]}")
    return count * len(rates), len(rates) / sum(1 / r for r in rates)


def measure(kind: str, process: subprocess.Popen[bytes], port: int, load: str, count: int) -> Result:
    before = cpu.tree([process.pid])
    requests, rate = bench(port, load, count)
    spent = cpu.tree([process.pid]) - before
    return Result(kind, requests, spent.user_s, spent.sys_s, rate)


def syscalls(process: subprocess.Popen[bytes], port: int, load: str, count: int) -> tuple[int, dict[str, int]]:
    """System calls of the proxy (every thread) while it serves `load`, by name, and the requests made."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out.name, "-p", str(process.pid)],
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)  # strace attaches to every thread
        requests, _ = bench(port, load, count)
        time.sleep(0.5)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        return requests, parse_strace_c(out.read())


def parse_strace_c(text: str) -> dict[str, int]:
    """`strace -c` table -> calls per system call name (errors included in the count)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def run(
    kinds: tuple[str, ...],
    load: str,
    count: int,
    rounds: int,
    trace: bool,
    say: Callable[[str], None],
    root: Path = REPO,
    against: Path | None = None,
) -> None:
    with tempfile.TemporaryDirectory(prefix="natfwd-loopback-") as tmp:
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
                started[kind] = start(kind, node_port, workdir, root, against)
                bench(started[kind][1], load, max(100, count // 10))  # warm-up
            results: dict[str, list[Result]] = {kind: [] for kind in kinds}
            for round_no in range(rounds):
                order = kinds if round_no % 2 == 0 else kinds[::-1]
                for kind in order:
                    process, port = started[kind]
                    result = measure(kind, process, port, load, count)
                    results[kind].append(result)
                    say(f"round {round_no + 1} {kind:<10} {result.us_per_request:6.1f} µs/request "
                        f"(user {result.user_us_per_request:5.1f})  {result.rate:8.0f} requests/s")  # fmt: skip
            say("")
            say(f"load {load}: redis-benchmark {' '.join(LOADS[load])}, {count} requests per test, {rounds} rounds")
            say("| proxy | µs CPU per request (user), median | per round | requests/s, median |")
            say("|---|---:|---|---:|")
            for kind, runs in results.items():
                total = statistics.median(r.us_per_request for r in runs)
                user = statistics.median(r.user_us_per_request for r in runs)
                per = ", ".join(f"{r.us_per_request:.1f}" for r in runs)
                rate = statistics.median(r.rate for r in runs)
                say(f"| {kind} | {total:.1f} ({user:.1f}) | {per} | {rate:.0f} |")
            for base_kind in ("haproxy", "natfwd", "natfwd-mux", *(k for k in kinds if k.endswith(BASE))):
                base = results.get(base_kind)
                for kind, runs in results.items():
                    if kind.endswith(BASE) and not base_kind.endswith(BASE):
                        continue
                    compared = (
                        kind == f"{base_kind}-py"
                        or (base_kind.endswith(BASE) and kind == base_kind.removesuffix(BASE))
                        or (base_kind == "haproxy")
                    )
                    if base is None or kind == base_kind or not compared:
                        continue
                    # A few hundred requests can take less than one tick of /proc's CPU clock: no ratio then.
                    cost = [r.us_per_request / b.us_per_request if b.us_per_request else float("nan")
                            for r, b in zip(runs, base, strict=True)]  # fmt: skip
                    faster = [r.rate / b.rate for r, b in zip(runs, base, strict=True)]
                    say(f"{kind} over {base_kind}, paired medians: CPU per request {statistics.median(cost):.2f}, "
                        f"rate {statistics.median(faster):.2f}")  # fmt: skip
            if trace:
                say("")
                for kind in kinds:
                    process, port = started[kind]
                    requests, counts = syscalls(process, port, load, count)
                    total_calls = sum(counts.values())
                    top = sorted(counts.items(), key=lambda kv: -kv[1])[:14]
                    shown = ", ".join(f"{name} {n / requests:.2f}" for name, n in top)
                    say(f"{kind}: {total_calls / requests:.1f} system calls per request: {shown}")
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loopback", description=__doc__.split("\n\n")[1])
    parser.add_argument("--load", choices=sorted(LOADS), default="new", help="new: a new connection per request")
    parser.add_argument("--requests", type=int, default=20000, help="requests per test per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS[:3]), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--strace", action="store_true", help="also count each proxy's system calls per request")
    parser.add_argument("--root", type=Path, default=REPO, help="the natfwd checkout to run (C extensions built)")
    parser.add_argument("--against", type=Path, help=f"another checkout, run by the natfwd kinds ending in {BASE}")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k.removesuffix(BASE) not in KINDS or k == "haproxy" + BASE]
    if unknown or args.requests < 100 or args.rounds < 1:
        print(f"python -m benchmarks.loopback: error: bad --kinds {unknown} or --requests/--rounds", file=sys.stderr)
        return 2
    if any(k.endswith(BASE) for k in kinds) and args.against is None:
        print(f"python -m benchmarks.loopback: error: kinds ending in {BASE} need --against CHECKOUT", file=sys.stderr)
        return 2
    run(kinds, args.load, args.requests, args.rounds, args.strace, lambda line: print(line, flush=True), args.root,
        args.against)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
