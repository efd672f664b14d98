"""Apply a plan: diff it against what already exists (idempotency), create the rest, roll back on failure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from forwarder.aws import userdata
from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.destroy import destroy
from forwarder.aws.inventory import Address, Group, Instance, Inventory, Reference
from forwarder.aws.plan import TAG_CLUSTER, Plan
from forwarder.aws.rules import DEFAULT_EGRESS, Rule, from_permissions, to_permission
from forwarder.aws.waiter import Progress, Timing, wait_for_instances
from forwarder.errors import NatfwdError

T = TypeVar("T")

# EC2 is eventually consistent: a resource created a moment ago can still be "not found" for a few seconds.
_NOT_YET = {"InvalidGroup.NotFound", "InvalidInstanceID.NotFound", "InvalidAllocationID.NotFound"}
_SETTLE_ATTEMPTS = 5


def settle(call: Callable[[], T], timing: Timing) -> T:
    """Run `call`, retrying while AWS does not see a just-created resource yet (backoff 1, 2, 4, 8 s at most)."""
    for attempt in range(_SETTLE_ATTEMPTS):
        try:
            return call()
        except AwsError as exc:
            if exc.code not in _NOT_YET or attempt == _SETTLE_ATTEMPTS - 1:
                raise
            timing.sleep(min(timing.poll_s, 2.0**attempt))
    raise AssertionError("unreachable")


class Conflict(NatfwdError):
    """What exists for the cluster does not match the request; provision will not change it silently."""


class ProvisionFailed(NatfwdError):
    """A step failed after others had created resources; the message says what was rolled back or left."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What apply will do: None/empty means "keep what exists"."""

    group: Group | None
    authorize_ingress: tuple[Rule, ...]
    authorize_egress: tuple[Rule, ...]
    revoke_ingress: tuple[Rule, ...]
    revoke_egress: tuple[Rule, ...]
    cache_ports_missing: tuple[int, ...]
    address: Address | None
    instance: Instance | None
    associate: bool

    @property
    def empty(self) -> bool:
        return not (
            self.group is None
            or self.authorize_ingress
            or self.authorize_egress
            or self.revoke_ingress
            or self.revoke_egress
            or self.cache_ports_missing
            or self.address is None
            or self.instance is None
            or self.associate
        )

    def lines(self, plan: Plan) -> list[str]:
        """One line per action, with what is kept."""
        lines = []
        if self.group is None:
            lines.append(f"create security group {plan.name} with the rules above")
        else:
            lines.append(f"keep security group {self.group.group_id}")
            lines += [f"  add    {rule.render(inbound=True)}" for rule in self.authorize_ingress]
            lines += [f"  add    {rule.render(inbound=False)}" for rule in self.authorize_egress]
            lines += [f"  remove {rule.render(inbound=True)}" for rule in self.revoke_ingress]
            lines += [f"  remove {rule.render(inbound=False)}" for rule in self.revoke_egress]
        verb = "add" if self.cache_ports_missing else "keep"
        lines.append(f"{verb} the inbound rule from {plan.name} in {plan.cache_security_group_id}")
        if self.address is None:
            lines.append("allocate an Elastic IP")
        else:
            lines.append(f"keep Elastic IP {self.address.public_ip} ({self.address.allocation_id})")
        if self.instance is None:
            lines.append(f"launch a {plan.request.instance_type} instance in {plan.subnet.subnet_id}")
        else:
            lines.append(f"keep instance {self.instance.instance_id} ({self.instance.state})")
        if self.associate:
            lines.append("associate the Elastic IP with the instance")
        return lines


def _one(kind: str, found: tuple[object, ...], cluster_id: str) -> None:
    if len(found) > 1:
        raise Conflict(
            f"found {len(found)} {kind}s tagged {TAG_CLUSTER}={cluster_id}; expected one. "
            f"Run natfwd destroy --cluster-id {cluster_id} and provision again"
        )


