"""The AWS calls of the --ha and --replicas layouts (launch templates, Auto Scaling, Elastic Load Balancing v2).

A mixin of AwsClient: the same `_call`/`_paginate` plumbing, the same errors, the IAM spelling of each
operation so that the policy test reads these pairs too.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

# The load balancer's TCP checks on each node port: a target is out after UNHEALTHY_CHECKS failures
# HEALTH_CHECK_INTERVAL_S apart, and back in after as many successes.
HEALTH_CHECK_INTERVAL_S = 10
UNHEALTHY_CHECKS = 3

Tags = Sequence[tuple[str, str]]
Filters = Mapping[str, Sequence[str]]


def _tag_list(tags: Tags) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags]


class FleetCalls:
    """EC2 launch templates, Auto Scaling groups, and Network Load Balancers with their target groups and listeners."""

    def _call(self, service: str, operation: str, **params: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _paginate(self, service: str, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- EC2: launch templates -----------------------------------------------------------------------------------

    def describe_launch_templates(self, filters: Filters) -> list[dict[str, Any]]:
        return self._paginate(
            "ec2",
            "DescribeLaunchTemplates",
            "LaunchTemplates",
            Filters=[{"Name": name, "Values": list(values)} for name, values in filters.items()],
        )

    def launch_template_data(self, template_id: str) -> tuple[int, dict[str, Any]]:
        """The latest version of a launch template: (version number, its LaunchTemplateData)."""
        found = self._call("ec2", "DescribeLaunchTemplateVersions", LaunchTemplateId=template_id, Versions=["$Latest"])
        version = found["LaunchTemplateVersions"][0]
        data: dict[str, Any] = version.get("LaunchTemplateData") or {}
        return int(version["VersionNumber"]), data

    def create_launch_template(self, name: str, data: Mapping[str, Any], tags: Tags) -> str:
        """Create the template (version 1); returns its id."""
        created = self._call(
            "ec2",
            "CreateLaunchTemplate",
            LaunchTemplateName=name,
            LaunchTemplateData=dict(data),
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": _tag_list(tags)}],
        )
        return str(created["LaunchTemplate"]["LaunchTemplateId"])

    def create_launch_template_version(self, template_id: str, data: Mapping[str, Any]) -> int:
        created = self._call(
            "ec2", "CreateLaunchTemplateVersion", LaunchTemplateId=template_id, LaunchTemplateData=dict(data)
        )
        return int(created["LaunchTemplateVersion"]["VersionNumber"])

    def delete_launch_template(self, template_id: str) -> None:
        self._call("ec2", "DeleteLaunchTemplate", LaunchTemplateId=template_id)

    # -- Auto Scaling ---------------------------------------------------------------------------------------------

    def describe_auto_scaling_groups(self, cluster_tag: tuple[str, str]) -> list[dict[str, Any]]:
        key, value = cluster_tag
        return self._paginate(
            "autoscaling",
            "DescribeAutoScalingGroups",
            "AutoScalingGroups",
            Filters=[{"Name": f"tag:{key}", "Values": [value]}],
        )

    def create_auto_scaling_group(
        self,
        *,
        name: str,
        template_id: str,
        size: int,
        subnet_ids: Sequence[str],
        health_check_type: str,
        grace_s: int,
        target_group_arns: Sequence[str],
        tags: Tags,
    ) -> None:
        """A group of exactly `size` instances from the template's latest version, spread over the subnets."""
        params: dict[str, Any] = {
            "AutoScalingGroupName": name,
            "LaunchTemplate": {"LaunchTemplateId": template_id, "Version": "$Latest"},
            "MinSize": size,
            "MaxSize": size,
            "DesiredCapacity": size,
            "VPCZoneIdentifier": ",".join(subnet_ids),
            "HealthCheckType": health_check_type,
            "HealthCheckGracePeriod": grace_s,
            # The launch template tags the instances, volumes and interfaces; the group's own tags stay on it.
            "Tags": [{"Key": k, "Value": v, "PropagateAtLaunch": False} for k, v in tags],
        }
        if target_group_arns:
            params["TargetGroupARNs"] = list(target_group_arns)
        self._call("autoscaling", "CreateAutoScalingGroup", **params)

    def update_auto_scaling_group(
        self, *, name: str, size: int, subnet_ids: Sequence[str], health_check_type: str, grace_s: int
    ) -> None:
        self._call(
            "autoscaling",
            "UpdateAutoScalingGroup",
            AutoScalingGroupName=name,
            MinSize=size,
            MaxSize=size,
            DesiredCapacity=size,
            VPCZoneIdentifier=",".join(subnet_ids),
            HealthCheckType=health_check_type,
            HealthCheckGracePeriod=grace_s,
        )

    def terminate_in_group(self, instance_id: str) -> None:
        """Terminate one instance of a group, which launches its replacement (the desired size is kept)."""
        self._call(
            "autoscaling",
            "TerminateInstanceInAutoScalingGroup",
            InstanceId=instance_id,
            ShouldDecrementDesiredCapacity=False,
        )

    def start_instance_refresh(self, name: str) -> str:
        """Replace the group's instances with the template's latest version, launching each replacement before
        terminating the instance it replaces (the group never has fewer healthy instances than it should)."""
        started = self._call(
            "autoscaling",
            "StartInstanceRefresh",
            AutoScalingGroupName=name,
            Preferences={"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200},
        )
        return str(started.get("InstanceRefreshId", ""))

    def delete_auto_scaling_group(self, name: str) -> None:
        """Delete the group and terminate its instances (ForceDelete)."""
        self._call("autoscaling", "DeleteAutoScalingGroup", AutoScalingGroupName=name, ForceDelete=True)

    # -- Elastic Load Balancing v2: the Network Load Balancer -------------------------------------------------------

    def describe_load_balancers(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """The load balancers of these names (none: an empty list, not an error)."""
        try:
            return self._paginate("elbv2", "DescribeLoadBalancers", "LoadBalancers", Names=list(names))
        except Exception as exc:
            if getattr(exc, "code", "") == "LoadBalancerNotFound":
                return []
            raise

    def elb_tags(self, arns: Sequence[str]) -> dict[str, dict[str, str]]:
        """The tags of each load balancer or target group ARN."""
        tags: dict[str, dict[str, str]] = {}
        for start in range(0, len(arns), 20):  # DescribeTags takes at most 20 ARNs
            found = self._call("elbv2", "DescribeTags", ResourceArns=list(arns[start : start + 20]))
            for entry in found.get("TagDescriptions", []):
                tags[str(entry["ResourceArn"])] = {str(t["Key"]): str(t["Value"]) for t in entry.get("Tags") or ()}
        return tags

    def create_network_load_balancer(
        self, name: str, mappings: Sequence[tuple[str, str]], security_group_id: str, tags: Tags
    ) -> dict[str, Any]:
        """An internet-facing NLB with one (subnet, Elastic IP allocation) mapping per zone."""
        created = self._call(
            "elbv2",
            "CreateLoadBalancer",
            Name=name,
            Type="network",
            Scheme="internet-facing",
            IpAddressType="ipv4",
            SubnetMappings=[{"SubnetId": subnet, "AllocationId": allocation} for subnet, allocation in mappings],
            SecurityGroups=[security_group_id],
            Tags=_tag_list(tags),
        )
        balancer: dict[str, Any] = created["LoadBalancers"][0]
        return balancer

    def load_balancer_attributes(self, arn: str) -> dict[str, str]:
        found = self._call("elbv2", "DescribeLoadBalancerAttributes", LoadBalancerArn=arn)
        return {str(a["Key"]): str(a["Value"]) for a in found.get("Attributes", [])}

    def set_load_balancer_attributes(self, arn: str, attributes: Mapping[str, str]) -> None:
        self._call(
            "elbv2",
            "ModifyLoadBalancerAttributes",
            LoadBalancerArn=arn,
            Attributes=[{"Key": k, "Value": v} for k, v in attributes.items()],
        )

    def delete_load_balancer(self, arn: str) -> None:
        self._call("elbv2", "DeleteLoadBalancer", LoadBalancerArn=arn)

    def describe_target_groups(self) -> list[dict[str, Any]]:
        return self._paginate("elbv2", "DescribeTargetGroups", "TargetGroups")

    def create_target_group(self, name: str, port: int, vpc_id: str, tags: Tags) -> str:
        """A TCP target group of instances on `port`, TCP health checks on the same port; returns its ARN."""
        created = self._call(
            "elbv2",
            "CreateTargetGroup",
            Name=name,
            Protocol="TCP",
            Port=port,
            VpcId=vpc_id,
            TargetType="instance",
            HealthCheckProtocol="TCP",
            HealthCheckPort="traffic-port",
            HealthCheckIntervalSeconds=HEALTH_CHECK_INTERVAL_S,
            HealthyThresholdCount=UNHEALTHY_CHECKS,
            UnhealthyThresholdCount=UNHEALTHY_CHECKS,
            Tags=_tag_list(tags),
        )
        return str(created["TargetGroups"][0]["TargetGroupArn"])

    def set_target_group_attributes(self, arn: str, attributes: Mapping[str, str]) -> None:
        self._call(
            "elbv2",
            "ModifyTargetGroupAttributes",
            TargetGroupArn=arn,
            Attributes=[{"Key": k, "Value": v} for k, v in attributes.items()],
        )

    def target_group_attributes(self, arn: str) -> dict[str, str]:
        found = self._call("elbv2", "DescribeTargetGroupAttributes", TargetGroupArn=arn)
        return {str(a["Key"]): str(a["Value"]) for a in found.get("Attributes", [])}

    def delete_target_group(self, arn: str) -> None:
        self._call("elbv2", "DeleteTargetGroup", TargetGroupArn=arn)

    def describe_listeners(self, balancer_arn: str) -> list[dict[str, Any]]:
        return self._paginate("elbv2", "DescribeListeners", "Listeners", LoadBalancerArn=balancer_arn)

    def create_listener(self, balancer_arn: str, port: int, target_group_arn: str, tags: Tags) -> str:
        created = self._call(
            "elbv2",
            "CreateListener",
            LoadBalancerArn=balancer_arn,
            Protocol="TCP",
            Port=port,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": target_group_arn}],
            Tags=_tag_list(tags),
        )
        return str(created["Listeners"][0]["ListenerArn"])

    def delete_listener(self, arn: str) -> None:
        self._call("elbv2", "DeleteListener", ListenerArn=arn)


def user_data_text(data: Mapping[str, Any]) -> str:
    """The user data of LaunchTemplateData, decoded (launch templates hold it base64-encoded)."""
    value = data.get("UserData")
    return base64.b64decode(value).decode("utf-8", "replace") if value else ""
