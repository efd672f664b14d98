"""Find what provision created for a cluster, by its tags: group, instance, Elastic IP, cache rules, bucket, role."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forwarder.aws.artefact import bucket_name
from forwarder.aws.client import AwsClient
from forwarder.aws.plan import TAG_CLUSTER, TAG_MODE
from forwarder.aws.rules import Rule, from_permissions

# Instances in these states are gone, or going; they no longer count as provisioned.
_GONE = {"shutting-down", "terminated"}


def _tags(resource: Mapping[str, Any]) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in resource.get("Tags") or ()}


@dataclass(frozen=True, slots=True)
class Group:
    """The NAT security group and its current rules."""

    group_id: str
    vpc_id: str
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    state: str
    subnet_id: str
    mode: str
    instance_type: str = ""
    user_data: str = ""


@dataclass(frozen=True, slots=True)
class Address:
    allocation_id: str
    public_ip: str
    association_id: str | None
    instance_id: str | None


@dataclass(frozen=True, slots=True)
class Reference:
    """An inbound rule of another security group (the cache's) whose source is the NAT security group."""

    group_id: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class Bucket:
    """The cluster's artefact bucket and the objects in it."""

    name: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Role:
    """The instance role (`exists`), its instance profile (`profile`), their policies."""

    name: str
    exists: bool
    profile: bool
    profile_roles: tuple[str, ...] = ()
    inline_policies: tuple[str, ...] = ()
    attached_policies: tuple[str, ...] = ()
    policy: str | None = None  # the natfwd inline policy, as sorted JSON


@dataclass(frozen=True, slots=True)
class Inventory:
    """natfwd's resources for one cluster; empty tuples when none exist."""

    cluster_id: str
    groups: tuple[Group, ...] = ()
    instances: tuple[Instance, ...] = ()
    addresses: tuple[Address, ...] = ()
    references: tuple[Reference, ...] = field(default=())
    bucket: Bucket | None = None
    role: Role | None = None

    @property
    def empty(self) -> bool:
        return not (self.groups or self.instances or self.addresses or self.references or self.bucket or self.role)

    def lines(self) -> list[str]:
        """One line per resource, in the order destroy removes them."""
        lines = [f"instance {i.instance_id} ({i.state})" for i in self.instances]
        lines += [f"Elastic IP {a.public_ip} ({a.allocation_id})" for a in self.addresses]
        lines += [
            f"rule in {r.group_id}: inbound {r.rule.protocol} {r.rule.ports} from {r.rule.peer}"
            for r in self.references
        ]
        lines += [f"security group {g.group_id} (in {g.vpc_id})" for g in self.groups]
        if self.bucket is not None:
            count = len(self.bucket.keys)
            lines.append(f"S3 bucket {self.bucket.name} and its {count} object{'s' * (count != 1)}")
        if self.role is not None:
            if self.role.profile:
                lines.append(f"IAM instance profile {self.role.name}")
            if self.role.exists:
                lines.append(f"IAM role {self.role.name} and its policies")
        return lines


def find_bucket(client: AwsClient, cluster_id: str) -> Bucket | None:
    """The cluster's bucket, if it exists and carries the cluster's tag (a bucket of that name without it is not
    natfwd's to touch)."""
    name = bucket_name(client.account_id(), client.region, cluster_id)
    tags = client.bucket_tags(name)
    if tags is None or tags.get(TAG_CLUSTER) != cluster_id:
        return None
    return Bucket(name, tuple(sorted(client.list_objects(name))))


def find_role(client: AwsClient, cluster_id: str) -> Role | None:
    """The instance role and profile named natfwd-<cluster_id>, if the role is tagged for the cluster or the
    profile holds no other role."""
    name = f"natfwd-{cluster_id}"[:64]
    tags = client.role_tags(name)
    exists = tags is not None and tags.get(TAG_CLUSTER) == cluster_id
    profile_roles = client.instance_profile_roles(name)
    profile = profile_roles is not None and all(r == name for r in profile_roles)
    if not exists and not profile:
        return None
    if not exists:
        return Role(name, False, True, tuple(profile_roles or ()))
    policies = tuple(client.role_policy_names(name))
    return Role(
        name,
        True,
        profile,
        tuple(profile_roles or ()),
        policies,
        tuple(client.attached_policies(name)),
        client.role_policy(name, "natfwd") if "natfwd" in policies else None,
    )


def find(client: AwsClient, cluster_id: str) -> Inventory:
    """Everything tagged natfwd:cluster-id=<cluster_id> in the client's region (terminated instances excluded),
    any inbound rule elsewhere that references the NAT security group, the bucket and the role. Raises AwsError."""
    tagged = {f"tag:{TAG_CLUSTER}": [cluster_id]}
    groups = []
    for entry in client.describe_security_groups(tagged):
        groups.append(
            Group(
                group_id=str(entry["GroupId"]),
                vpc_id=str(entry.get("VpcId", "")),
                ingress=tuple(from_permissions(entry.get("IpPermissions") or ())),
                egress=tuple(from_permissions(entry.get("IpPermissionsEgress") or ())),
            )
        )
    instances = [
        Instance(
            instance_id=str(entry["InstanceId"]),
            state=str(entry["State"]["Name"]),
            subnet_id=str(entry.get("SubnetId", "")),
            mode=_tags(entry).get(TAG_MODE, ""),
            instance_type=str(entry.get("InstanceType", "")),
            user_data=client.instance_user_data(str(entry["InstanceId"])),
        )
        for entry in client.describe_instances(tagged)
        if entry["State"]["Name"] not in _GONE
    ]
    addresses = [
        Address(
            allocation_id=str(entry["AllocationId"]),
            public_ip=str(entry.get("PublicIp", "")),
            association_id=entry.get("AssociationId") or None,
            instance_id=entry.get("InstanceId") or None,
        )
        for entry in client.describe_addresses(tagged)
    ]
    references = []
    group_ids = [g.group_id for g in groups]
    if group_ids:
        for entry in client.describe_security_groups({"ip-permission.group-id": group_ids}):
            if entry["GroupId"] in group_ids:
                continue
            for rule in from_permissions(entry.get("IpPermissions") or ()):
                if rule.peer in group_ids:
                    references.append(Reference(str(entry["GroupId"]), rule))
    return Inventory(
        cluster_id=cluster_id,
        groups=tuple(sorted(groups, key=lambda g: g.group_id)),
        instances=tuple(sorted(instances, key=lambda i: i.instance_id)),
        addresses=tuple(sorted(addresses, key=lambda a: a.allocation_id)),
        references=tuple(references),
        bucket=find_bucket(client, cluster_id),
        role=find_role(client, cluster_id),
    )
