"""Pure text rendering of the kernel DNAT rules (sh commands, iptables-restore, nft) equivalent to a Config."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from forwarder.config import Config, ConfigError

Format = Literal["commands", "restore", "nft"]
FORMATS: tuple[str, ...] = get_args(Format)
SaveFamily = Literal["amazon-linux", "debian"]
SAVE_FAMILIES: tuple[str, ...] = get_args(SaveFamily)

# Our own chains: the script flushes and refills them, so re-running never duplicates a rule.
PREROUTING_CHAIN = "NATFWD-PREROUTING"
POSTROUTING_CHAIN = "NATFWD-POSTROUTING"
FORWARD_CHAIN = "NATFWD-FORWARD"
NFT_TABLE = "natfwd"
SYSCTL_FILE = "/etc/sysctl.d/90-natfwd.conf"


@dataclass(frozen=True, slots=True)
class Rule:
    """One forward, reduced to the validated literals the kernel rules are made of."""

    index: int
    port: int
    node: str
    node_port: int


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a renderer needs; built only from values config.py validated."""

    interface: str
    public_address: str
    engine: str
    clients: tuple[str, ...]
    rules: tuple[Rule, ...]
    notes: tuple[str, ...]


def plan(config: Config) -> Plan:
    """Reduce a Config to kernel rules; raises ConfigError for what DNAT cannot express."""
    if config.engine == "redis-cluster":
        raise ConfigError(
            "engine: redis-cluster needs MOVED/ASK and CLUSTER SLOTS rewritten to public_address, which kernel "
            "rules cannot do; use natfwd serve"
        )
    if config.tls is not None:
        raise ConfigError("tls: kernel rules cannot terminate TLS for clients; use natfwd serve, or remove tls")
    if not config.forwards:
        raise ConfigError(
            "forwards: empty; discovery builds forwards only at runtime, and kernel rules need them listed; "
            "add forwards or use natfwd serve"
        )
    clients: list[str] = []
    for index, network in enumerate(config.allowed_clients):
        if not isinstance(network, ipaddress.IPv4Network):
            raise ConfigError(
                f"allowed_clients[{index}]: {network} is IPv6; the emitted rules are IPv4 only; use natfwd serve"
            )
        clients.append(str(network))
    rules: list[Rule] = []
    for index, forward in enumerate(config.forwards):
        host = forward.target.host
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"forwards[{index}].target: {host} is a DNS name; kernel rules need an IP address "
                "(use the node's IP, or natfwd serve, which re-resolves names)"
            ) from None
        if not isinstance(address, ipaddress.IPv4Address):
            raise ConfigError(
                f"forwards[{index}].target: {host} is IPv6; the emitted rules are IPv4 only; use natfwd serve"
            )
        rules.append(Rule(index, forward.port, str(address), forward.target.port))
    notes: list[str] = []
    if config.auto_discovery is not None:
        notes.append(
            f"auto_discovery (port {config.auto_discovery.port}) is not rendered: `config get cluster` answers "
            "need their node addresses rewritten, which only natfwd serve does"
        )
    if config.discovery is not None:
        notes.append("discovery is not followed by kernel rules: re-run emit-iptables when the nodes change")
    return Plan(config.interface, config.public_address, config.engine, tuple(clients), tuple(rules), tuple(notes))


