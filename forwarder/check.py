"""Probes for `natfwd check`: memcached `version` or Redis `PING` through every forward, with latency."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from forwarder.config import Auth, Config, ConfigError

Kind = Literal["memcached", "redis", "discovery"]
_MAX_REPLY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Probe:
    """One thing to dial: the forward's listen port, its target, and the address actually dialled."""

    port: int
    target: str
    host: str
    dial_port: int
    kind: Kind
    tls_hostname: str | None  # None: plain TCP

    @property
    def label(self) -> str:
        return f"{self.port} (auto_discovery)" if self.kind == "discovery" else str(self.port)


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one probe: `detail` is the server's answer when ok, else the reason it failed."""

    probe: Probe
    ok: bool
    detail: str
    latency_ms: float


def plan(config: Config, direct: bool = False) -> tuple[Probe, ...]:
    """The probes for `config`: through public_address, or (direct) to each target; raises ConfigError if none."""
    if not config.forwards:
        raise ConfigError(
            "forwards: empty; discovery builds forwards only at runtime, so there is nothing to check; list forwards"
        )
    kind: Kind = "memcached" if config.engine == "memcached" else "redis"
    tls_on = config.upstream_tls is not None if direct else config.tls is not None
    probes = []
    for forward in config.forwards:
        host, dial_port = (
            (forward.target.host, forward.target.port) if direct else (config.public_address, forward.port)
        )
        probes.append(Probe(forward.port, str(forward.target), host, dial_port, kind, host if tls_on else None))
    if config.auto_discovery is not None:
        ad = config.auto_discovery
        host, dial_port = (ad.target.host, ad.target.port) if direct else (config.public_address, ad.port)
        probes.append(Probe(ad.port, str(ad.target), host, dial_port, "discovery", host if tls_on else None))
    return tuple(probes)


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def requests(kind: Kind, auth: Auth | None) -> list[tuple[str, bytes]]:
    """The (command name, request bytes) a probe sends, in order; each gets one reply."""
    if kind == "memcached":
        return [("version", b"version\r\n")]
    if kind == "discovery":
        return [("config get cluster", b"config get cluster\r\n")]
    steps: list[tuple[str, bytes]] = []
    if auth is not None:
        credentials = (auth.username, auth.password) if auth.username else (auth.password,)
        steps.append(("AUTH", _resp("AUTH", *credentials)))
    steps.append(("PING", _resp("PING")))
    return steps


def judge(kind: Kind, command: str, reply: bytes) -> tuple[bool, str]:
    """Whether `reply` to `command` is healthy, and what to print about it (the answer, or the reason)."""
    text = reply.decode("utf-8", "replace").strip()
    first = text.splitlines()[0] if text else ""
    if kind == "memcached":
        if first.startswith("VERSION "):
            return True, "memcached " + first.removeprefix("VERSION ")
        return False, f"unexpected reply to version: {first[:80]!r}"
    if kind == "discovery":
        if first.startswith("CONFIG cluster"):
            lines = text.splitlines()
            nodes = len(lines[2].split()) if len(lines) > 2 else 0
            return True, f"config version {lines[1] if len(lines) > 1 else '?'}, {nodes} node(s)"
        return False, f"unexpected reply to config get cluster: {first[:80]!r} (is it a configuration endpoint?)"
    expected = "+OK" if command == "AUTH" else "+PONG"
    if first == expected:
        return True, first[1:]
    if first.startswith("-"):
        hint = " (set auth in the config)" if first.startswith("-NOAUTH") else ""
        return False, f"{command} rejected: {first[1:80]}{hint}"
    return False, f"unexpected reply to {command}: {first[:80]!r}"


def _complete(kind: Kind, data: bytes) -> bool:
    if not data.endswith(b"\r\n"):
        return False
    if kind == "discovery" and data.startswith(b"CONFIG"):
        return data.endswith(b"END\r\n")
    return True


def _tls_context(config: Config, direct: bool) -> ssl.SSLContext:
    if direct:
        ca = config.upstream_tls.ca if config.upstream_tls else None
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    context = ssl.create_default_context()
    if config.tls is not None:
        # The front's own certificate, when this host has the file, is a trust anchor: self-signed, or a CA-issued
        # leaf (PARTIAL_CHAIN lets a leaf anchor verification). Absent on the client, the system store decides.
        with contextlib.suppress(OSError, ssl.SSLError):
            context.load_verify_locations(cafile=str(config.tls.cert))
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


async def _exchange(probe: Probe, steps: Sequence[tuple[str, bytes]], context: ssl.SSLContext | None) -> str:
    reader, writer = await asyncio.open_connection(
        probe.host, probe.dial_port, ssl=context, server_hostname=probe.tls_hostname if context else None
    )
    try:
        detail = ""
        for command, request in steps:
            writer.write(request)
            data = b""
            while not _complete(probe.kind, data):
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("connection closed by the server")
                data += chunk
                if len(data) > _MAX_REPLY_BYTES:
                    raise ConnectionError("reply too large")
            ok, detail = judge(probe.kind, command, data)
            if not ok:
                raise _Rejected(detail)
        return detail
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


class _Rejected(Exception):
    pass


def _reason(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.errno else str(exc)
    return str(exc) or type(exc).__name__


async def _probe(probe: Probe, auth: Auth | None, context: ssl.SSLContext | None, timeout_s: float) -> Result:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            detail = await _exchange(probe, requests(probe.kind, auth), context)
    except _Rejected as exc:
        return Result(probe, False, str(exc), (time.perf_counter() - start) * 1000)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Result(probe, False, _reason(exc, timeout_s), (time.perf_counter() - start) * 1000)
    return Result(probe, True, detail, (time.perf_counter() - start) * 1000)


async def _run_all(config: Config, probes: Sequence[Probe], direct: bool, timeout_s: float) -> list[Result]:
    context = _tls_context(config, direct) if any(p.tls_hostname for p in probes) else None
    auth = config.auth if config.engine != "memcached" else None
    return list(await asyncio.gather(*(_probe(p, auth, context, timeout_s) for p in probes)))


def run(config: Config, direct: bool = False, timeout_s: float = 3.0) -> list[Result]:
    """Probe every forward concurrently, in the calling thread (so in its network namespace).

    Never raises for an unreachable forward: that is a failed Result. Raises ConfigError if there is nothing
    to probe or the timeout is not positive.
    """
    if not timeout_s > 0:
        raise ConfigError(f"--timeout: {timeout_s!r} is not valid; expected a positive number of seconds")
    probes = plan(config, direct)
    return asyncio.run(_run_all(config, probes, direct, timeout_s))


def format_result(result: Result) -> str:
    """One line: port, target, ok or FAIL with the reason, latency in ms (and what answered)."""
    p = result.probe
    head = f"{p.label:<6} {p.target:<21}"
    if result.ok:
        return f"{head} ok  {result.latency_ms:.2f} ms  ({result.detail})"
    return f"{head} FAIL {result.detail}  {result.latency_ms:.2f} ms"


def summary(results: Sequence[Result]) -> str | None:
    """The error line when any probe failed, naming the failing forwards; None when all passed."""
    failed = [r.probe.label for r in results if not r.ok]
    if not failed:
        return None
    return f"{len(failed)} of {len(results)} forward(s) failed: {', '.join(failed)}"
