"""Config validation: table-driven, with the exact messages users see (one line per problem)."""

from __future__ import annotations

import dataclasses
import ipaddress
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Node, free_port, write_config
from pymemcache.client.base import Client
from servekit import serving

from forwarder import config, supervisor

VALID = """\
engine: memcached
public_address: 203.0.113.73
allowed_clients: [198.51.100.27/32]
forwards:
  - {port: 11211, target: 10.0.1.230:11211}
  - {port: 11212, target: 10.0.1.231:11211}
"""


def test_valid_config_defaults() -> None:
    cfg = config.loads(VALID)
    assert cfg.engine == "memcached"
    assert cfg.listen_address == "0.0.0.0"
    assert cfg.interface == "eth0"
    assert cfg.workers == 1
    assert cfg.metrics is None
    assert [(f.port, str(f.target)) for f in cfg.forwards] == [(11211, "10.0.1.230:11211"), (11212, "10.0.1.231:11211")]
    assert cfg.is_allowed("198.51.100.27")
    assert cfg.is_allowed("::ffff:198.51.100.27")
    assert not cfg.is_allowed("198.51.100.28")


def test_allowlist_answers_are_kept_per_config_and_bounded() -> None:
    cfg = config.loads(VALID)
    for _ in range(2):  # the second round answers from what the first one kept
        assert cfg.is_allowed("198.51.100.27") and cfg.is_allowed("::ffff:198.51.100.27")
        assert not cfg.is_allowed("198.51.100.28") and not cfg.is_allowed("not-an-address")
    other = dataclasses.replace(cfg, allowed_clients=(ipaddress.ip_network("198.51.100.28/32"),))
    assert other.is_allowed("198.51.100.28") and not other.is_allowed("198.51.100.27")  # not the old answers
    assert cfg == config.loads(VALID)  # what is kept is not part of the config's value
    for i in range(config.ALLOWED_CACHE_SIZE + 100):
        assert not cfg.is_allowed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(cfg._allowed) <= config.ALLOWED_CACHE_SIZE
    assert cfg.is_allowed("198.51.100.27")


def test_example_config_is_valid() -> None:
    cfg = config.load(Path(__file__).parent.parent / "config.example.yaml")
    assert len(cfg.forwards) == 3


def test_cpu_affinity_pins_workers_round_robin_over_the_cpus_we_may_use() -> None:
    cfg = config.loads(VALID + "workers: 3\ncpu_affinity: true\n")
    assert supervisor.worker_cpus(cfg, {5, 2}) == [2, 5, 2]
    assert supervisor.worker_cpus(config.loads(VALID + "workers: 3\n"), {2, 5}) == [None, None, None]  # off by default


def test_workers_auto_is_one_per_core() -> None:
    import os

    assert config.loads(VALID + "workers: auto\n").workers == (os.cpu_count() or 1)


