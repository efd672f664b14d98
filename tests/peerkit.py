"""Run redis-py's and pymemcache's own test suites, fetched by scripts/peer-suites, as subprocesses, and read their
junit reports."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from conftest import IN_CI, Node, free_port, require_binary, wait_port

ROOT = Path(__file__).resolve().parent.parent

# The peer suites read these; natfwd's own pytest must not hand them its options or plugins, nor tell them they run
# in a pytest-xdist worker (PYTEST_XDIST_WORKER and the like).
_SCRUBBED_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONWARNINGS", "PYTEST_CURRENT_TEST", "PYTEST_VERSION")
_SCRUBBED_ENV_PREFIX = "PYTEST_XDIST_"


def fetch_suites() -> dict[str, Path]:
    """The unpacked sdists by distribution name. Fails in CI, and skips elsewhere, when PyPI cannot be reached."""
    try:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "peer-suites")],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHON": sys.executable},
        )
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        why = "timed out" if proc is None else f"exited {proc.returncode}: {proc.stderr.strip()}"
        if IN_CI:
            pytest.fail(f"scripts/peer-suites {why}")
        pytest.skip(f"scripts/peer-suites {why} (no PyPI here?)")
    suites: dict[str, Path] = {}
    for line in proc.stdout.splitlines():
        name, _, path = line.partition(" ")
        suites[name] = Path(path)
    return suites


@contextlib.contextmanager
def node(argv: list[str], port: int) -> Iterator[Node]:
    """A server process on 127.0.0.1:`port`, killed when the block ends."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, process=proc)
        yield Node(proc, "127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def redis_node(workdir: Path) -> Iterator[Node]:
    """A fresh redis-server: the suite's BGSAVE and CONFIG SET land in `workdir` and die with it."""
    binary = require_binary("redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with node([*argv, "--dir", str(workdir)], port) as running:
        yield running


@contextlib.contextmanager
def memcached_node() -> Iterator[Node]:
    binary = require_binary("memcached")
    port = free_port()
    argv = [binary, "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    with node(argv, port) as running:
        yield running


@dataclass(frozen=True)
class PeerRun:
    """One run of a peer suite: the outcome of every test it reported, by test id."""

    outcomes: dict[str, str]  # "passed", "failed" or "skipped"
    messages: dict[str, str]  # the first line of each failure
    log: Path
    cut_off: bool  # interrupted at its deadline: the tests it had not reached are missing

    def having(self, outcome: str) -> set[str]:
        return {test for test, seen in self.outcomes.items() if seen == outcome}


def once_per_run(name: str, tmp_path_factory: pytest.TempPathFactory, run: Callable[[Path], PeerRun]) -> PeerRun:
    """`run(directory)` once for the whole test run, however many pytest-xdist workers ask for it.

    The first worker to ask runs it while holding a lock in the run's temporary directory (its workers' common
    parent) and leaves the result there; the others wait for the lock and read it. A run that fails leaves nothing,
    so the next one to ask tries again (and fails in its turn).
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return run(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / f"peer-{name}"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = shared / "result.json"
        if result.exists():
            saved = json.loads(result.read_text())
            return PeerRun(saved["outcomes"], saved["messages"], Path(saved["log"]), saved["cut_off"])
        done = run(shared)
        result.write_text(json.dumps({**asdict(done), "log": str(done.log)}))
        return done


def read_junit(report: Path, log: Path, cut_off: bool) -> PeerRun:
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag: child for child in case}
        bad = tags.get("failure", tags.get("error"))
        # A test can be reported twice (its call and an error in its teardown): any failure wins.
        if bad is not None:
            outcomes[test] = "failed"
            message = (bad.get("message") or bad.text or "").strip()
            messages[test] = message.splitlines()[0][:200] if message else bad.tag
        elif outcomes.get(test) != "failed":
            outcomes[test] = "skipped" if "skipped" in tags else "passed"
    return PeerRun(outcomes, messages, log, cut_off)


def run_suite(suite: Path, args: list[str], out: Path, name: str, deadline_s: float) -> PeerRun:
    """Run pytest in `suite` (its own config, warnings and plugins, not natfwd's) with `args`, and read its report.

    A run still going after `deadline_s` is interrupted as Ctrl-C would (pytest then reports what it ran) and comes
    back `cut_off`. Fails the calling test if pytest crashed or no test passed: a peer run that tested nothing must
    never read as a pass.
    """
    out.mkdir(parents=True, exist_ok=True)
    report, log = out / f"{name}.xml", out / f"{name}.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED_ENV and not key.startswith(_SCRUBBED_ENV_PREFIX)
    }
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--junit-xml", str(report), *args]
    cut_off = False
    with open(log, "w") as log_file:
        # A session of its own: the suite's multiprocessing tests leave children that must die with it.
        proc = subprocess.Popen(
            argv, cwd=suite, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            cut_off = True
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        finally:
            _signal_group(proc.pid, signal.SIGKILL)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    # 0: all passed, 1: some failed. Others: interrupted, internal error, usage error, nothing collected; when we
    # interrupted it, whatever it was doing at that moment may end it so too, and its report is still what it ran.
    if (proc.returncode not in (0, 1) and not cut_off) or not report.exists():
        pytest.fail(f"{name}: pytest exited {proc.returncode} in {suite}; log {log} ends:\n{tail}")
    run = read_junit(report, log, cut_off)
    if not run.having("passed"):
        pytest.fail(f"{name}: no test passed ({len(run.outcomes)} reported); log {log} ends:\n{tail}")
    return run


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
