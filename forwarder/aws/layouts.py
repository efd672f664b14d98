"""The --ha and --replicas layouts on top of the shared pieces: what differs from what exists, and making it so."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from forwarder.aws import balancer, fleet, userdata
from forwarder.aws.balancer import BalancerChanges, BalancerGroup, ZoneAddress
from forwarder.aws.client import AwsClient
from forwarder.aws.fleet import FleetChanges
from forwarder.aws.inventory import Address, Group, Instance, Inventory
from forwarder.aws.plan import Plan
from forwarder.aws.settle import settle
from forwarder.aws.waiter import Progress, Timing, wait_for_instances
from forwarder.errors import NatfwdError


class LayoutConflict(NatfwdError):
    """What exists was made for another layout, and provision does not switch between those two."""


@dataclass(frozen=True, slots=True)
class GroupChanges:
    """The layout-specific part of a diff (ha and replicas)."""

    fleet: FleetChanges
    balancer: BalancerChanges | None
    # Instances of the single layout that the group takes over from (single -> ha keeps the Elastic IP).
    retire: tuple[Instance, ...]
    claim: bool  # ha: provision associates the Elastic IP with the group's instance

    @property
    def empty(self) -> bool:
        return (
            self.fleet.empty and (self.balancer is None or self.balancer.empty) and not self.retire and not self.claim
        )

    def lines(self, plan: Plan) -> list[str]:
        lines = self.balancer.lines(plan) if self.balancer is not None else []
        lines += self.fleet.lines(plan)
        if self.claim:
            lines.append("associate the Elastic IP with the group's instance once it runs (it also claims it at boot)")
        for instance in self.retire:
            lines.append(f"then terminate instance {instance.instance_id} of the single layout (the group replaces it)")
        return lines


def check_switch(plan: Plan, inventory: Inventory) -> None:
    """Raise LayoutConflict unless what exists can converge to the plan's layout.

    Allowed: the same layout, and single -> ha (the group's instance takes over the same Elastic IP).
    """
    found = inventory.layout
    if found is None or found == plan.layout or (found == "single" and plan.layout == "ha"):
        return
    flags = {"single": "no --ha or --replicas", "ha": "--ha", "replicas": "--replicas"}
    raise LayoutConflict(
        f"cluster {plan.cluster_id!r} is provisioned as the {found} layout ({flags[found]}); switching it to "
        f"{plan.layout} is not built: run natfwd destroy --cluster-id {plan.cluster_id}, then provision again "
        "(the clients' address changes)"
    )


def user_data(plan: Plan, address: Address | None, zone_addresses: Sequence[ZoneAddress]) -> str | None:
    """The user data of the group's instances, or None while the address it names does not exist yet."""
    if plan.layout == "ha":
        if address is None:
            return None
        return userdata.render(plan, address.public_ip, allocation_id=address.allocation_id)
    first = [a for a in zone_addresses if a.zone == plan.zones[0]]
    return userdata.render(plan, first[0].public_ip) if first else None


def diff(plan: Plan, inventory: Inventory, group: Group | None, address: Address | None) -> GroupChanges:
    """The group, template and load balancer changes, given the instances' security group and (ha) the address."""
    zone_addresses = [ZoneAddress(a.allocation_id, a.public_ip, a.zone) for a in inventory.addresses if a.zone]
    text = user_data(plan, address, zone_addresses)
    wanted = fleet.template_data(plan, group.group_id if group else "sg-new", text or "")
    fleet_changes = fleet.diff(plan, inventory.templates, inventory.scaling_groups, wanted)
    if text is None and fleet_changes.template is not None:
        fleet_changes = FleetChanges(
            fleet_changes.template,
            ("a new Elastic IP (the old one is gone), so a new config",),
            fleet_changes.group,
            fleet_changes.group_reasons,
        )
    balancer_changes = None
    if plan.layout == "replicas":
        found = inventory.balancer_groups[0] if inventory.balancer_groups else None
        balancer_group = BalancerGroup(found.group_id, found.ingress, found.egress) if found else None
        balancer_changes = balancer.diff(
            plan,
            balancer_group,
            group.group_id if group else None,
            zone_addresses,
            inventory.balancers,
            inventory.target_groups,
            inventory.listeners,
        )
    members = {i.instance_id for i in inventory.instances if i.group}
    claim = plan.layout == "ha" and (address is None or address.instance_id not in members)
    return GroupChanges(fleet_changes, balancer_changes, inventory.standalone, claim)


@dataclass
class Applied:
    """What the group side ended with."""

    template_id: str = ""
    group_name: str = ""
    instance_ids: tuple[str, ...] = ()
    public_ips: tuple[str, ...] = ()
    dns_name: str = ""
    rollout: str = ""


def apply_group(
    client: AwsClient,
    plan: Plan,
    changes: GroupChanges,
    nat_group_id: str,
    address: tuple[str, str] | None,
    balancer_made: balancer.Made,
    fleet_made: fleet.Made,
    timing: Timing,
    progress: Progress,
) -> Applied:
    """Create or converge the load balancer (replicas), the template and the group; under ha, put the Elastic IP
    (`address`: allocation id, public IP) on the group's instance and retire a single-layout instance.

    Raises AwsError; what was created is in `balancer_made` and `fleet_made` (for a rollback).
    """
    applied = Applied()
    target_group_arns: tuple[str, ...] = ()
    if plan.layout == "replicas":
        assert changes.balancer is not None
        balancer_group_id = balancer_made.group_id or (
            changes.balancer.group.group_id if changes.balancer.group else ""
        )
        public_ips, target_group_arns, applied.dns_name = balancer.converge(
            client, plan, changes.balancer, balancer_group_id, nat_group_id, timing, progress, balancer_made
        )
        applied.public_ips = public_ips
        text = userdata.render(plan, public_ips[0])
    else:
        assert address is not None
        applied.public_ips = (address[1],)
        text = userdata.render(plan, address[1], allocation_id=address[0])
    data = fleet.template_data(plan, nat_group_id, text)
    applied.template_id, applied.group_name = fleet.converge(
        client, plan, changes.fleet, data, target_group_arns, progress, fleet_made
    )
    old_members = changes.fleet.group.instance_ids if changes.fleet.group is not None else ()
    replaced: tuple[str, ...] = ()
    if changes.fleet.new_version and old_members:
        applied.rollout = _roll_out(client, plan, old_members, progress)
        replaced = old_members if plan.layout == "ha" else ()
    if plan.layout == "ha":
        assert address is not None
        applied.instance_ids = _claim(client, plan, address, changes, replaced, timing, progress)
    else:
        applied.instance_ids = _members(client, plan)
    return applied


def _members(client: AwsClient, plan: Plan) -> tuple[str, ...]:
    groups = [g for g in fleet.find_groups(client, plan.cluster_id) if g.name == plan.group_name]
    return groups[0].instance_ids if groups else ()


def _roll_out(client: AwsClient, plan: Plan, old_members: Sequence[str], progress: Progress) -> str:
    if plan.layout == "replicas":
        refresh = client.start_instance_refresh(plan.group_name)
        progress(f"started instance refresh {refresh} of {plan.group_name}")
        return f"instance refresh {refresh}"
    for instance_id in old_members:
        client.terminate_in_group(instance_id)
        progress(f"terminating {instance_id} in {plan.group_name}; the group launches its replacement")
    return f"replaced {', '.join(old_members)}"


def _claim(
    client: AwsClient,
    plan: Plan,
    address: tuple[str, str],
    changes: GroupChanges,
    replaced: tuple[str, ...],
    timing: Timing,
    progress: Progress,
) -> tuple[str, ...]:
    """Wait for the group's instance, give it the Elastic IP (its boot does the same), retire a single instance."""
    allocation_id, public_ip = address
    start = timing.clock()
    members: tuple[str, ...] = ()
    while True:
        retiring = {i.instance_id for i in changes.retire} | set(replaced)
        members = tuple(i for i in _members(client, plan) if i not in retiring)
        if members:
            break
        if timing.clock() - start >= timing.timeout_s:
            raise NatfwdError(f"gave up after {timing.timeout_s:.0f} s waiting for {plan.group_name} to launch")
        progress(f"waiting for {plan.group_name} to launch its instance")
        timing.sleep(timing.poll_s)
    wait_for_instances(client, list(members), "running", progress, timing)
    if changes.claim or changes.retire or changes.fleet.new_version:
        settle(lambda: client.associate_address(allocation_id, members[0]), timing)
        progress(f"associated {public_ip} with {members[0]}")
    if changes.retire:
        client.terminate_instances([i.instance_id for i in changes.retire])
        progress(f"terminating {', '.join(i.instance_id for i in changes.retire)}: the group took over")
    return members
