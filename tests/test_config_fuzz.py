"""Config fuzzing: seeded mutations of a valid config give a ConfigError of one line per problem (exit 2), never a
traceback or a server."""

from __future__ import annotations

import copy
import math
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_ports
from reliakit import REPO, natfwd_argv, natfwd_env

from forwarder import config

SEED = 20240607
STRUCTURAL = 300
TEXTUAL = 300
CLI_SAMPLE = 16


def base_config(ports: list[int]) -> dict[str, Any]:
    """A valid config that uses every key, so every key can be mutated."""
    *forward_ports, discovery_port, metrics_port = ports
    return {
        "engine": "memcached",
        "public_address": "203.0.113.73",
        "listen_address": "127.0.0.1",
        "interface": "eth0",
        "allowed_clients": ["198.51.100.27/32", "127.0.0.0/8"],
        "forwards": [{"port": port, "target": f"10.0.1.{230 + i}:11211"} for i, port in enumerate(forward_ports)],
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "workers": 1,
        "connect_timeout_s": 5,
        "idle_timeout_s": 3600,
        "drain_timeout_s": 30,
        "max_connections": 10000,
        "auto_discovery": {"port": discovery_port, "target": "mycluster.abc.cfg.use1.cache.amazonaws.com:11211"},
        "discovery": {
            "cluster_id": "mycluster",
            "region": "us-east-1",
            "refresh_s": 30,
            "first_port": 11211,
            "endpoint_url": "http://127.0.0.1:5000",
        },
        "tls": {"cert": "/etc/natfwd/server.pem", "key": "/etc/natfwd/server.key", "client_ca": "/etc/natfwd/ca.pem"},
        "upstream_tls": {"ca": "/etc/natfwd/nodes-ca.pem"},
        "auth": {"username": "natfwd", "password": "an-auth-token"},
    }


NAN, INF = float("nan"), float("inf")
BAD_SECONDS: list[Any] = [-1, -0.5, "5s", "", True, [], {}, NAN, -INF]
BAD_PORTS: list[Any] = [0, -1, 65536, 10**30, "11211", 1.5, True, [], {}, "port"]
BAD_HOST_PORTS: list[Any] = [
    "10.0.1.230", "10.0.1.230:", ":11211", "10.0.1.230:0", "10.0.1.230:65536", "10.0.1.230:port", "::1:11211",
    "[::1]11211", "bad host:11211", "a;reboot:1", "x" * 300 + ":1", 11211, True, [], {}, "10.0.1.230:-1",
]  # fmt: skip
BAD_HOSTS: list[Any] = ["", "bad host", "a;reboot", "-leading.dash", "x" * 300, "ünï.example", 12, [], {}, True]
BAD_PATHS: list[Any] = ["", 5, [], {}, True]

