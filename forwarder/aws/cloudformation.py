"""The provision plan as a CloudFormation template: the same resources, rules, tags and user data, as YAML text."""

from __future__ import annotations

from typing import Any

import yaml

from forwarder.aws import userdata
from forwarder.aws.balancer import BALANCER_ATTRIBUTES, TARGET_ATTRIBUTES
from forwarder.aws.fleetcalls import HEALTH_CHECK_INTERVAL_S, UNHEALTHY_CHECKS
from forwarder.aws.plan import (
    BALANCER_GROUP,
    GRACE_S,
    SSM_POLICY_ARN,
    Plan,
    Role,
    balancer_name,
    target_group_name,
)
from forwarder.aws.rules import Rule
from forwarder.errors import UsageError

# Logical ids: the names `Fn::Sub`, `Ref` and the Outputs use, stable across natfwd versions so that an update of
# a deployed stack changes resources in place rather than replacing them.
SECURITY_GROUP = "NatSecurityGroup"
BALANCER_SECURITY_GROUP = "LoadBalancerSecurityGroup"
ROLE = "InstanceRole"
PROFILE = "InstanceProfile"
ADDRESS = "ElasticIp"
INSTANCE = "Instance"
ASSOCIATION = "ElasticIpAssociation"
LAUNCH_TEMPLATE = "LaunchTemplate"
GROUP = "AutoScalingGroup"
BALANCER = "LoadBalancer"

# What userdata.render is given in place of the values only a deploy knows; each becomes one `${...}` of Fn::Sub.
# Letters and hyphens only, so shell quoting and YAML leave them as they are.
_PUBLIC_IP_TOKEN = "NATFWD-CFN-PUBLIC-IP"
_ALLOCATION_TOKEN = "NATFWD-CFN-ALLOCATION-ID"

NEEDS_PACKAGE = (
    "--output cloudformation: a template cannot carry the natfwd that runs here (provision uploads it to S3 "
    "first, and a stack's instance would boot before it is there); pass --package SPEC, a release, a wheel URL "
    "or a git+https URL that the instances pip-install"
)

_TRUST_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}
# IMDSv2 only, as provision launches its instances.
_METADATA_OPTIONS = {"HttpTokens": "required", "HttpEndpoint": "enabled"}


def _tags(plan: Plan, role: Role) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in plan.tags(role)]


def _ref(logical_id: str) -> dict[str, str]:
    return {"Ref": logical_id}


def _group_id(logical_id: str) -> dict[str, list[str]]:
    return {"Fn::GetAtt": [logical_id, "GroupId"]}


def _rule(rule: Rule, inbound: bool, peer: Any = None) -> dict[str, Any]:
    """One SecurityGroupIngress/Egress entry; `peer` (a CloudFormation value) replaces a security group peer."""
    entry: dict[str, Any] = {"IpProtocol": rule.protocol}
    if rule.protocol != "-1":
        entry["FromPort"] = rule.from_port
        entry["ToPort"] = rule.to_port
    if peer is not None or rule.peer.startswith("sg-"):
        entry["SourceSecurityGroupId" if inbound else "DestinationSecurityGroupId"] = peer or rule.peer
    elif rule.peer.startswith("pl-"):
        entry["SourcePrefixListId" if inbound else "DestinationPrefixListId"] = rule.peer
    elif ":" in rule.peer:
        entry["CidrIpv6"] = rule.peer
    else:
        entry["CidrIp"] = rule.peer
    if rule.description:
        entry["Description"] = rule.description
    return entry


def user_data(plan: Plan, public_ip: str, allocation_id: str | None = None) -> dict[str, Any]:
    """Provision's user data for `plan` as `Fn::Base64` of `Fn::Sub`: `public_ip` and `allocation_id` are
    CloudFormation `${...}` references; every other `${` of the script is escaped as `${!` (a literal)."""
    token_allocation = _ALLOCATION_TOKEN if allocation_id is not None else None
    text = userdata.render(plan, _PUBLIC_IP_TOKEN, allocation_id=token_allocation)
    text = text.replace("${", "${!").replace(_PUBLIC_IP_TOKEN, public_ip)
    if allocation_id is not None:
        text = text.replace(_ALLOCATION_TOKEN, allocation_id)
    return {"Fn::Base64": {"Fn::Sub": text}}


