"""natfwd under systemd, with the real protocols: sd_notify on a datagram socket, journald priority prefixes,
and config and keys read from $CREDENTIALS_DIRECTORY; `natfwd serve` runs as a real process each time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports, wait_for
from labkit import REPO, memcached_server

from forwarder import credentials, journal

# A notify message arrives within this; only stops a hang.
TIMEOUT_S = 30.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", credentials.ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _config(node_port: int, ports: list[int], workers: int = 1) -> str:
    lines = [
        "engine: memcached",
        "public_address: 127.0.0.1",
        "listen_address: 127.0.0.1",
        "interface: lo",
        f"workers: {workers}",
        "allowed_clients:",
        "  - 127.0.0.0/8",
        "forwards:",
    ]
    for port in ports:
        lines += [f"  - port: {port}", f"    target: 127.0.0.1:{node_port}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(TIMEOUT_S)
    try:
        yield sock
    finally:
        sock.close()


def _receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_only_once_every_listener_is_bound_then_reloading_and_stopping(
    tmp_path: Path, notify_socket: socket.socket, workers: int
) -> None:
    ports = free_ports(3)
    with memcached_server() as node:
        path = tmp_path / "natfwd.yaml"
        path.write_text(_config(node, ports, workers))
        env = _env(NOTIFY_SOCKET=notify_socket.getsockname())
        argv = [sys.executable, "-m", "forwarder", "serve", "--config", str(path)]
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            first = _receive(notify_socket)
            assert first["READY"] == "1"
            # At READY=1 every port already accepts: nothing is still binding (every worker, with workers: 2).
            assert [_accepts(port) for port in ports] == [True, True, True]
            process.send_signal(signal.SIGHUP)
            reloading = _receive(notify_socket)
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert _receive(notify_socket)["READY"] == "1"
            process.send_signal(signal.SIGTERM)
            assert _receive(notify_socket)["STOPPING"] == "1"
            assert process.wait(timeout=TIMEOUT_S) == 0
            # Workers were told to forget the socket: only the one process spoke, once per event.
            notify_socket.settimeout(0.2)
            with pytest.raises(TimeoutError):
                notify_socket.recv(4096)
        finally:
            process.kill()
            process.wait()


def test_no_notify_socket_means_no_messages_and_no_failure() -> None:
    assert not __import__("forwarder.notify", fromlist=["send"]).send("READY=1")


def _serve_logs(tmp_path: Path, config_text: str, journal_stream: bool) -> str:
    """Start serve with stderr on a file, as systemd connects it to journald, and return what it wrote."""
    path = tmp_path / "natfwd.yaml"
    path.write_text(config_text)
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        info = os.fstat(stderr.fileno())
        extra = {journal.ENV: f"{info.st_dev}:{info.st_ino}"} if journal_stream else {}
        argv = [sys.executable, "-m", "forwarder", "serve", "--config", str(path)]
        process = subprocess.Popen(argv, env=_env(**extra), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for(lambda: "forwarding" in log.read_text() or process.poll() is not None, "natfwd to log", 30)
            path.write_text("engine: nonsense\n")  # an error line, at the next reload
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload refused" in log.read_text(), "the refused reload to be logged", 30)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=TIMEOUT_S)
        finally:
            process.kill()
            process.wait()
    return log.read_text()


def test_journal_gets_priority_prefixes_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    ports = free_ports(1)
    with memcached_server() as node:
        text = _serve_logs(tmp_path, _config(node, ports), journal_stream=True)
        lines = text.splitlines()
        assert lines and all(line[:3] in ("<6>", "<3>", "<4>", "<7>") for line in lines), text
        assert any(line.startswith("<6>") and "forwarding" in line for line in lines)
        assert any(line.startswith("<3>") and "reload refused" in line for line in lines)
        plain = _serve_logs(tmp_path, _config(node, ports), journal_stream=False)
        assert not any(line.startswith("<") for line in plain.splitlines())
        assert "reload refused" in plain


@pytest.mark.parametrize(("levelno", "expected"), [(50, 2), (40, 3), (30, 4), (20, 6), (10, 7), (5, 7)])
def test_priorities(levelno: int, expected: int) -> None:
    assert journal.priority(levelno) == expected


def test_config_and_keys_from_the_credentials_directory(tmp_path: Path) -> None:
    ports = free_ports(1)
    creds = tmp_path / "credentials"
    creds.mkdir()
    with memcached_server() as node:
        (creds / "natfwd.yaml").write_text(_config(node, ports))
        argv = [sys.executable, "-m", "forwarder", "check", "--config", "credential:natfwd.yaml", "--direct"]
        done = subprocess.run(
            argv, env=_env(**{credentials.ENV: str(creds)}), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        # Outside systemd the name means nothing: a usage error saying what to do.
        done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr == (
            "natfwd: error: config: 'credential:natfwd.yaml': $CREDENTIALS_DIRECTORY is not set; credential: paths "
            "work under systemd with LoadCredential=natfwd.yaml:PATH (see deploy/natfwd.service), elsewhere give the "
            "file's path\n"
        )
    # A TLS key path in the config resolves there too.
    os.environ[credentials.ENV] = str(creds)
    try:
        assert credentials.resolve("credential:tls.key") == str(creds / "tls.key")
        assert credentials.resolve("/etc/natfwd/tls.key") == "/etc/natfwd/tls.key"
        with pytest.raises(credentials.CredentialError, match="plain file name"):
            credentials.resolve("credential:../etc/shadow")
    finally:
        del os.environ[credentials.ENV]
