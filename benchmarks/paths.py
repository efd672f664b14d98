"""The paths under test (direct, kernel DNAT, natfwd, HAProxy, socat): their configs, ports, start and stop."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from benchmarks import conntrack
from forwarder.lab import CLIENT_ADDRESS, METRICS_LISTEN, PUBLIC_ADDRESS, Lab

REPO = Path(__file__).resolve().parent.parent
Kind = Literal["direct", "kernel", "natfwd", "haproxy", "socat"]
Engine = Literal["memcached", "redis"]
NODE_PORTS: dict[Engine, int] = {"memcached": 11211, "redis": 6379}


@dataclass(frozen=True, slots=True)
class PathSpec:
    """One way from the client namespace to the node: what runs in the NAT namespace and which ports it uses."""

    id: str
    label: str
    kind: Kind
    threads: int  # natfwd workers / HAProxy nbthread; 1 for the rest
    slot: int  # public ports are 20000 + 10*slot (memcached) and +1 (redis); 0 means the node itself
    splice: bool = False  # HAProxy only: `option splice-auto`
    multiplex: bool = False  # natfwd only: `multiplex: true`, one process per engine (the framing follows `engine`)
    cpu_affinity: bool = False  # natfwd only: `cpu_affinity: true` (each worker pinned, connections steered to it)
    mirrors: str | None = None  # `--against`'s natfwd-base: the id of the path whose settings it runs
    pure_python: bool = False  # natfwd only: NATFWD_NO_EXTENSIONS=1, the pure-Python relay and scanners
    data_path: str | None = None  # natfwd only: its `data_path:` (kernel: serve programs nftables, relays nothing)
    beside: str | None = None  # the path it is compared with, measured right next to it in every round

    def port(self, engine: Engine) -> int:
        if self.kind == "direct":
            return NODE_PORTS[engine]
        return 20000 + 10 * self.slot + (0 if engine == "memcached" else 1)

    def host(self, node_address: str) -> str:
        return node_address if self.kind == "direct" else PUBLIC_ADDRESS


PATHS: tuple[PathSpec, ...] = (
    PathSpec("direct", "direct (routed, no NAT)", "direct", 1, 0),
    PathSpec("kernel", "kernel DNAT (nft)", "kernel", 1, 1),
    PathSpec("natfwd-w1", "natfwd workers: 1", "natfwd", 1, 2),
    PathSpec("natfwd-w2", "natfwd workers: 2", "natfwd", 2, 3),
    PathSpec("haproxy-t1", "HAProxy nbthread 1", "haproxy", 1, 4),
    PathSpec("haproxy-t2", "HAProxy nbthread 2", "haproxy", 2, 5),
    PathSpec("natfwd-mux-w1", "natfwd workers: 1, multiplex: true", "natfwd", 1, 9, multiplex=True),
    PathSpec(
        "natfwd-mux-w2",
        "natfwd workers: 2, multiplex: true, cpu_affinity: true",
        "natfwd",
        2,
        10,
        multiplex=True,
        cpu_affinity=True,
    ),
    PathSpec("socat", "socat (fork per connection)", "socat", 1, 6),
    # What the C extensions buy: the same natfwd with its pure-Python fallbacks, next to the C one in every round.
    PathSpec("natfwd-py-w1", "natfwd workers: 1, pure Python", "natfwd", 1, 11, pure_python=True, beside="natfwd-w1"),
    PathSpec(
        "natfwd-py-mux-w1",
        "natfwd workers: 1, multiplex: true, pure Python",
        "natfwd",
        1,
        12,
        multiplex=True,
        pure_python=True,
        beside="natfwd-mux-w1",
    ),
    # natfwd's control plane over the kernel's data path, next to the static rules it replaces.
    PathSpec(
        "natfwd-kernel", "natfwd data_path: kernel (nftables)", "natfwd", 1, 13, data_path="kernel", beside="kernel"
    ),  # fmt: skip
)
PATH_IDS = tuple(p.id for p in PATHS)
# Measured only when named in --paths: HAProxy tuned for bulk, which the targets do not compare against.
EXTRA_PATHS: tuple[PathSpec, ...] = (
    PathSpec("haproxy-splice", "HAProxy nbthread 1, option splice-auto", "haproxy", 1, 8, splice=True),
)
KNOWN_PATHS = PATHS + EXTRA_PATHS
BASE_ID = "natfwd-base"


def against(of: PathSpec) -> PathSpec:
    """`--against REV`: the natfwd path `of` as it was at git revision REV, measured next to `of` in every round."""
    return PathSpec(BASE_ID, f"{of.label}, at the --against revision", "natfwd", of.threads, 7,
                    multiplex=of.multiplex, cpu_affinity=of.cpu_affinity, mirrors=of.id,
                    pure_python=of.pure_python, data_path=of.data_path)  # fmt: skip


ENGINES: tuple[Engine, ...] = ("memcached", "redis")


def natfwd_config(spec: PathSpec, node_address: str, metrics_port: int, engine: Engine | None = None) -> str:
    """The natfwd config for `spec`: the lab's, with this path's ports and worker count. With `engine`, only that
    engine's forward, framed as that engine (multiplexing paths run one natfwd per engine)."""
    host, _, _ = METRICS_LISTEN.partition(":")
    engines = ENGINES if engine is None else (engine,)
    forwards = "\n".join(f"  - port: {spec.port(e)}\n    target: {node_address}:{NODE_PORTS[e]}" for e in engines)
    return (
        f"engine: {engine or 'memcached'}\npublic_address: {PUBLIC_ADDRESS}\nlisten_address: {PUBLIC_ADDRESS}\n"
        f"allowed_clients:\n  - {CLIENT_ADDRESS}/32\nforwards:\n{forwards}\n"
        f"metrics:\n  listen: {host}:{metrics_port}\nworkers: {spec.threads}\n"
        + ("multiplex: true\n" if spec.multiplex else "")
        + ("cpu_affinity: true\n" if spec.cpu_affinity else "")
        # natfwd-kernel is stopped after each measurement, with nothing left worth draining
        + (f"data_path: {spec.data_path}\ndrain_timeout_s: 0\n" if spec.data_path else "")
    )


