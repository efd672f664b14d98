"""`python benchmarks/failover.py [--repetitions N]`: how long a retrying client is cut off when the NAT fails over.

Each repetition builds a fresh failover lab (forwarder/labfailover.py): memcached (or redis-server) nodes,
natfwd serve in the active NAT namespace, and a pymemcache (or redis-py) client in the client namespace that
sets a key continuously, with a short connect timeout, and reconnects on any failure. The active NAT then dies
(public link down, natfwd SIGKILLed) and the standby takes the public address: `warm` with natfwd already
running there, `cold` with natfwd started after the address is claimed, as a replacement instance does. The
figure is the time from the death to the first reply on a connection opened after it, which can only have gone
through the standby. Prints the median and maximum of each mode; writes nothing. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a fresh checkout

import redis  # noqa: E402
from pymemcache.client.base import Client  # type: ignore[import-untyped]  # noqa: E402
from pymemcache.exceptions import MemcacheError  # type: ignore[import-untyped]  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from forwarder import netns  # noqa: E402
from forwarder.errors import NatfwdError  # noqa: E402
from forwarder.lab import PUBLIC_ADDRESS, LabEngine  # noqa: E402
from forwarder.labfailover import FailoverLab, Takeover  # noqa: E402

Mode = Literal["warm", "cold"]
MODES: tuple[Mode, ...] = ("warm", "cold")
KEY = "failover:counter"
CONNECT_TIMEOUT_S = 0.25  # a SYN into a dead path is retried with a new connection this soon
TIMEOUT_S = 1.0  # a request on a connection whose path died; TCP retransmits reach the new holder sooner
PAUSE_S = 0.01  # between requests, and after a failure, so the client does not spin a core
HANG_S = 60.0  # stops a hang (no success at all); never a pass/fail bound on the measured time


class KV(Protocol):
    def set(self, key: str, value: str) -> Any: ...
    def get(self, key: str) -> Any: ...
    def close(self) -> None: ...


def kv_client(engine: LabEngine, host: str, port: int) -> KV:
    """A pymemcache or redis-py client with the short timeouts, which connects at its first request."""
    if engine == "redis":
        # No retries inside redis-py: the loop below retries, with a new connection, and counts the failures.
        return redis.Redis(
            host, port, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )
    return cast(KV, Client((host, port), connect_timeout=CONNECT_TIMEOUT_S, timeout=TIMEOUT_S, default_noreply=False))


class RetryingClient(threading.Thread):
    """A pymemcache or redis-py client in the client namespace: sets KEY to 0, 1, 2... and reconnects on any failure.

    Each success is recorded with the time its connection was opened, so a success on a connection opened after
    a moment is known to have taken the path of that moment.
    """

    def __init__(self, namespace: str, port: int, engine: LabEngine = "memcached") -> None:
        super().__init__(name=f"failover-client-{namespace}", daemon=True)
        self.namespace = namespace
        self.engine: LabEngine = engine
        self.port = port
        self.successes: list[tuple[float, float]] = []  # (replied at, connection opened at), time.monotonic()
        self.failures = 0
        self.acknowledged = -1  # the last value the server confirmed storing
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            # The thread stays in the namespace, so every reconnect (pymemcache connects lazily) is made there.
            with netns.entered(self.namespace):
                self._loop()
        except BaseException as exc:  # reported by stop(); a thread's exception would only be printed
            self.error = exc

    def _loop(self) -> None:
        client: KV | None = None
        opened_at = 0.0
        value = 0
        while not self._halt.is_set():
            if client is None:
                client = kv_client(self.engine, PUBLIC_ADDRESS, self.port)
                opened_at = time.monotonic()
            try:
                if client.set(KEY, str(value)) is not True:
                    raise MemcacheError(f"set {KEY} was not stored")
            except (OSError, MemcacheError, redis.RedisError):
                client.close()
                client = None
                self.failures += 1
            else:
                self.successes.append((time.monotonic(), opened_at))
                self.acknowledged = value
                value += 1
            time.sleep(PAUSE_S)
        if client is not None:
            client.close()

    def first_success_after(self, moment: float) -> float | None:
        """When the first reply came on a connection opened after `moment`, or None yet."""
        for replied_at, opened_at in self.successes:
            if opened_at > moment:
                return replied_at
        return None

    def wait_for(self, condition: str, predicate: Callable[[], bool], timeout_s: float = HANG_S) -> None:
        """Wait until `predicate()` is truthy; raises NatfwdError naming `condition` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.error is not None:
                raise NatfwdError(f"the client failed: {self.error!r}")
            if time.monotonic() >= deadline:
                raise NatfwdError(f"{condition} did not happen within {timeout_s:g} s ({self.failures} failures)")
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop and join the thread; raises what the thread raised, if anything."""
        self._halt.set()
        self.join(HANG_S)
        if self.error is not None:
            raise NatfwdError(f"the client failed: {self.error!r}")


@dataclass(frozen=True, slots=True)
class Failover:
    """One failover, in seconds after the active NAT died."""

    mode: Mode
    address_s: float  # the standby holds and has announced the address
    listening_s: float  # natfwd in the standby listens on every public port
    first_reply_s: float  # the client's first reply through the standby
    failures: int  # the client's failed requests and connects meanwhile


@dataclass(slots=True)
class Stage:
    """A running failover lab: natfwd in the active NAT (and in the standby if warm), and the retrying client."""

    lab: FailoverLab
    config_path: Path
    log_dir: Path
    mode: Mode
    standby_serve: subprocess.Popen[bytes] | None = None
    client: RetryingClient | None = None


@contextmanager
def staged(mode: Mode, name: str, log_dir: Path, engine: LabEngine = "memcached") -> Iterator[Stage]:
    """Build a failover lab `name`, start nodes, natfwd and the client; torn down on exit, even on failure."""
    lab = FailoverLab(name, engine, log_dir=log_dir)
    stage = Stage(lab, log_dir / "natfwd.yaml", log_dir, mode)
    try:
        lab.build()
        lab.start_nodes()
        stage.config_path.write_text(lab.config_text(), encoding="utf-8")
        active_log = log_dir / "serve-nat1.log"
        active = lab.start_serve(lab.nat, stage.config_path, active_log)
        if mode == "warm":
            standby_log = log_dir / "serve-nat2.log"
            standby = lab.start_serve(lab.standby, stage.config_path, standby_log)
            lab.wait_serving(lab.standby, standby, standby_log)
            stage.standby_serve = standby
        lab.wait_serving(lab.nat, active, active_log)
        client = stage.client = RetryingClient(lab.client, lab.nodes[0].public_port, engine)
        client.start()
        client.wait_for("20 replies through the active NAT", lambda: len(client.successes) >= 20)
        yield stage
    finally:
        try:
            if stage.client is not None and stage.client.is_alive():
                stage.client.stop()
        finally:
            lab.teardown()


def fail_over(stage: Stage) -> Failover:
    """Kill the active NAT, move the address to the standby, and wait for the client's first reply through it."""
    lab, client = stage.lab, stage.client
    assert client is not None
    died_at = time.monotonic()
    lab.fail(lab.nat)
    if stage.mode == "warm":
        takeover: Takeover = lab.take_over(lab.standby, serving=stage.standby_serve)
    else:
        takeover = lab.take_over(lab.standby, cold=(stage.config_path, stage.log_dir / "serve-nat2.log"))
    client.wait_for("a reply through the standby NAT", lambda: client.first_success_after(died_at) is not None)
    replied_at = client.first_success_after(died_at)
    assert replied_at is not None
    return Failover(
        stage.mode,
        takeover.address_at - died_at,
        takeover.listening_at - died_at,
        replied_at - died_at,
        client.failures,
    )


