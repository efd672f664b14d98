"""natfwd check: reply judging, real memcached/redis probes on loopback, and a lab with a node killed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port
from labkit import memcached_server, natfwd, redis_server, root, running_lab, write_config

from forwarder import check, config, iptables, netns
from forwarder.config import Auth


def _config(*ports: int, engine: str = "memcached", extra: str = "") -> str:
    """Forwards whose public port is the target port on 127.0.0.1, so both modes dial a real server."""
    lines = [f"engine: {engine}", "public_address: 127.0.0.1", "allowed_clients: [127.0.0.1/32]", "forwards:"]
    lines += [f"  - {{port: {port}, target: '127.0.0.1:{port}'}}" for port in ports]
    return "\n".join(lines) + "\n" + extra


# --- pure parts ---


@pytest.mark.parametrize(
    ("kind", "command", "reply", "expected"),
    [
        ("memcached", "version", b"VERSION 1.6.18\r\n", (True, "memcached 1.6.18")),
        ("memcached", "version", b"ERROR\r\n", (False, "unexpected reply to version: 'ERROR'")),
        ("redis", "PING", b"+PONG\r\n", (True, "PONG")),
        ("redis", "AUTH", b"+OK\r\n", (True, "OK")),
        ("redis", "PING", b"+OK\r\n", (False, "unexpected reply to PING: '+OK'")),
        (
            "redis",
            "PING",
            b"-NOAUTH Authentication required.\r\n",
            (False, "PING rejected: NOAUTH Authentication required. (set auth in the config)"),
        ),
        (
            "redis",
            "AUTH",
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
            (False, "AUTH rejected: WRONGPASS invalid username-password pair or user is disabled."),
        ),
        (
            "discovery",
            "config get cluster",
            b"CONFIG cluster 0 44\r\n12\nn1.cache|10.0.1.230|11211 n2.cache|10.0.1.231|11211\n\r\nEND\r\n",
            (True, "config version 12, 2 node(s)"),
        ),
        (
            "discovery",
            "config get cluster",
            b"ERROR\r\n",
            (False, "unexpected reply to config get cluster: 'ERROR' (is it a configuration endpoint?)"),
        ),
    ],
)
def test_judge(kind: check.Kind, command: str, reply: bytes, expected: tuple[bool, str]) -> None:
    assert check.judge(kind, command, reply) == expected


def test_redis_requests_send_auth_first_when_configured() -> None:
    assert check.requests("redis", None) == [("PING", b"*1\r\n$4\r\nPING\r\n")]
    assert check.requests("redis", Auth(None, "s3cret")) == [
        ("AUTH", b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n"),
        ("PING", b"*1\r\n$4\r\nPING\r\n"),
    ]
    assert check.requests("redis", Auth("alice", "pa ss"))[0] == (
        "AUTH",
        b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$5\r\npa ss\r\n",
    )
    assert check.requests("memcached", Auth(None, "ignored")) == [("version", b"version\r\n")]


def test_plan_dials_public_address_or_each_target() -> None:
    cfg = config.loads(
        "engine: memcached\npublic_address: 203.0.113.73\nallowed_clients: [198.51.100.27/32]\n"
        "forwards:\n  - {port: 11211, target: 10.0.1.230:11211}\n  - {port: 11212, target: node2.internal:11311}\n"
        "auto_discovery: {port: 11210, target: cfg.internal:11211}\n"
    )
    public = [(p.label, p.target, p.host, p.dial_port, p.kind) for p in check.plan(cfg)]
    assert public == [
        ("11211", "10.0.1.230:11211", "203.0.113.73", 11211, "memcached"),
        ("11212", "node2.internal:11311", "203.0.113.73", 11212, "memcached"),
        ("11210 (auto_discovery)", "cfg.internal:11211", "203.0.113.73", 11210, "discovery"),
    ]
    direct = [(p.host, p.dial_port) for p in check.plan(cfg, direct=True)]
    assert direct == [("10.0.1.230", 11211), ("node2.internal", 11311), ("cfg.internal", 11211)]


def test_format_result_lines() -> None:
    probe = check.Probe(11211, "10.0.1.230:11211", "203.0.113.73", 11211, "memcached", None)
    ok = check.Result(probe, True, "memcached 1.6.18", 0.4242)
    failed = check.Result(probe, False, "connection refused", 1.5)
    assert check.format_result(ok) == "11211  10.0.1.230:11211      ok  0.42 ms  (memcached 1.6.18)"
    assert check.format_result(failed) == "11211  10.0.1.230:11211      FAIL connection refused  1.50 ms"
    assert check.summary([ok]) is None
    assert check.summary([ok, failed]) == "1 of 2 forward(s) failed: 11211"


# --- real servers on loopback ---


def test_memcached_both_modes_pass(tmp_path: Path) -> None:
    with memcached_server() as first, memcached_server() as second:
        path = write_config(tmp_path, _config(first, second))
        for extra in ([], ["--direct"]):
            result = natfwd("check", "--config", str(path), *extra)
            assert (result.returncode, result.stderr) == (0, ""), result.stderr
            lines = result.stdout.splitlines()
            assert [line.split()[:3] for line in lines] == [
                [str(first), f"127.0.0.1:{first}", "ok"],
                [str(second), f"127.0.0.1:{second}", "ok"],
            ]
            assert all(line.split()[4] == "ms" and float(line.split()[3]) > 0 for line in lines)


def test_a_dead_forward_is_named_and_exits_1(tmp_path: Path) -> None:
    dead = free_port()
    with memcached_server() as alive:
        result = natfwd("check", "--config", str(write_config(tmp_path, _config(alive, dead))))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].split()[2] == "ok"
    assert lines[1].startswith(f"{dead}  127.0.0.1:{dead}") and " FAIL connection refused " in lines[1]
    assert result.stderr == f"natfwd: error: 1 of 2 forward(s) failed: {dead}\n"


def test_redis_with_auth(tmp_path: Path) -> None:
    with redis_server("--requirepass", "s3cret") as port:
        good_cfg = write_config(tmp_path, _config(port, engine="redis", extra="auth: {password: s3cret}\n"))
        good = natfwd("check", "--config", str(good_cfg))
        assert good.returncode == 0, good.stderr
        assert good.stdout.split()[2:3] == ["ok"] and good.stdout.rstrip().endswith("(PONG)")

        missing = natfwd("check", "--config", str(write_config(tmp_path, _config(port, engine="redis"), "b.yaml")))
        assert missing.returncode == 1
        assert "FAIL PING rejected: NOAUTH Authentication required. (set auth in the config)" in missing.stdout

        wrong_cfg = write_config(tmp_path, _config(port, engine="redis", extra="auth: {password: nope}\n"), "c.yaml")
        wrong = natfwd("check", "--config", str(wrong_cfg))
        assert wrong.returncode == 1
        assert "FAIL AUTH rejected: WRONGPASS" in wrong.stdout


def test_redis_acl_user(tmp_path: Path) -> None:
    with redis_server("--user", "alice", "on", ">pw", "~*", "+@all") as port:
        cfg = config.loads(_config(port, engine="redis", extra="auth: {username: alice, password: pw}\n"))
        [result] = check.run(cfg)
        assert (result.ok, result.detail) == (True, "PONG")


@contextmanager
def _silent_server() -> Iterator[int]:
    """Accepts connections and never answers: the probe must give up at its timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_silence_times_out_at_the_given_timeout(tmp_path: Path) -> None:
    with _silent_server() as port:
        result = natfwd("check", "--config", str(write_config(tmp_path, _config(port))), "--timeout", "0.3")
    assert result.returncode == 1
    assert f"{port}  127.0.0.1:{port}" in result.stdout and "FAIL timed out after 0.3 s" in result.stdout
    latency = float(result.stdout.split()[-2])
    assert latency >= 250  # not before the timeout; how long after depends on the machine


