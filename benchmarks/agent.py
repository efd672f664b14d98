"""The Python-client load generator (pymemcache, redis-py): runs in the client namespace, one JSON job per line.

The harness starts it once with `ip netns exec CLIENT python -m benchmarks.agent` and writes jobs to its stdin;
each job's result is one JSON line on stdout. Keeping one process saves an interpreter start per measurement.
Every reply is checked against what was stored, so a relay that corrupts bytes fails the run instead of scoring.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

SMALL_VALUE = b"v" * 32
KEY = "bench:small"
BIG_KEY = "bench:big"
START_TIMEOUT_S = 60.0  # for the other processes of `many` to connect


class KV(Protocol):
    def get(self, key: str) -> Any: ...
    def set(self, key: str, value: bytes) -> Any: ...
    def close(self) -> None: ...


def connect(engine: str, host: str, port: int) -> KV:
    """A connected client of the design's named library for `engine`; raises OSError if it cannot connect."""
    if engine == "memcached":
        from pymemcache.client.base import Client  # type: ignore[import-untyped]

        mc = Client((host, port), connect_timeout=5, timeout=30, no_delay=True, default_noreply=False)
        mc.version()  # connect now
        return cast(KV, mc)
    import redis

    rd = redis.Redis(host=host, port=port, socket_connect_timeout=5, socket_timeout=30)
    rd.ping()
    return rd


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list; 0.0 for an empty one."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def _check(value: Any, expected: bytes) -> None:
    if value != expected:
        shown = repr(value[:40]) if isinstance(value, bytes | bytearray) else repr(value)
        raise RuntimeError(f"wrong value through the path: expected {len(expected)} bytes, got {shown}")


def latency(engine: str, host: str, port: int, duration_s: float) -> dict[str, float]:
    """GETs on one connection, back to back: p50/p99 in microseconds and operations per second."""
    client = connect(engine, host, port)
    try:
        client.set(KEY, SMALL_VALUE)
        for _ in range(50):  # warm up caches and the path's buffers
            client.get(KEY)
        samples: list[float] = []
        clock = time.perf_counter
        deadline = clock() + duration_s
        started = clock()
        now = started
        while now < deadline:
            value = client.get(KEY)
            after = clock()
            samples.append(after - now)
            now = after
            _check(value, SMALL_VALUE)
        elapsed = now - started
    finally:
        client.close()
    samples.sort()
    return {
        "ops": len(samples) / elapsed,
        "p50_us": percentile(samples, 0.50) * 1e6,
        "p99_us": percentile(samples, 0.99) * 1e6,
    }


_start: Any = None  # many()'s barrier, inherited by its pool's processes


def _share_start(barrier: Any) -> None:
    global _start
    _start = barrier


def _many_part(engine: str, host: str, port: int, connections: int, threads: int,
               duration_s: float) -> tuple[list[float], float]:  # fmt: skip
    """One process of `many`: its connections, round-robin over its threads, for `duration_s` from when every
    process has connected. Returns the per-GET latencies and the seconds actually measured."""
    clients: list[KV] = []
    try:
        clients += (connect(engine, host, port) for _ in range(connections))
    except BaseException:
        _start.abort()  # the others stop waiting for this process
        for client in clients:
            client.close()
        raise
    try:
        results: list[list[float]] = [[] for _ in range(threads)]
        errors: list[BaseException] = []
        _start.wait(START_TIMEOUT_S)  # every process starts together
        started = time.perf_counter()
        deadline = started + duration_s

        def work(index: int) -> None:
            mine = clients[index::threads]
            samples = results[index]
            clock = time.perf_counter
            try:
                now = clock()
                while now < deadline:
                    for client in mine:
                        value = client.get(KEY)
                        after = clock()
                        samples.append(after - now)
                        now = after
                        _check(value, SMALL_VALUE)
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{len(errors)} of {threads} client threads failed: {errors[0]}")
    finally:
        for client in clients:
            client.close()
    return [s for part in results for s in part], elapsed


def many(engine: str, host: str, port: int, duration_s: float, connections: int, threads: int,
         processes: int) -> dict[str, float]:  # fmt: skip
    """`connections` open at once, spread over `processes` processes of `threads` threads each (one process's
    GIL would measure itself, not the path): total GETs/s and the p99 of every GET."""
    client = connect(engine, host, port)
    try:
        client.set(KEY, SMALL_VALUE)
    finally:
        client.close()
    share = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    context = multiprocessing.get_context("fork")  # the children stay in this network namespace
    # One task per process: each blocks at the barrier until all have connected, so none can take a second one.
    start = context.Barrier(processes)
    with context.Pool(processes, initializer=_share_start, initargs=(start,)) as pool:
        pending = [pool.apply_async(_many_part, (engine, host, port, n, threads, duration_s)) for n in share]
        parts: list[tuple[list[float], float]] = []
        errors: list[BaseException] = []
        for task in pending:
            try:
                parts.append(task.get())
            except BaseException as exc:
                errors.append(exc)
    if errors:  # the process that could not connect says why; the others only saw the barrier break
        own = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (own or errors)[0]
    samples = sorted(s for part, _ in parts for s in part)
    elapsed = max(seconds for _, seconds in parts)
    return {"ops": len(samples) / elapsed, "p99_us": percentile(samples, 0.99) * 1e6}


def bulk(engine: str, host: str, port: int, duration_s: float, size: int) -> dict[str, float]:
    """Alternating SET and GET of a `size`-byte value on one connection: SETs/s and GETs/s, each on its own time."""
    client = connect(engine, host, port)
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    set_s = get_s = 0.0
    count = 0
    clock = time.perf_counter
    try:
        deadline = clock() + duration_s
        while clock() < deadline or count == 0:
            t0 = clock()
            client.set(BIG_KEY, value)
            t1 = clock()
            got = client.get(BIG_KEY)
            t2 = clock()
            _check(got, value)
            set_s += t1 - t0
            get_s += t2 - t1
            count += 1
    finally:
        client.close()
    return {"set_ops": count / set_s, "get_ops": count / get_s}


JOBS: dict[str, Callable[..., dict[str, float]]] = {"latency": latency, "many": many, "bulk": bulk}


def main() -> int:
    """Serve jobs from stdin until EOF; a failed job answers {"error": ...} and the agent keeps going."""
    for line in sys.stdin:
        job = json.loads(line)
        kind = job.pop("job")
        try:
            reply: dict[str, Any] = {"result": JOBS[kind](**job)}
        except Exception as exc:  # reported to the harness, which records it per measurement
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
