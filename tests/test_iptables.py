# ruff: noqa: E501  (the expected rule text is exact, and rules are long lines)
"""emit-iptables: exact text per format and --save family, refusals, and every format applied in a lab."""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

import pytest
from labkit import memcached_client, natfwd, root, ruleset, running_lab, sysctl, write_config

from forwarder import config, iptables, netns
from forwarder.config import ConfigError
from forwarder.lab import CLIENT_ADDRESS, PUBLIC_ADDRESS, Lab

TWO_FORWARDS = """\
engine: memcached
public_address: 203.0.113.73
interface: ens5
allowed_clients: [198.51.100.27/32, 192.0.2.0/24]
forwards:
  - {port: 11211, target: 10.0.1.230:11211}
  - {port: 11212, target: 10.0.1.231:11211}
"""

EXPECTED_COMMANDS = """\
#!/bin/sh
# natfwd emit-iptables --format commands: memcached, 2 forward(s) arriving on ens5 for 203.0.113.73
# Only these clients are forwarded: 198.51.100.27/32, 192.0.2.0/24
# Safe to run again: it rebuilds its own NATFWD-* chains and jumps to each exactly once.
set -eu
sysctl -qw net.ipv4.ip_forward=1

natfwd_chain() {  # TABLE CHAIN PARENT: create CHAIN if missing, flush it, jump to it from PARENT once
  iptables -w -t "$1" -n -L "$2" >/dev/null 2>&1 || iptables -w -t "$1" -N "$2"
  iptables -w -t "$1" -F "$2"
  iptables -w -t "$1" -C "$3" -j "$2" 2>/dev/null || iptables -w -t "$1" -I "$3" 1 -j "$2"
}
natfwd_chain nat NATFWD-PREROUTING PREROUTING
natfwd_chain nat NATFWD-POSTROUTING POSTROUTING
natfwd_chain filter NATFWD-FORWARD FORWARD
# forwards[0]: 11211 -> 10.0.1.230:11211
iptables -w -t nat -A NATFWD-PREROUTING -i ens5 -s 198.51.100.27/32 -p tcp --dport 11211 -j DNAT --to-destination 10.0.1.230:11211
iptables -w -t nat -A NATFWD-PREROUTING -i ens5 -s 192.0.2.0/24 -p tcp --dport 11211 -j DNAT --to-destination 10.0.1.230:11211
iptables -w -t nat -A NATFWD-POSTROUTING -d 10.0.1.230/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j MASQUERADE
iptables -w -t filter -A NATFWD-FORWARD -i ens5 -s 198.51.100.27/32 -d 10.0.1.230/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
iptables -w -t filter -A NATFWD-FORWARD -s 10.0.1.230/32 -d 198.51.100.27/32 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
iptables -w -t filter -A NATFWD-FORWARD -i ens5 -s 192.0.2.0/24 -d 10.0.1.230/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
iptables -w -t filter -A NATFWD-FORWARD -s 10.0.1.230/32 -d 192.0.2.0/24 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
# forwards[1]: 11212 -> 10.0.1.231:11211
iptables -w -t nat -A NATFWD-PREROUTING -i ens5 -s 198.51.100.27/32 -p tcp --dport 11212 -j DNAT --to-destination 10.0.1.231:11211
iptables -w -t nat -A NATFWD-PREROUTING -i ens5 -s 192.0.2.0/24 -p tcp --dport 11212 -j DNAT --to-destination 10.0.1.231:11211
iptables -w -t nat -A NATFWD-POSTROUTING -d 10.0.1.231/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j MASQUERADE
iptables -w -t filter -A NATFWD-FORWARD -i ens5 -s 198.51.100.27/32 -d 10.0.1.231/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
iptables -w -t filter -A NATFWD-FORWARD -s 10.0.1.231/32 -d 198.51.100.27/32 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
iptables -w -t filter -A NATFWD-FORWARD -i ens5 -s 192.0.2.0/24 -d 10.0.1.231/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
iptables -w -t filter -A NATFWD-FORWARD -s 10.0.1.231/32 -d 192.0.2.0/24 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
"""


