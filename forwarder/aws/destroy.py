"""Remove natfwd's resources in dependency order: Auto Scaling group, launch template, instance, listeners,
target groups, load balancer, Elastic IPs, cache rule, security groups, bucket, role."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial

from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.inventory import Bucket, Group, Inventory, Role
from forwarder.aws.rules import Rule, to_permission
from forwarder.aws.waiter import Progress, Timing, wait_for_instances

# Codes meaning "already gone": destroy is safe to run twice, and after a half-finished destroy.
_GONE = {
    "InvalidAssociationID.NotFound",
    "InvalidAllocationID.NotFound",
    "InvalidPermission.NotFound",
    "InvalidGroup.NotFound",
    "InvalidInstanceID.NotFound",
    "NoSuchEntity",
    "NoSuchBucket",
    "NoSuchKey",
    "404",
    "InvalidLaunchTemplateId.NotFound",
    "LoadBalancerNotFound",
    "TargetGroupNotFound",
    "ListenerNotFound",
    "ValidationError",  # Auto Scaling's word for a group that is already gone
}
# A load balancer's Elastic IP stays in use until its network interfaces are gone, a little after the NLB.
_IN_USE = {"InvalidIPAddress.InUse", "DependencyViolation", "ResourceInUse"}


def render(inventory: Inventory, region: str) -> str:
    """What destroy will remove, as printed before asking (no trailing newline)."""
    lines = [f"natfwd destroy for cluster {inventory.cluster_id!r} in {region} removes, in this order:"]
    lines += [f"  {line}" for line in inventory.lines()]
    return "\n".join(lines)


@contextlib.contextmanager
def _gone_ok() -> Iterator[None]:
    """Deleting what is already gone (another run, or AWS itself, removed it) is success."""
    try:
        yield
    except AwsError as exc:
        if exc.code not in _GONE:
            raise


def destroy(client: AwsClient, inventory: Inventory, progress: Progress, timing: Timing | None = None) -> list[str]:
    """Remove everything in `inventory`; returns one line per removed resource.

    Resources already gone are skipped. Raises AwsError on the first failure: what is left stays tagged, so
    running destroy again finishes the job.
    """
    timing = timing or Timing()
    removed: list[str] = []
    removed += _remove_instances(client, inventory, progress, timing)
    removed += _remove_balancer(client, inventory, progress, timing)
    for address in inventory.addresses:
        progress(f"releasing Elastic IP {address.public_ip}")
        with _gone_ok():
            if address.association_id:
                client.disassociate_address(address.association_id)
        _retry_in_use(partial(client.release_address, address.allocation_id), progress, timing)
        removed.append(f"Elastic IP {address.public_ip} ({address.allocation_id})")
    by_group: dict[str, list[Rule]] = defaultdict(list)
    for reference in inventory.references:
        by_group[reference.group_id].append(reference.rule)
    for group_id, group_rules in by_group.items():
        progress(f"revoking the NAT instance's access in {group_id}")
        for rule in group_rules:
            with _gone_ok():
                client.revoke_ingress(group_id, [to_permission(rule)])
            removed.append(f"rule in {group_id}: inbound {rule.protocol} {rule.ports} from {rule.peer}")
    _untangle(client, inventory.groups, inventory.balancer_groups)
    for group in (*inventory.groups, *inventory.balancer_groups):
        progress(f"deleting security group {group.group_id}")
        _delete_group(client, group.group_id, progress, timing)
        removed.append(f"security group {group.group_id}")
    if inventory.bucket is not None:
        removed += _delete_bucket(client, inventory.bucket, progress)
    if inventory.role is not None:
        removed += _delete_role(client, inventory.role, progress)
    return removed


def _delete_bucket(client: AwsClient, bucket: Bucket, progress: Progress) -> list[str]:
    progress(f"deleting S3 bucket {bucket.name}")
    with _gone_ok():
        # Listed again: an object uploaded after the inventory was taken would keep the bucket from going.
        for key in sorted(set(bucket.keys) | set(client.list_objects(bucket.name))):
            client.delete_object(bucket.name, key)
        client.delete_bucket(bucket.name)
    return [f"S3 bucket {bucket.name}"]


def _delete_role(client: AwsClient, role: Role, progress: Progress) -> list[str]:
    removed = []
    if role.profile:
        progress(f"deleting IAM instance profile {role.name}")
        for name in role.profile_roles:
            with _gone_ok():
                client.remove_role_from_instance_profile(role.name, name)
        with _gone_ok():
            client.delete_instance_profile(role.name)
        removed.append(f"IAM instance profile {role.name}")
    if role.exists:
        progress(f"deleting IAM role {role.name}")
        with _gone_ok():
            for arn in role.attached_policies:
                client.detach_role_policy(role.name, arn)
            for name in role.inline_policies:
                client.delete_role_policy(role.name, name)
            client.delete_role(role.name)
        removed.append(f"IAM role {role.name}")
    return removed


def _delete_group(client: AwsClient, group_id: str, progress: Progress, timing: Timing) -> None:
    # A terminated instance's network interface can hold the group for a little while longer.
    start = timing.clock()
    while True:
        try:
            client.delete_security_group(group_id)
            return
        except AwsError as exc:
            if exc.code in _GONE:
                return
            if exc.code != "DependencyViolation" or timing.clock() - start >= timing.timeout_s:
                raise
        progress(f"security group {group_id} is still in use; retrying")
        timing.sleep(timing.poll_s)


def _remove_instances(client: AwsClient, inventory: Inventory, progress: Progress, timing: Timing) -> list[str]:
    """The groups (force-deleted with their instances), their templates, and the single layout's instance."""
    removed: list[str] = []
    for group in inventory.scaling_groups:
        progress(f"deleting Auto Scaling group {group.name} and its instances")
        with _gone_ok():
            client.delete_auto_scaling_group(group.name)
        removed.append(f"Auto Scaling group {group.name}")
    standalone = [i.instance_id for i in inventory.instances if not i.group]
    if standalone:
        progress(f"terminating instance {', '.join(standalone)}")
        with _gone_ok():
            client.terminate_instances(standalone)
    members = {i.instance_id for i in inventory.instances if i.group}
    members.update(iid for group in inventory.scaling_groups for iid in group.instance_ids)
    # The instances' network interfaces hold the security group, and a template in use by a group cannot go.
    wait_for_instances(client, sorted({*standalone, *members}), "terminated", progress, timing)
    removed += [f"instance {iid}" for iid in standalone]
    for template in inventory.templates:
        progress(f"deleting launch template {template.template_id}")
        with _gone_ok():
            client.delete_launch_template(template.template_id)
        removed.append(f"launch template {template.template_id}")
    return removed