def test_bad_timeout_and_missing_config_are_usage_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, _config(free_port()))
    bad = natfwd("check", "--config", str(path), "--timeout", "0")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "natfwd: error: --timeout: 0.0 is not valid; expected a positive number of seconds\n"
    missing = natfwd("check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --- in a lab: through the kernel path from the client namespace, then one node killed ---


@root
def test_check_in_a_lab_passes_then_names_the_killed_node(tmp_path: Path) -> None:
    with running_lab() as lab:
        cfg_text = lab.config_text()
        lab.run(lab.nat, ["sh", "-s"], input=iptables.render(config.loads(cfg_text)))
        path = write_config(tmp_path, cfg_text)

        healthy = natfwd("check", "--config", str(path), namespace=lab.client)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert [line.split()[:3] for line in healthy.stdout.splitlines()] == [
            [str(n.public_port), f"{n.address}:{n.port}", "ok"] for n in lab.nodes
        ]
        direct = natfwd("check", "--config", str(path), "--direct", namespace=lab.nat)
        assert direct.returncode == 0, direct.stdout + direct.stderr

        lab.stop_node(1)
        broken = natfwd("check", "--config", str(path), "--timeout", "1", namespace=lab.client)
        assert broken.returncode == 1
        lines = broken.stdout.splitlines()
        assert [line.split()[2] for line in lines] == ["ok", "FAIL", "ok"]
        assert lines[1].startswith("11212  10.0.1.231:11211      FAIL connection refused")
        assert broken.stderr == "natfwd: error: 1 of 3 forward(s) failed: 11212\n"

        # The same from Python, with the calling thread moved into the client namespace.
        with netns.entered(lab.client):
            results = check.run(config.loads(cfg_text), timeout_s=1)
        assert [r.ok for r in results] == [True, False, True]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (an IP SAN), and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "natfwd-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_probes_verify_the_server(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    tls_args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-auth-clients", "no"]  # fmt: skip
    with redis_server(*tls_args, port=port):
        # Through public_address with `tls`: the self-signed certificate is its own trust anchor.
        public = config.loads(_config(port, engine="redis", extra=f"tls: {{cert: '{cert}', key: '{key}'}}\n"))
        assert [(r.ok, r.detail) for r in check.run(public)] == [(True, "PONG")]
        # --direct with upstream_tls verifies against its CA; without the CA, verification fails.
        direct = config.loads(_config(port, engine="redis", extra=f"upstream_tls: {{ca: '{cert}'}}\n"))
        assert [(r.ok, r.detail) for r in check.run(direct, direct=True)] == [(True, "PONG")]
        unverified = config.loads(_config(port, engine="redis", extra="upstream_tls: {}\n"))
        [failed] = check.run(unverified, direct=True)
        assert not failed.ok and failed.detail.startswith("TLS: CERTIFICATE_VERIFY_FAILED")
        # Plain TCP to a TLS port is not mistaken for a healthy node.
        [plain] = check.run(config.loads(_config(port, engine="redis")), timeout_s=1)
        assert not plain.ok