CASES = [
    (
        "engine: memcached\n",
        "public_address: missing is not valid; expected the IP address or DNS name clients dial (the EIP)\n"
        "allowed_clients: missing is not valid; expected a non-empty list of CIDRs such as 198.51.100.27/32\n"
        "forwards: missing is not valid; expected a non-empty list of {port, target} entries",
    ),
    (
        VALID.replace("engine: memcached", "engine: mongodb"),
        "engine: 'mongodb' is not valid; expected one of memcached, redis, redis-cluster",
    ),
    (
        VALID.replace("port: 11212", "port: 70000"),
        "forwards[1].port: 70000 is not valid; expected an integer port from 1 to 65535",
    ),
    (
        VALID.replace("port: 11212", "port: 11211"),
        "forwards[1].port: 11211 is already used by forwards[0]; each forward needs its own port",
    ),
    (
        VALID.replace("198.51.100.27/32", "198.51.100.27/33"),
        "allowed_clients[0]: '198.51.100.27/33' is not valid; expected a CIDR such as 198.51.100.27/32 "
        "('198.51.100.27/33' does not appear to be an IPv4 or IPv6 network)",
    ),
    (
        VALID.replace("target: 10.0.1.231:11211", "target: 10.0.1.231"),
        "forwards[1].target: '10.0.1.231' is not valid; expected HOST:PORT such as 10.0.1.230:11211 (IPv6 as [::1]:11211)",
    ),
    (
        VALID.replace("target: 10.0.1.231:11211", "target: 'bad host:11211'"),
        "forwards[1].target: 'bad host' is not valid; expected an IP address or a DNS host name",
    ),
    (
        VALID + "workrs: 2\n",
        "workrs: unknown key (did you mean workers?); valid keys here are: " + ", ".join(config._TOP_KEYS),
    ),
    (
        VALID.replace("  - {port: 11211, target: 10.0.1.230:11211}", "  - {port: 11211, tagret: 10.0.1.230:11211}"),
        "forwards[0].tagret: unknown key (did you mean target?); valid keys here are: port, target\n"
        "forwards[0].target: missing is not valid; expected HOST:PORT such as 10.0.1.230:11211",
    ),
    (
        VALID.replace("allowed_clients: [198.51.100.27/32]", "allowed_clients: []"),
        "allowed_clients: [] is not valid; expected a non-empty list of CIDRs such as 198.51.100.27/32",
    ),
    (
        VALID.replace("allowed_clients: [198.51.100.27/32]\n", ""),
        "allowed_clients: missing is not valid; expected a non-empty list of CIDRs such as 198.51.100.27/32",
    ),
    (
        "engine: memcached\npublic_address: 203.0.113.73\nallowed_clients: [198.51.100.27/32]\nforwards: []\n",
        "forwards: [] is not valid; expected a non-empty list of {port, target} entries (or a discovery section)",
    ),
    (
        "engine: memcached\npublic_address: 203.0.113.73\nallowed_clients: [198.51.100.27/32]\n",
        "forwards: missing is not valid; expected a non-empty list of {port, target} entries",
    ),
    (VALID + "workers: 0\n", "workers: 0 is not valid; expected an integer from 1 to 256, or auto (one per core)"),
    (
        VALID + "interface: 'eth0;reboot'\n",
        "interface: 'eth0;reboot' is not valid; expected a network interface name such as eth0 "
        "(letters, digits, _ . -, at most 15)",
    ),
    (
        VALID + "metrics: {listen: 9108}\n",
        "metrics.listen: 9108 is not valid; expected HOST:PORT such as 10.0.1.230:11211",
    ),
    (VALID + "connect_timeout_s: -1\n", "connect_timeout_s: -1 is not valid; expected a positive number of seconds"),
    (
        "engine: memcached\n  bad: [\n",
        "config: <config> line 2 column 6: invalid YAML: mapping values are not allowed here",
    ),
    ("", "config: the file is empty; see config.example.yaml for a complete example"),
    ("- a\n- b\n", "config: ['a', 'b'] is not valid; expected a mapping of keys"),
    (
        VALID.replace("engine: memcached", "engine: redis")
        + "auto_discovery: {port: 11210, target: cfg.example.com:11211}\n",
        "auto_discovery: only valid with engine memcached, not 'redis'",
    ),
    # Duplicate keys at any depth: YAML itself would keep the last one and silently drop the other.
    (
        VALID + "forwards:\n  - {port: 11213, target: 10.0.1.232:11211}\n",
        "forwards: duplicate key on lines 4 and 7; remove one of them",
    ),
    (
        VALID.replace(
            "  - {port: 11212, target: 10.0.1.231:11211}", "  - port: 11212\n    port: 11213\n    target: x:1"
        ),
        "forwards[1].port: duplicate key on lines 6 and 7; remove one of them",
    ),
    (
        VALID.replace("{port: 11211, target: 10.0.1.230:11211}", "{port: 11211, target: a:1, port: 11212}"),
        "forwards[0].port: duplicate key on line 5; remove one of them",
    ),
    (
        VALID + "metrics:\n  listen: 127.0.0.1:9108\n  'listen': 127.0.0.1:9109\n",
        "metrics.listen: duplicate key on lines 8 and 9; remove one of them",
    ),
    (
        "engine: memcached\n" + VALID,
        "engine: duplicate key on lines 1 and 2; remove one of them",
    ),
    (
        VALID + "workers: 2\ncpu_affinity: yes please\n",
        "cpu_affinity: 'yes please' is not valid; expected true or false",
    ),
    (
        VALID + "cpu_affinity: true\n",
        "cpu_affinity: needs workers of 2 or more (workers is 1: one worker takes every connection anyway); "
        "raise workers or remove cpu_affinity",
    ),
    # Before any validation: the duplicate is reported even when the key is unknown too.
    (
        VALID + "bogus: 1\nbogus: 2\n",
        "bogus: duplicate key on lines 7 and 8; remove one of them",
    ),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text)
    assert str(info.value) == message


