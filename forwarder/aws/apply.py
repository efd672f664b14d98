"""Apply a plan: diff it against what already exists (idempotency), create the rest, roll back on failure."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from forwarder.aws import balancer, instancerole, layouts, userdata
from forwarder.aws.artefact import bucket_name
from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.created import Created
from forwarder.aws.destroy import destroy
from forwarder.aws.fleet import user_data_diff
from forwarder.aws.inventory import Address, Bucket, Group, Instance, Inventory, Reference
from forwarder.aws.plan import BALANCER_GROUP, SSM_POLICY_ARN, TAG_CLUSTER, Plan
from forwarder.aws.rules import DEFAULT_EGRESS, Rule, from_permissions, to_permission
from forwarder.aws.settle import settle
from forwarder.aws.waiter import Progress, Timing, wait_for_instances
from forwarder.errors import NatfwdError


class Conflict(NatfwdError):
    """What exists for the cluster does not match the request; provision will not change it silently."""


class ProvisionFailed(NatfwdError):
    """A step failed after others had created resources; the message says what was rolled back or left."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What apply will do: None/empty/False means "keep what exists"."""

    group: Group | None
    authorize_ingress: tuple[Rule, ...]
    authorize_egress: tuple[Rule, ...]
    revoke_ingress: tuple[Rule, ...]
    revoke_egress: tuple[Rule, ...]
    cache_ports_missing: tuple[int, ...]
    address: Address | None
    instance: Instance | None
    associate: bool
    replace: tuple[str, ...] = ()  # why the instance is replaced (under the same Elastic IP); empty: kept
    create_bucket: bool = False
    upload: bool = False
    stale_keys: tuple[str, ...] = ()
    create_role: bool = False
    put_policy: bool = False
    attach_ssm: bool = False
    create_profile: bool = False
    add_role_to_profile: bool = False
    # ha and replicas: the template, the group, the load balancer (None for the single layout).
    layout: layouts.GroupChanges | None = None

    @property
    def launch(self) -> bool:
        return self.layout is None and (self.instance is None or bool(self.replace))

    @property
    def empty(self) -> bool:
        return not (
            self.group is None
            or self.authorize_ingress
            or self.authorize_egress
            or self.revoke_ingress
            or self.revoke_egress
            or self.cache_ports_missing
            or (self.address is None and (self.layout is None or self.layout.balancer is None))
            or self.launch
            or self.associate
            or (self.layout is not None and not self.layout.empty)
            or self.create_bucket
            or self.upload
            or self.stale_keys
            or self.create_role
            or self.put_policy
            or self.attach_ssm
            or self.create_profile
            or self.add_role_to_profile
        )

    def lines(self, plan: Plan) -> list[str]:
        """One line per action, with what is kept; a `+`/`-` line for each rule or setting added or removed."""
        lines = []
        artefact = plan.artefact
        if artefact is not None:
            verb = "create" if self.create_bucket else "keep"
            lines.append(f"{verb} S3 bucket {artefact.bucket} (private, encrypted, tagged)")
            verb = "upload" if self.upload else "keep"
            lines.append(f"  {verb} {artefact.key}")
            lines += [f"  - {key}" for key in self.stale_keys]
        elif self.stale_keys:
            lines.append("keep the S3 bucket, empty: --package replaces the natfwd stored there")
            lines += [f"  - {key}" for key in self.stale_keys]
        if self.create_role:
            lines.append(f"create IAM role and instance profile {plan.role_name}")
        else:
            lines.append(f"keep IAM role {plan.role_name}")
            if self.put_policy:
                lines.append("  update its policy (the natfwd object it may read)")
            if self.attach_ssm or self.create_profile or self.add_role_to_profile:
                lines.append("  repair its SSM policy attachment and instance profile")
        if self.group is None:
            lines.append(f"create security group {plan.name} with the rules above")
        else:
            lines.append(f"keep security group {self.group.group_id}")
            lines += [f"  + {rule.render(inbound=True)}" for rule in self.authorize_ingress]
            lines += [f"  + {rule.render(inbound=False)}" for rule in self.authorize_egress]
            lines += [f"  - {rule.render(inbound=True)}" for rule in self.revoke_ingress]
            lines += [f"  - {rule.render(inbound=False)}" for rule in self.revoke_egress]
        verb = "add" if self.cache_ports_missing else "keep"
        lines.append(f"{verb} the inbound rule from {plan.name} in {plan.cache_security_group_id}")
        if self.layout is not None:
            if self.layout.balancer is None:
                address = self.address
                kept = f"keep Elastic IP {address.public_ip} ({address.allocation_id})" if address else None
                lines.append(kept or "allocate an Elastic IP (tagged; the group's instances claim it)")
            return lines + self.layout.lines(plan)
        if self.address is None:
            lines.append("allocate an Elastic IP")
        else:
            lines.append(f"keep Elastic IP {self.address.public_ip} ({self.address.allocation_id})")
        if self.instance is None:
            lines.append(f"launch a {plan.request.instance_type} instance in {plan.subnet.subnet_id}")
        elif self.replace:
            lines.append(
                f"replace instance {self.instance.instance_id} with a new {plan.request.instance_type} instance, "
                "then move the Elastic IP to it and terminate the old one"
            )
            lines += [f"  {reason}" for reason in self.replace]
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


