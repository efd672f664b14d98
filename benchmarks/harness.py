"""One benchmark run: build the lab, start every path, calibrate, measure in interleaved rounds, write the results."""

from __future__ import annotations

import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from benchmarks import cpu, packets, report
from benchmarks.loads import Load, Runner, requests_per_run
from benchmarks.paths import BASE_ID, LOCAL_PORTS, PATHS, REPO, PathSpec, RunningPath, against
from forwarder.errors import NatfwdError
from forwarder.lab import Lab, require_root

# Starting request counts for the fixed-count tools; calibration on the direct path rescales them to the duration.
PROBE_COUNTS = {"rb-get-c1": 2000, "rb-get-c50": 20000, "rb-get-c50-p16": 100000, "rb-get-c50-new": 3000, "rb-256k": 300,
                "ms-get-c50": 5000}  # fmt: skip
MIN_COUNTS = {"rb-get-c1": 500, "rb-get-c50": 5000, "rb-get-c50-p16": 20000, "rb-get-c50-new": 1000, "rb-256k": 50,
              "ms-get-c50": 1000}  # fmt: skip
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CHART_PNG = "results.png"


@dataclass(frozen=True, slots=True)
class Settings:
    """What to measure and for how long."""

    out: Path
    rounds: int
    duration_s: float
    paths: tuple[PathSpec, ...]
    loads: tuple[Load, ...]
    quick: bool
    against: str | None = None  # a git revision whose natfwd runs next to this one (natfwd-base)
    against_path: str = "natfwd-w1"  # the natfwd path whose settings natfwd-base runs, and which it is compared with
    skipped: tuple[str, ...] = ()  # why named paths are not measured (the installed natfwd cannot run them)

    @property
    def measured(self) -> tuple[PathSpec, ...]:
        if not self.against:
            return self.paths
        return (*self.paths, against(next(p for p in self.paths if p.id == self.against_path)))


def tools_needed(settings: Settings) -> list[str]:
    tools = {"ip", "memcached", "redis-server", "redis-benchmark", "nft"}
    tools |= {p.kind for p in settings.paths if p.kind in ("haproxy", "socat")}
    tools |= {load.tool for load in settings.loads if load.tool != "agent"}
    return sorted(tools)