def test_merge_keys_still_merge_and_may_be_overridden() -> None:
    # `<<` is not a duplicate of the keys it brings in, and an explicit key beside it overrides the merged one.
    text = VALID.replace(
        "  - {port: 11212, target: 10.0.1.231:11211}",
        "  - &second {port: 11212, target: 10.0.1.231:11211}\n  - <<: *second\n    port: 11213",
    )
    cfg = config.loads(text)
    assert [(f.port, str(f.target)) for f in cfg.forwards] == [
        (11211, "10.0.1.230:11211"),
        (11212, "10.0.1.231:11211"),
        (11213, "10.0.1.231:11211"),
    ]


def test_missing_file() -> None:
    with pytest.raises(config.ConfigError, match=r"config: '/nonexistent.yaml' does not exist; pass --config"):
        config.load("/nonexistent.yaml")


@pytest.mark.parametrize(
    "text",
    [VALID.replace("port: 11212", "port: 0"), VALID + "bogus: 1\n", "engine: [\n"],
)
def test_cli_exit_2_without_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "serve", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("natfwd: error: ")
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_debug_shows_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(VALID + "bogus: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "--debug", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_cli_usage_error_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "serve", "--bogus"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "natfwd: error: unrecognized arguments: --bogus" in proc.stderr


@pytest.mark.parametrize("command", ["serve", "check", "emit-iptables"])
def test_cli_duplicate_key_exit_2_without_traceback(tmp_path: Path, command: str) -> None:
    # Loopback addresses only: were the duplicate ever let through, `check` would probe these.
    path = tmp_path / "dup.yaml"
    path.write_text(
        "engine: memcached\n"
        "public_address: 127.0.0.1\n"
        "allowed_clients: [127.0.0.0/8]\n"
        "forwards:\n"
        f"  - port: {free_port()}\n"
        f"    target: 127.0.0.1:{free_port()}\n"
        f"    port: {free_port()}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"natfwd: error: {path}:7: forwards[0].port: duplicate key on lines 5 and 7; remove one of them\n"
    )
    assert proc.stdout == ""


@pytest.mark.parametrize("workers", [1, 2])  # one worker reloads itself; with more, the supervisor loads the file
def test_reload_with_a_duplicate_key_is_refused_counted_and_keeps_the_old_config(
    tmp_path: Path, start_memcached: Callable[..., Node], workers: int
) -> None:
    node = start_memcached()
    setter = Client(("127.0.0.1", node.port), timeout=5)
    setter.set("whoami", "node")
    setter.close()
    port, other_port, metrics_port = free_port(), free_port(), free_port()
    path = write_config(
        tmp_path / "natfwd.yaml",
        [(port, node.address)],
        extra=f"workers: {workers}\nmetrics: {{listen: 127.0.0.1:{metrics_port}}}\n",
    )
    good = path.read_text()

    def whoami(listen_port: int) -> object:
        client = Client(("127.0.0.1", listen_port), connect_timeout=5, timeout=5)
        try:
            return client.get("whoami")
        finally:
            client.close()

    with serving(path, [port], metrics_port) as serve:
        # Last-one-wins would move the forward from `port` to `other_port`.
        path.write_text(good + f"forwards:\n  - {{port: {other_port}, target: '{node.address}'}}\n")
        serve.signal(signal.SIGHUP)
        serve.wait_log("reload refused")
        assert "forwards: duplicate key on lines 6 and 10; remove one of them" in serve.log()
        assert serve.metric("natfwd_config_reloads_total", result="failure") == 1
        assert whoami(port) == b"node"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", other_port), timeout=2)

        # The same reload without the duplicate goes through, so the refusal above was the duplicate's doing.
        path.write_text(good.replace(f"port: {port},", f"port: {other_port},"))
        serve.signal(signal.SIGHUP)
        serve.wait_log("config reloaded")
        assert serve.metric("natfwd_config_reloads_total", result="success") == 1
        assert whoami(other_port) == b"node"
        assert serve.proc.poll() is None


MANY_MISTAKES = """\
engine: memcached
public_address: 203.0.113.73
allowed_clients: [198.51.100.27/32, 10.0.0.0/33]
forwards:
  - {port: 11211, target: 10.0.1.230:11211}
  - port: 70000
    target: 10.0.1.231
  - {port: 11213, tagret: 10.0.1.232:11211}
workrs: 2
connect_timeout_s: -1
"""


def test_every_mistake_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "natfwd.yaml"
    path.write_text(MANY_MISTAKES)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert info.value.problems == (
        f"{path}:3: allowed_clients[1]: '10.0.0.0/33' is not valid; expected a CIDR such as 198.51.100.27/32 "
        "('10.0.0.0/33' does not appear to be an IPv4 or IPv6 network)",
        f"{path}:6: forwards[1].port: 70000 is not valid; expected an integer port from 1 to 65535",
        f"{path}:7: forwards[1].target: '10.0.1.231' is not valid; expected HOST:PORT such as 10.0.1.230:11211 "
        "(IPv6 as [::1]:11211)",
        f"{path}:8: forwards[2].tagret: unknown key (did you mean target?); valid keys here are: port, target",
        f"{path}:8: forwards[2].target: missing is not valid; expected HOST:PORT such as 10.0.1.230:11211",
        f"{path}:9: workrs: unknown key (did you mean workers?); valid keys here are: " + ", ".join(config._TOP_KEYS),
        f"{path}:10: connect_timeout_s: -1 is not valid; expected a positive number of seconds",
    )
    # The CLI prints every one of them, each as its own error line, and exits 2.
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "check", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr == "".join(f"natfwd: error: {problem}\n" for problem in info.value.problems)


def test_invalid_yaml_is_reported_as_file_line_column(tmp_path: Path) -> None:
    path = tmp_path / "natfwd.yaml"
    path.write_text("engine: memcached\n  bad: [\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}:2:6: invalid YAML: mapping values are not allowed here"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("tls:\n#  cert: /etc/natfwd/server.pem\n#  key: /etc/natfwd/server.key\n",
         "tls: is empty (are all its entries commented out?); give cert and key, or remove the tls key to serve "
         "without TLS"),
        ("upstream_tls:\n#  ca: /etc/natfwd/ca.pem\n",
         "upstream_tls: is empty (are all its entries commented out?); write `upstream_tls: {}` to verify the nodes "
         "against the system CA store, or remove the key"),
    ],
)  # fmt: skip
def test_an_empty_tls_section_is_an_error(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(VALID + section)
    assert str(info.value) == message
    assert config.loads(VALID + "upstream_tls: {}\n").upstream_tls == config.UpstreamTLS(ca=None)
    path = tmp_path / "natfwd.yaml"
    path.write_text(VALID + section)
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "emit-iptables", "--config", str(path)], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"natfwd: error: {path}:7: {message}\n"


def test_access_log_is_off_unless_asked_for() -> None:
    assert config.loads(VALID).access_log is False
    assert config.loads(VALID + "access_log: true\n").access_log is True
    with pytest.raises(config.ConfigError, match=r"^access_log: 'yes please' is not valid; expected true or false$"):
        config.loads(VALID + "access_log: yes please\n")


def test_warnings_for_a_wide_allowlist_and_metrics_off_loopback() -> None:
    assert config.warnings(config.loads(VALID + "metrics: {listen: 127.0.0.1:9108}\n")) == []
    wide = VALID.replace("[198.51.100.27/32]", "[198.51.100.27/32, 0.0.0.0/0, 10.0.0.0/8]")
    cfg = config.loads(wide + "metrics: {listen: 0.0.0.0:9108}\n")
    assert config.warnings(cfg) == [
        "allowed_clients[1]: 0.0.0.0/0 is wider than /8 and lets in 4,294,967,296 addresses; list the trusted "
        "clients' networks instead",
        "metrics.listen: 0.0.0.0:9108 is not a loopback address, so /metrics (no authentication) is reachable from "
        "the network; bind 127.0.0.1 unless a firewall keeps it private",
    ]