def _replacement(plan: Plan, instance: Instance, user_data: str | None) -> tuple[str, ...]:
    """Why `instance` must be replaced to match the plan: one line per difference (empty: it matches)."""
    reasons: list[str] = []
    if instance.instance_type and instance.instance_type != plan.request.instance_type:
        reasons.append(f"- instance type {instance.instance_type}")
        reasons.append(f"+ instance type {plan.request.instance_type}")
    if user_data is None:
        return tuple(reasons)
    return (*reasons, *user_data_diff(instance.user_data, user_data))


def diff(plan: Plan, inventory: Inventory) -> Changes:
    """Compare the plan with the tagged resources that exist. Pure.

    Another instance type, mode, node set or client list replaces the instance under the same Elastic IP, and
    security group rules are changed in place. Raises Conflict when the resources are in another VPC, when
    duplicates exist, or when the instance was stopped or the address moved by hand.
    """
    cluster_id = plan.cluster_id
    again = f"run natfwd destroy --cluster-id {cluster_id} first to change it"
    layouts.check_switch(plan, inventory)
    standalone = inventory.standalone
    own_addresses = tuple(a for a in inventory.addresses if not a.zone)
    _one("security group", inventory.groups, cluster_id)
    _one("instance", standalone, cluster_id)
    _one("Elastic IP", own_addresses, cluster_id)
    _one("Auto Scaling group", inventory.scaling_groups, cluster_id)
    _one("launch template", inventory.templates, cluster_id)
    group = inventory.groups[0] if inventory.groups else None
    instance = standalone[0] if standalone else None
    address = own_addresses[0] if own_addresses else None
    if plan.layout != "single":
        return _group_diff(plan, inventory, group, address, again)
    if group is not None and group.vpc_id != plan.vpc_id:
        raise Conflict(
            f"security group {group.group_id} is in {group.vpc_id}, not the cluster's {plan.vpc_id}; {again}"
        )
    if instance is not None and instance.state in ("stopping", "stopped"):
        raise Conflict(f"instance {instance.instance_id} is {instance.state}; start it, or {again}")
    if (
        address is not None
        and address.instance_id
        and (instance is None or address.instance_id != instance.instance_id)
    ):
        raise Conflict(f"Elastic IP {address.public_ip} is associated with {address.instance_id}; {again}")
    replace: tuple[str, ...] = ()
    if instance is not None:
        wanted = userdata.render(plan, address.public_ip) if address is not None else None
        replace = _replacement(plan, instance, wanted)
        if address is None:
            replace = (*replace, "a new Elastic IP (the old one is gone), so a new config")
    shared = _shared(plan, inventory, group, plan.nat_ingress)
    associate = instance is None or address is None or bool(replace) or address.instance_id != instance.instance_id
    return dataclasses.replace(shared, address=address, instance=instance, associate=associate, replace=replace)


def _shared(plan: Plan, inventory: Inventory, group: Group | None, ingress_wanted: tuple[Rule, ...]) -> Changes:
    """The pieces every layout has: the instances' security group, the cache rule, the bucket, the role."""
    ingress = set(group.ingress) if group else set()
    egress = set(group.egress) if group else {DEFAULT_EGRESS}
    cache_present = {r.rule for r in inventory.references if r.group_id == plan.cache_security_group_id}
    cache_wanted = plan.cache_ingress(group.group_id if group else "sg-new")
    keys = inventory.bucket.keys if inventory.bucket is not None else ()
    role = inventory.role
    return Changes(
        group=group,
        authorize_ingress=tuple(r for r in ingress_wanted if r not in ingress) if group else (),
        authorize_egress=tuple(r for r in plan.nat_egress if r not in egress) if group else (),
        revoke_ingress=tuple(r for r in sorted(ingress, key=repr) if r not in ingress_wanted),
        revoke_egress=tuple(r for r in sorted(egress, key=repr) if r not in plan.nat_egress) if group else (),
        cache_ports_missing=tuple(r.from_port or 0 for r in cache_wanted if group is None or r not in cache_present),
        address=None,
        instance=None,
        associate=False,
        create_bucket=plan.artefact is not None and inventory.bucket is None,
        upload=plan.artefact is not None and plan.artefact.key not in keys,
        stale_keys=tuple(k for k in keys if plan.artefact is None or k != plan.artefact.key),
        create_role=role is None or not role.exists,
        put_policy=role is None or role.policy != json.dumps(plan.instance_policy(), sort_keys=True),
        attach_ssm=role is None or SSM_POLICY_ARN not in role.attached_policies,
        create_profile=role is None or not role.profile,
        add_role_to_profile=role is None or plan.role_name not in role.profile_roles,
    )


