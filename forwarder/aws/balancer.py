"""The Network Load Balancer of --replicas: its security group, Elastic IPs, target groups and listeners."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from forwarder.aws.client import AwsClient
from forwarder.aws.plan import TAG_CLUSTER, TAG_ZONE, Plan, balancer_name, target_group_name
from forwarder.aws.rules import DEFAULT_EGRESS, Rule, to_permission
from forwarder.aws.settle import settle
from forwarder.aws.waiter import Progress, Timing
from forwarder.errors import NatfwdError

# Each instance sees the client's own address, so natfwd's allowlist still applies behind the load balancer.
TARGET_ATTRIBUTES = {"preserve_client_ip.enabled": "true"}
# Clients dial the zones' Elastic IPs directly, not the DNS name: each address must reach every healthy instance,
# whichever zone it runs in (an NLB balances within the zone unless cross-zone is on).
BALANCER_ATTRIBUTES = {"load_balancing.cross_zone.enabled": "true"}


@dataclass(frozen=True, slots=True)
class Balancer:
    arn: str
    name: str
    dns_name: str
    subnet_ids: tuple[str, ...]
    attributes_ok: bool = True


@dataclass(frozen=True, slots=True)
class TargetGroup:
    arn: str
    name: str
    port: int
    attributes_ok: bool


@dataclass(frozen=True, slots=True)
class Listener:
    arn: str
    port: int
    target_group_arn: str


@dataclass(frozen=True, slots=True)
class BalancerGroup:
    """The load balancer's security group and its current rules."""

    group_id: str
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class ZoneAddress:
    """One of the load balancer's Elastic IPs, tagged with its zone."""

    allocation_id: str
    public_ip: str
    zone: str


def find_balancers(client: AwsClient, cluster_id: str) -> tuple[Balancer, ...]:
    """The cluster's load balancer (by its name, then its tag), or none."""
    found = client.describe_load_balancers([balancer_name(cluster_id)])
    if not found:
        return ()
    tags = client.elb_tags([str(b["LoadBalancerArn"]) for b in found])
    balancers = []
    for entry in found:
        arn = str(entry["LoadBalancerArn"])
        if tags.get(arn, {}).get(TAG_CLUSTER) != cluster_id:
            continue
        zones = entry.get("AvailabilityZones") or ()
        balancers.append(
            Balancer(
                arn=arn,
                name=str(entry["LoadBalancerName"]),
                dns_name=str(entry.get("DNSName", "")),
                subnet_ids=tuple(sorted(str(z["SubnetId"]) for z in zones)),
                attributes_ok=_has(client.load_balancer_attributes(arn), BALANCER_ATTRIBUTES),
            )
        )
    return tuple(balancers)