def render(config: Config, fmt: Format = "commands", save: SaveFamily | None = None) -> str:
    """Render the rules for `fmt`, plus the persistence step for `save`; raises ConfigError (see plan())."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not valid; expected one of {', '.join(FORMATS)}")
    if save is not None and save not in SAVE_FAMILIES:
        raise ConfigError(f"--save: {save!r} is not valid; expected one of {', '.join(SAVE_FAMILIES)}")
    p = plan(config)
    body = {"commands": _commands, "restore": _restore, "nft": _nft}[fmt](p)
    if save is not None:
        section = _save_section(fmt, save)
        if fmt == "commands":
            # The package that saves the rules goes in before the first rule: installing it after them could load
            # its own default ruleset (Amazon Linux's REJECTs forwarded traffic) over natfwd's.
            install = [line for line in section if line.startswith(("rpm -q ", "dpkg -s "))]
            section = [line for line in section if line not in install]
            first_rule = next(i for i, line in enumerate(body) if line and not line.startswith(("#", "set ")))
            body[first_rule:first_rule] = [f"# The package that persists the rules ({save}), first.", *install, ""]
        body += section
    return "\n".join(body) + "\n"


def _header(p: Plan, fmt: Format) -> list[str]:
    lines = [
        f"# natfwd emit-iptables --format {fmt}: {p.engine}, {len(p.rules)} forward(s) arriving on {p.interface} "
        f"for {p.public_address}",
        f"# Only these clients are forwarded: {', '.join(p.clients)}",
    ]
    lines += [f"# Note: {note}" for note in p.notes]
    return lines


def _describe(rule: Rule) -> str:
    return f"# forwards[{rule.index}]: {rule.port} -> {rule.node}:{rule.node_port}"


def _dnat_args(p: Plan, rule: Rule, client: str) -> str:
    return (
        f"-A {PREROUTING_CHAIN} -i {p.interface} -s {client} -p tcp --dport {rule.port} "
        f"-j DNAT --to-destination {rule.node}:{rule.node_port}"
    )


def _masquerade_args(rule: Rule) -> str:
    # Only connections we DNATed are masqueraded: the nodes have no route back to the client.
    return (
        f"-A {POSTROUTING_CHAIN} -d {rule.node}/32 -p tcp --dport {rule.node_port} "
        "-m conntrack --ctstate DNAT -j MASQUERADE"
    )


def _forward_args(p: Plan, rule: Rule, client: str) -> list[str]:
    # Needed where FORWARD drops by default (Amazon Linux's iptables-services REJECTs forwarded traffic).
    return [
        f"-A {FORWARD_CHAIN} -i {p.interface} -s {client} -d {rule.node}/32 -p tcp --dport {rule.node_port} "
        "-m conntrack --ctstate DNAT -j ACCEPT",
        f"-A {FORWARD_CHAIN} -s {rule.node}/32 -d {client} -p tcp --sport {rule.node_port} "
        "-m conntrack --ctstate ESTABLISHED -j ACCEPT",
    ]


def _nat_lines(p: Plan) -> Iterable[tuple[str, str]]:
    """(table, iptables arguments) for every rule, in order."""
    for rule in p.rules:
        yield "", _describe(rule)
        for client in p.clients:
            yield "nat", _dnat_args(p, rule, client)
        yield "nat", _masquerade_args(rule)
        for client in p.clients:
            for args in _forward_args(p, rule, client):
                yield "filter", args


_CHAINS = (
    ("nat", PREROUTING_CHAIN, "PREROUTING"),
    ("nat", POSTROUTING_CHAIN, "POSTROUTING"),
    ("filter", FORWARD_CHAIN, "FORWARD"),
)


def _commands(p: Plan) -> list[str]:
    lines = ["#!/bin/sh", *_header(p, "commands")]
    lines += [
        "# Safe to run again: it rebuilds its own NATFWD-* chains and jumps to each exactly once.",
        "set -eu",
        "sysctl -qw net.ipv4.ip_forward=1",
        "",
        "natfwd_chain() {  # TABLE CHAIN PARENT: create CHAIN if missing, flush it, jump to it from PARENT once",
        '  iptables -w -t "$1" -n -L "$2" >/dev/null 2>&1 || iptables -w -t "$1" -N "$2"',
        '  iptables -w -t "$1" -F "$2"',
        '  iptables -w -t "$1" -C "$3" -j "$2" 2>/dev/null || iptables -w -t "$1" -I "$3" 1 -j "$2"',
        "}",
    ]
    lines += [f"natfwd_chain {table} {chain} {parent}" for table, chain, parent in _CHAINS]
    for table, args in _nat_lines(p):
        lines.append(args if not table else f"iptables -w -t {table} {args}")
    return lines


def _restore(p: Plan) -> list[str]:
    lines = _header(p, "restore")
    lines += [
        "# Input for `iptables-restore --noflush`, applied atomically. Meant for a fresh box or boot: loading it",
        "# again refills the NATFWD-* chains but adds a second jump to them; re-apply with --format commands.",
        "# Also needed, since iptables-restore cannot set it: sysctl -w net.ipv4.ip_forward=1",
    ]
    for table in ("nat", "filter"):
        lines.append(f"*{table}")
        chains = [(chain, parent) for t, chain, parent in _CHAINS if t == table]
        lines += [f":{chain} - [0:0]" for chain, _ in chains]
        lines += [f"-I {parent} 1 -j {chain}" for chain, parent in chains]
        lines += [args for t, args in _nat_lines(p) if t in ("", table)]
        lines.append("COMMIT")
    return lines


def _nft(p: Plan) -> list[str]:
    clients = "{ " + ", ".join(p.clients) + " }"
    lines = ["#!/usr/sbin/nft -f", *_header(p, "nft")]
    lines += [
        "# Safe to load again: the table is created if missing, deleted, and rebuilt in one transaction.",
        "# Also needed, since nft cannot set it: sysctl -w net.ipv4.ip_forward=1",
        f"table ip {NFT_TABLE}",
        f"delete table ip {NFT_TABLE}",
        f"table ip {NFT_TABLE} {{",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    ]
    for rule in p.rules:
        lines.append("\t\t" + _describe(rule))
        lines.append(
            f'\t\tiifname "{p.interface}" ip saddr {clients} tcp dport {rule.port} dnat to {rule.node}:{rule.node_port}'
        )
    lines += [
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
    ]
    for rule in p.rules:
        lines.append(f"\t\tct status dnat ip daddr {rule.node} tcp dport {rule.node_port} masquerade")
    lines += ["\t}", "}"]
    return lines


def _save_commands(fmt: Format, family: SaveFamily) -> list[str]:
    sysctl = f"echo 'net.ipv4.ip_forward=1' > {SYSCTL_FILE}"
    if fmt == "nft":
        conf = "/etc/nftables.conf" if family == "debian" else "/etc/sysconfig/nftables.conf"
        install = (
            "dpkg -s nftables >/dev/null 2>&1 || { apt-get update -q && apt-get install -qy nftables; }"
            if family == "debian"
            else "rpm -q nftables >/dev/null 2>&1 || yum install -y nftables"
        )
        include = 'include "/etc/nftables.d/natfwd.nft"'
        return [
            sysctl,
            install,
            "install -D -m 0644 natfwd.nft /etc/nftables.d/natfwd.nft",
            f"grep -qxF '{include}' {conf} || echo '{include}' >> {conf}",
            "systemctl enable nftables",
        ]
    if family == "debian":
        return [
            sysctl,
            "dpkg -s iptables-persistent >/dev/null 2>&1 || "
            "{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -qy iptables-persistent; }",
            "systemctl enable netfilter-persistent",
            "netfilter-persistent save",
        ]
    return [
        sysctl,
        "rpm -q iptables-services >/dev/null 2>&1 || yum install -y iptables-services",
        "systemctl enable iptables",
        "service iptables save",
    ]


def _save_section(fmt: Format, family: SaveFamily) -> list[str]:
    name = "Amazon Linux" if family == "amazon-linux" else "Debian/Ubuntu"
    commands = _save_commands(fmt, family)
    if fmt == "commands":
        how = "netfilter-persistent" if family == "debian" else "iptables-services"
        return ["", f"# Persist across reboots ({name}): ip_forward in sysctl.d, rules saved by {how}.", *commands]
    # restore and nft input cannot run commands: the step is spelled out for the operator to run.
    first = (
        "save this output as natfwd.nft, then run:"
        if fmt == "nft"
        else "after `iptables-restore --noflush` of this file, run:"
    )
    return ["", f"# Persist across reboots ({name}): {first}", *(f"#   {command}" for command in commands)]


# --- `natfwd serve` with data_path kernel: the nftables table serve owns and keeps in step with its config ---

SERVE_TABLE = "natfwd_serve"  # inet family; a name of its own, so serve never touches emit-iptables's `ip natfwd`
SERVE_CHAINS = ("prerouting", "postrouting", "forward", "input")
SERVE_SETS = ("allowed4", "allowed6")
COUNTER_KINDS = ("accepted", "to_node", "to_client", "refused")


@dataclass(frozen=True, slots=True)
class KernelForward:
    """One forward on the kernel path: its port, the target as configured, and the address DNAT sends each
    client family to (None: no address of that family, so clients of that family are not forwarded)."""

    port: int
    target: str
    ipv4: str | None
    ipv6: str | None
    node_port: int


@dataclass(frozen=True, slots=True)
class ServeTable:
    """What serve's table holds: built only from validated config values and resolved IP literals."""

    listen_address: str
    allowed4: tuple[str, ...]
    allowed6: tuple[str, ...]
    forwards: tuple[KernelForward, ...]
    accepting: bool = True  # False while draining: no new connections, live ones keep their translation