def _shared(plan: Plan, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    """The NAT security group, its rules in the cache's group, and the instance role and profile."""
    description = f"natfwd NAT instance for ElastiCache cluster {plan.cluster_id}"
    resources: dict[str, Any] = {
        SECURITY_GROUP: {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupName": plan.name,
                "GroupDescription": description,
                "VpcId": plan.vpc_id,
                **({"SecurityGroupIngress": ingress} if ingress else {}),
                # Listing egress rules replaces AWS's default allow-all outbound rule, as provision removes it.
                "SecurityGroupEgress": [_rule(rule, inbound=False) for rule in plan.nat_egress],
                "Tags": _tags(plan, "security-group"),
            },
        }
    }
    for rule in plan.cache_ingress("sg-nat"):
        resources[f"CacheIngress{rule.from_port}"] = {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Properties": {"GroupId": plan.cache_security_group_id, **_rule(rule, True, _group_id(SECURITY_GROUP))},
        }
    resources[ROLE] = {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "RoleName": plan.role_name,
            "Description": f"{description}: SSM, discovery, its package",
            "AssumeRolePolicyDocument": _TRUST_POLICY,
            "ManagedPolicyArns": [SSM_POLICY_ARN],
            "Policies": [{"PolicyName": "natfwd", "PolicyDocument": plan.instance_policy()}],
            "Tags": _tags(plan, "iam-role"),
        },
    }
    # AWS::IAM::InstanceProfile takes no tags; it is found by its name, the role's.
    resources[PROFILE] = {
        "Type": "AWS::IAM::InstanceProfile",
        "Properties": {"InstanceProfileName": plan.role_name, "Roles": [_ref(ROLE)]},
    }
    return resources


def _address(plan: Plan) -> dict[str, Any]:
    return {"Type": "AWS::EC2::EIP", "Properties": {"Domain": "vpc", "Tags": _tags(plan, "elastic-ip")}}


def _launch_template(plan: Plan, data: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "ImageId": plan.image_id,
        "InstanceType": plan.request.instance_type,
        "IamInstanceProfile": {"Arn": {"Fn::GetAtt": [PROFILE, "Arn"]}},
        "SecurityGroupIds": [_group_id(SECURITY_GROUP)],
        "MetadataOptions": _METADATA_OPTIONS,
        "UserData": data,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": _tags(plan, "instance")},
            {"ResourceType": "volume", "Tags": _tags(plan, "instance")},
        ],
    }
    if plan.request.key_name:
        properties["KeyName"] = plan.request.key_name
    return {
        "Type": "AWS::EC2::LaunchTemplate",
        "Properties": {
            "LaunchTemplateName": plan.name,
            "LaunchTemplateData": properties,
            "TagSpecifications": [{"ResourceType": "launch-template", "Tags": _tags(plan, "launch-template")}],
        },
    }


def _auto_scaling_group(plan: Plan, size: int, extra: dict[str, Any]) -> dict[str, Any]:
    # The group's own tags; the launch template tags the instances (PropagateAtLaunch would overwrite its role).
    tags = [{**tag, "PropagateAtLaunch": False} for tag in _tags(plan, "auto-scaling-group")]
    return {
        "Type": "AWS::AutoScaling::AutoScalingGroup",
        "Properties": {
            "AutoScalingGroupName": plan.name,
            "MinSize": str(size),
            "MaxSize": str(size),
            "DesiredCapacity": str(size),
            "VPCZoneIdentifier": [subnet.subnet_id for subnet in plan.subnets],
            "LaunchTemplate": {
                "LaunchTemplateId": _ref(LAUNCH_TEMPLATE),
                "Version": {"Fn::GetAtt": [LAUNCH_TEMPLATE, "LatestVersionNumber"]},
            },
            **extra,
            "Tags": tags,
        },
    }


def _endpoints(plan: Plan, address: str) -> dict[str, Any]:
    lines = [f"${{{address}}}:{f.port} -> {f.node.address}:{f.node.port}" for f in plan.forwards]
    return {"Description": "public port -> cache node", "Value": {"Fn::Sub": ", ".join(lines)}}


