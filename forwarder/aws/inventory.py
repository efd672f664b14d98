"""Find what provision created for a cluster, by its tags: groups, instances, Elastic IPs, cache rules, bucket, role,
and for --ha/--replicas the launch template, Auto Scaling group and load balancer pieces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forwarder.aws import balancer, fleet
from forwarder.aws.artefact import bucket_name
from forwarder.aws.balancer import Balancer, Listener, TargetGroup
from forwarder.aws.client import AwsClient
from forwarder.aws.fleet import ScalingGroup, Template
from forwarder.aws.plan import TAG_CLUSTER, TAG_MODE, TAG_ROLE, TAG_ZONE
from forwarder.aws.rules import Rule, from_permissions

# Instances in these states are gone, or going; they no longer count as provisioned.
_GONE = {"shutting-down", "terminated"}
# CloudFormation tags what a stack creates with the stack's name; AWS reserves the aws: prefix, so only it sets this.
TAG_STACK = "aws:cloudformation:stack-name"


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
    group: str = ""  # the Auto Scaling group that launched it ("" for the single layout's instance)


@dataclass(frozen=True, slots=True)
class Address:
    allocation_id: str
    public_ip: str
    association_id: str | None
    instance_id: str | None
    zone: str = ""  # the load balancer's zone it serves ("": the instance's Elastic IP)


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
    scaling_groups: tuple[ScalingGroup, ...] = ()
    templates: tuple[Template, ...] = ()
    listeners: tuple[Listener, ...] = ()
    target_groups: tuple[TargetGroup, ...] = ()
    balancers: tuple[Balancer, ...] = ()
    # The load balancer's security group (the instances' is in `groups`).
    balancer_groups: tuple[Group, ...] = ()
    # The CloudFormation stacks that made any of the groups, instances or addresses (`--output cloudformation`).
    stacks: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.groups
            or self.instances
            or self.addresses
            or self.references
            or self.bucket
            or self.role
            or self.scaling_groups
            or self.templates
            or self.listeners
            or self.target_groups
            or self.balancers
            or self.balancer_groups
        )

    @property
    def standalone(self) -> tuple[Instance, ...]:
        """The instances no Auto Scaling group launched (the single layout's)."""
        return tuple(i for i in self.instances if not i.group)

    @property
    def layout(self) -> str | None:
        """The layout of what exists: "single", "ha", "replicas", or None when there is no instance or group."""
        if self.balancers or self.target_groups:
            return "replicas"
        if self.scaling_groups or self.templates:
            return "ha"
        return "single" if self.standalone else None

    def lines(self) -> list[str]:
        """One line per resource, in the order destroy removes them."""
        lines = [
            f"Auto Scaling group {g.name} and its instances ({', '.join(g.instance_ids) or 'none'})"
            for g in self.scaling_groups
        ]
        lines += [f"launch template {t.template_id} ({t.name})" for t in self.templates]
        lines += [f"instance {i.instance_id} ({i.state})" for i in self.instances if not i.group]
        lines += [f"listener TCP {listener.port}" for listener in self.listeners]
        lines += [f"target group {t.name}" for t in self.target_groups]
        lines += [f"Network Load Balancer {b.name}" for b in self.balancers]
        lines += [f"Elastic IP {a.public_ip} ({a.allocation_id})" for a in self.addresses]
        lines += [
            f"rule in {r.group_id}: inbound {r.rule.protocol} {r.rule.ports} from {r.rule.peer}"
            for r in self.references
        ]
        lines += [f"security group {g.group_id} (in {g.vpc_id})" for g in (*self.groups, *self.balancer_groups)]
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
    groups: list[Group] = []
    balancer_groups: list[Group] = []
    group_entries = client.describe_security_groups(tagged)
    instance_entries = [e for e in client.describe_instances(tagged) if e["State"]["Name"] not in _GONE]
    address_entries = client.describe_addresses(tagged)
    stacks = {_tags(e).get(TAG_STACK, "") for e in (*group_entries, *instance_entries, *address_entries)} - {""}
    for entry in group_entries:
        found = Group(
            group_id=str(entry["GroupId"]),
            vpc_id=str(entry.get("VpcId", "")),
            ingress=tuple(from_permissions(entry.get("IpPermissions") or ())),
            egress=tuple(from_permissions(entry.get("IpPermissionsEgress") or ())),
        )
        is_balancer = _tags(entry).get(TAG_ROLE) == "load-balancer-security-group"
        (balancer_groups if is_balancer else groups).append(found)
    instances = [
        Instance(
            instance_id=str(entry["InstanceId"]),
            state=str(entry["State"]["Name"]),
            subnet_id=str(entry.get("SubnetId", "")),
            mode=_tags(entry).get(TAG_MODE, ""),
            instance_type=str(entry.get("InstanceType", "")),
            user_data=client.instance_user_data(str(entry["InstanceId"])),
            group=_tags(entry).get(fleet.TAG_GROUP, ""),
        )
        for entry in instance_entries
    ]
    addresses = [
        Address(
            allocation_id=str(entry["AllocationId"]),
            public_ip=str(entry.get("PublicIp", "")),
            association_id=entry.get("AssociationId") or None,
            instance_id=entry.get("InstanceId") or None,
            zone=_tags(entry).get(TAG_ZONE, ""),
        )
        for entry in address_entries
    ]
    balancers = balancer.find_balancers(client, cluster_id)
    references = []
    group_ids = [g.group_id for g in (*groups, *balancer_groups)]
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
        scaling_groups=fleet.find_groups(client, cluster_id),
        templates=fleet.find_templates(client, cluster_id),
        listeners=balancer.find_listeners(client, balancers),
        target_groups=balancer.find_target_groups(client, cluster_id),
        balancers=balancers,
        balancer_groups=tuple(sorted(balancer_groups, key=lambda g: g.group_id)),
        stacks=tuple(sorted(stacks)),
    )