def unsupported(spec: PathSpec, node_address: str = "10.0.1.230") -> str | None:
    """Why the installed natfwd cannot run `spec`, or None when it can: its config refuses a key the path sets
    (`data_path`, before natfwd had a kernel data path)."""
    if spec.kind != "natfwd" or spec.data_path is None:
        return None
    from forwarder import config

    try:
        config.loads(natfwd_config(spec, node_address, 9100), "<bench path check>")
    except config.ConfigError as exc:
        return f"{spec.id} skipped: this natfwd does not accept `data_path: {spec.data_path}` ({exc})"
    return None


def haproxy_config(spec: PathSpec, node_address: str) -> str:
    """A plain HAProxy `mode tcp` config with the same allowlist natfwd applies and default buffers; no splice
    unless the path asks for `option splice-auto` (HAProxy then splices when it expects more data than a buffer)."""
    splice = "    option splice-auto\n" if spec.splice else ""
    # HAProxy reserves two descriptors per pipe (maxpipes defaults to maxconn/4), over a 20000 hard limit here.
    pipes = "    maxpipes 512\n" if spec.splice else ""
    # Threads pinned one per CPU, as natfwd-mux-w2's workers are (cpu_affinity): what pinning alone is worth is then
    # HAProxy's too, and natfwd's lead is its steering (benchmarks/README.md, "What moved").
    cpu_map = f"    cpu-map auto:1/1-{spec.threads} 0-{spec.threads - 1}\n" if spec.threads > 1 else ""
    listens = "\n".join(
        textwrap.dedent(f"""\
        listen {engine}
            bind {PUBLIC_ADDRESS}:{spec.port(engine)}
            tcp-request connection reject unless {{ src {CLIENT_ADDRESS}/32 }}
            server node {node_address}:{NODE_PORTS[engine]}
        """)
        for engine in ENGINES
    )
    return (
        textwrap.dedent(f"""\
        global
            nbthread {spec.threads}
            maxconn 9000
        """)
        + cpu_map
        + pipes
        + textwrap.dedent("""
        defaults
            mode tcp
            timeout connect 5s
            timeout client 1h
            timeout server 1h
        """)
        + splice
        + "\n"
        + listens
    )


# The kernel path masquerades to ports the proxies' own connections never use (the NAT namespace's local port range
# ends below): with tens of thousands of new connections per run (rb-get-c50-new), a masqueraded flow otherwise
# reuses the 4-tuple of an idle long-lived proxy connection to the node (natfwd's shared one, with multiplex), and
# the node's challenge ACK draws a RST from the client that kills that connection.
MASQUERADE_PORTS = "40000-65000"
LOCAL_PORTS = "1024 39999"
CLIENT_PORTS = "1024 65000"  # the client namespace's local ports
KERNEL_CLIENT_PORTS = "40000 65000"  # ...while a kernel path is measured (natfwd-kernel's masquerade takes no range)


def nft_rules(spec: PathSpec, node_address: str) -> str:
    """The kernel path's rules as `natfwd emit-iptables --format nft` renders them, masquerading to MASQUERADE_PORTS."""
    from forwarder import config, iptables

    text = natfwd_config(spec, node_address, 9100)
    rules = iptables.render(config.loads(text, "<bench kernel path>"), "nft")
    return rules.replace(" masquerade\n", f" masquerade to :{MASQUERADE_PORTS}\n")


def socat_argv(spec: PathSpec, engine: Engine, node_address: str) -> list[str]:
    # nodelay on both legs: HAProxy and natfwd set TCP_NODELAY, socat does not unless asked.
    listen = f"TCP4-LISTEN:{spec.port(engine)},bind={PUBLIC_ADDRESS},reuseaddr,fork,backlog=1024,nodelay"
    return ["socat", f"{listen},range={CLIENT_ADDRESS}/32", f"TCP4:{node_address}:{NODE_PORTS[engine]},nodelay"]