def _single(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    resources = _shared(plan, [_rule(rule, inbound=True) for rule in plan.nat_ingress])
    resources[ADDRESS] = _address(plan)
    instance: dict[str, Any] = {
        "ImageId": plan.image_id,
        "InstanceType": plan.request.instance_type,
        "SubnetId": plan.subnet.subnet_id,
        "SecurityGroupIds": [_group_id(SECURITY_GROUP)],
        "IamInstanceProfile": _ref(PROFILE),
        "MetadataOptions": _METADATA_OPTIONS,
        "UserData": user_data(plan, f"${{{ADDRESS}}}"),
        "Tags": _tags(plan, "instance"),
    }
    if plan.request.key_name:
        instance["KeyName"] = plan.request.key_name
    resources[INSTANCE] = {"Type": "AWS::EC2::Instance", "Properties": instance}
    resources[ASSOCIATION] = {
        "Type": "AWS::EC2::EIPAssociation",
        "Properties": {"AllocationId": {"Fn::GetAtt": [ADDRESS, "AllocationId"]}, "InstanceId": _ref(INSTANCE)},
    }
    outputs = {
        "PublicAddress": {"Description": "the Elastic IP clients dial", "Value": _ref(ADDRESS)},
        "InstanceId": {"Description": "the NAT instance", "Value": _ref(INSTANCE)},
        "Endpoints": _endpoints(plan, ADDRESS),
    }
    return resources, outputs


def _ha(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    resources = _shared(plan, [_rule(rule, inbound=True) for rule in plan.nat_ingress])
    resources[ADDRESS] = _address(plan)
    data = user_data(plan, f"${{{ADDRESS}}}", f"${{{ADDRESS}.AllocationId}}")
    resources[LAUNCH_TEMPLATE] = _launch_template(plan, data)
    # Each instance claims the address at boot (natfwd claim-address), so nothing associates it here; the group
    # replaces an instance whose health the box itself reports (SetInstanceHealth) or EC2 reports.
    resources[GROUP] = _auto_scaling_group(plan, 1, {"HealthCheckType": "EC2", "HealthCheckGracePeriod": GRACE_S})
    outputs = {
        "PublicAddress": {"Description": "the Elastic IP clients dial", "Value": _ref(ADDRESS)},
        "AllocationId": {
            "Description": "the Elastic IP each instance claims at boot",
            "Value": {"Fn::GetAtt": [ADDRESS, "AllocationId"]},
        },
        "AutoScalingGroup": {"Description": "the group of one", "Value": _ref(GROUP)},
        "Endpoints": _endpoints(plan, ADDRESS),
    }
    return resources, outputs


def _balancer_address(index: int) -> str:
    return f"LoadBalancerIp{index + 1}"


def _replicas(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    # The public ports: one per node, each a listener, a target group and a port natfwd serves on every replica.
    ports = tuple(forward.port for forward in plan.forwards)
    # Node ports are admitted from the load balancer's group only (its health checks come from there too), by
    # separate rules: the load balancer's group names this one in its egress, and inline both ways is a cycle.
    # SSH, when there is a key pair, comes straight from the trusted networks.
    from_balancer = [rule for rule in plan.nat_ingress if rule.peer == BALANCER_GROUP]
    inline = [_rule(rule, inbound=True) for rule in plan.nat_ingress if rule.peer != BALANCER_GROUP]
    resources = _shared(plan, inline)
    resources[BALANCER_SECURITY_GROUP] = {
        "Type": "AWS::EC2::SecurityGroup",
        "Properties": {
            "GroupName": plan.balancer_group_name,
            "GroupDescription": f"natfwd load balancer for ElastiCache cluster {plan.cluster_id}",
            "VpcId": plan.vpc_id,
            "SecurityGroupIngress": [_rule(r, inbound=True) for r in plan.balancer_ingress()],
            "SecurityGroupEgress": [_rule(r, False, _group_id(SECURITY_GROUP)) for r in plan.balancer_egress("sg-nat")],
            "Tags": _tags(plan, "load-balancer-security-group"),
        },
    }
    for rule in from_balancer:
        resources[f"NatIngress{rule.from_port}"] = {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Properties": {
                "GroupId": _group_id(SECURITY_GROUP),
                **_rule(rule, True, _group_id(BALANCER_SECURITY_GROUP)),
            },
        }
    mappings = []
    for index, subnet in enumerate(plan.subnets):
        resources[_balancer_address(index)] = _address(plan)
        mappings.append(
            {"SubnetId": subnet.subnet_id, "AllocationId": {"Fn::GetAtt": [_balancer_address(index), "AllocationId"]}}
        )
    resources[BALANCER] = {
        "Type": "AWS::ElasticLoadBalancingV2::LoadBalancer",
        "Properties": {
            "Name": balancer_name(plan.cluster_id),
            "Type": "network",
            "Scheme": "internet-facing",
            "IpAddressType": "ipv4",
            "SecurityGroups": [_group_id(BALANCER_SECURITY_GROUP)],
            "SubnetMappings": mappings,
            "LoadBalancerAttributes": [{"Key": k, "Value": v} for k, v in BALANCER_ATTRIBUTES.items()],
            "Tags": _tags(plan, "load-balancer"),
        },
    }
    groups = []
    for port in ports:
        target = f"TargetGroup{port}"
        groups.append(_ref(target))
        resources[target] = {
            "Type": "AWS::ElasticLoadBalancingV2::TargetGroup",
            "Properties": {
                "Name": target_group_name(plan.cluster_id, port),
                "Protocol": "TCP",
                "Port": port,
                "VpcId": plan.vpc_id,
                "TargetType": "instance",
                "HealthCheckProtocol": "TCP",
                "HealthCheckPort": "traffic-port",
                "HealthCheckIntervalSeconds": HEALTH_CHECK_INTERVAL_S,
                "HealthyThresholdCount": UNHEALTHY_CHECKS,
                "UnhealthyThresholdCount": UNHEALTHY_CHECKS,
                # natfwd's own allowlist sees the client's address, not the load balancer's.
                "TargetGroupAttributes": [{"Key": k, "Value": v} for k, v in TARGET_ATTRIBUTES.items()],
                "Tags": _tags(plan, "target-group"),
            },
        }
        resources[f"Listener{port}"] = {
            "Type": "AWS::ElasticLoadBalancingV2::Listener",
            "Properties": {
                "LoadBalancerArn": _ref(BALANCER),
                "Port": port,
                "Protocol": "TCP",
                "DefaultActions": [{"Type": "forward", "TargetGroupArn": _ref(target)}],
            },
        }
    first = _balancer_address(0)
    resources[LAUNCH_TEMPLATE] = _launch_template(plan, user_data(plan, f"${{{first}}}"))
    extra = {"TargetGroupARNs": groups, "HealthCheckType": "ELB", "HealthCheckGracePeriod": GRACE_S}
    resources[GROUP] = _auto_scaling_group(plan, plan.request.replicas, extra)
    resources[GROUP]["DependsOn"] = [f"Listener{port}" for port in ports]
    addresses = [_ref(_balancer_address(index)) for index in range(len(plan.subnets))]
    outputs = {
        "PublicAddress": {
            "Description": "the load balancer's first Elastic IP (natfwd's public_address)",
            "Value": _ref(first),
        },
        "PublicAddresses": {
            "Description": "every Elastic IP of the load balancer",
            "Value": {"Fn::Join": [",", addresses]},
        },
        "LoadBalancerDnsName": {
            "Description": "the load balancer's DNS name",
            "Value": {"Fn::GetAtt": [BALANCER, "DNSName"]},
        },
        "AutoScalingGroup": {"Description": "the replicas", "Value": _ref(GROUP)},
        "Endpoints": _endpoints(plan, first),
    }
    return resources, outputs


def template(plan: Plan) -> dict[str, Any]:
    """The CloudFormation template that builds what provision builds for `plan`.

    Raises UsageError when natfwd itself would have to be uploaded first (no --package): a template only
    describes resources, and the instance would boot before anyone could put the package in its bucket.
    """
    if plan.artefact is not None:
        raise UsageError(NEEDS_PACKAGE)
    build = {"single": _single, "ha": _ha, "replicas": _replicas}[plan.layout]
    resources, outputs = build(plan)
    kind = {"single": "one NAT instance", "ha": "an Auto Scaling group of one", "replicas": "a Network Load Balancer"}
    description = (
        f"natfwd for ElastiCache cluster {plan.cluster_id} ({plan.cluster.engine}) in {plan.region}: "
        f"{kind[plan.layout]}, made by natfwd provision --output cloudformation"
    )
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": description,
        "Resources": resources,
        "Outputs": outputs,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the user data) as literal blocks, so the script reads as it runs."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(plan: Plan) -> str:
    """The template as YAML text. Raises UsageError as template() does."""
    return yaml.dump(template(plan), Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
