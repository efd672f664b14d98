"""Security group rules as data: the Rule type, and its conversion to and from EC2 IpPermissions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Rule:
    """One security group rule. `peer` is a CIDR, a security group id (sg-...) or a prefix list id (pl-...).

    `protocol` "-1" means every protocol, with no ports. The description does not take part in equality, so
    a rule found in AWS equals the planned one whatever its description says.
    """

    protocol: str
    from_port: int | None
    to_port: int | None
    peer: str
    description: str = field(default="", compare=False)

    @classmethod
    def tcp(cls, port: int, peer: str, description: str = "") -> Rule:
        return cls("tcp", port, port, peer, description)

    @property
    def ports(self) -> str:
        if self.protocol == "-1":
            return "all"
        if self.from_port == self.to_port:
            return str(self.from_port)
        return f"{self.from_port}-{self.to_port}"

    def render(self, inbound: bool, peer_name: str | None = None) -> str:
        """One line such as `inbound   tcp 11211 from 198.51.100.27/32   forward to node 0001`."""
        protocol = "all" if self.protocol == "-1" else self.protocol
        word = "from" if inbound else "to"
        direction = "inbound" if inbound else "outbound"
        line = f"{direction:<9} {protocol:<3} {self.ports:<5} {word:<4} {peer_name or self.peer:<20}"
        return f"{line} {self.description}".rstrip()


# What AWS puts in every new security group; natfwd removes it (all traffic is denied unless a rule allows it).
DEFAULT_EGRESS = Rule("-1", None, None, "0.0.0.0/0", "default allow-all outbound")


def to_permission(rule: Rule) -> dict[str, Any]:
    """The EC2 IpPermissions entry for one rule."""
    permission: dict[str, Any] = {"IpProtocol": rule.protocol}
    if rule.protocol != "-1":
        permission["FromPort"] = rule.from_port
        permission["ToPort"] = rule.to_port
    described = {"Description": rule.description} if rule.description else {}
    if rule.peer.startswith("sg-"):
        permission["UserIdGroupPairs"] = [{"GroupId": rule.peer, **described}]
    elif rule.peer.startswith("pl-"):
        permission["PrefixListIds"] = [{"PrefixListId": rule.peer, **described}]
    elif ":" in rule.peer:
        permission["Ipv6Ranges"] = [{"CidrIpv6": rule.peer, **described}]
    else:
        permission["IpRanges"] = [{"CidrIp": rule.peer, **described}]
    return permission


def from_permissions(permissions: Iterable[Mapping[str, Any]]) -> list[Rule]:
    """Flatten EC2 IpPermissions (one entry may hold many peers) into one Rule per peer."""
    found = []
    for permission in permissions:
        protocol = str(permission.get("IpProtocol", "-1"))
        if protocol in ("6", "tcp"):
            protocol = "tcp"
        all_traffic = protocol == "-1"
        from_port = None if all_traffic else permission.get("FromPort")
        to_port = None if all_traffic else permission.get("ToPort")
        peers: list[tuple[str, str]] = []
        peers += [(r["CidrIp"], r.get("Description", "")) for r in permission.get("IpRanges") or ()]
        peers += [(r["CidrIpv6"], r.get("Description", "")) for r in permission.get("Ipv6Ranges") or ()]
        peers += [(r["GroupId"], r.get("Description", "")) for r in permission.get("UserIdGroupPairs") or ()]
        peers += [(r["PrefixListId"], r.get("Description", "")) for r in permission.get("PrefixListIds") or ()]
        for peer, description in peers:
            found.append(Rule(protocol, from_port, to_port, str(peer), str(description or "")))
    return found