def counter_name(port: int, kind: str) -> str:
    """The named nft counter of `kind` (accepted, to_node, to_client, refused) for listen `port`."""
    return f"f{port}_{kind}"


def serve_table(
    config: Config, resolved: Mapping[str, Sequence[str]] | None = None, *, accepting: bool = True
) -> ServeTable:
    """The table for `config.kernel_forwards`; DNS-name targets take the first IP of each family in `resolved`
    (host name -> IPs), and a name with none there is left without a DNAT rule until it resolves."""
    networks4 = [n for n in config.allowed_clients if isinstance(n, ipaddress.IPv4Network)]
    networks6 = [n for n in config.allowed_clients if isinstance(n, ipaddress.IPv6Network)]
    forwards: list[KernelForward] = []
    for forward in config.kernel_forwards:
        host = forward.target.host
        ips = [host] if forward.target.is_ip else list((resolved or {}).get(host.lower().rstrip("."), ()))
        addresses = [ipaddress.ip_address(ip) for ip in ips]
        ipv4 = next((str(a) for a in addresses if a.version == 4), None)
        ipv6 = next((str(a) for a in addresses if a.version == 6), None)
        forwards.append(KernelForward(forward.port, str(forward.target), ipv4, ipv6, forward.target.port))
    return ServeTable(
        config.listen_address,
        tuple(str(n) for n in ipaddress.collapse_addresses(networks4)),  # nft refuses overlapping intervals
        tuple(str(n) for n in ipaddress.collapse_addresses(networks6)),
        tuple(forwards),
        accepting,
    )


