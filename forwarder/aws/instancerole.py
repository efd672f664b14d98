"""The instance role and its instance profile: create them, or repair their policies, as a diff says."""

from __future__ import annotations

import json
from typing import Protocol

from forwarder.aws.client import AwsClient
from forwarder.aws.created import Created
from forwarder.aws.inventory import Role
from forwarder.aws.plan import SSM_POLICY_ARN, Plan
from forwarder.aws.waiter import Progress, Timing


class RoleChanges(Protocol):
    """The role part of apply.Changes."""

    @property
    def create_role(self) -> bool: ...
    @property
    def put_policy(self) -> bool: ...
    @property
    def attach_ssm(self) -> bool: ...
    @property
    def create_profile(self) -> bool: ...
    @property
    def add_role_to_profile(self) -> bool: ...


_TRUST_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
)


def ensure_role(
    client: AwsClient,
    plan: Plan,
    changes: RoleChanges,
    progress: Progress,
    timing: Timing,
    created: Created,
    made: list[str],
) -> None:
    name = plan.role_name
    if changes.create_role:
        description = f"natfwd NAT instance for ElastiCache cluster {plan.cluster_id}: SSM, discovery, its package"
        client.create_role(name, _TRUST_POLICY, description, plan.tags("iam-role"))
        created.role = Role(name, True, False, (), (), ())
        made.append(f"IAM role {name}")
        progress(f"created IAM role {name}")
    if changes.put_policy:
        client.put_role_policy(name, "natfwd", json.dumps(plan.instance_policy()))
        if created.role is not None:
            created.role = Role(name, True, False, (), ("natfwd",), ())
    if changes.attach_ssm:
        client.attach_role_policy(name, SSM_POLICY_ARN)
        if created.role is not None:
            created.role = Role(name, True, False, (), ("natfwd",), (SSM_POLICY_ARN,))
    if changes.create_profile:
        client.create_instance_profile(name, plan.tags("instance-profile"))
        if created.role is not None:
            created.role = Role(name, True, True, (), ("natfwd",), (SSM_POLICY_ARN,))
        made.append(f"IAM instance profile {name}")
        progress(f"created IAM instance profile {name}")
    if changes.add_role_to_profile:
        client.add_role_to_instance_profile(name, name)
        if created.role is not None:
            created.role = Role(name, True, True, (name,), ("natfwd",), (SSM_POLICY_ARN,))