def _has(attributes: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(attributes.get(k) == v for k, v in wanted.items())


def find_target_groups(client: AwsClient, cluster_id: str) -> tuple[TargetGroup, ...]:
    """The cluster's target groups: named natfwd-..., tagged for the cluster."""
    candidates = [t for t in client.describe_target_groups() if str(t["TargetGroupName"]).startswith("natfwd-")]
    if not candidates:
        return ()
    tags = client.elb_tags([str(t["TargetGroupArn"]) for t in candidates])
    groups = []
    for entry in candidates:
        arn = str(entry["TargetGroupArn"])
        if tags.get(arn, {}).get(TAG_CLUSTER) != cluster_id:
            continue
        ok = _has(client.target_group_attributes(arn), TARGET_ATTRIBUTES)
        groups.append(TargetGroup(arn, str(entry["TargetGroupName"]), int(entry["Port"]), ok))
    return tuple(sorted(groups, key=lambda t: t.port))


def find_listeners(client: AwsClient, balancers: Sequence[Balancer]) -> tuple[Listener, ...]:
    listeners = []
    for balancer in balancers:
        for entry in client.describe_listeners(balancer.arn):
            actions = entry.get("DefaultActions") or [{}]
            listeners.append(
                Listener(str(entry["ListenerArn"]), int(entry["Port"]), str(actions[0].get("TargetGroupArn", "")))
            )
    return tuple(sorted(listeners, key=lambda listener: listener.port))


@dataclass(frozen=True, slots=True)
class BalancerChanges:
    """What apply does on the load balancer side (None: create)."""

    group: BalancerGroup | None
    authorize_ingress: tuple[Rule, ...]
    revoke_ingress: tuple[Rule, ...]
    authorize_egress: tuple[Rule, ...]
    revoke_egress: tuple[Rule, ...]
    addresses: tuple[ZoneAddress, ...]
    allocate_zones: tuple[str, ...]
    balancer: Balancer | None
    target_groups: tuple[TargetGroup, ...]
    create_ports: tuple[int, ...]
    fix_attributes: tuple[str, ...]
    listeners: tuple[Listener, ...]
    listen_ports: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return not (
            self.group is None
            or self.authorize_ingress
            or self.revoke_ingress
            or self.authorize_egress
            or self.revoke_egress
            or self.allocate_zones
            or self.balancer is None
            or not self.balancer.attributes_ok
            or self.create_ports
            or self.fix_attributes
            or self.listen_ports
        )

    def lines(self, plan: Plan) -> list[str]:
        lines = []
        if self.group is None:
            lines.append(f"create security group {plan.balancer_group_name} for the load balancer with the rules above")
        else:
            lines.append(f"keep the load balancer's security group {self.group.group_id}")
            lines += [f"  + {rule.render(inbound=True)}" for rule in self.authorize_ingress]
            lines += [f"  - {rule.render(inbound=True)}" for rule in self.revoke_ingress]
            lines += [f"  + {rule.render(inbound=False)}" for rule in self.authorize_egress]
            lines += [f"  - {rule.render(inbound=False)}" for rule in self.revoke_egress]
        for address in self.addresses:
            lines.append(f"keep Elastic IP {address.public_ip} ({address.allocation_id}) in {address.zone}")
        lines += [f"allocate an Elastic IP for the load balancer in {zone}" for zone in self.allocate_zones]
        if self.balancer is None:
            lines.append(f"create Network Load Balancer {plan.balancer_name} in {', '.join(plan.zones)}")
        else:
            lines.append(f"keep Network Load Balancer {self.balancer.name} ({self.balancer.dns_name})")
            if not self.balancer.attributes_ok:
                lines.append("  turn cross-zone load balancing on")
        for group in self.target_groups:
            fix = ": turn client IP preservation on" if group.arn in self.fix_attributes else ""
            lines.append(f"keep target group {group.name}{fix}")
        lines += [f"create target group {target_group_name(plan.cluster_id, port)}" for port in self.create_ports]
        lines += [f"keep listener TCP {listener.port}" for listener in self.listeners]
        lines += [f"create listener TCP {port}" for port in self.listen_ports]
        return lines


def diff(
    plan: Plan,
    group: BalancerGroup | None,
    nat_group_id: str | None,
    addresses: Sequence[ZoneAddress],
    balancers: Sequence[Balancer],
    target_groups: Sequence[TargetGroup],
    listeners: Sequence[Listener],
) -> BalancerChanges:
    """Compare the planned load balancer with what exists. Pure.

    Raises NatfwdError when the load balancer was made for other zones or other node ports: AWS cannot move an
    NLB's Elastic IPs, and the group's target groups are fixed once made.
    """
    again = f"run natfwd destroy --cluster-id {plan.cluster_id}, then provision again"
    if len(balancers) > 1:
        raise NatfwdError(f"found {len(balancers)} load balancers for {plan.cluster_id}; {again}")
    balancer = balancers[0] if balancers else None
    wanted_subnets = tuple(sorted(s.subnet_id for s in plan.subnets))
    if balancer is not None and balancer.subnet_ids != wanted_subnets:
        raise NatfwdError(
            f"load balancer {balancer.name} is in subnets {', '.join(balancer.subnet_ids)}, the plan wants "
            f"{', '.join(wanted_subnets)}; an NLB's Elastic IPs cannot move: {again}"
        )
    ports = {f.port for f in plan.forwards}
    if balancer is not None and {t.port for t in target_groups} - ports:
        raise NatfwdError(f"the cluster's node ports changed since the load balancer was made; {again}")
    by_zone = {a.zone: a for a in addresses}
    ingress = set(group.ingress) if group else set()
    egress = set(group.egress) if group else {DEFAULT_EGRESS}
    wanted_in = plan.balancer_ingress()
    wanted_out = plan.balancer_egress(nat_group_id or "sg-new")
    return BalancerChanges(
        group=group,
        authorize_ingress=tuple(r for r in wanted_in if r not in ingress) if group else (),
        revoke_ingress=tuple(r for r in sorted(ingress, key=repr) if r not in wanted_in),
        authorize_egress=tuple(r for r in wanted_out if r not in egress) if group else (),
        revoke_egress=tuple(r for r in sorted(egress, key=repr) if r not in wanted_out) if group else (),
        addresses=tuple(by_zone[z] for z in plan.zones if z in by_zone),
        allocate_zones=tuple(z for z in plan.zones if z not in by_zone),
        balancer=balancer,
        target_groups=tuple(target_groups),
        create_ports=tuple(sorted(ports - {t.port for t in target_groups})),
        fix_attributes=tuple(t.arn for t in target_groups if not t.attributes_ok),
        listeners=tuple(listeners),
        listen_ports=tuple(sorted(ports - {listener.port for listener in listeners})),
    )


@dataclass
class Made:
    """What converge created, for a rollback."""

    group_id: str | None = None
    allocations: list[tuple[str, str, str]] = field(default_factory=list)  # (allocation id, public IP, zone)
    balancer: Balancer | None = None
    target_groups: list[TargetGroup] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)