def preflight(settings: Settings) -> None:
    """Fail before building anything: root, the tools, matplotlib. Raises NatfwdError with the fix."""
    require_root()
    missing = [tool for tool in tools_needed(settings) if shutil.which(tool) is None]
    if missing:
        raise NatfwdError(
            f"missing {', '.join(missing)}; install them (Debian: apt-get install memcached redis-server "
            "redis-tools libmemcached-tools haproxy socat nftables iproute2)"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NatfwdError("matplotlib is not installed; pip install matplotlib (it draws the chart)") from None


def _version(argv: Sequence[str], line_with: str = "") -> str:
    """The first output line of `argv` (that contains `line_with`)."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line_with in line]
    return lines[0] if lines else "?"


def metadata(settings: Settings) -> dict[str, Any]:
    import uvloop

    from forwarder.protocols import framing

    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--", "forwarder", "benchmarks"])
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "commit": commit + (" (with local changes)" if dirty not in ("?", "") else ""),
        "rounds": settings.rounds,
        "duration_s": settings.duration_s,
        "quick": settings.quick,
        "against": None
        if settings.against is None
        else _version(["git", "-C", str(REPO), "rev-parse", "--short", settings.against]),  # fmt: skip
        "against_path": settings.against_path if settings.against else None,
        "skipped": list(settings.skipped),
        "versions": {
            "python": platform.python_version(),
            "uvloop": str(getattr(uvloop, "__version__", "?")),
            # what natfwd serve frames multiplexed requests with: it inherits this process's environment
            "natfwd scanners": "C (_cframing)" if framing.C is not None else "pure Python",
            "haproxy": _version(["haproxy", "-v"]),
            "socat": _version(["socat", "-V"], "socat version"),
            "redis-server": _version(["redis-server", "--version"]),
            "memcached": _version(["memcached", "-V"]),
            "redis-benchmark": _version(["redis-benchmark", "--version"]),
            "memcslap": _version(["memcslap", "--version"]),
        },
    }


class Bench:
    """The lab, the running paths, the client agent, and the measurements so far."""

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.lab = Lab(
            f"bench-{secrets.token_hex(3)}", "memcached", nodes=1, routed=True, log_dir=settings.out / "logs"
        )
        self.running: dict[str, RunningPath] = {}
        self.runner: Runner | None = None
        self.agent: subprocess.Popen[str] | None = None
        self.counts: dict[str, int] = {}
        self.measurements: list[report.Measurement] = []
        self.meta: dict[str, Any] = {}

    # --- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the lab, start the nodes, the paths and the agent; raises NatfwdError (the caller tears down)."""
        lab = self.lab
        self.say(f"building lab {lab.name} (namespaces {', '.join(lab.namespaces)})")
        lab.build()
        # A new connection per request (rb-get-c50-new) leaves tens of thousands of TIME_WAIT sockets per run on the
        # closing side (the client, and each proxy towards the node): reuse them after a second, as busy proxy
        # hosts are set up to, or later rounds run out of local ports.
        for namespace, ports in ((lab.client, "1024 65000"), (lab.nat, LOCAL_PORTS)):
            lab.run(
                namespace, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", f"net.ipv4.ip_local_port_range={ports}"]
            )
        lab.start_nodes()
        node = lab.nodes[0]
        with open(self.settings.out / "logs" / "redis.log", "ab") as log:
            redis = lab.popen(
                node.namespace,
                [
                    "redis-server",
                    "--bind",
                    node.address,
                    "--port",
                    "6379",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/tmp",
                start_new_session=True,
            )
        lab.wait_listening(lab.nat, node.address, 6379, 10.0, redis)
        # redis-benchmark's GET tests read key:__rand_int__; give it a small value (the 256 KiB ones use db 1).
        lab.run(
            lab.client,
            ["redis-benchmark", "-h", node.address, "-p", "6379", "-t", "set", "-n", "10", "-c", "1", "-d", "32", "-q"],
        )
        for spec in self.settings.measured:
            self.say(f"starting {spec.label}")
            root = self._checkout(self.settings.against) if spec.id == BASE_ID and self.settings.against else REPO
            running = RunningPath(spec, lab, self.settings.out / "logs", root)
            running.start()
            self.running[spec.id] = running
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.settings.out / "logs" / "agent.log", "ab") as log:
            agent = lab.popen(
                lab.client,
                [sys.executable, "-m", "benchmarks.agent"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=str(REPO),
                start_new_session=True,
            )
        self.agent = cast("subprocess.Popen[str]", agent)
        self.runner = Runner(lab.client, self.agent)

    def _checkout(self, revision: str) -> Path:
        """`forwarder/` as it was at `revision`, unpacked under the output directory; raises NatfwdError."""
        root = self.settings.out / "against"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", revision, "forwarder", "pyproject.toml"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise NatfwdError(f"--against {revision}: git archive failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
        build_extensions(root, revision)
        return root

    def calibrate(self) -> None:
        """Size each fixed-count load so one run takes about `duration_s` on the direct path (also a warm-up).

        Two passes on wall time, connection setup included: one short probe is too noisy to scale from.
        """
        assert self.runner is not None
        direct = next(p for p in PATHS if p.id == "direct")
        host = direct.host(self.lab.nodes[0].address)
        for load in self.settings.loads:
            if load.tool == "agent":
                continue
            count = PROBE_COUNTS[load.id]
            for _ in range(2):
                started = time.monotonic()
                self.runner.run(load, host, direct.port(load.engine), self.settings.duration_s, count)
                seconds = max(time.monotonic() - started, 1e-3)
                count = max(MIN_COUNTS[load.id], int(count * self.settings.duration_s / seconds))
            self.counts[load.id] = count
            self.say(f"calibrated {load.id}: {count} requests per run")

    # --- measuring -----------------------------------------------------------------------------------------
    def measure(self, round_no: int, load: Load, spec: PathSpec) -> report.Measurement:
        assert self.runner is not None
        running = self.running[spec.id]
        started = time.monotonic()
        count = self.counts.get(load.id, 0)
        try:
            running.before()
            has_proxy = bool(running.pids)  # natfwd-kernel's natfwd runs only between before() and after()
            try:
                proxy_before, machine_before = cpu.tree(running.pids), cpu.machine()
                packets_before = packets.namespace(self.lab.nat)
                values = self.runner.run(
                    load, spec.host(self.lab.nodes[0].address), spec.port(load.engine), self.settings.duration_s, count
                )
                proxy, busy = cpu.tree(running.pids) - proxy_before, cpu.machine() - machine_before
                packets_after = packets.namespace(self.lab.nat)
            finally:
                running.after()
        except NatfwdError as exc:
            return report.Measurement(round_no, load.id, spec.id, {}, time.monotonic() - started, str(exc))
        spent = {"machine_s": busy.total_s}
        if has_proxy:
            spent |= {"proxy_user_s": proxy.user_s, "proxy_sys_s": proxy.sys_s}
        requests = requests_per_run(load, count)
        if requests:
            spent["requests"] = float(requests)
        net: dict[str, float] = {}
        if packets_before is not None and packets_after is not None:
            moved = packets_after - packets_before
            net = {"nat_received": float(moved.received), "nat_sent": float(moved.sent)}
        return report.Measurement(round_no, load.id, spec.id, values, time.monotonic() - started, cpu=spent, net=net)

    def rounds(self) -> None:
        settings = self.settings
        paths = list(settings.measured)
        total = settings.rounds * len(settings.loads) * len(paths)
        done = 0
        started = time.monotonic()
        for round_no in range(1, settings.rounds + 1):
            for index, load in enumerate(settings.loads):
                for spec in measuring_order(paths, round_no + index):
                    m = self.measure(round_no, load, spec)
                    self.measurements.append(m)
                    done += 1
                    elapsed = time.monotonic() - started
                    left = elapsed / done * (total - done)
                    self.say(
                        f"[round {round_no}/{settings.rounds} {done:>3}/{total} {_clock(elapsed)} "
                        f"~{_clock(left)} left] {load.id:<15} {spec.id:<11} {_show(load, m)}"
                    )
            self.write(chart=False)

    # --- output --------------------------------------------------------------------------------------------
    def write(self, *, chart: bool) -> None:
        """Write results.json and results.md (and the chart) from the measurements so far."""
        out = self.settings.out
        path_ids = [p.id for p in self.settings.measured]
        summary = report.summary(self.measurements)
        data = {
            "meta": self.meta,
            "paths": [{"id": p.id, "label": p.label} for p in self.settings.measured],
            "loads": [
                {
                    "id": load.id,
                    "label": load.label,
                    "tool": load.tool,
                    "engine": load.engine,
                    "args": load.args,
                    "requests_per_run": self.counts.get(load.id),
                }
                for load in self.settings.loads
            ],
            "measurements": [m.to_json() for m in self.measurements],
            "summary": summary,
        }
        (out / RESULTS_JSON).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        chart_name = None
        if chart and self.measurements:
            from benchmarks import chart as chart_mod

            title = f"natfwd benchmark, {self.meta.get('date', '')}, {self.meta.get('cpus')} CPUs"
            chart_mod.draw(summary, path_ids, out / CHART_PNG, title)
            chart_name = CHART_PNG
        (out / RESULTS_MD).write_text(report.markdown(self.measurements, self.meta, path_ids, chart_name))

    def teardown(self) -> None:
        if self.agent is not None and self.agent.stdin is not None:
            try:
                self.agent.stdin.close()
            except OSError:
                pass
        self.lab.teardown()


def build_extensions(root: Path, revision: str) -> None:
    """Compile the C extensions that `root`'s pyproject.toml lists next to their sources, as an install would; raises
    NatfwdError. Without them the other revision would run its pure-Python fallbacks (forwarder/extensions.py), and the
    A/B would measure those instead of the change."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    modules = config.get("tool", {}).get("setuptools", {}).get("ext-modules", [])
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for module in modules:
        target = root / (module["name"].replace(".", "/") + suffix)
        argv = [*compiler, "-shared", "-fPIC", f"-I{include}", *module.get("extra-compile-args", [])]
        built = subprocess.run(
            [*argv, *(str(root / source) for source in module["sources"]), "-o", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            raise NatfwdError(
                f"--against {revision}: building its {module['name']} failed (it needs gcc and python3-dev, as "
                f"installing natfwd does): {built.stderr.strip()[-500:]}"
            )


def measuring_order(paths: Sequence[PathSpec], turn: int) -> list[PathSpec]:
    """The order of one load's measurements: each natfwd right next to the HAProxy it is compared with (this
    machine drifts within seconds), groups rotated by `turn` so none always runs first, and the pair's own order
    swapped every other turn so neither always runs right after the other."""
    groups: list[list[PathSpec]] = []
    partners = {"natfwd": "haproxy", "haproxy": "natfwd"}
    # --against's base and the paths compared with another (pure Python with C, natfwd-kernel with the static
    # rules) go right beside that path, on its side away from HAProxy: [py, base, w1, HAProxy, mux, base, py mux].
    # Those compared with another come first, so the base, placed last, lands between them and its partner.
    for spec in sorted(paths, key=lambda p: p.mirrors is not None):
        of = spec.mirrors or spec.beside
        if of is not None:
            group = next((g for g in groups if any(p.id == of for p in g)), None)
            if group is not None:
                group.insert(_beside(group, of), spec)
                continue
        if spec.multiplex:  # after the HAProxy of its thread count: [natfwd, HAProxy, natfwd multiplexing]
            group = next((g for g in groups if any(p.kind == "haproxy" and p.threads == spec.threads and not p.splice
                                                   for p in g)), None)  # fmt: skip
            if group is not None:
                group.append(spec)
                continue
        partner = next((g for g in groups if g[0].kind == partners.get(spec.kind) and g[0].threads == spec.threads
                        and len(g) == 1), None)  # fmt: skip
        if partner is not None:
            partner.append(spec)
        else:
            groups.append([spec])
    shift = turn % len(groups)
    ordered = groups[shift:] + groups[:shift]
    return [spec for group in ordered for spec in (group[::-1] if turn % 2 else group)]


def _beside(group: Sequence[PathSpec], of: str) -> int:
    """Where a path goes in `group` to be right next to path `of`, on the side away from the group's HAProxy."""
    at = next(i for i, p in enumerate(group) if p.id == of)
    haproxy = next((i for i, p in enumerate(group) if p.kind == "haproxy"), None)
    return at + 1 if haproxy is not None and haproxy < at else at


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _show(load: Load, m: report.Measurement) -> str:
    if m.error:
        return f"FAILED: {m.error}"
    return "  ".join(f"{report.human(m.values[f.id], f.unit)}" for f in load.figures)


def run(settings: Settings, say: Callable[[str], None]) -> list[report.TargetResult]:
    """Run the whole benchmark; results land in settings.out even when interrupted. Raises NatfwdError."""
    preflight(settings)
    (settings.out / "logs").mkdir(parents=True, exist_ok=True)
    bench = Bench(settings, say)
    bench.meta = metadata(settings)
    try:
        bench.setup()
        bench.calibrate()
        bench.rounds()
    finally:
        # A second Ctrl-C (or SIGTERM) must not cut the teardown short and leave namespaces behind.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            bench.teardown()
            bench.write(chart=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return report.evaluate_targets(bench.measurements)
