"""Run `natfwd serve` as a real subprocess on loopback, and read its metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conftest import Node, free_port, wait_port, write_config


class Serve:
    def __init__(self, proc: subprocess.Popen[str], log_path: Path, metrics_port: int | None) -> None:
        self.proc = proc
        self.log_path = log_path
        self.metrics_port = metrics_port

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_log(self, text: str, timeout_s: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged {count}x within {timeout_s}s; log:\n{self.log()}")
            time.sleep(0.05)

    def metrics(self) -> str:
        assert self.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        found = False
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric_name, _, label_text = key.partition("{")
            if metric_name != name:
                continue
            parts = sorted(p for p in label_text.rstrip("}").split(",") if p)
            if all(f'{k}="{v}"' in parts for k, v in labels.items()):
                total += float(value)
                found = True
        if not found:
            raise KeyError(f"{name}{{{want}}} not in metrics")
        return total


@contextlib.contextmanager
def serving(
    config_path: Path,
    ports: list[int],
    metrics_port: int | None = None,
    extra_args: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
) -> Iterator[Serve]:
    """`natfwd serve` until the block ends (then SIGKILL), once every port in `ports` listens. `wrapper` goes
    before the python command line; it must exec it, so that the process started is natfwd itself."""
    log_path = config_path.with_suffix(".log")
    # The supervisor's metrics directory goes beside the config: a SIGKILL at the end leaves it in pytest's tmp_path.
    tmp = config_path.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    log_file = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "forwarder", *extra_args, "serve", "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)},
    )
    serve = Serve(proc, log_path, metrics_port)
    try:
        for port in ports:
            try:
                wait_port("127.0.0.1", port, 15)
            except TimeoutError:
                raise AssertionError(f"natfwd did not listen on {port}; log:\n{serve.log()}") from None
        yield serve
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log_file.close()


def mux_config(tmp_path: Path, target: str, engine: str, extra: str = "") -> tuple[Path, int, int]:
    """A `multiplex: true` config with one forward to `target` and metrics: (its path, the port, the metrics port)."""
    port, metrics_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "natfwd.yaml",
        [(port, target)],
        engine=engine,
        extra=f"multiplex: true\nmetrics: {{listen: 127.0.0.1:{metrics_port}}}\n{extra}",
    )
    return cfg, port, metrics_port


@contextlib.contextmanager
def serving_mux(
    tmp_path: Path, node: Node, engine: str, wrapper: tuple[str, ...] = ()
) -> Iterator[tuple[Node, int, Serve]]:
    cfg, port, metrics_port = mux_config(tmp_path, node.address, engine)
    with serving(cfg, [port], metrics_port, wrapper=wrapper) as serve:
        yield node, port, serve
