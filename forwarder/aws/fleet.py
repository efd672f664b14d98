"""The Auto Scaling side of --ha and --replicas: the launch template, the group, what exists, and converging them."""

from __future__ import annotations

import base64
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from forwarder.aws.client import AwsClient
from forwarder.aws.fleetcalls import user_data_text
from forwarder.aws.plan import GRACE_S, TAG_CLUSTER, Plan
from forwarder.aws.waiter import Progress

# The tag EC2 Auto Scaling puts on every instance it launches.
TAG_GROUP = "aws:autoscaling:groupName"
_MAX_DIFF_LINES = 40


@dataclass(frozen=True, slots=True)
class Template:
    """The cluster's launch template and what its latest version launches."""

    template_id: str
    name: str
    version: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ScalingGroup:
    """The cluster's Auto Scaling group, and its instances."""

    name: str
    size: int
    subnet_ids: tuple[str, ...]
    health_check_type: str
    grace_s: int
    target_group_arns: tuple[str, ...]
    instance_ids: tuple[str, ...]


def find_templates(client: AwsClient, cluster_id: str) -> tuple[Template, ...]:
    found = []
    for entry in client.describe_launch_templates({f"tag:{TAG_CLUSTER}": [cluster_id]}):
        template_id = str(entry["LaunchTemplateId"])
        version, data = client.launch_template_data(template_id)
        found.append(Template(template_id, str(entry["LaunchTemplateName"]), version, data))
    return tuple(sorted(found, key=lambda t: t.template_id))


def find_groups(client: AwsClient, cluster_id: str) -> tuple[ScalingGroup, ...]:
    found = []
    for entry in client.describe_auto_scaling_groups((TAG_CLUSTER, cluster_id)):
        found.append(
            ScalingGroup(
                name=str(entry["AutoScalingGroupName"]),
                size=int(entry.get("DesiredCapacity", 0)),
                subnet_ids=tuple(s for s in str(entry.get("VPCZoneIdentifier", "")).split(",") if s),
                health_check_type=str(entry.get("HealthCheckType", "")),
                grace_s=int(entry.get("HealthCheckGracePeriod", 0)),
                target_group_arns=tuple(sorted(str(a) for a in entry.get("TargetGroupARNs") or ())),
                instance_ids=tuple(sorted(str(i["InstanceId"]) for i in entry.get("Instances") or ())),
            )
        )
    return tuple(sorted(found, key=lambda g: g.name))


def template_data(plan: Plan, nat_group_id: str, user_data: str) -> dict[str, Any]:
    """What each instance of the group is launched with: the single instance's settings, and a public IP.

    The public IP lets the box install natfwd and call the EC2 API at first boot; under --ha the Elastic IP
    then replaces it (an instance with an Elastic IP gives its automatic public IP back).
    """
    tags = [{"Key": key, "Value": value} for key, value in plan.tags("instance")]
    data: dict[str, Any] = {
        "ImageId": plan.image_id,
        "InstanceType": plan.request.instance_type,
        # Launch templates take user data base64-encoded (RunInstances encodes it itself; this API does not).
        "UserData": base64.b64encode(user_data.encode()).decode(),
        "IamInstanceProfile": {"Name": plan.role_name},
        "NetworkInterfaces": [
            {"DeviceIndex": 0, "AssociatePublicIpAddress": True, "DeleteOnTermination": True, "Groups": [nat_group_id]}
        ],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        # The interface is tagged too: the instance role's AssociateAddress is conditioned on the cluster tag of
        # every resource it touches (address, instance and interface).
        "TagSpecifications": [
            {"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume", "network-interface")
        ],
    }
    if plan.request.key_name:
        data["KeyName"] = plan.request.key_name
    return data


def _essence(data: Mapping[str, Any]) -> dict[str, Any]:
    """What decides how an instance is launched, in a form that compares equal however EC2 returns it."""
    interfaces = data.get("NetworkInterfaces") or [{}]
    return {
        "image": data.get("ImageId"),
        "instance type": data.get("InstanceType"),
        "key pair": data.get("KeyName"),
        "instance profile": (data.get("IamInstanceProfile") or {}).get("Name"),
        "security groups": sorted(interfaces[0].get("Groups") or ()),
        "public IP": bool(interfaces[0].get("AssociatePublicIpAddress")),
        "IMDSv2": (data.get("MetadataOptions") or {}).get("HttpTokens"),
    }