EXPECTED_RESTORE = """\
# natfwd emit-iptables --format restore: memcached, 2 forward(s) arriving on ens5 for 203.0.113.73
# Only these clients are forwarded: 198.51.100.27/32, 192.0.2.0/24
# Input for `iptables-restore --noflush`, applied atomically. Meant for a fresh box or boot: loading it
# again refills the NATFWD-* chains but adds a second jump to them; re-apply with --format commands.
# Also needed, since iptables-restore cannot set it: sysctl -w net.ipv4.ip_forward=1
*nat
:NATFWD-PREROUTING - [0:0]
:NATFWD-POSTROUTING - [0:0]
-I PREROUTING 1 -j NATFWD-PREROUTING
-I POSTROUTING 1 -j NATFWD-POSTROUTING
# forwards[0]: 11211 -> 10.0.1.230:11211
-A NATFWD-PREROUTING -i ens5 -s 198.51.100.27/32 -p tcp --dport 11211 -j DNAT --to-destination 10.0.1.230:11211
-A NATFWD-PREROUTING -i ens5 -s 192.0.2.0/24 -p tcp --dport 11211 -j DNAT --to-destination 10.0.1.230:11211
-A NATFWD-POSTROUTING -d 10.0.1.230/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j MASQUERADE
# forwards[1]: 11212 -> 10.0.1.231:11211
-A NATFWD-PREROUTING -i ens5 -s 198.51.100.27/32 -p tcp --dport 11212 -j DNAT --to-destination 10.0.1.231:11211
-A NATFWD-PREROUTING -i ens5 -s 192.0.2.0/24 -p tcp --dport 11212 -j DNAT --to-destination 10.0.1.231:11211
-A NATFWD-POSTROUTING -d 10.0.1.231/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
*filter
:NATFWD-FORWARD - [0:0]
-I FORWARD 1 -j NATFWD-FORWARD
# forwards[0]: 11211 -> 10.0.1.230:11211
-A NATFWD-FORWARD -i ens5 -s 198.51.100.27/32 -d 10.0.1.230/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
-A NATFWD-FORWARD -s 10.0.1.230/32 -d 198.51.100.27/32 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
-A NATFWD-FORWARD -i ens5 -s 192.0.2.0/24 -d 10.0.1.230/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
-A NATFWD-FORWARD -s 10.0.1.230/32 -d 192.0.2.0/24 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
# forwards[1]: 11212 -> 10.0.1.231:11211
-A NATFWD-FORWARD -i ens5 -s 198.51.100.27/32 -d 10.0.1.231/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
-A NATFWD-FORWARD -s 10.0.1.231/32 -d 198.51.100.27/32 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
-A NATFWD-FORWARD -i ens5 -s 192.0.2.0/24 -d 10.0.1.231/32 -p tcp --dport 11211 -m conntrack --ctstate DNAT -j ACCEPT
-A NATFWD-FORWARD -s 10.0.1.231/32 -d 192.0.2.0/24 -p tcp --sport 11211 -m conntrack --ctstate ESTABLISHED -j ACCEPT
COMMIT
"""


EXPECTED_NFT = """\
#!/usr/sbin/nft -f
# natfwd emit-iptables --format nft: memcached, 2 forward(s) arriving on ens5 for 203.0.113.73
# Only these clients are forwarded: 198.51.100.27/32, 192.0.2.0/24
# Safe to load again: the table is created if missing, deleted, and rebuilt in one transaction.
# Also needed, since nft cannot set it: sysctl -w net.ipv4.ip_forward=1
table ip natfwd
delete table ip natfwd
table ip natfwd {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\t# forwards[0]: 11211 -> 10.0.1.230:11211
\t\tiifname "ens5" ip saddr { 198.51.100.27/32, 192.0.2.0/24 } tcp dport 11211 dnat to 10.0.1.230:11211
\t\t# forwards[1]: 11212 -> 10.0.1.231:11211
\t\tiifname "ens5" ip saddr { 198.51.100.27/32, 192.0.2.0/24 } tcp dport 11212 dnat to 10.0.1.231:11211
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat ip daddr 10.0.1.230 tcp dport 11211 masquerade
\t\tct status dnat ip daddr 10.0.1.231 tcp dport 11211 masquerade
\t}
}
"""