def _remove_balancer(client: AwsClient, inventory: Inventory, progress: Progress, timing: Timing) -> list[str]:
    """Listeners, then target groups (no longer in use), then the load balancer, waiting until it is gone."""
    removed: list[str] = []
    for listener in inventory.listeners:
        with _gone_ok():
            client.delete_listener(listener.arn)
        removed.append(f"listener TCP {listener.port}")
    for group in inventory.target_groups:
        progress(f"deleting target group {group.name}")
        _retry_in_use(partial(client.delete_target_group, group.arn), progress, timing)
        removed.append(f"target group {group.name}")
    for balancer in inventory.balancers:
        progress(f"deleting Network Load Balancer {balancer.name}")
        with _gone_ok():
            client.delete_load_balancer(balancer.arn)
        start = timing.clock()
        while client.describe_load_balancers([balancer.name]):
            if timing.clock() - start >= timing.timeout_s:
                raise AwsError(f"gave up after {timing.timeout_s:.0f} s waiting for {balancer.name} to be deleted")
            progress(f"waiting for load balancer {balancer.name} to be deleted")
            timing.sleep(timing.poll_s)
        removed.append(f"Network Load Balancer {balancer.name}")
    return removed


def _untangle(client: AwsClient, groups: tuple[Group, ...], balancer_groups: tuple[Group, ...]) -> None:
    """Drop the rules by which the instances' and the load balancer's groups name each other: a group that another
    group's rule references cannot be deleted."""
    ids = {g.group_id for g in (*groups, *balancer_groups)}
    for group in (*groups, *balancer_groups):
        inbound = [to_permission(r) for r in group.ingress if r.peer in ids]
        outbound = [to_permission(r) for r in group.egress if r.peer in ids]
        with _gone_ok():
            if inbound:
                client.revoke_ingress(group.group_id, inbound)
            if outbound:
                client.revoke_egress(group.group_id, outbound)


def _retry_in_use(call: Callable[[], None], progress: Progress, timing: Timing) -> None:
    start = timing.clock()
    while True:
        try:
            call()
            return
        except AwsError as exc:
            if exc.code in _GONE:
                return
            if exc.code not in _IN_USE or timing.clock() - start >= timing.timeout_s:
                raise
        progress("still in use; retrying")
        timing.sleep(timing.poll_s)