def template_changes(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> tuple[str, ...]:
    """Why a new template version is needed: one line per difference (empty: the latest version matches)."""
    reasons: list[str] = []
    old, new = _essence(found), _essence(wanted)
    for key in new:
        if old[key] != new[key]:
            reasons += [f"- {key} {old[key]}", f"+ {key} {new[key]}"]
    return (*reasons, *user_data_diff(user_data_text(found), user_data_text(wanted)))


def user_data_diff(old_text: str, new_text: str) -> tuple[str, ...]:
    """The changed lines between two user data texts, as plan lines (empty: equal)."""
    if old_text == new_text:
        return ()
    changed = [
        line
        for line in difflib.unified_diff(old_text.splitlines(), new_text.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    reasons = ["user data (natfwd's config, unit or bootstrap):"]
    reasons += [f"  {line[0]} {line[1:].strip()}" for line in changed[:_MAX_DIFF_LINES]]
    if len(changed) > _MAX_DIFF_LINES:
        reasons.append(f"  ... and {len(changed) - _MAX_DIFF_LINES} more changed lines")
    return tuple(reasons)


@dataclass(frozen=True, slots=True)
class FleetChanges:
    """What apply does to the template and the group (None: create it)."""

    template: Template | None
    template_reasons: tuple[str, ...]
    group: ScalingGroup | None
    group_reasons: tuple[str, ...]

    @property
    def new_version(self) -> bool:
        return self.template is not None and bool(self.template_reasons)

    @property
    def empty(self) -> bool:
        return not (self.template is None or self.template_reasons or self.group is None or self.group_reasons)

    def lines(self, plan: Plan) -> list[str]:
        lines = []
        if self.template is None:
            lines.append(f"create launch template {plan.group_name} (version 1)")
        elif self.template_reasons:
            lines.append(
                f"add version {self.template.version + 1} to launch template {self.template.template_id}, the "
                "group's $Latest"
            )
            lines += [f"  {reason}" for reason in self.template_reasons]
            if self.group is not None:
                lines.append(f"  {rollout(plan)}")
        else:
            lines.append(f"keep launch template {self.template.template_id} (version {self.template.version})")
        if self.group is None:
            lines.append(
                f"create Auto Scaling group {plan.group_name} of {plan.size} over {', '.join(plan.zones)} "
                f"({plan.health_check_type} health checks)"
            )
        elif self.group_reasons:
            lines.append(f"update Auto Scaling group {self.group.name} in place")
            lines += [f"  {reason}" for reason in self.group_reasons]
        else:
            members = ", ".join(self.group.instance_ids) or "no instances yet"
            lines.append(f"keep Auto Scaling group {self.group.name} ({members})")
        return lines


def rollout(plan: Plan) -> str:
    """How running instances get a new template version."""
    if plan.layout == "replicas":
        return "then an instance refresh replaces the instances one by one, each replacement healthy first"
    return "then the instance is terminated in its group, which launches a replacement that claims the Elastic IP"


def group_changes(plan: Plan, group: ScalingGroup) -> tuple[str, ...]:
    reasons: list[str] = []
    wanted_subnets = tuple(s.subnet_id for s in plan.subnets)
    if group.size != plan.size:
        reasons.append(f"size {group.size} -> {plan.size}")
    if set(group.subnet_ids) != set(wanted_subnets):
        reasons.append(f"subnets {', '.join(group.subnet_ids)} -> {', '.join(wanted_subnets)}")
    if group.health_check_type != plan.health_check_type or group.grace_s != GRACE_S:
        reasons.append(
            f"health checks {group.health_check_type} ({group.grace_s} s grace) -> {plan.health_check_type} "
            f"({GRACE_S} s grace)"
        )
    return tuple(reasons)


def diff(
    plan: Plan,
    templates: Sequence[Template],
    groups: Sequence[ScalingGroup],
    wanted: Mapping[str, Any] | None,
) -> FleetChanges:
    """Compare the planned template (`wanted`, None when the security group does not exist yet) and group with
    what exists. Pure."""
    template = templates[0] if templates else None
    group = groups[0] if groups else None
    reasons: tuple[str, ...] = ()
    if template is not None and wanted is not None:
        reasons = template_changes(template.data, wanted)
    group_reasons = group_changes(plan, group) if group is not None else ()
    return FleetChanges(template, reasons, group, group_reasons)


@dataclass
class Made:
    """What converge created, for a rollback."""

    template_id: str | None = None
    group_name: str | None = None


def converge(
    client: AwsClient,
    plan: Plan,
    changes: FleetChanges,
    data: Mapping[str, Any],
    target_group_arns: Sequence[str],
    progress: Progress,
    made: Made,
) -> tuple[str, str]:
    """Create or update the template and the group; returns (template id, group name).

    Raises AwsError. A new template version reaches running instances by `rollout`, which the caller starts.
    """
    if changes.template is None:
        template_id = client.create_launch_template(plan.group_name, data, plan.tags("launch-template"))
        made.template_id = template_id
        progress(f"created launch template {template_id}")
    else:
        template_id = changes.template.template_id
        if changes.template_reasons:
            version = client.create_launch_template_version(template_id, data)
            progress(f"added version {version} to launch template {template_id}")
    subnet_ids = [s.subnet_id for s in plan.subnets]
    if changes.group is None:
        client.create_auto_scaling_group(
            name=plan.group_name,
            template_id=template_id,
            size=plan.size,
            subnet_ids=subnet_ids,
            health_check_type=plan.health_check_type,
            grace_s=GRACE_S,
            target_group_arns=target_group_arns,
            tags=plan.tags("auto-scaling-group"),
        )
        made.group_name = plan.group_name
        progress(f"created Auto Scaling group {plan.group_name} of {plan.size} over {', '.join(plan.zones)}")
    elif changes.group_reasons:
        client.update_auto_scaling_group(
            name=plan.group_name,
            size=plan.size,
            subnet_ids=subnet_ids,
            health_check_type=plan.health_check_type,
            grace_s=GRACE_S,
        )
        progress(f"updated Auto Scaling group {plan.group_name}: {'; '.join(changes.group_reasons)}")
    return template_id, plan.group_name