EXPECTED_INSTALL_FIRST = {
    "amazon-linux": """rpm -q iptables-services >/dev/null 2>&1 || yum install -y iptables-services
""",
    "debian": """dpkg -s iptables-persistent >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -qy iptables-persistent; }
""",
}
EXPECTED_SAVE = {
    ("commands", "amazon-linux"): """\

# Persist across reboots (Amazon Linux): ip_forward in sysctl.d, rules saved by iptables-services.
echo 'net.ipv4.ip_forward=1' > /etc/sysctl.d/90-natfwd.conf
systemctl enable iptables
service iptables save
""",
    ("commands", "debian"): """\

# Persist across reboots (Debian/Ubuntu): ip_forward in sysctl.d, rules saved by netfilter-persistent.
echo 'net.ipv4.ip_forward=1' > /etc/sysctl.d/90-natfwd.conf
systemctl enable netfilter-persistent
netfilter-persistent save
""",
    ("restore", "amazon-linux"): """\

# Persist across reboots (Amazon Linux): after `iptables-restore --noflush` of this file, run:
#   echo 'net.ipv4.ip_forward=1' > /etc/sysctl.d/90-natfwd.conf
#   rpm -q iptables-services >/dev/null 2>&1 || yum install -y iptables-services
#   systemctl enable iptables
#   service iptables save
""",
    ("restore", "debian"): """\

# Persist across reboots (Debian/Ubuntu): after `iptables-restore --noflush` of this file, run:
#   echo 'net.ipv4.ip_forward=1' > /etc/sysctl.d/90-natfwd.conf
#   dpkg -s iptables-persistent >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -qy iptables-persistent; }
#   systemctl enable netfilter-persistent
#   netfilter-persistent save
""",
    ("nft", "amazon-linux"): """\

# Persist across reboots (Amazon Linux): save this output as natfwd.nft, then run:
#   echo 'net.ipv4.ip_forward=1' > /etc/sysctl.d/90-natfwd.conf
#   rpm -q nftables >/dev/null 2>&1 || yum install -y nftables
#   install -D -m 0644 natfwd.nft /etc/nftables.d/natfwd.nft
#   grep -qxF 'include "/etc/nftables.d/natfwd.nft"' /etc/sysconfig/nftables.conf || echo 'include "/etc/nftables.d/natfwd.nft"' >> /etc/sysconfig/nftables.conf
#   systemctl enable nftables
""",
    ("nft", "debian"): """\

# Persist across reboots (Debian/Ubuntu): save this output as natfwd.nft, then run:
#   echo 'net.ipv4.ip_forward=1' > /etc/sysctl.d/90-natfwd.conf
#   dpkg -s nftables >/dev/null 2>&1 || { apt-get update -q && apt-get install -qy nftables; }
#   install -D -m 0644 natfwd.nft /etc/nftables.d/natfwd.nft
#   grep -qxF 'include "/etc/nftables.d/natfwd.nft"' /etc/nftables.conf || echo 'include "/etc/nftables.d/natfwd.nft"' >> /etc/nftables.conf
#   systemctl enable nftables
""",
}


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("commands", EXPECTED_COMMANDS), ("restore", EXPECTED_RESTORE), ("nft", EXPECTED_NFT)],
)
def test_render_exact_text(fmt: iptables.Format, expected: str) -> None:
    assert iptables.render(config.loads(TWO_FORWARDS), fmt) == expected


@pytest.mark.parametrize(("fmt", "family"), sorted(EXPECTED_SAVE))
def test_save_appends_the_persistence_step(fmt: iptables.Format, family: iptables.SaveFamily) -> None:
    cfg = config.loads(TWO_FORWARDS)
    rules = iptables.render(cfg, fmt)
    if fmt == "commands":
        # The package that persists the rules is installed before the first rule, not after them.
        install = EXPECTED_INSTALL_FIRST[family]
        rules = rules.replace(
            "set -eu\n", f"set -eu\n# The package that persists the rules ({family}), first.\n{install}\n", 1
        )
    assert iptables.render(cfg, fmt, family) == rules + EXPECTED_SAVE[(fmt, family)]


