"""serve's kernel data path: its own nftables table kept in step with the config, and its counters and conntrack
read into the metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from forwarder import config as config_mod
from forwarder import iptables
from forwarder.errors import NatfwdError

if TYPE_CHECKING:
    from forwarder.metrics import Metrics

log = logging.getLogger("natfwd.kernel")

# metrics.py's direction labels. Not imported from there: prometheus_client must not be imported before the
# supervisor sets PROMETHEUS_MULTIPROC_DIR, and the worker module imports this one.
DIRECTION_TO_NODE = "client_to_node"
DIRECTION_TO_CLIENT = "node_to_client"

CONNTRACK_PROC = "/proc/net/nf_conntrack"  # this network namespace's table (CONFIG_NF_CONNTRACK_PROCFS)
# sbin is often missing from a service's PATH; nft lives there on Debian and Amazon Linux.
NFT_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
# A TCP flow is live until both sides have closed; TIME_WAIT and CLOSE are its remains.
LIVE_TCP_STATES = frozenset({"SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK"})
# A conntrack read costs the kernel and us a few microseconds per flow in the table, finished ones included: with
# connection churn (tens of thousands of flows in TIME_WAIT) it takes a good part of a second. The active gauges
# are then read less often than once a tick, so that reading them takes at most this share of the time.
CONNTRACK_SHARE = 0.02
FORWARDING_SYSCTLS = {"ip": "net.ipv4.ip_forward", "ip6": "net.ipv6.conf.all.forwarding"}
CAPABILITY_HINT = (
    "natfwd serve needs CAP_NET_ADMIN for data_path kernel or auto: run it as root, or give it the capability "
    "(systemd: AmbientCapabilities=CAP_NET_ADMIN and AF_NETLINK in RestrictAddressFamilies; see docs/kernel-path.md)"
)


def find_nft(search_path: str = NFT_SEARCH_PATH) -> str:
    """The nft program's path; raises NatfwdError naming the package when it is not installed."""
    found = shutil.which("nft", path=search_path)
    if found is None:
        raise NatfwdError(
            "data_path: kernel needs the nft command, which is not installed; install nftables (Debian: apt-get "
            "install nftables; Amazon Linux: dnf install nftables), or use data_path: userspace"
        )
    return found


def nft_failure(stderr: str, what: str) -> NatfwdError:
    """The error for an nft run that failed: a missing capability says so, anything else quotes nft."""
    text = stderr.strip()
    if "Operation not permitted" in text or "Permission denied" in text:
        return NatfwdError(f"{what}: nft was refused (Operation not permitted); {CAPABILITY_HINT}")
    return NatfwdError(f"{what}: nft failed: {text[-800:] or 'no message'}")


def parse_counters(text: str) -> dict[str, tuple[int, int]]:
    """`nft -j list counters` output -> {counter name: (packets, bytes)}; raises ValueError on anything else."""
    document = json.loads(text)
    found: dict[str, tuple[int, int]] = {}
    for item in document["nftables"]:
        counter = item.get("counter")
        if isinstance(counter, dict):
            found[str(counter["name"])] = (int(counter["packets"]), int(counter["bytes"]))
    return found


def count_live(text: str, ports: Collection[int]) -> dict[int, int]:
    """Live TCP flows we translated, per port the client dialled, from /proc/net/nf_conntrack or `conntrack -L`.

    A flow counts when its original destination port is one of `ports` and its reply comes from elsewhere than
    that destination (it was DNATed), and TCP has not finished with it (TIME_WAIT and CLOSE are not counted).
    """
    live = dict.fromkeys(ports, 0)
    for line in text.splitlines():
        if " TIME_WAIT " in line or " CLOSE " in line:
            continue  # most of a busy table, skipped before the split
        fields = line.split()
        try:
            state = fields[fields.index("tcp") + 3]
        except (ValueError, IndexError):
            continue
        if state not in LIVE_TCP_STATES:
            continue
        original: dict[str, str] = {}
        reply: dict[str, str] = {}
        for field in fields:
            key, sep, value = field.partition("=")
            if sep and key in ("src", "dst", "sport", "dport"):
                (reply if key in original else original).setdefault(key, value)
        try:
            port = int(original["dport"])
            translated = (reply["src"], reply["sport"]) != (original["dst"], original["dport"])
        except (KeyError, ValueError):
            continue
        if port in live and translated:
            live[port] += 1
    return live


