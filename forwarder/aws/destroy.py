"""Remove natfwd's resources in dependency order: instance, Elastic IP, cache rule, NAT group, bucket, role."""

from __future__ import annotations

from collections import defaultdict

from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.inventory import Bucket, Inventory, Role
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
}


def render(inventory: Inventory, region: str) -> str:
    """What destroy will remove, as printed before asking (no trailing newline)."""
    lines = [f"natfwd destroy for cluster {inventory.cluster_id!r} in {region} removes, in this order:"]
    lines += [f"  {line}" for line in inventory.lines()]
    return "\n".join(lines)


def _ignore_gone(exc: AwsError) -> None:
    if exc.code not in _GONE:
        raise exc


def destroy(client: AwsClient, inventory: Inventory, progress: Progress, timing: Timing | None = None) -> list[str]:
    """Remove everything in `inventory`; returns one line per removed resource.

    Resources already gone are skipped. Raises AwsError on the first failure: what is left stays tagged, so
    running destroy again finishes the job.
    """
    timing = timing or Timing()
    removed: list[str] = []
    instance_ids = [i.instance_id for i in inventory.instances]
    if instance_ids:
        progress(f"terminating instance {', '.join(instance_ids)}")
        try:
            client.terminate_instances(instance_ids)
        except AwsError as exc:
            _ignore_gone(exc)
        # The instance's network interface holds the security group until it is gone.
        wait_for_instances(client, instance_ids, "terminated", progress, timing)
        removed += [f"instance {iid}" for iid in instance_ids]
    for address in inventory.addresses:
        progress(f"releasing Elastic IP {address.public_ip}")
        try:
            if address.association_id:
                client.disassociate_address(address.association_id)
        except AwsError as exc:
            _ignore_gone(exc)
        try:
            client.release_address(address.allocation_id)
        except AwsError as exc:
            _ignore_gone(exc)
        removed.append(f"Elastic IP {address.public_ip} ({address.allocation_id})")
    by_group: dict[str, list[Rule]] = defaultdict(list)
    for reference in inventory.references:
        by_group[reference.group_id].append(reference.rule)
    for group_id, group_rules in by_group.items():
        progress(f"revoking the NAT instance's access in {group_id}")
        for rule in group_rules:
            try:
                client.revoke_ingress(group_id, [to_permission(rule)])
            except AwsError as exc:
                _ignore_gone(exc)
            removed.append(f"rule in {group_id}: inbound {rule.protocol} {rule.ports} from {rule.peer}")
    for group in inventory.groups:
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
    try:
        # Listed again: an object uploaded after the inventory was taken would keep the bucket from going.
        for key in sorted(set(bucket.keys) | set(client.list_objects(bucket.name))):
            client.delete_object(bucket.name, key)
        client.delete_bucket(bucket.name)
    except AwsError as exc:
        _ignore_gone(exc)
    return [f"S3 bucket {bucket.name}"]


def _delete_role(client: AwsClient, role: Role, progress: Progress) -> list[str]:
    removed = []
    if role.profile:
        progress(f"deleting IAM instance profile {role.name}")
        for name in role.profile_roles:
            try:
                client.remove_role_from_instance_profile(role.name, name)
            except AwsError as exc:
                _ignore_gone(exc)
        try:
            client.delete_instance_profile(role.name)
        except AwsError as exc:
            _ignore_gone(exc)
        removed.append(f"IAM instance profile {role.name}")
    if role.exists:
        progress(f"deleting IAM role {role.name}")
        try:
            for arn in role.attached_policies:
                client.detach_role_policy(role.name, arn)
            for name in role.inline_policies:
                client.delete_role_policy(role.name, name)
            client.delete_role(role.name)
        except AwsError as exc:
            _ignore_gone(exc)
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