def test_cli_prints_the_rules_on_stdout_only(tmp_path: Path) -> None:
    path = write_config(tmp_path, TWO_FORWARDS)
    result = natfwd("emit-iptables", "--config", str(path), "--format", "nft", "--save", "debian")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == EXPECTED_NFT + EXPECTED_SAVE[("nft", "debian")]
    assert natfwd("emit-iptables", "--config", str(path)).stdout == EXPECTED_COMMANDS


def _replace(old: str, new: str) -> str:
    assert old in TWO_FORWARDS
    return TWO_FORWARDS.replace(old, new)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_replace("10.0.1.231:11211", "node2.example.internal:11211"),
         "forwards[1].target: node2.example.internal is a DNS name; kernel rules need an IP address"),
        (_replace("10.0.1.231:11211", "'[2001:db8::7]:11211'"), "forwards[1].target: 2001:db8::7 is IPv6"),
        (_replace("192.0.2.0/24", "2001:db8::/32"), "allowed_clients[1]: 2001:db8::/32 is IPv6"),
        (_replace("engine: memcached", "engine: redis-cluster"), "engine: redis-cluster needs MOVED/ASK"),
        (TWO_FORWARDS + "tls: {cert: /etc/natfwd/server.pem, key: /etc/natfwd/server.key}\n",
         "tls: kernel rules cannot terminate TLS"),
        (_replace("forwards:\n  - {port: 11211, target: 10.0.1.230:11211}\n  - {port: 11212, target: 10.0.1.231:11211}\n",
                  "discovery: {cluster_id: mycluster}\n"),
         "forwards: empty; discovery builds forwards only at runtime"),
    ],
    ids=["dns-target", "ipv6-target", "ipv6-client", "redis-cluster", "tls", "discovery-only"],
)  # fmt: skip
def test_what_dnat_cannot_express_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        iptables.render(config.loads(text))


def test_cli_refusal_is_one_line_exit_2_and_nothing_on_stdout(tmp_path: Path) -> None:
    path = write_config(tmp_path, _replace("10.0.1.231:11211", "node2.example.internal:11211"))
    result = natfwd("emit-iptables", "--config", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("natfwd: error: forwards[1].target: node2.example.internal is a DNS name")
    assert "natfwd serve, which re-resolves names" in result.stderr and len(result.stderr.splitlines()) == 1


def test_auto_discovery_is_left_out_with_a_note() -> None:
    cfg = config.loads(TWO_FORWARDS + "auto_discovery: {port: 11210, target: cfg.example.internal:11211}\n")
    text = iptables.render(cfg, "nft")
    assert "# Note: auto_discovery (port 11210) is not rendered" in text
    assert "11210" not in text.replace("auto_discovery (port 11210)", "")


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("interface: ens5", "interface: eth0;reboot", "interface"),
        ("interface: ens5", "interface: 'eth0 $(reboot)'", "interface"),
        ("interface: ens5", 'interface: "eth0\\"; flush ruleset; \\""', "interface"),
        ("interface: ens5", 'interface: "eth0\\nreboot"', "interface"),
        ("10.0.1.231:11211", "$(x):11211", "forwards[1].target"),
        ("10.0.1.231:11211", "'`reboot`:11211'", "forwards[1].target"),
        ("10.0.1.231:11211", "'10.0.1.231;reboot:11211'", "forwards[1].target"),
        ("10.0.1.231:11211", "'10.0.1.231:11211 -j ACCEPT'", "forwards[1].target"),
        ("192.0.2.0/24", "'192.0.2.0/24 -j ACCEPT'", "allowed_clients[1]"),
        ("203.0.113.73", "'203.0.113.73;reboot'", "public_address"),
    ],
)
@pytest.mark.parametrize("fmt", iptables.FORMATS)
def test_injection_attempts_exit_2_with_nothing_printed(tmp_path: Path, old: str, new: str, key: str, fmt: str) -> None:
    path = write_config(tmp_path, _replace(old, new))
    result = natfwd("emit-iptables", "--config", str(path), "--format", fmt)
    assert (result.returncode, result.stdout) == (2, "")
    # FILE:LINE: first, as a compiler reports (forwarder/config.py).
    assert re.match(rf"natfwd: error: {re.escape(str(path))}:\d+: {re.escape(key)}: ", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


# --- in a lab: every format, applied exactly as emitted on a fresh NAT namespace ---


def _apply(lab: Lab, fmt: iptables.Format) -> None:
    text = iptables.render(config.loads(lab.config_text()), fmt)
    if fmt == "commands":
        lab.run(lab.nat, ["sh", "-s"], input=text)
        return
    lab.run(lab.nat, ["iptables-restore", "--noflush"] if fmt == "restore" else ["nft", "-f", "-"], input=text)
    # These formats cannot set it; their text says so, and the operator runs it.
    lab.run(lab.nat, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])


