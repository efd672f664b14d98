"""Test helpers for cluster-aware forwarding: a stand-in configuration endpoint, natfwd serve and scripts in a lab."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from labkit import REPO

from forwarder import netns
from forwarder.lab import Lab
from forwarder.protocols.memcached import render_config_reply

PYTHON_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _answer(conn: socket.socket, reply: bytes) -> None:
    """Serve one connection: `config get cluster` (and the legacy get) -> `reply`, `version`, else ERROR."""
    buffer = b""
    with conn:
        conn.settimeout(10)
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if line.strip() in (b"config get cluster", b"get AmazonElastiCache:cluster"):
                    conn.sendall(reply)
                elif line.strip() == b"version":
                    conn.sendall(b"VERSION 1.6.21\r\n")
                else:
                    conn.sendall(b"ERROR\r\n")


@contextmanager
def config_endpoint(namespace: str, host: str, port: int, nodes: Sequence[tuple[str, str, int]]) -> Iterator[None]:
    """A stand-in ElastiCache configuration endpoint on host:port inside `namespace`, listing `nodes`."""
    reply = render_config_reply(7, nodes)
    with netns.entered(namespace):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the socket stays in the namespace
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    listener.settimeout(0.1)
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_answer, args=(conn, reply), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@contextmanager
def serve_in_nat(lab: Lab, config_text: str, ports: Sequence[int], directory: Path) -> Iterator[Path]:
    """natfwd serve inside the lab's NAT namespace, listening on `ports` (checked from the client); yields its log."""
    config_path = directory / "natfwd.yaml"
    config_path.write_text(config_text)
    log_path = directory / "natfwd.log"
    with open(log_path, "wb") as log:
        process = lab.popen(
            lab.nat,
            [sys.executable, "-m", "forwarder", "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=PYTHON_ENV,
        )
    try:
        for port in ports:
            try:
                lab.wait_listening(lab.client, "203.0.113.73", port, 15, process)
            except Exception as exc:
                raise AssertionError(f"natfwd did not listen on {port}: {exc}; log:\n{log_path.read_text()}") from exc
        yield log_path
    finally:
        process.kill()
        process.wait()


def run_python(lab: Lab, namespace: str, script: str, timeout_s: float = 60) -> object:
    """Run a Python script inside `namespace`; it prints one JSON document, which is returned."""
    result = lab.run(namespace, [sys.executable, "-c", script], check=False, timeout=timeout_s)
    if result.returncode != 0:
        raise AssertionError(f"script in {namespace} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