# key path -> values that must each be refused with a message naming that key path.
BAD_VALUES: dict[str, list[Any]] = {
    "engine": ["mongodb", "", "MEMCACHED", 1, True, [], {}],
    "public_address": BAD_HOSTS,
    "listen_address": ["example.com", "", "0.0.0.0/0", "256.1.1.1", 5, 0, True, [], {}],
    "interface": ["", "eth 0", "x" * 16, "eth0;reboot", 3, [], {}, True],
    "allowed_clients": [[], "198.51.100.27/32", {}, 5, True],
    "allowed_clients[0]": ["198.51.100.27/33", "198.51.100.27/24", "x", "", 5, [], {}, None],
    "forwards": [[], {}, "11211", 5, True],
    "forwards[0]": ["11211", 5, [], None],
    "forwards[1].port": [*BAD_PORTS, "FORWARD_PORT"],
    "forwards[1].target": BAD_HOST_PORTS,
    "metrics": ["127.0.0.1:9108", 9108, [], True],
    "metrics.listen": [*BAD_HOST_PORTS, "FORWARD_PORT"],
    "workers": [0, 257, -1, "many", "", 1.5, True, []],
    "connect_timeout_s": [*BAD_SECONDS, 0],
    "idle_timeout_s": BAD_SECONDS,
    "drain_timeout_s": BAD_SECONDS,
    "max_connections": [0, -5, 1.5, "lots", "", True, [], NAN],
    "auto_discovery": ["11210", 5, [], True],
    "auto_discovery.port": [*BAD_PORTS, "FORWARD_PORT"],
    "auto_discovery.target": BAD_HOST_PORTS,
    "discovery": ["mycluster", 5, [], True],
    "discovery.cluster_id": ["bad id!", "", "x" * 65, 5, [], True],
    "discovery.region": ["mars", "US-EAST-1", "", 5, [], True],
    "discovery.refresh_s": [*BAD_SECONDS, 0],
    "discovery.first_port": BAD_PORTS,
    "discovery.endpoint_url": ["ftp://example.com", "example.com", "", 5, [], True],
    "tls": ["on", 5, [], True],
    "tls.cert": BAD_PATHS,
    "tls.key": BAD_PATHS,
    "tls.client_ca": BAD_PATHS,
    "upstream_tls": ["on", 5, [], False],
    "upstream_tls.ca": BAD_PATHS,
    "auth": ["token", 5, [], True],
    "auth.password": ["", 5, [], True],
    "auth.username": [5, [], {}, True],
}
REQUIRED = [
    "engine", "public_address", "allowed_clients", "forwards[0].port", "forwards[1].target", "metrics.listen",
    "auto_discovery.port", "auto_discovery.target", "discovery.cluster_id", "tls.cert", "tls.key", "auth.password",
]  # fmt: skip
MAPPINGS = ["", "forwards[0]", "forwards[1]", "metrics", "auto_discovery", "discovery", "tls", "upstream_tls", "auth"]
UNKNOWN_KEYS: list[Any] = [
    "listen_adress", "port_", "bogus", "Engine", "timeout", "x" * 200, "a\nb", "tab\there", "\x07bell", "ünïcode",
    "", 5, 1.5, True, None,
]  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    """One mutated config document and the key path its error message must start with."""

    what: str
    document: object
    path: str


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in path.replace("[", ".[").split("."):
        if part:
            steps.append(int(part[1:-1]) if part.startswith("[") else part)
    return steps


def _parent(document: Any, path: str) -> tuple[Any, str | int]:
    *head, last = _steps(path)
    node = document
    for step in head:
        node = node[step]
    return node, last


def structural_mutations(ports: list[int], rng: random.Random) -> Iterator[Mutation]:
    """Mutations that each make exactly one key invalid, so the error must name that key."""
    forward_port = ports[0]
    kinds = ("bad value", "missing", "unknown key")
    while True:
        document = base_config(ports)
        kind = rng.choice(kinds)
        if kind == "bad value":
            path = rng.choice(sorted(BAD_VALUES))
            value = copy.deepcopy(rng.choice(BAD_VALUES[path]))
            if value == "FORWARD_PORT":  # valid alone, but it clashes with forwards[0]
                value = f"127.0.0.1:{forward_port}" if path == "metrics.listen" else forward_port
            parent, last = _parent(document, path)
            parent[last] = value
            yield Mutation(f"{path} = {value!r}", document, path)
        elif kind == "missing":
            path = rng.choice(REQUIRED)
            parent, last = _parent(document, path)
            del parent[last]
            yield Mutation(f"{path} deleted", document, path)
        else:
            where = rng.choice(MAPPINGS)
            key = rng.choice(UNKNOWN_KEYS)
            parent = document
            if where:
                parent, last = _parent(document, where)
                parent = parent[last]
            parent[key] = rng.choice(["x", 1, None, [1], {"a": 1}])
            yield Mutation(f"{where or 'top'} gets unknown key {key!r}", document, where or "")


JUNK = [":", "-", "- ", "[", "]", "{", "}", ",", "#", "&a ", "*a", "*nope", "!!python/object/apply:os.system [id]",
        "!!binary ", "\t", "\x00", "\x1b", "\ufeff", "'", '"', "|", ">", "? ", "%YAML 1.1\n", "---\n", "...\n", "\\",
        "é", "\U0001f600", "\r", "  ", "\n", "null", "~", ".nan", "-.inf", "0x1F", "0o17", "1e3", "2001-12-14",
        "<<: *a\n", "yes", "no"]  # fmt: skip


