"""Find what provision created for a cluster, by its tags: security group, instance, Elastic IP, cache rules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forwarder.aws.client import AwsClient
from forwarder.aws.plan import TAG_CLUSTER, TAG_MODE, TAG_TRUSTED_CIDR
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
    trusted_cidr: str
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    state: str
    subnet_id: str
    mode: str


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
class Inventory:
    """natfwd's resources for one cluster; empty tuples when none exist."""

    cluster_id: str
    groups: tuple[Group, ...] = ()
    instances: tuple[Instance, ...] = ()
    addresses: tuple[Address, ...] = ()
    references: tuple[Reference, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.groups or self.instances or self.addresses or self.references)

    def lines(self) -> list[str]:
        """One line per resource, in the order destroy removes them."""
        lines = [f"instance {i.instance_id} ({i.state})" for i in self.instances]
        lines += [f"Elastic IP {a.public_ip} ({a.allocation_id})" for a in self.addresses]
        lines += [
            f"rule in {r.group_id}: inbound {r.rule.protocol} {r.rule.ports} from {r.rule.peer}"
            for r in self.references
        ]
        lines += [f"security group {g.group_id} (in {g.vpc_id})" for g in self.groups]
        return lines


def find(client: AwsClient, cluster_id: str) -> Inventory:
    """Everything tagged natfwd:cluster-id=<cluster_id> in the client's region (terminated instances excluded),
    plus any inbound rule elsewhere that references the NAT security group. Raises AwsError."""
    tagged = {f"tag:{TAG_CLUSTER}": [cluster_id]}
    groups = []
    for entry in client.describe_security_groups(tagged):
        tags = _tags(entry)
        groups.append(
            Group(
                group_id=str(entry["GroupId"]),
                vpc_id=str(entry.get("VpcId", "")),
                trusted_cidr=tags.get(TAG_TRUSTED_CIDR, ""),
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
    )
