"""TLS front and verified TLS to real TLS-only redis-server nodes, with redis-py and redis-cli as clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from conftest import Node, free_port, free_ports, require_binary, write_config
from reliakit import config_text, memcached_nodes, natfwd_serve
from servekit import Serve, serving
from tlskit import CA, Issued, client_hello


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca = CA(tmp_path, "trusted")
    rogue = CA(tmp_path, "rogue")
    return {
        "ca": ca,
        "rogue": rogue,
        "front": ca.issue("front", ips=("127.0.0.1",), dns=("localhost",)),
        "node": ca.issue("node", ips=("127.0.0.1",), dns=("localhost",)),
        "rogue_node": rogue.issue("node", ips=("127.0.0.1",), dns=("localhost",)),
        "client": ca.issue("client", client=True),
        "rogue_client": rogue.issue("client", client=True),
    }


def tls_redis(start_redis: Callable[..., Node], cert: Issued, ca: CA) -> Node:
    """A TLS-only redis-server (plain port 0), like ElastiCache with in-transit encryption."""
    tls_port = free_port()
    node = start_redis(
        tls_port,
        "127.0.0.1",
        "--port", "0", "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key),
        "--tls-ca-cert-file", str(ca.path), "--tls-auth-clients", "no",
        "--requirepass", "s3cret-token",
    )  # fmt: skip
    return node


class Front(NamedTuple):
    serve: Serve
    port: int
    config: Path


@contextlib.contextmanager
def tls_front(
    tmp_path: Path,
    start_redis: Callable[..., Node],
    pki: dict[str, object],
    *,
    node: str = "node",
    node_ca: str = "ca",
    client_ca: bool = False,
    allowed: str = "127.0.0.0/8",
) -> Iterator[Front]:
    """A TLS-only redis node with `pki[node]`'s certificate (issued by `pki[node_ca]`), and natfwd serving it
    behind a TLS front with `pki["front"]`, verifying the node against `pki["ca"]`."""
    cert, issuer = pki[node], pki[node_ca]
    front = pki["front"]
    ca = pki["ca"]
    assert isinstance(cert, Issued) and isinstance(issuer, CA) and isinstance(front, Issued) and isinstance(ca, CA)
    redis_node = tls_redis(start_redis, cert, issuer)
    port, metrics_port = free_port(), free_port()
    extra = (
        f"tls: {{cert: {front.cert}, key: {front.key}"
        + (f", client_ca: {ca.path}" if client_ca else "")
        + "}\n"
        + f"upstream_tls: {{ca: {ca.path}}}\n"
        + f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n"
        + "auth: {password: s3cret-token}\n"
    )
    cfg = write_config(
        tmp_path / "natfwd.yaml", [(port, redis_node.address)], engine="redis", allowed=allowed, extra=extra
    )
    with serving(cfg, [port], metrics_port) as serve:
        yield Front(serve, port, cfg)


def test_tls_front_to_verified_tls_node(tmp_path: Path, start_redis: Callable[..., Node], pki: dict) -> None:
    with tls_front(tmp_path, start_redis, pki) as (serve, port, cfg):
        client = redis.Redis(
            host="127.0.0.1", port=port, password="s3cret-token", ssl=True, ssl_ca_certs=str(pki["ca"].path),
            socket_timeout=10, protocol=2,
        )  # fmt: skip
        value = b"\x00\xff" * 300_000
        assert client.set("secret", value)
        assert client.get("secret") == value
        client.close()
        cli = subprocess.run(
            [require_binary("redis-cli"), "--tls", "--cacert", str(pki["ca"].path), "-h", "127.0.0.1", "-p", str(port),
             "-a", "s3cret-token", "--no-auth-warning", "PING"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert cli.stdout.strip() == "PONG", cli.stderr
        check = subprocess.run(
            [".venv/bin/natfwd" if Path(".venv/bin/natfwd").exists() else "natfwd", "check", "--config", str(cfg)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert (
            serve.metric("natfwd_upstream_errors_total") == 0 if _has(serve, "natfwd_upstream_errors_total") else True
        )


def _has(serve: object, name: str) -> bool:
    try:
        serve.metric(name)  # type: ignore[attr-defined]
    except KeyError:
        return False
    return True


def test_plaintext_client_on_tls_front_is_dropped_and_counted(
    tmp_path: Path, start_redis: Callable[..., Node], pki: dict
) -> None:
    with tls_front(tmp_path, start_redis, pki) as (serve, port, _):
        plain = redis.Redis(host="127.0.0.1", port=port, password="s3cret-token", socket_timeout=5, protocol=2)
        with pytest.raises(redis.exceptions.ConnectionError):
            plain.ping()
        plain.close()
        serve.wait_log("reason=tls_handshake")
        assert serve.metric("natfwd_connections_rejected_total", forward=str(port), reason="tls_handshake") >= 1
        # The front keeps serving TLS clients.
        good = redis.Redis(
            host="127.0.0.1", port=port, password="s3cret-token", ssl=True, ssl_ca_certs=str(pki["ca"].path),
            protocol=2,
        )  # fmt: skip
        assert good.ping()
        good.close()
        for _ in range(100):
            if serve.metric("natfwd_connections_active", forward=str(port)) == 0:
                break
            time.sleep(0.05)
        assert serve.metric("natfwd_connections_active", forward=str(port)) == 0


def rejected(serve: Serve, port: int, reason: str) -> float:
    """natfwd_connections_rejected_total for one reason; a series never touched is absent, that is 0."""
    try:
        return serve.metric("natfwd_connections_rejected_total", forward=str(port), reason=reason)
    except KeyError:
        return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_client_outside_the_allowlist_costs_no_handshake(
    tmp_path: Path, start_redis: Callable[..., Node], pki: dict
) -> None:
    """With tls the allowlist is checked on the bare socket: a refused client never gets a ServerHello."""
    with tls_front(tmp_path, start_redis, pki, allowed="127.0.0.2/32") as (serve, port, _):
        # The readiness probe came from 127.0.0.1, outside the allowlist too: its refusal is counted first, whenever
        # the worker gets to it, so the count is read only once its log line is out.
        serve.wait_log("reason=not_allowed")
        refused = rejected(serve, port, "not_allowed")
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.1", 0)) as sock:
            sock.sendall(client_hello())
            try:
                reply = sock.recv(4096)
            except ConnectionResetError:
                reply = b""
        assert reply == b"", f"a client outside the allowlist got {reply[:8]!r}"
        serve.wait_log("reason=not_allowed", count=int(refused) + 1)
        assert rejected(serve, port, "not_allowed") == refused + 1
        assert rejected(serve, port, "tls_handshake") == 0
        # A client inside the allowlist still gets TLS all the way to the node.
        context = ssl.create_default_context(cafile=str(pki["ca"].path))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"AUTH s3cret-token\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"+PONG\r\n"):
                chunk = tls.recv(4096)
                assert chunk, f"closed after {reply!r}"
                reply += chunk
        assert reply == b"+OK\r\n+PONG\r\n"


def test_failed_handshakes_leave_no_descriptors_behind(
    tmp_path: Path, start_redis: Callable[..., Node], pki: dict
) -> None:
    with tls_front(tmp_path, start_redis, pki) as (serve, port, _):
        serve.wait_log("reason=tls_handshake")  # the readiness probe's empty connection
        before = open_fds(serve.proc.pid)
        failures = rejected(serve, port, "tls_handshake")
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"PING\r\n")  # plaintext on a TLS port
                with contextlib.suppress(ConnectionResetError):
                    sock.recv(4096)
        # Every refusal is counted; only the first few of a burst are logged (forwarder/accesslog.py).
        deadline = time.monotonic() + 10
        while rejected(serve, port, "tls_handshake") < failures + 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rejected(serve, port, "tls_handshake") == failures + 40
        for _ in range(100):
            if open_fds(serve.proc.pid) <= before:
                break
            time.sleep(0.05)
        assert open_fds(serve.proc.pid) <= before


def test_rogue_node_certificate_is_never_relayed_to(
    tmp_path: Path, start_redis: Callable[..., Node], pki: dict
) -> None:
    with tls_front(tmp_path, start_redis, pki, node="rogue_node", node_ca="rogue") as (serve, port, _):
        client = redis.Redis(
            host="127.0.0.1", port=port, password="s3cret-token", ssl=True, ssl_ca_certs=str(pki["ca"].path),
            socket_timeout=5, protocol=2,
        )  # fmt: skip
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        client.close()
        serve.wait_log("node connection failed")
        assert "reason=tls" in serve.log()
        assert "CERTIFICATE_VERIFY_FAILED" in serve.log()
        assert serve.metric("natfwd_upstream_errors_total", forward=str(port), reason="tls") >= 1


def test_mutual_tls(tmp_path: Path, start_redis: Callable[..., Node], pki: dict) -> None:
    with tls_front(tmp_path, start_redis, pki, client_ca=True) as (serve, port, _):
        ca_path = str(pki["ca"].path)
        with_cert = redis.Redis(
            host="127.0.0.1", port=port, password="s3cret-token", ssl=True, ssl_ca_certs=ca_path,
            ssl_certfile=str(pki["client"].cert), ssl_keyfile=str(pki["client"].key), protocol=2,
        )  # fmt: skip
        assert with_cert.ping()
        with_cert.close()
        for cert in (None, pki["rogue_client"]):
            kwargs = {} if cert is None else {"ssl_certfile": str(cert.cert), "ssl_keyfile": str(cert.key)}
            refused = redis.Redis(
                host="127.0.0.1", port=port, password="s3cret-token", ssl=True, ssl_ca_certs=ca_path,
                socket_timeout=5, protocol=2, **kwargs,
            )  # fmt: skip
            with pytest.raises(redis.exceptions.ConnectionError):
                refused.ping()
            refused.close()
        assert serve.metric("natfwd_connections_rejected_total", forward=str(port), reason="tls_handshake") >= 2


def test_certificates_reload_on_sighup(tmp_path: Path, start_redis: Callable[..., Node], pki: dict) -> None:
    with tls_front(tmp_path, start_redis, pki) as (serve, port, _):
        first = _peer_serial(port, pki["ca"].path)
        renewed = pki["ca"].issue("front2", ips=("127.0.0.1",))
        front = pki["front"]
        front.cert.write_bytes(renewed.cert.read_bytes())
        front.key.write_bytes(renewed.key.read_bytes())
        serve.signal(signal.SIGHUP)
        serve.wait_log("config reloaded")
        assert _peer_serial(port, pki["ca"].path) != first
        # A broken certificate file is refused and the previous one keeps serving.
        front.cert.write_text("not a certificate")
        serve.signal(signal.SIGHUP)
        serve.wait_log("reload refused")
        assert _peer_serial(port, pki["ca"].path) is not None


def _peer_serial(port: int, ca: Path) -> int | None:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number if der else None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_pauses_tls_accepts_instead_of_spinning(tmp_path: Path, pki: dict) -> None:
    """At EMFILE the TLS listener stays readable (the client waits in the backlog). natfwd stops watching it for a
    moment instead of retrying in a loop, and takes clients again once descriptors are free."""
    front, ca = pki["front"], pki["ca"]
    port, metrics_port = free_ports(2)
    with memcached_nodes(1) as (node,):
        text = config_text(
            [(port, node.address)], metrics_port, max_connections=10, connect_timeout_s=30,
            tls=f"{{cert: {front.cert}, key: {front.key}}}",
        )  # fmt: skip
        with natfwd_serve(tmp_path, text, metrics_port, nofile=(64, 64)) as serve:
            # Clients that connect and never start TLS each hold a descriptor until the 30 s handshake timeout.
            idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(250)]
            try:
                for _ in range(100):
                    if "pausing accepts" in serve.log():
                        break
                    time.sleep(0.05)
                assert "pausing accepts" in serve.log(), serve.log()[-2000:]
                before = cpu_seconds(serve.pid)
                time.sleep(1.0)
                assert cpu_seconds(serve.pid) - before < 0.3, "natfwd spins on a listener it cannot accept from"
                assert serve.log().count("pausing accepts") < 40  # about 10 a second, not one per loop turn
            finally:
                for sock in idle:
                    sock.close()
            # Descriptors come back as natfwd notices the closed clients; then a real client gets TLS again.
            context = ssl.create_default_context(cafile=str(ca.path))
            deadline = time.monotonic() + 20
            while True:
                try:
                    with context.wrap_socket(
                        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
                    ) as tls:
                        tls.sendall(b"version\r\n")
                        assert tls.recv(100).startswith(b"VERSION ")
                    break
                except (OSError, ssl.SSLError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert serve.alive()
