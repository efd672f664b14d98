"""The IAM policies in deploy/: least privilege for provision/destroy, and the instance policy for discovery."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from awskit import REGION, REPO, TRUSTED, Aws, build_world, memcached_cluster, redis_group
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"

from forwarder import cli, config
from forwarder.aws import discovery
from forwarder.aws.client import AwsClient

PROVISION = REPO / "deploy" / "iam-provision-policy.json"
INSTANCE = REPO / "deploy" / "iam-instance-policy.json"
CLIENT_SOURCES = (REPO / "forwarder" / "aws" / "client.py", REPO / "forwarder" / "aws" / "fleetcalls.py")
DESTRUCTIVE = {
    "ec2:TerminateInstances",
    "ec2:DeleteSecurityGroup",
    "ec2:ReleaseAddress",
    "ec2:DisassociateAddress",
    "ec2:DeleteLaunchTemplate",
    "autoscaling:DeleteAutoScalingGroup",
    "autoscaling:TerminateInstanceInAutoScalingGroup",
    "elasticloadbalancing:DeleteListener",
    "elasticloadbalancing:DeleteLoadBalancer",
    "elasticloadbalancing:DeleteTargetGroup",
}
# boto3's client name where IAM spells the service otherwise.
IAM_SERVICE = {"elbv2": "elasticloadbalancing"}


def load(path: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def statements(document: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[str], list[str]]]:
    for statement in document["Statement"]:
        actions = statement["Action"]
        resources = statement["Resource"]
        yield (
            statement,
            [actions] if isinstance(actions, str) else actions,
            [resources] if isinstance(resources, str) else resources,
        )


def actions_of(document: dict[str, Any]) -> set[str]:
    return {action for _, actions, _ in statements(document) for action in actions}


# The IAM action that authorises an API operation, where the two are spelled differently (S3's reads and writes).
IAM_ACTION = {
    "s3:HeadBucket": "s3:ListBucket",
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "s3:PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
}
# Needed with the API operations, but never called as one: tags, the ownership setting given to CreateBucket, and
# handing the instance role to EC2 in RunInstances.
IMPLIED = {
    "ec2:CreateTags",
    "iam:TagRole",
    "iam:TagInstanceProfile",
    "s3:PutBucketOwnershipControls",
    "iam:PassRole",
    "autoscaling:CreateOrUpdateTags",
    "elasticloadbalancing:AddTags",
    # The first Auto Scaling group and load balancer in an account create their service's linked role.
    "iam:CreateServiceLinkedRole",
}
# Allowed to everyone, so never in a policy.
ALWAYS_ALLOWED = {"sts:GetCallerIdentity"}


def as_actions(operations: set[str]) -> set[str]:
    spelled = set()
    for operation in operations:
        service, name = operation.split(":")
        spelled.add(f"{IAM_SERVICE.get(service, service)}:{name}")
    return {IAM_ACTION.get(operation, operation) for operation in spelled} - ALWAYS_ALLOWED


def calls_in_client(sources: tuple[Any, ...] = CLIENT_SOURCES) -> set[str]:
    """Every `service:Operation` the one boto3 wrapper (and its fleet mixin) can call, read from their source."""
    text = "".join(path.read_text() for path in sources)
    return {
        f"{service}:{operation}"
        for service, operation in re.findall(r'_(?:call|paginate)\(\s*"(\w+)",\s*"(\w+)"', text)
    }


def test_policies_are_well_formed() -> None:
    for path in (PROVISION, INSTANCE):
        document = load(path)
        assert document["Version"] == "2012-10-17"
        sids = [s["Sid"] for s in document["Statement"]]
        assert len(sids) == len(set(sids))
        for statement, actions, _ in statements(document):
            assert statement["Effect"] == "Allow"
            assert all(
                re.fullmatch(r"(ec2|elasticache|ssm|s3|iam|autoscaling|elasticloadbalancing):[A-Z][A-Za-z]+", action)
                for action in actions
            ), actions


def test_provision_policy_grants_exactly_what_the_client_calls() -> None:
    used = calls_in_client()
    assert len(used) == 74  # the regex still finds every call
    assert actions_of(load(PROVISION)) == as_actions(used) | IMPLIED


def test_the_instance_role_is_only_ever_passed_to_ec2_and_holds_only_the_ssm_policy() -> None:
    statements_by_sid = {s["Sid"]: s for s in load(PROVISION)["Statement"]}
    assert statements_by_sid["PassOnlyTheInstanceRoleToEc2"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}
    }
    assert statements_by_sid["AttachOnlyTheSsmPolicy"]["Condition"] == {
        "ArnEquals": {"iam:PolicyARN": "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"}
    }
    linked = statements_by_sid["ServiceLinkedRolesForGroupsAndLoadBalancers"]
    assert linked["Action"] == "iam:CreateServiceLinkedRole"
    assert linked["Condition"] == {
        "StringEquals": {"iam:AWSServiceName": ["autoscaling.amazonaws.com", "elasticloadbalancing.amazonaws.com"]}
    }
    for statement, actions, resources in statements(load(PROVISION)):
        if statement["Sid"] == linked["Sid"]:
            continue
        if any(a.startswith(("iam:", "s3:")) for a in actions):
            assert all(
                r.split(":")[-1].split("/")[-1].startswith("natfwd-")
                or "/natfwd-" in r
                or r.startswith("arn:aws:s3:::natfwd-")
                for r in resources
            ), statement["Sid"]


def test_destructive_actions_only_touch_natfwd_tagged_resources() -> None:
    for statement, actions, resources in statements(load(PROVISION)):
        for action in DESTRUCTIVE & set(actions):
            if resources == ["arn:aws:ec2:*:*:network-interface/*"]:
                assert action in ("ec2:AssociateAddress", "ec2:DisassociateAddress")
                continue
            key = "autoscaling:ResourceTag" if action.startswith("autoscaling:") else "aws:ResourceTag"
            assert statement["Condition"] == {"Null": {f"{key}/natfwd:cluster-id": "false"}}, action


def test_tags_can_only_be_written_while_creating() -> None:
    (statement,) = [s for s, actions, _ in statements(load(PROVISION)) if "ec2:CreateTags" in actions]
    assert statement["Condition"] == {
        "StringEquals": {
            "ec2:CreateAction": [
                "AllocateAddress",
                "AuthorizeSecurityGroupEgress",
                "AuthorizeSecurityGroupIngress",
                "CreateLaunchTemplate",
                "CreateSecurityGroup",
                "RunInstances",
            ]
        }
    }


# What each creating action makes; a statement allowing it on that resource must require the cluster tag.
CREATES = {
    "ec2:RunInstances": ("arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:*:*:volume/*"),
    "ec2:AllocateAddress": ("arn:aws:ec2:*:*:elastic-ip/*",),
    "ec2:CreateLaunchTemplate": ("arn:aws:ec2:*:*:launch-template/*",),
    "autoscaling:CreateAutoScalingGroup": ("arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/natfwd-*",),
    "elasticloadbalancing:CreateLoadBalancer": ("arn:aws:elasticloadbalancing:*:*:loadbalancer/net/natfwd-*/*",),
    "elasticloadbalancing:CreateTargetGroup": ("arn:aws:elasticloadbalancing:*:*:targetgroup/natfwd-*/*",),
}


def test_new_resources_must_carry_the_cluster_tag() -> None:
    checked = set()
    for statement, actions, resources in statements(load(PROVISION)):
        for action in set(actions) & set(CREATES):
            if set(CREATES[action]) & set(resources):
                assert statement["Condition"] == {"Null": {"aws:RequestTag/natfwd:cluster-id": "false"}}, action
                checked.add(action)
    assert checked == set(CREATES)


def test_instance_policy_is_exactly_the_discovery_reads() -> None:
    assert load(INSTANCE) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "NatfwdDiscovery",
                "Effect": "Allow",
                "Action": ["elasticache:DescribeCacheClusters", "elasticache:DescribeReplicationGroups"],
                "Resource": "*",
            }
        ],
    }


# -- what a real run calls stays inside the policies ----------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every AWS operation natfwd calls during the test, as `service:Operation`."""
    seen: set[str] = set()
    call, paginate = AwsClient._call, AwsClient._paginate

    def recording_call(self: AwsClient, service: str, operation: str, **params: Any) -> dict[str, Any]:
        seen.add(f"{service}:{operation}")
        return call(self, service, operation, **params)

    def recording_paginate(self: AwsClient, service: str, operation: str, key: str, **params: Any) -> list[Any]:
        seen.add(f"{service}:{operation}")
        return paginate(self, service, operation, key, **params)

    monkeypatch.setattr(AwsClient, "_call", recording_call)
    monkeypatch.setattr(AwsClient, "_paginate", recording_paginate)
    return seen


