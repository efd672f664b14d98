"""A client that resets before natfwd accepts it is counted as `reset`, not as a refused `not_allowed` client."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Node, free_port, write_config
from pymemcache.client.base import Client
from servekit import Serve, serving
from tlskit import CA

HANG_S = 15.0  # only stops a hang


def natfwd_pids(serve: Serve) -> list[int]:
    pid = serve.proc.pid
    return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


def rejected(serve: Serve, port: int, reason: str) -> float:
    try:
        return serve.metric("natfwd_connections_rejected_total", forward=str(port), reason=reason)
    except KeyError:
        return 0.0


@pytest.mark.parametrize("front", ["plain", "tls", "multiplex"])
def test_a_client_that_resets_before_accept_is_counted_as_reset(
    front: str, start_memcached: Callable[..., Node], tmp_path: Path
) -> None:
    """natfwd is stopped (SIGSTOP) while an allowed client connects and resets (SO_LINGER 0, then close): the
    kernel has the connection queued, already reset, when natfwd accepts it. That is counted once under
    reason="reset", never as not_allowed, and the next client is served."""
    node = start_memcached()
    port, metrics_port = free_port(), free_port()
    extra = f"metrics:\n  listen: 127.0.0.1:{metrics_port}\n"
    tls = front == "tls"
    if front == "multiplex":
        extra += "multiplex: true\n"
    if tls:
        cert = CA(tmp_path, "front").issue("natfwd", ips=("127.0.0.1",))
        extra += f"tls: {{cert: {cert.cert}, key: {cert.key}}}\n"
    config = write_config(tmp_path / "natfwd.yaml", [(port, node.address)], extra=extra)
    with serving(config, [port, metrics_port], metrics_port) as serve:
        reasons = ("reset", "tls_handshake", "not_allowed")
        deadline = time.monotonic() + HANG_S
        while tls and rejected(serve, port, "tls_handshake") < 1:  # serving()'s probe: a handshake never begun
            assert time.monotonic() < deadline, f"the probe's handshake failure was not counted; log:\n{serve.log()}"
            time.sleep(0.05)
        before = {reason: rejected(serve, port, reason) for reason in reasons}
        pids = natfwd_pids(serve)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)  # the kernel completes it
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # an RST, while the connection waits in natfwd's accept queue
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + HANG_S
        while rejected(serve, port, "reset") < before["reset"] + 1:
            assert time.monotonic() < deadline, f"no reset counted; log:\n{serve.log()}"
            time.sleep(0.05)
        after = {reason: rejected(serve, port, reason) for reason in reasons}
        # once, as reset; with TLS, it never got to a handshake
        assert {reason: after[reason] - before[reason] for reason in reasons} == {
            "reset": 1,
            "tls_handshake": 0,
            "not_allowed": 0,
        }
        if not tls:
            direct = Client(("127.0.0.1", port), timeout=HANG_S)
            try:
                assert direct.set("after", b"1") and direct.get("after") == b"1"
            finally:
                direct.close()
        assert "reason=not_allowed" not in serve.log()