def _families(listen_address: str) -> list[tuple[str, str]]:
    """(nft protocol, destination match) per client family the listen address takes, as a socket bound there
    would: 0.0.0.0 takes IPv4, :: both, an address only its own family."""
    if listen_address == "0.0.0.0":
        return [("ip", "fib daddr type local")]
    if listen_address == "::":
        return [("ip", "fib daddr type local"), ("ip6", "fib daddr type local")]
    protocol = "ip6" if ":" in listen_address else "ip"
    return [(protocol, f"{protocol} daddr {listen_address}")]


def _serve_body(t: ServeTable) -> list[str]:
    lines = [f"table inet {SERVE_TABLE} {{"]
    for forward in t.forwards:
        lines += [f"\tcounter {counter_name(forward.port, kind)} {{}}" for kind in COUNTER_KINDS]
    for name, kind, elements in (("allowed4", "ipv4_addr", t.allowed4), ("allowed6", "ipv6_addr", t.allowed6)):
        listed = f" elements = {{ {', '.join(elements)} }};" if elements else ""
        lines.append(f"\tset {name} {{ type {kind}; flags interval;{listed} }}")
    families = _families(t.listen_address)
    accepting = t.forwards if t.accepting else ()
    lines += ["\tchain prerouting {", "\t\ttype nat hook prerouting priority dstnat; policy accept;"]
    for forward in accepting:
        lines.append(f"\t\t# {forward.port} -> {forward.target}")
        for protocol, local in families:
            address = forward.ipv4 if protocol == "ip" else forward.ipv6
            if address is None:
                continue
            to = f"{address}:{forward.node_port}" if protocol == "ip" else f"[{address}]:{forward.node_port}"
            allowed = "@allowed4" if protocol == "ip" else "@allowed6"
            lines.append(
                f"\t\t{local} {protocol} saddr {allowed} tcp dport {forward.port} "
                f'counter name "{counter_name(forward.port, "accepted")}" dnat {protocol} to {to}'
            )
    lines += ["\t}", "\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;"]
    if accepting:
        # The nodes have no route back to the client (nor does a VPC): replies must come back through this box.
        ports = ", ".join(str(forward.port) for forward in accepting)
        lines.append(f"\t\tct status dnat meta l4proto tcp ct original proto-dst {{ {ports} }} masquerade")
    lines += ["\t}", "\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;"]
    if t.forwards:
        # Bytes per direction of every flow we DNATed, found by the direction and the port the client dialled: one
        # rule and one map lookup per forwarded packet, whatever the number of forwards. It also keeps conntrack
        # hooked into the namespace (below).
        entries = ", ".join(
            f'{direction} . {f.port} : "{counter_name(f.port, kind)}"'
            for f in t.forwards
            for direction, kind in (("original", "to_node"), ("reply", "to_client"))
        )
        lines.append(
            f"\t\tct status dnat meta l4proto tcp counter name ct direction . ct original proto-dst map {{ {entries} }}"
        )
    else:
        # nft keeps conntrack hooked into the namespace only while some rule needs it, and without conntrack the
        # flows already translated lose their translation: this rule needs it whatever else the table holds.
        lines.append('\t\tct status dnat comment "keeps conntrack on for the flows natfwd translated"')
    lines += ["\t}", "\tchain input {", "\t\ttype filter hook input priority filter; policy accept;"]
    for forward in accepting:
        # A connection from outside the allowlist is not translated, so it arrives here: refused with a reset
        # (one per attempt, where a silent drop would count each SYN retransmission), and counted. Not on lo:
        # this host's own connections are never translated, and may be meant for a local server on that port.
        for protocol, local in families:
            allowed = "@allowed4" if protocol == "ip" else "@allowed6"
            where = "" if local.startswith("fib") else f"{local} "
            lines.append(
                f'\t\tmeta nfproto {"ipv4" if protocol == "ip" else "ipv6"} iifname != "lo" {where}'
                f"{protocol} saddr != {allowed} "
                f"tcp dport {forward.port} tcp flags syn / syn,ack "
                f'counter name "{counter_name(forward.port, "refused")}" reject with tcp reset'
            )
    lines += ["\t}", "}"]
    return lines