def diff(plan: Plan, inventory: Inventory) -> Changes:
    """Compare the plan with the tagged resources that exist. Pure.

    Raises Conflict when they were made for another trusted CIDR, mode or VPC, or when duplicates exist:
    changing those means destroy, then provision.
    """
    cluster_id = plan.cluster_id
    again = f"run natfwd destroy --cluster-id {cluster_id} first to change it"
    _one("security group", inventory.groups, cluster_id)
    _one("instance", inventory.instances, cluster_id)
    _one("Elastic IP", inventory.addresses, cluster_id)
    group = inventory.groups[0] if inventory.groups else None
    instance = inventory.instances[0] if inventory.instances else None
    address = inventory.addresses[0] if inventory.addresses else None
    if group is not None:
        if group.vpc_id != plan.vpc_id:
            raise Conflict(
                f"security group {group.group_id} is in {group.vpc_id}, not the cluster's {plan.vpc_id}; {again}"
            )
        if group.trusted_cidr != str(plan.request.trusted_cidr):
            raise Conflict(f"natfwd for {cluster_id!r} already exists with trusted CIDR {group.trusted_cidr}; {again}")
    if instance is not None:
        if instance.mode != plan.request.mode:
            raise Conflict(f"natfwd for {cluster_id!r} already exists in mode {instance.mode}; {again}")
        if instance.state in ("stopping", "stopped"):
            raise Conflict(f"instance {instance.instance_id} is {instance.state}; start it, or {again}")
    if (
        address is not None
        and address.instance_id
        and (instance is None or address.instance_id != instance.instance_id)
    ):
        raise Conflict(f"Elastic IP {address.public_ip} is associated with {address.instance_id}; {again}")
    ingress = set(group.ingress) if group else set()
    egress = set(group.egress) if group else {DEFAULT_EGRESS}
    cache_present = {r.rule for r in inventory.references if r.group_id == plan.cache_security_group_id}
    cache_wanted = plan.cache_ingress(group.group_id if group else "sg-new")
    cache_missing = tuple(r.from_port or 0 for r in cache_wanted if group is None or r not in cache_present)
    return Changes(
        group=group,
        authorize_ingress=tuple(r for r in plan.nat_ingress if r not in ingress) if group else (),
        authorize_egress=tuple(r for r in plan.nat_egress if r not in egress) if group else (),
        revoke_ingress=tuple(r for r in sorted(ingress, key=repr) if r not in plan.nat_ingress),
        revoke_egress=tuple(r for r in sorted(egress, key=repr) if r not in plan.nat_egress) if group else (),
        cache_ports_missing=cache_missing,
        address=address,
        instance=instance,
        associate=instance is None or address is None or address.instance_id != instance.instance_id,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What provision ended with."""

    plan: Plan
    group_id: str
    instance_id: str
    allocation_id: str
    public_ip: str
    created: tuple[str, ...]


@dataclass
class _Created:
    """What this run created, as an Inventory that destroy() can remove."""

    cluster_id: str
    groups: list[Group] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)

    def inventory(self) -> Inventory:
        return Inventory(
            self.cluster_id, tuple(self.groups), tuple(self.instances), tuple(self.addresses), tuple(self.references)
        )


def _describe_group(client: AwsClient, group_id: str) -> dict[str, Any]:
    found = client.describe_security_groups({"group-id": [group_id]})
    if not found:
        raise AwsError(f"security group {group_id} is not visible yet", "InvalidGroup.NotFound")
    return found[0]


def _reconcile_group(client: AwsClient, plan: Plan, group_id: str, changes: Changes | None, timing: Timing) -> None:
    """Make the NAT group's rules exactly the planned ones (a new group: read AWS's defaults, then fix them)."""
    if changes is None:
        entry = settle(lambda: _describe_group(client, group_id), timing)
        ingress = set(from_permissions(entry.get("IpPermissions") or ()))
        egress = set(from_permissions(entry.get("IpPermissionsEgress") or ()))
        revoke_in = [r for r in ingress if r not in plan.nat_ingress]
        revoke_out = [r for r in egress if r not in plan.nat_egress]
        add_in = [r for r in plan.nat_ingress if r not in ingress]
        add_out = [r for r in plan.nat_egress if r not in egress]
    else:
        revoke_in, revoke_out = list(changes.revoke_ingress), list(changes.revoke_egress)
        add_in, add_out = list(changes.authorize_ingress), list(changes.authorize_egress)
    # Revoke first: the group admits nothing unplanned at any moment after this.
    if revoke_out:
        settle(lambda: client.revoke_egress(group_id, [to_permission(r) for r in revoke_out]), timing)
    if revoke_in:
        settle(lambda: client.revoke_ingress(group_id, [to_permission(r) for r in revoke_in]), timing)
    if add_in:
        settle(
            lambda: client.authorize_ingress(group_id, [to_permission(r) for r in add_in], plan.tags("rule")), timing
        )
    if add_out:
        settle(
            lambda: client.authorize_egress(group_id, [to_permission(r) for r in add_out], plan.tags("rule")), timing
        )


def apply(
    client: AwsClient,
    plan: Plan,
    inventory: Inventory,
    progress: Progress,
    destroy_command: str,
    timing: Timing | None = None,
) -> Outcome:
    """Create what the plan needs and does not exist yet, and fix the NAT group's rules.

    On a failure, what this run created is removed again and ProvisionFailed says so; if that removal fails too,
    or on Ctrl-C, the message gives `destroy_command`. Raises Conflict (nothing touched) when the existing
    resources were made for a different request.
    """
    timing = timing or Timing()
    changes = diff(plan, inventory)
    created = _Created(plan.cluster_id)
    try:
        return _apply(client, plan, changes, progress, timing, created)
    except KeyboardInterrupt:
        made = ", ".join(created.inventory().lines()) or "nothing"
        raise ProvisionFailed(f"interrupted; created so far: {made}; remove it with: {destroy_command}") from None
    except Exception as exc:
        made_inventory = created.inventory()
        if made_inventory.empty:
            raise
        reason = str(exc) if isinstance(exc, NatfwdError) else f"unexpected {type(exc).__name__}: {exc}"
        progress(f"failed: {reason}; rolling back")
        try:
            removed = destroy(client, made_inventory, progress, timing)
        except NatfwdError as rollback_exc:
            raise ProvisionFailed(
                f"{reason}; rolling back failed too ({rollback_exc}); remove what is left with: {destroy_command}"
            ) from exc
        raise ProvisionFailed(f"{reason}; rolled back what this run created: {', '.join(removed)}") from exc


def _apply(
    client: AwsClient, plan: Plan, changes: Changes, progress: Progress, timing: Timing, created: _Created
) -> Outcome:
    made: list[str] = []
    if changes.group is None:
        description = f"natfwd NAT instance for ElastiCache cluster {plan.cluster_id}"
        group_id = client.create_security_group(plan.name, description, plan.vpc_id, plan.tags("security-group"))
        created.groups.append(Group(group_id, plan.vpc_id, str(plan.request.trusted_cidr), (), ()))
        made.append(f"security group {group_id}")
        progress(f"created security group {group_id}")
        _reconcile_group(client, plan, group_id, None, timing)
    else:
        group_id = changes.group.group_id
        _reconcile_group(client, plan, group_id, changes, timing)

    cache_group = plan.cache_security_group_id
    for rule in plan.cache_ingress(group_id):
        if rule.from_port in changes.cache_ports_missing:
            authorize = partial(client.authorize_ingress, cache_group, [to_permission(rule)], plan.tags("rule"))
            settle(authorize, timing)
            created.references.append(Reference(cache_group, rule))
            made.append(f"rule in {cache_group}")
            progress(f"let {group_id} into {cache_group} on tcp {rule.ports}")

    if changes.address is None:
        allocation_id, public_ip = client.allocate_address(plan.tags("elastic-ip"))
        created.addresses.append(Address(allocation_id, public_ip, None, None))
        made.append(f"Elastic IP {public_ip}")
        progress(f"allocated Elastic IP {public_ip}")
    else:
        allocation_id, public_ip = changes.address.allocation_id, changes.address.public_ip

    if changes.instance is None:
        instance_id = client.run_instance(
            image_id=plan.image_id,
            instance_type=plan.request.instance_type,
            subnet_id=plan.subnet.subnet_id,
            security_group_id=group_id,
            user_data=userdata.render(plan, public_ip),
            key_name=plan.request.key_name,
            tags=plan.tags("instance"),
        )
        created.instances.append(Instance(instance_id, "pending", plan.subnet.subnet_id, plan.request.mode))
        made.append(f"instance {instance_id}")
        progress(f"launched instance {instance_id}")
    else:
        instance_id = changes.instance.instance_id
    wait_for_instances(client, [instance_id], "running", progress, timing)

    if changes.associate:
        settle(lambda: client.associate_address(allocation_id, instance_id), timing)
        progress(f"associated {public_ip} with {instance_id}")
    return Outcome(plan, group_id, instance_id, allocation_id, public_ip, tuple(made))