def _package_env(root: Path = REPO) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def natfwd_env(spec: PathSpec, root: Path = REPO) -> dict[str, str]:
    """The environment natfwd runs in: `root`'s package, and for the pure-Python paths no C extension."""
    env = _package_env(root)
    if spec.pure_python:
        env["NATFWD_NO_EXTENSIONS"] = "1"
    else:
        env.pop("NATFWD_NO_EXTENSIONS", None)  # a C path measures the C extensions, whatever the harness runs with
    return env


class RunningPath:
    """A path started in the lab; `before()`/`after()` bracket each measurement (the kernel rules live only then)."""

    def __init__(self, spec: PathSpec, lab: Lab, workdir: Path, package_root: Path = REPO) -> None:
        self.spec = spec
        self.package_root = package_root  # where `python -m forwarder` comes from (another revision's copy)
        self.lab = lab
        self.workdir = workdir
        self.node_address = lab.nodes[0].address
        self.pids: list[int] = []  # the processes this path started in the NAT namespace (none for direct, kernel)
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start the path's processes and wait until its ports accept from the client; raises NatfwdError."""
        spec = self.spec
        lab = self.lab
        if spec.kind in ("direct", "kernel") or spec.data_path == "kernel":
            return  # the kernel paths' rules (and natfwd-kernel's natfwd) live only while measured: before()
        with open(self.workdir / f"{spec.id}.log", "ab") as log:  # the children keep their own copy
            if spec.kind == "natfwd" and spec.multiplex:  # one natfwd per engine: the framing follows `engine`
                watch = {
                    engine: self._natfwd(
                        f"{spec.id}-{engine}",
                        natfwd_config(spec, self.node_address, 9108 + spec.slot + 50 * index, engine),
                        log,
                    )
                    for index, engine in enumerate(ENGINES)
                }
            elif spec.kind == "natfwd":
                process = self._natfwd(spec.id, natfwd_config(spec, self.node_address, 9108 + spec.slot), log)
                watch = {engine: process for engine in ENGINES}
            elif spec.kind == "haproxy":
                cfg = self.workdir / f"{spec.id}.cfg"
                cfg.write_text(haproxy_config(spec, self.node_address))
                process = self._popen(["haproxy", "-db", "-f", str(cfg)], log)
                watch = {engine: process for engine in ENGINES}
            else:
                watch = {engine: self._popen(socat_argv(spec, engine, self.node_address), log) for engine in ENGINES}
        for engine, process in watch.items():
            lab.wait_listening(lab.client, PUBLIC_ADDRESS, spec.port(engine), 15.0, process)

    def _natfwd(self, name: str, config_text: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
        cfg = self.workdir / f"{name}.yaml"
        cfg.write_text(config_text)
        argv = [sys.executable, "-m", "forwarder", "serve", "--config", str(cfg)]
        return self._popen(argv, log, env=natfwd_env(self.spec, self.package_root))

    def _popen(self, argv: Sequence[str], log: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = self.lab.popen(
            self.lab.nat,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
        )
        self.pids.append(process.pid)
        self.processes.append(process)
        return process

    def before(self) -> None:
        if self.spec.kind == "kernel" or self.spec.data_path == "kernel":
            # Both kernel paths' clients take the same ports, above the proxies' (LOCAL_PORTS): natfwd-kernel's
            # masquerade keeps the client's port where it can. How many ports the client has moves its connect()
            # cost a lot under churn, so the two are compared with the same.
            self.lab.run(self.lab.client, ["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={KERNEL_CLIENT_PORTS}"])
        if self.spec.kind == "kernel":
            self.lab.run(self.lab.nat, ["nft", "-f", "-"], input=nft_rules(self.spec, self.node_address))
        elif self.spec.data_path == "kernel":
            self._start_kernel_natfwd()

    def after(self) -> None:
        # Delete the table so conntrack and NAT hooks do not tax the other paths' measurements, and the flows it
        # left in conntrack, which would make the next kernel path's masquerade pick the proxies' ports
        # (benchmarks/conntrack.py).
        if self.spec.kind == "kernel":
            self.lab.run(self.lab.nat, ["nft", "delete", "table", "ip", "natfwd"], check=False)
        elif self.spec.data_path == "kernel":
            self._stop_kernel_natfwd()
        else:
            return
        self.lab.run(self.lab.client, ["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={CLIENT_PORTS}"])
        conntrack.flush_namespace(self.lab.nat)

    def _start_kernel_natfwd(self) -> None:
        """natfwd with `data_path: kernel`, started for one measurement (its rules, like the static ones, would tax
        every other path with conntrack); ready once the client gets through to the node."""
        lab = self.lab
        with open(self.workdir / f"{self.spec.id}.log", "ab") as log:
            process = self._natfwd(
                self.spec.id, natfwd_config(self.spec, self.node_address, 9108 + self.spec.slot), log
            )
        for engine in ENGINES:
            lab.wait_listening(lab.client, PUBLIC_ADDRESS, self.spec.port(engine), 15.0, process)

    def _stop_kernel_natfwd(self) -> None:
        """SIGTERM: natfwd removes its table."""
        for process in self.processes:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.pids.clear()
        self.processes.clear()