def measure(mode: Mode, engine: LabEngine = "memcached") -> Failover:
    """One failover in a fresh lab with a name of its own."""
    name = f"fo{secrets.token_hex(4)}"
    with (
        tempfile.TemporaryDirectory(prefix="natfwd-failover-") as tmp,
        staged(mode, name, Path(tmp), engine) as stage,
    ):
        return fail_over(stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repetitions", type=int, default=10, help="failovers per mode")
    parser.add_argument("--modes", default="warm,cold", help="comma-separated: warm, cold")
    parser.add_argument("--engine", choices=("memcached", "redis"), default="memcached", help="nodes and client")
    args = parser.parse_args(argv)
    modes = [m for m in MODES if m in args.modes.split(",")]
    if args.repetitions < 1 or not modes or set(args.modes.split(",")) - set(MODES):
        parser.error("--repetitions must be at least 1 and --modes a list of warm, cold")
    results: dict[str, list[Failover]] = {m: [] for m in modes}
    try:
        for repetition in range(args.repetitions):
            for mode in modes:  # interleaved, so drift in the machine's load hits both modes alike
                run = measure(mode, args.engine)
                results[mode].append(run)
                print(
                    f"{mode} {repetition + 1}/{args.repetitions}: first reply {run.first_reply_s * 1000:.0f} ms "
                    f"(address {run.address_s * 1000:.0f} ms, listening {run.listening_s * 1000:.0f} ms, "
                    f"{run.failures} failures)",
                    file=sys.stderr,
                )
    except NatfwdError as exc:
        print(f"failover: error: {exc}", file=sys.stderr)
        return 1
    print("| mode | N | first reply median | first reply max | natfwd listening median | failed requests median |")
    print("|---|---|---|---|---|---|")
    for shown, runs in results.items():
        replies = [r.first_reply_s * 1000 for r in runs]
        listening = [r.listening_s * 1000 for r in runs]
        print(
            f"| {shown} | {len(runs)} | {statistics.median(replies):.0f} ms | {max(replies):.0f} ms "
            f"| {statistics.median(listening):.0f} ms | {statistics.median(r.failures for r in runs):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