def _seed(lab: Lab) -> None:
    """Give each node a key only it has: `owner` = its namespace."""
    for node in lab.nodes:
        with memcached_client(node.address, node.port, lab.nat) as client:
            client.set("owner", node.namespace)
            client.set(f"only-{node.index}", "yes")


@root
@pytest.mark.parametrize("fmt", iptables.FORMATS)
def test_each_format_reaches_each_node_and_only_that_one(fmt: iptables.Format) -> None:
    with running_lab() as lab:
        _seed(lab)
        _apply(lab, fmt)
        for node in lab.nodes:
            with memcached_client(PUBLIC_ADDRESS, node.public_port, lab.client) as client:
                assert client.get("owner") == node.namespace.encode()
                keys = [f"only-{other.index}" for other in lab.nodes]
                assert client.get_many(keys) == {f"only-{node.index}": b"yes"}
        # A source outside allowed_clients is not forwarded: the NAT box itself refuses it.
        lab.run(lab.client, ["ip", "addr", "add", "198.51.100.99/32", "dev", "eth0"])
        lab.run(lab.nat, ["ip", "route", "add", "198.51.100.99/32", "dev", "eth0"])
        with netns.entered(lab.client):
            stranger = socket.socket()
        with stranger, pytest.raises(ConnectionRefusedError):
            stranger.settimeout(3)
            stranger.bind(("198.51.100.99", 0))
            stranger.connect((PUBLIC_ADDRESS, lab.nodes[0].public_port))


@root
def test_without_rules_the_client_cannot_reach_the_nodes() -> None:
    with running_lab() as lab:
        with netns.entered(lab.client):
            sock = socket.socket()
        with sock, pytest.raises(OSError) as caught:
            sock.settimeout(3)
            sock.connect((lab.nodes[0].address, lab.nodes[0].port))
        assert caught.value.errno == errno.ENETUNREACH
        with netns.entered(lab.client):
            sock = socket.socket()
        with sock, pytest.raises(ConnectionRefusedError):
            sock.settimeout(3)
            sock.connect((PUBLIC_ADDRESS, lab.nodes[0].public_port))


@root
def test_commands_twice_leave_the_same_ruleset_and_set_ip_forward() -> None:
    with running_lab() as lab:
        assert sysctl(lab, lab.nat, "net.ipv4.ip_forward") == "0"
        _apply(lab, "commands")
        once = ruleset(lab)
        assert sysctl(lab, lab.nat, "net.ipv4.ip_forward") == "1"
        _apply(lab, "commands")
        assert ruleset(lab) == once
        assert once.count("-j NATFWD-PREROUTING") == 1 and once.count("DNAT --to-destination") == 3
        _seed(lab)
        with memcached_client(PUBLIC_ADDRESS, lab.nodes[2].public_port, lab.client) as client:
            assert client.get("owner") == lab.nodes[2].namespace.encode()


@root
def test_nft_twice_leaves_the_same_ruleset() -> None:
    with running_lab() as lab:
        _apply(lab, "nft")
        once = ruleset(lab)
        _apply(lab, "nft")
        assert ruleset(lab) == once
        assert once.count("table ip natfwd") == 1 and once.count("dnat to") == 3
        _seed(lab)
        with memcached_client(PUBLIC_ADDRESS, lab.nodes[1].public_port, lab.client) as client:
            assert client.get("owner") == lab.nodes[1].namespace.encode()


def test_lab_client_address_is_the_one_the_rules_allow() -> None:
    assert f"{CLIENT_ADDRESS}/32" in Lab("x").config_text()