def render_serve(t: ServeTable, *, replace: bool, dropped: Iterable[int] = ()) -> str:
    """nft -f input, applied as one transaction. `replace`: delete the table if it exists and create it (at start:
    nothing a crashed run left survives). Otherwise update it in place: flush its chains and sets, delete the
    counters of the `dropped` ports and redefine the rest, so the counters of the forwards that stay keep counting
    and live connections keep their conntrack translation."""
    lines = [
        f"# natfwd serve, data_path kernel: {len(t.forwards)} forward(s); table inet {SERVE_TABLE} is natfwd's own"
    ]
    if replace:
        lines += [f"table inet {SERVE_TABLE}", f"delete table inet {SERVE_TABLE}"]
    else:
        lines += [f"flush chain inet {SERVE_TABLE} {chain}" for chain in SERVE_CHAINS]
        lines += [f"flush set inet {SERVE_TABLE} {name}" for name in SERVE_SETS]
        lines += [
            f"delete counter inet {SERVE_TABLE} {counter_name(port, kind)}"
            for port in sorted(set(dropped))
            for kind in COUNTER_KINDS
        ]
    return "\n".join(lines + _serve_body(t)) + "\n"


def render_serve_delete() -> str:
    """nft -f input that removes serve's table."""
    return f"delete table inet {SERVE_TABLE}\n"
