"""Choose the NAT instance's subnet: a public one, whose route table sends 0.0.0.0/0 to an internet gateway."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from forwarder.errors import NatfwdError, UsageError


class NoPublicSubnet(NatfwdError):
    """The cluster's VPC has no subnet with a default route to an internet gateway."""


@dataclass(frozen=True, slots=True)
class Subnet:
    """A public subnet and the internet gateway its route table uses."""

    subnet_id: str
    availability_zone: str
    cidr: str
    gateway_id: str


def _internet_gateway(route_table: Mapping[str, Any]) -> str | None:
    for route in route_table.get("Routes") or ():
        if (
            route.get("DestinationCidrBlock") == "0.0.0.0/0"
            and str(route.get("GatewayId", "")).startswith("igw-")
            and route.get("State", "active") == "active"
        ):
            return str(route["GatewayId"])
    return None


def public_subnets(subnets: Iterable[Mapping[str, Any]], route_tables: Iterable[Mapping[str, Any]]) -> list[Subnet]:
    """The public subnets among `subnets`, ordered by availability zone then id (so the choice is stable).

    A subnet uses the route table explicitly associated with it, or else its VPC's main route table.
    """
    explicit: dict[str, Mapping[str, Any]] = {}
    main: dict[str, Mapping[str, Any]] = {}
    for route_table in route_tables:
        for association in route_table.get("Associations") or ():
            if association.get("SubnetId"):
                explicit[str(association["SubnetId"])] = route_table
            elif association.get("Main"):
                main[str(route_table.get("VpcId", ""))] = route_table
    found = []
    for subnet in subnets:
        table: Mapping[str, Any] | None = explicit.get(str(subnet["SubnetId"])) or main.get(
            str(subnet.get("VpcId", ""))
        )
        gateway = _internet_gateway(table) if table is not None else None
        if gateway is not None:
            found.append(
                Subnet(
                    str(subnet["SubnetId"]), str(subnet.get("AvailabilityZone", "")), str(subnet["CidrBlock"]), gateway
                )
            )
    return sorted(found, key=lambda s: (s.availability_zone, s.subnet_id))


def choose(
    subnets: Iterable[Mapping[str, Any]],
    route_tables: Iterable[Mapping[str, Any]],
    vpc_id: str,
    cluster_id: str,
    wanted: str | None = None,
) -> Subnet:
    """The subnet to launch in: `wanted` (--subnet-id) if given and public, else the first public subnet.

    Raises UsageError when `wanted` is not a public subnet of the VPC, NoPublicSubnet when the VPC has none.
    """
    subnets = list(subnets)
    candidates = public_subnets(subnets, route_tables)
    if wanted is not None:
        for subnet in candidates:
            if subnet.subnet_id == wanted:
                return subnet
        known = {str(s["SubnetId"]) for s in subnets}
        reason = (
            "is not public (no 0.0.0.0/0 route to an internet gateway)" if wanted in known else f"is not in {vpc_id}"
        )
        choices = ", ".join(s.subnet_id for s in candidates) or "none"
        raise UsageError(f"--subnet-id: {wanted} {reason}; public subnets of {vpc_id}: {choices}")
    if not candidates:
        raise NoPublicSubnet(
            f"VPC {vpc_id} of cluster {cluster_id!r} has no public subnet (one whose route table sends 0.0.0.0/0 "
            "to an internet gateway); add such a subnet, or that route, and run provision again"
        )
    return candidates[0]


def spread(
    subnets: Iterable[Mapping[str, Any]],
    route_tables: Iterable[Mapping[str, Any]],
    vpc_id: str,
    cluster_id: str,
    minimum_zones: int,
    wanted: str | None = None,
) -> tuple[Subnet, ...]:
    """One public subnet per availability zone, for an Auto Scaling group or a load balancer.

    `wanted` (--subnet-id), when given, is the subnet used in its zone and comes first. Raises UsageError or
    NoPublicSubnet as `choose` does, and NoPublicSubnet when the public subnets span fewer than
    `minimum_zones` zones.
    """
    subnets = list(subnets)
    route_tables = list(route_tables)
    first = choose(subnets, route_tables, vpc_id, cluster_id, wanted)
    picked = [first]
    for subnet in public_subnets(subnets, route_tables):
        if subnet.availability_zone not in {s.availability_zone for s in picked}:
            picked.append(subnet)
    if len(picked) < minimum_zones:
        zones = ", ".join(s.availability_zone for s in picked)
        raise NoPublicSubnet(
            f"VPC {vpc_id} of cluster {cluster_id!r} has public subnets in {len(picked)} availability zone(s) "
            f"({zones}); --ha and --replicas need public subnets in at least {minimum_zones} zones; add a public "
            "subnet in another zone, or drop --ha/--replicas for a single instance"
        )
    return tuple(picked)