def next_conntrack_read(started: float, finished: float) -> float:
    """When the active gauges may read conntrack again, after a read that ran from `started` to `finished`: once
    the time since `started` is 1/CONNTRACK_SHARE times the read's."""
    return started + (finished - started) / CONNTRACK_SHARE


class KernelPath:
    """serve's nftables table for one worker (the one that programs nft) and the metrics read back from it.

    `apply` programs a config (the first time: enable forwarding and replace any table a crashed run left),
    `poll` moves the counters and conntrack into the metrics, `stop_accepting`/`wait_idle`/`stop` drain and remove
    the table. One lock orders every change, so a transaction rendered before a drain never lands after it.
    """

    def __init__(self, metrics: Metrics, *, conntrack_path: str = CONNTRACK_PROC) -> None:
        self.metrics = metrics
        self.conntrack_path = conntrack_path
        self.nft: str | None = None  # found at the first apply that has kernel forwards
        self.table: iptables.ServeTable | None = None  # what the kernel holds now; None: no table of ours
        self.accepting = True
        self.live: dict[int, int] = {}  # flows per forward at the last poll
        self._last: dict[str, tuple[int, int]] = {}  # counter values already added to the metrics
        self._lookups: dict[str, tuple[str, ...]] = {}  # names resolved here, before the tracker has them
        self._lock = asyncio.Lock()
        self._conntrack_warned = False
        self._conntrack_due = 0.0  # the loop's clock: poll reads conntrack again from then on

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(f.port for f in self.table.forwards) if self.table is not None else ()

    # --- programming ------------------------------------------------------------------------------------------
    async def apply(self, cfg: config_mod.Config, resolved: Mapping[str, Sequence[str]]) -> None:
        """Serve `cfg.kernel_forwards` from now on, in one nft transaction; does nothing when the kernel already
        holds exactly that. Raises NatfwdError (nft missing, no CAP_NET_ADMIN, forwarding off and not settable, nft
        refused the table), with the kernel unchanged."""
        async with self._lock:
            if self.table is None and cfg.data_path == "userspace":
                return  # the relay serves everything, and no table of ours to update
            # With kernel or auto the table is made at start even with no forward on the kernel yet (auto with a
            # config that needs the relay): its rules hook conntrack, so the relay's own node connections are
            # tracked from their first packet. A forward a reload moves to the kernel later then cannot masquerade
            # a client onto the address and port of one of them (the reply would go to the wrong socket).
            wanted = iptables.serve_table(cfg, await self._resolved(cfg, resolved), accepting=self.accepting)
            if wanted == self.table:
                return
            if self.table is not None:
                try:
                    await self._poll_counters()  # what the counters of forwards about to go hold, first
                except NatfwdError as exc:
                    log.warning("cannot read the kernel path's counters", extra={"error": str(exc)})
            if self.table is None:
                self.nft = find_nft()
                _enable_forwarding(wanted)
                await self._nft(iptables.render_serve(wanted, replace=True), "data_path kernel: creating its table")
                self._last = {}
                log.info(
                    "kernel path on", extra={"table": f"inet {iptables.SERVE_TABLE}", "forwards": len(wanted.forwards)}
                )
            else:
                dropped = set(self.ports) - {f.port for f in wanted.forwards}
                _enable_forwarding(wanted)
                text = iptables.render_serve(wanted, replace=False, dropped=dropped)
                await self._nft(text, "data_path kernel: updating its table")
                self._last = {k: v for k, v in self._last.items() if int(k[1:].partition("_")[0]) not in dropped}
            self._report_changes(self.table, wanted)
            self.table = wanted
            self._conntrack_due = 0.0  # the next poll reads conntrack: the forwards' gauges follow a change at once

    async def _resolved(self, cfg: config_mod.Config, resolved: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """The tracker's IPs for DNS-name targets, plus a lookup now for a name it has not resolved yet (a reload
        that names a new node must not leave that forward without a rule until the next DNS round)."""
        merged = {host: list(ips) for host, ips in self._lookups.items()}
        merged.update({host: list(ips) for host, ips in resolved.items() if ips})
        loop = asyncio.get_running_loop()
        for forward in cfg.kernel_forwards:
            host = forward.target.host.lower().rstrip(".")
            if forward.target.is_ip or host in merged:
                continue
            try:
                infos = await loop.getaddrinfo(forward.target.host, forward.target.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("node name did not resolve; its forward waits", extra={"target": str(forward.target),
                                                                                  "error": str(exc)})  # fmt: skip
                continue
            merged[host] = sorted({str(info[4][0]) for info in infos})
            self._lookups[host] = tuple(merged[host])
        return merged

    def _report_changes(self, old: iptables.ServeTable | None, new: iptables.ServeTable) -> None:
        before = {f.port: f for f in old.forwards} if old is not None else {}
        after = {f.port: f for f in new.forwards}
        for port, forward in after.items():
            label = str(port)
            self.metrics.accepted.labels(label)  # the series exist from the start, as for relayed forwards
            self.metrics.active.labels(label)
            self.metrics.bytes.labels(label, DIRECTION_TO_NODE)
            self.metrics.bytes.labels(label, DIRECTION_TO_CLIENT)
            self.metrics.rejected.labels(label, "not_allowed")
            previous = before.get(port)
            if previous is None:
                if old is not None:
                    self.metrics.forward_changes.labels("opened").inc()
                addresses = {k: v for k, v in (("ipv4", forward.ipv4), ("ipv6", forward.ipv6)) if v is not None}
                log.info("forwarding in the kernel", extra={"forward": port, "target": forward.target, **addresses})
            elif (previous.ipv4, previous.ipv6, previous.node_port) != (forward.ipv4, forward.ipv6, forward.node_port):
                self.metrics.forward_changes.labels("retargeted").inc()
                log.info(
                    "forward retargeted in the kernel; live connections keep their node",
                    extra={"forward": port, "from": previous.target, "to": forward.target},
                )
        for port in before.keys() - after.keys():
            self.metrics.active.labels(str(port)).set(0)
            self.metrics.forward_changes.labels("closed").inc()
            log.info("kernel forward closed; live connections continue", extra={"forward": port})

    async def _nft(self, text: str, what: str) -> str:
        """Run nft with `text` as its input file (one transaction); returns its stdout, raises NatfwdError."""
        return await self._run([self.nft or find_nft(), "-f", "-"], text, what)

    async def _run(self, argv: list[str], stdin: str | None, what: str) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NatfwdError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from exc
        out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        if process.returncode != 0:
            raise nft_failure(err.decode(errors="replace"), what)
        return out.decode(errors="replace")

    # --- metrics ----------------------------------------------------------------------------------------------
    async def poll(self) -> None:
        """Move the counters' growth and, when due (CONNTRACK_SHARE), the live flows into the metrics; logs and
        carries on when a read fails."""
        async with self._lock:
            if self.table is None:
                return
            try:
                await self._poll_counters()
            except NatfwdError as exc:
                log.warning("cannot read the kernel path's counters", extra={"error": str(exc)})
            if self.table is None or not self.table.forwards:
                # The table is gone (the counters read noticed), or it only keeps conntrack on (auto, every forward
                # relayed): no gauge to read, and the relay's own connections would make the read long.
                self.live = {}
                return
            loop = asyncio.get_running_loop()
            started = loop.time()
            if started >= self._conntrack_due:
                await self._poll_conntrack()
                self._conntrack_due = next_conntrack_read(started, loop.time())

    async def _poll_counters(self) -> None:
        assert self.nft is not None
        argv = [self.nft, "-j", "list", "counters", "table", "inet", iptables.SERVE_TABLE]
        try:
            text = await self._run(argv, None, "reading the kernel path's counters")
        except NatfwdError as exc:
            if "No such file or directory" in str(exc):
                # Someone removed our table (nft flush ruleset): forget it, and the next apply creates it again.
                log.error("natfwd's nft table is gone; creating it again", extra={"table": iptables.SERVE_TABLE})
                self.table = None
                return
            raise
        try:
            counters = parse_counters(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise NatfwdError(f"unexpected output from nft -j: {exc}") from exc
        for port in self.ports:
            label = str(port)
            self._add(counters, port, "accepted", 0, self.metrics.accepted.labels(label))
            self._add(counters, port, "to_node", 1, self.metrics.bytes.labels(label, DIRECTION_TO_NODE))
            self._add(counters, port, "to_client", 1, self.metrics.bytes.labels(label, DIRECTION_TO_CLIENT))
            self._add(counters, port, "refused", 0, self.metrics.rejected.labels(label, "not_allowed"))

    def _add(self, counters: Mapping[str, tuple[int, int]], port: int, kind: str, field: int, child: object) -> None:
        name = iptables.counter_name(port, kind)
        now = counters.get(name)
        if now is None:
            return
        before = self._last.get(name, (0, 0))
        # A counter below what we saw was made anew (its table re-created): all of it is new.
        delta = now[field] - before[field] if now[field] >= before[field] else now[field]
        self._last[name] = now
        if delta:
            child.inc(delta)  # type: ignore[attr-defined]

    async def _poll_conntrack(self) -> bool:
        """Set the active gauges from conntrack; False when conntrack cannot be read."""
        ports = self.ports
        text = await self._conntrack_text()
        if text is None:
            return False
        self.live = count_live(text, ports)
        for port, count in self.live.items():
            self.metrics.active.labels(str(port)).set(count)
        return True

    async def _conntrack_text(self) -> str | None:
        try:
            return await asyncio.to_thread(_read_text, self.conntrack_path)
        except OSError as proc_error:
            tool = shutil.which("conntrack", path=NFT_SEARCH_PATH)
            if tool is not None:
                try:
                    return await self._run([tool, "-L", "-p", "tcp"], None, "conntrack -L")
                except NatfwdError as exc:
                    problem = str(exc)
                else:
                    problem = ""
            else:
                problem = f"{self.conntrack_path}: {proc_error.strerror}, and the conntrack tool is not installed"
            if not self._conntrack_warned:
                self._conntrack_warned = True
                log.warning(
                    "natfwd_connections_active is not reported for kernel forwards: cannot read conntrack; install "
                    "the conntrack tool (Debian: conntrack, Amazon Linux: conntrack-tools)",
                    extra={"error": problem},
                )
            return None

    # --- drain and stop ---------------------------------------------------------------------------------------
    async def stop_accepting(self) -> None:
        """Drain: no new connection is translated from now on; live ones keep theirs (the table stays, its NAT
        chains empty: the kernel translates a flow's packets only while conntrack and a NAT chain are hooked in)."""
        async with self._lock:
            self.accepting = False
            if self.table is None:
                return
            draining = iptables.ServeTable(
                self.table.listen_address, self.table.allowed4, self.table.allowed6, self.table.forwards, False
            )
            try:
                await self._nft(iptables.render_serve(draining, replace=False), "data_path kernel: draining")
            except NatfwdError as exc:
                log.error("cannot stop the kernel path accepting", extra={"error": str(exc)})
                return
            self.table = draining

    async def wait_idle(self, deadline: float) -> None:
        """Poll until no translated flow is live or the loop's clock passes `deadline` (without a readable conntrack
        there is no telling, so the whole grace period)."""
        loop = asyncio.get_running_loop()
        while self.table is not None:
            async with self._lock:
                known = await self._poll_conntrack()  # the counters are read once, by stop()
            if (known and not any(self.live.values())) or loop.time() >= deadline:
                return
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))

    async def stop(self) -> None:
        """Count the last of the counters and remove the table; flows still live lose their translation."""
        self._conntrack_due = 0.0  # the count of flows left, logged below, read now
        await self.poll()
        async with self._lock:
            if self.table is None:
                return
            left = sum(self.live.values())
            try:
                await self._nft(iptables.render_serve_delete(), "data_path kernel: removing its table")
            except NatfwdError as exc:
                log.error("cannot remove natfwd's nft table", extra={"error": str(exc)})
                return
            for port in self.ports:
                self.metrics.active.labels(str(port)).set(0)
            self.table = None
            log.info("kernel path off: table removed", extra={"table": iptables.SERVE_TABLE, "cut": left})


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read()


def _enable_forwarding(table: iptables.ServeTable) -> None:
    """Turn on forwarding for the families the table translates; raises NatfwdError when it is off and cannot be
    set (no permission, or /proc/sys read-only as under systemd's ProtectKernelTunables)."""
    families = {"ip"} if any(f.ipv4 for f in table.forwards) else set()
    if any(f.ipv6 for f in table.forwards) and (table.listen_address == "::" or ":" in table.listen_address):
        families.add("ip6")
    for family in sorted(families):
        key = FORWARDING_SYSCTLS[family]
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            if _read_text(path).strip() == "1":
                continue
            with open(path, "w") as handle:
                handle.write("1")
        except OSError as exc:
            raise NatfwdError(
                f"data_path kernel: {key} is off and natfwd cannot turn it on ({exc.strerror}); set it with "
                f"`sysctl -w {key}=1` and in /etc/sysctl.d, or run natfwd as root"
            ) from exc
        log.info("forwarding enabled", extra={"sysctl": f"{key}=1"})
