"""TLS in the lab: a client in its own namespace reaches a node through natfwd's TLS front on the public address."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from labkit import REPO, ROOT_MARKS, memcached_client, running_lab, write_config
from reliakit import parse_metrics
from tlskit import CA, client_hello

from forwarder import netns
from forwarder.lab import CLIENT_ADDRESS, PUBLIC_ADDRESS, Lab

pytestmark = ROOT_MARKS


def read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def rejected(the_lab: Lab, reason: str) -> float:
    with netns.entered(the_lab.nat):
        text = urllib.request.urlopen("http://127.0.0.1:9108/metrics", timeout=5).read().decode()
    key = ("natfwd_connections_rejected_total", frozenset({("forward", "11211"), ("reason", reason)}))
    return parse_metrics(text).get(key, 0.0)


def test_tls_front_on_the_public_address(tmp_path: Path) -> None:
    ca = CA(tmp_path, "lab")
    front = ca.issue("front", ips=(PUBLIC_ADDRESS,))
    with running_lab(nodes=1) as the_lab:
        node = the_lab.nodes[0]
        config = write_config(
            tmp_path,
            f"engine: memcached\npublic_address: {PUBLIC_ADDRESS}\nlisten_address: {PUBLIC_ADDRESS}\n"
            f"allowed_clients: [{CLIENT_ADDRESS}/32]\nforwards:\n  - {{port: 11211, target: '{node.address}:11211'}}\n"
            f"metrics: {{listen: '127.0.0.1:9108'}}\ntls: {{cert: {front.cert}, key: {front.key}}}\n",
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(tmp_path / "serve.log", "wb") as log:
            serve = the_lab.popen(
                the_lab.nat, [sys.executable, "-m", "forwarder", "serve", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )  # fmt: skip
        the_lab.wait_listening(the_lab.client, PUBLIC_ADDRESS, 11211, 15.0, serve)

        # The client, as across the Internet: TLS verified against the public address, then plain memcached inside.
        with netns.entered(the_lab.client):
            raw = socket.create_connection((PUBLIC_ADDRESS, 11211), timeout=10)
        context = ssl.create_default_context(cafile=str(ca.path))
        with context.wrap_socket(raw, server_hostname=PUBLIC_ADDRESS) as tls:
            tls.sendall(b"set lab 0 0 3\r\nyes\r\nget lab\r\n")
            assert read_until(tls, b"END\r\n") == b"STORED\r\nVALUE lab 0 3\r\nyes\r\nEND\r\n"
        with memcached_client(node.address, node.port, the_lab.nat) as direct:
            assert direct.get("lab") == b"yes"  # it reached the node in the private subnet

        # Plaintext from the client is dropped and counted; the probe above already was one.
        handshakes = rejected(the_lab, "tls_handshake")
        with netns.entered(the_lab.client):
            plain = socket.create_connection((PUBLIC_ADDRESS, 11211), timeout=10)
        with plain:
            plain.sendall(b"version\r\n")
            assert read_until(plain, b"\r\n") == b""
        deadline = time.monotonic() + 5  # counted when the handshake's task resumes, maybe just after the close
        while rejected(the_lab, "tls_handshake") < handshakes + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rejected(the_lab, "tls_handshake") == handshakes + 1

        # The NAT box's own address is outside the allowlist: closed before a single TLS byte comes back.
        with netns.entered(the_lab.nat):
            stranger = socket.create_connection((PUBLIC_ADDRESS, 11211), timeout=10)
        with stranger:
            stranger.sendall(client_hello())
            try:
                reply = stranger.recv(4096)
            except ConnectionResetError:
                reply = b""
            assert reply == b""
        assert rejected(the_lab, "not_allowed") == 1
        serve.terminate()
        assert serve.wait(timeout=15) == 0