def text_mutation(text: str, rng: random.Random) -> tuple[str, str]:
    """A random edit of the YAML text; the result may still be valid."""
    if not text:
        return rng.choice(JUNK), "junk only"
    lines = text.splitlines(keepends=True)
    kind = rng.randrange(8)
    if kind == 0:
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(JUNK) + text[at:], f"junk inserted at {at}"
    if kind == 1:
        at = rng.randrange(len(text))
        char = chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 32), rng.randrange(128, 0x3000)]))
        return text[:at] + char + text[at + 1 :], f"character {at} replaced"
    if kind == 2:
        at = rng.randrange(len(text))
        return text[:at] + text[at + rng.randint(1, 40) :], f"span deleted at {at}"
    if kind == 3:
        return text[: rng.randrange(len(text))], "truncated"
    if kind == 4:
        i = rng.randrange(len(lines))
        return "".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :]), f"line {i + 1} duplicated"
    if kind == 5:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return "".join(lines), f"lines {i + 1} and {j + 1} swapped"
    if kind == 6:
        i = rng.randrange(len(lines))
        shift = rng.choice([" ", "  ", "    ", "\t"])
        lines[i] = shift + lines[i] if rng.random() < 0.5 else lines[i].lstrip()
        return "".join(lines), f"line {i + 1} re-indented"
    out = text
    for _ in range(rng.randint(2, 6)):
        out, _what = text_mutation(out, rng)
    return out, "several edits"


def dump(document: object) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def assert_one_line(message: str, what: str) -> None:
    assert message and "\n" not in message and "\r" not in message, f"{what}: message is not one line: {message!r}"
    assert "Traceback" not in message, what


def assert_problems(error: config.ConfigError, what: str) -> None:
    """Every problem a ConfigError reports is one line, and the message is those lines."""
    assert error.problems and str(error) == "\n".join(error.problems), what
    for problem in error.problems:
        assert_one_line(problem, what)


def _ports() -> list[int]:
    return free_ports(4)


# --- in-process ---------------------------------------------------------------------------------------------------


def test_base_config_is_valid() -> None:
    cfg = config.loads(dump(base_config(_ports())))
    assert len(cfg.forwards) == 2 and cfg.tls is not None and cfg.discovery is not None and cfg.auth is not None


def test_structural_mutations_are_refused_naming_the_key() -> None:
    rng = random.Random(SEED)
    mutations = structural_mutations(_ports(), rng)
    seen: set[str] = set()
    for _ in range(STRUCTURAL):
        mutation = next(mutations)
        with pytest.raises(config.ConfigError) as caught:
            config.loads(dump(mutation.document))
        assert_problems(caught.value, mutation.what)
        if mutation.path:
            named = [p for p in caught.value.problems if p.startswith((mutation.path + ":", mutation.path + "."))]
        else:
            named = [p for p in caught.value.problems if ": unknown key" in p]
        assert named, (mutation.what, caught.value.problems)
        message = named[0]
        assert "expected" in message or "valid keys" in message or "already used" in message or "pick" in message, (
            mutation.what,
            message,
        )
        seen.add(mutation.what.split(" ")[0])
    assert len(seen) > 30  # the seed really spread over the keys


def test_text_mutations_give_a_config_or_one_config_error() -> None:
    rng = random.Random(SEED + 1)
    text = dump(base_config(_ports()))
    refused = 0
    for _ in range(TEXTUAL):
        mutated, what = text_mutation(text, rng)
        try:
            config.loads(mutated)
        except config.ConfigError as exc:
            refused += 1
            assert_problems(exc, what)
        # Any other exception escapes and fails the test: that would be a traceback for the user.
    assert refused > TEXTUAL // 3, f"only {refused} of {TEXTUAL} text mutations were refused: the fuzzer is too tame"