def ensure_group(
    client: AwsClient, plan: Plan, changes: BalancerChanges, timing: Timing, progress: Progress, made: Made
) -> str:
    """The load balancer's security group, made first (the instances' rules reference it); returns its id."""
    if changes.group is not None:
        group_id = changes.group.group_id
        if changes.revoke_ingress:
            revoke = [to_permission(r) for r in changes.revoke_ingress]
            settle(lambda: client.revoke_ingress(group_id, revoke), timing)
        if changes.authorize_ingress:
            add = [to_permission(r) for r in changes.authorize_ingress]
            settle(lambda: client.authorize_ingress(group_id, add, plan.tags("rule")), timing)
        return group_id
    description = f"natfwd load balancer for ElastiCache cluster {plan.cluster_id}"
    group_id = client.create_security_group(
        plan.balancer_group_name, description, plan.vpc_id, plan.tags("load-balancer-security-group")
    )
    made.group_id = group_id
    progress(f"created security group {group_id} for the load balancer")
    add = [to_permission(r) for r in plan.balancer_ingress()]
    settle(lambda: client.authorize_ingress(group_id, add, plan.tags("rule")), timing)
    return group_id


def converge(
    client: AwsClient,
    plan: Plan,
    changes: BalancerChanges,
    group_id: str,
    nat_group_id: str,
    timing: Timing,
    progress: Progress,
    made: Made,
) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """The group's outbound rules, the addresses, the load balancer, its target groups and listeners.

    Returns (public IPs in zone order, target group ARNs in node port order, the DNS name). Raises AwsError.
    """
    # Outbound only to the instances, on the node ports (traffic and health checks); AWS's allow-all goes.
    if changes.group is None:
        revoke_out, add_out = [DEFAULT_EGRESS], list(plan.balancer_egress(nat_group_id))
    else:
        revoke_out, add_out = list(changes.revoke_egress), list(changes.authorize_egress)
    if revoke_out:
        revoke = [to_permission(r) for r in revoke_out]
        settle(lambda: client.revoke_egress(group_id, revoke), timing)
    if add_out:
        add = [to_permission(r) for r in add_out]
        settle(lambda: client.authorize_egress(group_id, add, plan.tags("rule")), timing)

    by_zone = {a.zone: (a.allocation_id, a.public_ip) for a in changes.addresses}
    for zone in changes.allocate_zones:
        allocation_id, public_ip = client.allocate_address((*plan.tags("elastic-ip"), (TAG_ZONE, zone)))
        made.allocations.append((allocation_id, public_ip, zone))
        by_zone[zone] = (allocation_id, public_ip)
        progress(f"allocated Elastic IP {public_ip} for the load balancer in {zone}")
    public_ips = tuple(by_zone[zone][1] for zone in plan.zones)

    if changes.balancer is None:
        mappings = [(s.subnet_id, by_zone[s.availability_zone][0]) for s in plan.subnets]
        created = client.create_network_load_balancer(
            plan.balancer_name, mappings, group_id, plan.tags("load-balancer")
        )
        balancer_arn, dns_name = str(created["LoadBalancerArn"]), str(created.get("DNSName", ""))
        made.balancer = Balancer(balancer_arn, plan.balancer_name, dns_name, ())
        progress(f"created Network Load Balancer {plan.balancer_name} ({dns_name})")
    else:
        balancer_arn, dns_name = changes.balancer.arn, changes.balancer.dns_name
    if changes.balancer is None or not changes.balancer.attributes_ok:
        client.set_load_balancer_attributes(balancer_arn, BALANCER_ATTRIBUTES)

    arns = {t.port: t.arn for t in changes.target_groups}
    for port in changes.create_ports:
        name = target_group_name(plan.cluster_id, port)
        arn = client.create_target_group(name, port, plan.vpc_id, plan.tags("target-group"))
        made.target_groups.append(TargetGroup(arn, name, port, True))
        client.set_target_group_attributes(arn, TARGET_ATTRIBUTES)
        arns[port] = arn
        progress(f"created target group {name}")
    for arn in changes.fix_attributes:
        client.set_target_group_attributes(arn, TARGET_ATTRIBUTES)
    for port in changes.listen_ports:
        listener_arn = client.create_listener(balancer_arn, port, arns[port], plan.tags("load-balancer"))
        made.listeners.append(Listener(listener_arn, port, arns[port]))
        progress(f"created listener TCP {port}")
    return public_ips, tuple(arns[f.port] for f in plan.forwards), dns_name
