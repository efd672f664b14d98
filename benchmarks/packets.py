"""Packets through the NAT namespace: what a path costs the network, counted on the NAT's two sides.

The public side is the lab's eth0 (clients) and the private side its bridge br0 (nodes), so each packet the NAT
receives or sends is counted once, whether the kernel forwards it (direct, kernel DNAT) or a proxy relays its bytes.
Per request, this is where a relay that cuts bulk into more segments than the node sent shows (benchmarks/README.md,
"Splices of whole packets").
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from forwarder.lab import BRIDGE, PUBLIC_INTERFACE

SIDES = (PUBLIC_INTERFACE, BRIDGE)


@dataclass(frozen=True, slots=True)
class Packets:
    received: int = 0
    sent: int = 0

    def __sub__(self, other: Packets) -> Packets:
        return Packets(self.received - other.received, self.sent - other.sent)


def parse_links(text: str, names: tuple[str, ...] = SIDES) -> Packets:
    """`ip -s -j link show` output -> packets received and sent on the interfaces `names`."""
    received = sent = 0
    for link in json.loads(text):
        if link["ifname"] in names:
            stats = link["stats64"]
            received += int(stats["rx"]["packets"])
            sent += int(stats["tx"]["packets"])
    return Packets(received, sent)


def namespace(name: str) -> Packets | None:
    """The NAT namespace `name`'s counters; None if `ip` cannot read them (the measurement then goes without)."""
    try:
        done = subprocess.run(
            ["ip", "-n", name, "-s", "-j", "link", "show"], capture_output=True, text=True, timeout=10, check=True
        )
        return parse_links(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return None