# Six levels of nine aliases each: 9**6 lists if a loader expanded them, 226 characters of YAML.
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]\n" for below, name in zip("abcde", "bcdef", strict=True)
)
# The loader makes 8 to 110 calls per character of these documents (Python and C functions alike).
CALLS_PER_CHARACTER = 200
CALLS_BASE = 5000


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("[" * 5000 + "]" * 5000, "config: <config>"),
        ("forwards: " + "{a: " * 3000 + "1" + "}" * 3000, "config: <config>"),
        (LAUGHS, "a: unknown key"),
        ("engine: !!python/object/apply:os.system ['touch /tmp/natfwd-fuzz-pwned']\n", "config: <config>"),
        ("? [1, 2]\n: x\n", "config: <config>"),
        ("\x00", "config: <config>"),
        ("", "config: the file is empty"),
        ("42", "config: 42 is not valid"),
        ("- a\n- b\n", "config: ['a', 'b'] is not valid"),
    ],
)  # fmt: skip
def test_hostile_documents_are_refused_with_work_linear_in_their_size(text: str, start: str) -> None:
    calls = 0

    def count(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        with pytest.raises(config.ConfigError) as caught:
            config.loads(text)
    finally:
        sys.setprofile(None)
    # Function calls measure the loader's work whatever the machine's load: no document may make it expand aliases
    # (LAUGHS stands for 9**6 lists if expanded) or recurse without bound.
    assert calls <= CALLS_PER_CHARACTER * len(text) + CALLS_BASE, f"{calls} calls for {len(text)} characters"
    assert str(caught.value).startswith(start)
    assert_problems(caught.value, text[:40])
    assert not Path("/tmp/natfwd-fuzz-pwned").exists()


def test_nan_seconds_are_refused() -> None:
    # NaN passes `< 0` and `== 0`; uvloop then fails every connection with "cannot convert float NaN to integer".
    text = dump(base_config(_ports()))
    for key in ("connect_timeout_s", "idle_timeout_s", "drain_timeout_s"):
        with pytest.raises(config.ConfigError, match=rf"^{key}: nan is not valid"):
            config.loads(text.replace(f"{key}: ", f"{key}: .nan #", 1))
    assert not math.isnan(config.loads(text).connect_timeout_s)


# --- through the CLI ----------------------------------------------------------------------------------------------


def _listening(ports: list[int]) -> list[int]:
    up = []
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                up.append(port)
    return up


def test_cli_sample_exits_2_with_one_line_and_never_binds(tmp_path: Path) -> None:
    ports = _ports()
    rng = random.Random(SEED + 2)
    mutations = structural_mutations(ports, rng)
    text = dump(base_config(ports))
    files: list[tuple[Path, str]] = []
    for index in range(CLI_SAMPLE):
        if index % 2 == 0:
            mutation = next(mutations)
            body, what = dump(mutation.document), mutation.what
        else:
            while True:
                body, what = text_mutation(text, rng)
                try:
                    config.loads(body)
                except config.ConfigError:
                    break
        path = tmp_path / f"mutation-{index}.yaml"
        path.write_text(body, encoding="utf-8")
        files.append((path, what))
    not_utf8 = tmp_path / "not-utf8.yaml"
    not_utf8.write_bytes(text.encode().replace(b"memcached", b"memc\xff\xfeached", 1))
    files += [(not_utf8, "invalid UTF-8"), (tmp_path / "missing.yaml", "no such file"), (tmp_path, "a directory")]

    processes = [
        (
            subprocess.Popen(
                natfwd_argv("serve", "--config", str(path)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=natfwd_env(),
                cwd=REPO,
            ),
            path,
            what,
        )
        for path, what in files
    ]
    try:
        deadline = time.monotonic() + 60
        while any(process.poll() is None for process, _, _ in processes):
            # A started server would bind and listen on these; none may, not even briefly.
            assert not _listening(ports), "a mutated config started a server"
            assert time.monotonic() < deadline, "a mutated config did not exit: it is serving"
            time.sleep(0.02)
        for process, path, what in processes:
            stdout, stderr = process.communicate()
            expected = _in_process_error(path)
            assert process.returncode == 2, (what, stderr)
            assert stdout == b"", what
            assert stderr.decode() == "".join(f"natfwd: error: {line}\n" for line in expected), (what, stderr)
    finally:
        for process, _, _ in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def _in_process_error(path: Path) -> tuple[str, ...]:
    try:
        config.load(path)
    except config.ConfigError as exc:
        return exc.problems
    raise AssertionError(f"{path} is a valid config; the CLI sample must hold only invalid ones")