def test_provision_and_destroy_call_only_policy_actions(aws: Aws, recorded: set[str]) -> None:
    world = build_world(aws)
    memcached_cluster(aws, world)
    common = ["--cluster-id", "mycluster", "--endpoint-url", aws.url, "--region", REGION]
    assert cli.main(["provision", *common, "--trusted-cidr", TRUSTED, "--yes"]) == 0
    assert cli.main(["destroy", *common, "--yes"]) == 0
    allowed = actions_of(load(PROVISION))
    used = as_actions(recorded)
    assert used <= allowed
    # The run used all of it but what IMPLIED lists, the replication group lookup and what only --ha and
    # --replicas change (test_group_layouts_call_only_policy_actions covers those).
    fleet_only = as_actions(calls_in_client(CLIENT_SOURCES[1:])) - used
    assert fleet_only and all(a.startswith(("autoscaling:", "elasticloadbalancing:", "ec2:")) for a in fleet_only)
    assert allowed - used - fleet_only == IMPLIED | {"elasticache:DescribeReplicationGroups"}


@pytest.mark.parametrize("layout", [("--ha",), ("--replicas", "2")])
def test_group_layouts_call_only_policy_actions(aws: Aws, recorded: set[str], layout: tuple[str, ...]) -> None:
    world = build_world(aws, public_zones=("us-east-1b", "us-east-1c"))
    memcached_cluster(aws, world)
    common = ["--cluster-id", "mycluster", "--endpoint-url", aws.url, "--region", REGION]
    assert cli.main(["provision", *common, "--trusted-cidr", TRUSTED, *layout, "--yes"]) == 0
    # A client change adds a template version and rolls it out (ha: a replacement; replicas: an instance refresh).
    assert cli.main(["provision", *common, "--trusted-cidr", "203.0.113.0/24", *layout, "--yes"]) == 0
    assert cli.main(["destroy", *common, "--yes"]) == 0
    used = as_actions(recorded)
    assert used <= actions_of(load(PROVISION))
    rollout = (
        "autoscaling:TerminateInstanceInAutoScalingGroup" if layout == ("--ha",) else "autoscaling:StartInstanceRefresh"
    )
    assert {rollout, "ec2:CreateLaunchTemplateVersion", "autoscaling:DeleteAutoScalingGroup"} <= used


def test_discovery_calls_only_instance_policy_actions(aws: Aws, recorded: set[str]) -> None:
    world = build_world(aws)
    redis_group(aws, world)
    recorded.clear()
    settings = config.Discovery("myredis", REGION, 30.0, 6379, aws.url)
    assert len(discovery.describe_nodes(settings)) == 3
    assert recorded == actions_of(load(INSTANCE))