def _group_diff(plan: Plan, inventory: Inventory, group: Group | None, address: Address | None, again: str) -> Changes:
    members = {i.instance_id for i in inventory.instances}
    if address is not None and address.instance_id and address.instance_id not in members:
        raise Conflict(f"Elastic IP {address.public_ip} is associated with {address.instance_id}; {again}")
    balancer_group = inventory.balancer_groups[0].group_id if inventory.balancer_groups else BALANCER_GROUP
    shared = _shared(plan, inventory, group, plan.nat_ingress_with(balancer_group))
    group_changes = layouts.diff(plan, inventory, group, address)
    return dataclasses.replace(shared, address=address if plan.layout == "ha" else None, layout=group_changes)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What provision ended with."""

    plan: Plan
    group_id: str
    instance_id: str
    allocation_id: str
    public_ip: str
    created: tuple[str, ...]
    replaced: str | None = None
    group: layouts.Applied | None = None  # ha and replicas


def _describe_group(client: AwsClient, group_id: str) -> dict[str, Any]:
    found = client.describe_security_groups({"group-id": [group_id]})
    if not found:
        raise AwsError(f"security group {group_id} is not visible yet", "InvalidGroup.NotFound")
    return found[0]


def _reconcile_group(
    client: AwsClient,
    plan: Plan,
    group_id: str,
    changes: Changes | None,
    wanted_ingress: tuple[Rule, ...],
    timing: Timing,
) -> None:
    """Make the NAT group's rules exactly the planned ones (a new group: read AWS's defaults, then fix them)."""
    if changes is None:
        entry = settle(lambda: _describe_group(client, group_id), timing)
        ingress = set(from_permissions(entry.get("IpPermissions") or ()))
        egress = set(from_permissions(entry.get("IpPermissionsEgress") or ()))
        revoke_in = [r for r in ingress if r not in wanted_ingress]
        revoke_out = [r for r in egress if r not in plan.nat_egress]
        add_in = [r for r in wanted_ingress if r not in ingress]
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
    created = Created(plan.cluster_id)
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
    client: AwsClient, plan: Plan, changes: Changes, progress: Progress, timing: Timing, created: Created
) -> Outcome:
    made: list[str] = []
    _store_artefact(client, plan, changes, progress, created, made)
    instancerole.ensure_role(client, plan, changes, progress, timing, created, made)
    ingress = plan.nat_ingress
    if changes.layout is not None and changes.layout.balancer is not None:
        # The load balancer's group first: the instances' rules name it.
        balancer_group_id = balancer.ensure_group(
            client, plan, changes.layout.balancer, timing, progress, created.balancer
        )
        ingress = plan.nat_ingress_with(balancer_group_id)
        if created.balancer.group_id:
            created.balancer_groups.append(Group(balancer_group_id, plan.vpc_id, (), ()))
    if changes.group is None:
        description = f"natfwd NAT instance for ElastiCache cluster {plan.cluster_id}"
        group_id = client.create_security_group(plan.name, description, plan.vpc_id, plan.tags("security-group"))
        created.groups.append(Group(group_id, plan.vpc_id, ingress, ()))
        made.append(f"security group {group_id}")
        progress(f"created security group {group_id}")
        _reconcile_group(client, plan, group_id, None, ingress, timing)
    else:
        group_id = changes.group.group_id
        _reconcile_group(client, plan, group_id, changes, ingress, timing)
    if created.balancer_groups:
        # Its outbound rules will name the instances' group: a rollback revokes them before deleting either.
        created.balancer_groups[0] = Group(
            created.balancer_groups[0].group_id, plan.vpc_id, (), plan.balancer_egress(group_id)
        )

    cache_group = plan.cache_security_group_id
    for rule in plan.cache_ingress(group_id):
        if rule.from_port in changes.cache_ports_missing:
            authorize = partial(client.authorize_ingress, cache_group, [to_permission(rule)], plan.tags("rule"))
            settle(authorize, timing)
            created.references.append(Reference(cache_group, rule))
            made.append(f"rule in {cache_group}")
            progress(f"let {group_id} into {cache_group} on tcp {rule.ports}")

    if changes.layout is not None:
        return _apply_group(client, plan, changes, changes.layout, group_id, progress, timing, created, made)
    if changes.address is None:
        allocation_id, public_ip = client.allocate_address(plan.tags("elastic-ip"))
        created.addresses.append(Address(allocation_id, public_ip, None, None))
        made.append(f"Elastic IP {public_ip}")
        progress(f"allocated Elastic IP {public_ip}")
    else:
        allocation_id, public_ip = changes.address.allocation_id, changes.address.public_ip

    if changes.launch:
        instance_id = _run_instance(client, plan, group_id, public_ip, timing)
        created.instances.append(Instance(instance_id, "pending", plan.subnet.subnet_id, plan.request.mode))
        made.append(f"instance {instance_id}")
        progress(f"launched instance {instance_id}")
    else:
        assert changes.instance is not None
        instance_id = changes.instance.instance_id
    wait_for_instances(client, [instance_id], "running", progress, timing)

    if changes.associate:
        settle(lambda: client.associate_address(allocation_id, instance_id), timing)
        progress(f"associated {public_ip} with {instance_id}")
    replaced = None
    if changes.replace and changes.instance is not None:
        replaced = changes.instance.instance_id
        # Only now: the address has moved, and a failure before this point left the old instance serving.
        client.terminate_instances([replaced])
        progress(f"terminating the replaced instance {replaced}")
    _delete_stale(client, plan, changes, progress)
    return Outcome(plan, group_id, instance_id, allocation_id, public_ip, tuple(made), replaced)


def _apply_group(
    client: AwsClient,
    plan: Plan,
    changes: Changes,
    group_changes: layouts.GroupChanges,
    group_id: str,
    progress: Progress,
    timing: Timing,
    created: Created,
    made: list[str],
) -> Outcome:
    address: tuple[str, str] | None = None
    if plan.layout == "ha":
        if changes.address is None:
            address = client.allocate_address(plan.tags("elastic-ip"))
            created.addresses.append(Address(address[0], address[1], None, None))
            made.append(f"Elastic IP {address[1]}")
            progress(f"allocated Elastic IP {address[1]}")
        else:
            address = changes.address.allocation_id, changes.address.public_ip
    applied = layouts.apply_group(
        client, plan, group_changes, group_id, address, created.balancer, created.fleet, timing, progress
    )
    made += [line for line in created.inventory().lines() if line not in made and not line.startswith("IAM")]
    _delete_stale(client, plan, changes, progress)
    allocation_id = address[0] if address else ""
    first = applied.instance_ids[0] if applied.instance_ids else ""
    return Outcome(plan, group_id, first, allocation_id, applied.public_ips[0], tuple(made), None, applied)


def _delete_stale(client: AwsClient, plan: Plan, changes: Changes, progress: Progress) -> None:
    bucket = plan.artefact.bucket if plan.artefact is not None else None
    for key in changes.stale_keys:
        client.delete_object(bucket or artefact_bucket(client, plan.cluster_id), key)
        progress(f"deleted the previous natfwd object {key}")


def artefact_bucket(client: AwsClient, cluster_id: str) -> str:
    return bucket_name(client.account_id(), client.region, cluster_id)


# IAM is eventually consistent too: a new instance profile can be unknown to EC2 for several seconds.
_PROFILE_ATTEMPTS = 8


def _run_instance(client: AwsClient, plan: Plan, group_id: str, public_ip: str, timing: Timing) -> str:
    for attempt in range(_PROFILE_ATTEMPTS):
        try:
            return client.run_instance(
                image_id=plan.image_id,
                instance_type=plan.request.instance_type,
                subnet_id=plan.subnet.subnet_id,
                security_group_id=group_id,
                user_data=userdata.render(plan, public_ip),
                key_name=plan.request.key_name,
                instance_profile=plan.role_name,
                tags=plan.tags("instance"),
            )
        except AwsError as exc:
            if "iamInstanceProfile" not in str(exc) or attempt == _PROFILE_ATTEMPTS - 1:
                raise
            timing.sleep(min(timing.poll_s, 2.0**attempt))
    raise AssertionError("unreachable")


def _store_artefact(
    client: AwsClient, plan: Plan, changes: Changes, progress: Progress, created: Created, made: list[str]
) -> None:
    artefact = plan.artefact
    if artefact is None:
        return
    if changes.create_bucket:
        client.create_bucket(artefact.bucket, plan.tags("bucket"))
        created.bucket = Bucket(artefact.bucket)
        made.append(f"S3 bucket {artefact.bucket}")
        progress(f"created S3 bucket {artefact.bucket}")
    if changes.upload:
        if artefact.data is None:
            raise NatfwdError(f"the natfwd package for {artefact.url} was not built; run provision again")
        client.put_object(artefact.bucket, artefact.key, artefact.data, {"sha256": artefact.sha256})
        if created.bucket is not None:
            created.bucket = Bucket(artefact.bucket, (artefact.key,))
        progress(f"uploaded {artefact.url}")
