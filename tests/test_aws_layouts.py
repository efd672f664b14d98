"""provision --ha and --replicas against a real moto server: the group, its template, the load balancer, re-runs,
layout switches, destroy, and the errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import boto3
import pytest
import yaml
from awskit import (
    INSTANCE_REFRESHES,
    REGION,
    TRUSTED,
    Aws,
    World,
    build_world,
    layout_snapshot,
    memcached_cluster,
    natfwd_cli,
    snapshot,
)
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"

from forwarder import cli, config
from forwarder.aws.plan import ami_parameter
from forwarder.aws.rules import Rule, from_permissions

PORTS = (11211, 11212, 11213)
ZONES = ("us-east-1b", "us-east-1c")
TAGGED = [{"Name": "tag:natfwd:cluster-id", "Values": ["mycluster"]}]


def provision(aws: Aws, *extra: str, cidr: str = TRUSTED) -> int:
    common = ["--cluster-id", "mycluster", "--endpoint-url", aws.url, "--region", REGION]
    return cli.main(["provision", *common, "--trusted-cidr", cidr, *extra])


def destroy(aws: Aws) -> int:
    return cli.main(["destroy", "--cluster-id", "mycluster", "--endpoint-url", aws.url, "--region", REGION, "--yes"])


def client(aws: Aws, service: str) -> Any:
    return boto3.client(service, endpoint_url=aws.url, region_name=REGION)


def the_group(aws: Aws) -> dict[str, Any]:
    (group,) = client(aws, "autoscaling").describe_auto_scaling_groups(Filters=TAGGED)["AutoScalingGroups"]
    found: dict[str, Any] = group
    return found


def latest_template(aws: Aws) -> dict[str, Any]:
    (template,) = aws.ec2.describe_launch_templates(Filters=TAGGED)["LaunchTemplates"]
    (version,) = aws.ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    found: dict[str, Any] = version
    return found


def embedded_config(data: dict[str, Any]) -> config.Config:
    document = yaml.safe_load(base64.b64decode(data["UserData"]).decode())
    files = {entry["path"]: entry["content"] for entry in document["write_files"]}
    return config.loads(files["/etc/natfwd/natfwd.yaml"])


def rules(aws: Aws, group_id: str) -> tuple[set[Rule], set[Rule]]:
    (group,) = aws.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return set(from_permissions(group["IpPermissions"])), set(from_permissions(group["IpPermissionsEgress"]))


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or ()}


def everything(aws: Aws) -> tuple[dict[str, Any], dict[str, Any]]:
    return snapshot(aws), layout_snapshot(aws)


@pytest.fixture
def world(aws: Aws) -> World:
    world = build_world(aws, public_zones=ZONES)
    memcached_cluster(aws, world)
    return world


def test_ha_is_a_group_of_one_over_two_zones_holding_the_elastic_ip(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    before = everything(aws)
    assert provision(aws, "--ha", "--yes") == 0
    out = capsys.readouterr().out

    group = the_group(aws)
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
    assert set(group["VPCZoneIdentifier"].split(",")) == set(world.public_subnet_ids)
    assert sorted(group["AvailabilityZones"]) == list(ZONES)
    assert (group["HealthCheckType"], group["HealthCheckGracePeriod"]) == ("EC2", 600)
    assert group["TargetGroupARNs"] == []
    assert tags_of(group)["natfwd:role"] == "auto-scaling-group"
    (member,) = group["Instances"]

    # The template: the single instance's settings, IMDSv2, a public IP for the first boot, and the tags.
    version = latest_template(aws)
    data = version["LaunchTemplateData"]
    assert data["ImageId"] == aws.client.parameter(ami_parameter("arm64"))
    assert data["InstanceType"] == "t4g.micro"
    assert data["IamInstanceProfile"] == {"Name": "natfwd-mycluster"}
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    (interface,) = data["NetworkInterfaces"]
    assert interface["AssociatePublicIpAddress"] is True
    (nat_group_id,) = interface["Groups"]
    specs = {s["ResourceType"]: tags_of(s) for s in data["TagSpecifications"]}
    for kind in ("instance", "volume", "network-interface"):
        assert specs[kind]["natfwd:cluster-id"] == "mycluster"
    assert "KeyName" not in data

    # The Elastic IP: tagged, on the group's instance, and the address the config publishes.
    (address,) = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    assert tags_of(address)["natfwd:role"] == "elastic-ip"
    assert address["InstanceId"] == member["InstanceId"]
    cfg = embedded_config(data)
    assert cfg.public_address == address["PublicIp"]
    assert [str(c) for c in cfg.allowed_clients] == [TRUSTED]
    assert [f.port for f in cfg.forwards] == list(PORTS)

    # The instances' group admits the clients on the node ports, as in the single layout.
    ingress, egress = rules(aws, nat_group_id)
    assert ingress == {Rule.tcp(port, TRUSTED) for port in PORTS}
    assert Rule.tcp(443, "0.0.0.0/0") in egress

    # The role may claim only this cluster's address and report only to this cluster's group.
    iam = client(aws, "iam")
    policy = iam.get_role_policy(RoleName="natfwd-mycluster", PolicyName="natfwd")["PolicyDocument"]
    statements = {s["Sid"]: s for s in policy["Statement"]}
    claim = statements["NatfwdClaimAddress"]
    assert claim["Action"] == "ec2:AssociateAddress"
    assert claim["Condition"] == {"StringEquals": {"aws:ResourceTag/natfwd:cluster-id": "mycluster"}}
    assert sorted(claim["Resource"]) == [
        "arn:aws:ec2:*:*:elastic-ip/*",
        "arn:aws:ec2:*:*:instance/*",
        "arn:aws:ec2:*:*:network-interface/*",
    ]
    health = statements["NatfwdReportHealth"]
    assert health["Action"] == "autoscaling:SetInstanceHealth"
    assert health["Condition"] == {"StringEquals": {"autoscaling:ResourceTag/natfwd:cluster-id": "mycluster"}}
    assert health["Resource"].endswith(":autoScalingGroupName/natfwd-mycluster")

    assert f"Elastic IP      {address['PublicIp']} ({address['AllocationId']}), claimed by each new instance" in out
    assert f"{address['PublicIp']}:11211 -> node 0001" in out

    # Again: nothing to change, nothing changed.
    after = everything(aws)
    assert provision(aws, "--ha") == 0
    assert "everything already exists; nothing to change" in capsys.readouterr().out
    assert everything(aws) == after

    # destroy: nothing of it is left, and a second destroy finds nothing.
    assert destroy(aws) == 0
    assert everything(aws) == before
    assert destroy(aws) == 0
    assert "nothing to destroy" in capsys.readouterr().out


def test_replicas_sit_behind_a_network_load_balancer(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    before = everything(aws)
    assert provision(aws, "--replicas", "2", "--yes") == 0
    out = capsys.readouterr().out
    elbv2 = client(aws, "elbv2")

    (balancer,) = elbv2.describe_load_balancers(Names=["natfwd-mycluster"])["LoadBalancers"]
    assert (balancer["Type"], balancer["Scheme"]) == ("network", "internet-facing")
    assert sorted(z["SubnetId"] for z in balancer["AvailabilityZones"]) == sorted(world.public_subnet_ids)
    (balancer_group_id,) = balancer["SecurityGroups"]
    attributes = elbv2.describe_load_balancer_attributes(LoadBalancerArn=balancer["LoadBalancerArn"])["Attributes"]
    assert {"Key": "load_balancing.cross_zone.enabled", "Value": "true"} in attributes
    (tag_set,) = elbv2.describe_tags(ResourceArns=[balancer["LoadBalancerArn"]])["TagDescriptions"]
    assert tags_of(tag_set)["natfwd:cluster-id"] == "mycluster"

    # One tagged Elastic IP per zone; the first zone's is public_address.
    addresses = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    by_zone = {tags_of(a)["natfwd:zone"]: a["PublicIp"] for a in addresses}
    assert sorted(by_zone) == list(ZONES)

    # One TCP target group per node port: instances, TCP health checks, client IP preserved; one listener each.
    groups = sorted(elbv2.describe_target_groups()["TargetGroups"], key=lambda t: t["Port"])
    assert [t["Port"] for t in groups] == list(PORTS)
    for target_group in groups:
        assert (target_group["Protocol"], target_group["TargetType"]) == ("TCP", "instance")
        assert target_group["HealthCheckProtocol"] == "TCP"
        attributes = elbv2.describe_target_group_attributes(TargetGroupArn=target_group["TargetGroupArn"])
        assert {"Key": "preserve_client_ip.enabled", "Value": "true"} in attributes["Attributes"]
    listeners = elbv2.describe_listeners(LoadBalancerArn=balancer["LoadBalancerArn"])["Listeners"]
    forwards = {(x["Protocol"], x["Port"], x["DefaultActions"][0]["TargetGroupArn"]) for x in listeners}
    assert forwards == {("TCP", t["Port"], t["TargetGroupArn"]) for t in groups}

    # The group: N instances over both zones, replaced on the load balancer's health checks.
    group = the_group(aws)
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (2, 2, 2)
    assert len(group["Instances"]) == 2
    assert set(group["VPCZoneIdentifier"].split(",")) == set(world.public_subnet_ids)
    assert group["HealthCheckType"] == "ELB"
    assert sorted(group["TargetGroupARNs"]) == sorted(t["TargetGroupArn"] for t in groups)
    data = latest_template(aws)["LaunchTemplateData"]
    (nat_group_id,) = data["NetworkInterfaces"][0]["Groups"]
    cfg = embedded_config(data)
    assert cfg.public_address == by_zone[ZONES[0]]
    assert [str(c) for c in cfg.allowed_clients] == [TRUSTED]

    # Security groups: clients reach the load balancer only; the instances take the node ports from it only.
    balancer_in, balancer_out = rules(aws, balancer_group_id)
    assert balancer_in == {Rule.tcp(port, TRUSTED) for port in PORTS}
    assert balancer_out == {Rule.tcp(port, nat_group_id) for port in PORTS}
    nat_in, _ = rules(aws, nat_group_id)
    assert nat_in == {Rule.tcp(port, balancer_group_id) for port in PORTS}

    assert f"Elastic IPs     {by_zone[ZONES[0]]} ({ZONES[0]}), {by_zone[ZONES[1]]} ({ZONES[1]})" in out

    after = everything(aws)
    assert provision(aws, "--replicas", "2") == 0
    assert "everything already exists; nothing to change" in capsys.readouterr().out
    assert everything(aws) == after

    assert destroy(aws) == 0
    assert everything(aws) == before


def test_ha_converges_a_client_change_with_a_new_template_version(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert provision(aws, "--ha", "--yes") == 0
    (old,) = the_group(aws)["Instances"]
    (address,) = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    nat_group_id = latest_template(aws)["LaunchTemplateData"]["NetworkInterfaces"][0]["Groups"][0]
    capsys.readouterr()

    assert provision(aws, "--ha", "--yes", cidr="203.0.113.0/24") == 0
    out = capsys.readouterr().out
    assert "  + inbound   tcp 11211 from 203.0.113.0/24" in out
    assert f"  - inbound   tcp 11211 from {TRUSTED}" in out
    assert "add version 2 to launch template" in out
    assert "    + - 203.0.113.0/24" in out
    assert "then the instance is terminated in its group, which launches a replacement" in out

    # Rules changed in place, the template has a version 2 with the new allowlist, and a new instance holds the
    # same Elastic IP.
    assert rules(aws, nat_group_id)[0] == {Rule.tcp(port, "203.0.113.0/24") for port in PORTS}
    version = latest_template(aws)
    assert version["VersionNumber"] == 2
    assert [str(c) for c in embedded_config(version["LaunchTemplateData"]).allowed_clients] == ["203.0.113.0/24"]
    (new,) = the_group(aws)["Instances"]
    assert new["InstanceId"] != old["InstanceId"]
    (moved,) = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    assert (moved["AllocationId"], moved["InstanceId"]) == (address["AllocationId"], new["InstanceId"])
    assert destroy(aws) == 0


def test_single_to_ha_keeps_the_elastic_ip(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(aws, "--yes") == 0
    (address,) = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    single = address["InstanceId"]
    capsys.readouterr()
    assert provision(aws, "--ha", "--yes") == 0
    out = capsys.readouterr().out
    assert f"then terminate instance {single} of the single layout (the group replaces it)" in out
    (member,) = the_group(aws)["Instances"]
    (moved,) = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    assert (moved["AllocationId"], moved["InstanceId"]) == (address["AllocationId"], member["InstanceId"])
    state = aws.ec2.describe_instances(InstanceIds=[single])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")
    assert destroy(aws) == 0


def test_switching_ha_to_replicas_is_refused_with_what_to_do(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert provision(aws, "--ha", "--yes") == 0
    after = everything(aws)
    capsys.readouterr()
    assert provision(aws, "--replicas", "2", "--yes") == 1
    err = capsys.readouterr().err
    assert (
        "natfwd: error: cluster 'mycluster' is provisioned as the ha layout (--ha); switching it to replicas is "
        "not built: run natfwd destroy --cluster-id mycluster, then provision again" in err
    )
    assert everything(aws) == after
    assert destroy(aws) == 0


def test_one_zone_is_not_enough(aws: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    world = build_world(aws)  # public subnets in one zone only
    memcached_cluster(aws, world)
    before = everything(aws)
    for flags in (("--ha",), ("--replicas", "2")):
        assert provision(aws, *flags, "--yes") == 1
        err = capsys.readouterr().err
        assert "has public subnets in 1 availability zone(s) (us-east-1b); --ha and --replicas need" in err
    assert everything(aws) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--replicas", "1"), "--replicas: 1 is out of range; pass 2 to 20 instances behind the load balancer"),
        (("--replicas", "21"), "--replicas: 21 is out of range"),
        (("--ha", "--replicas", "2"), "argument --replicas: not allowed with argument --ha"),
    ],
)
def test_bad_layout_flags_exit_2(aws: Aws, world: World, flags: tuple[str, ...], message: str) -> None:
    before = everything(aws)
    common = ["--cluster-id", "mycluster", "--trusted-cidr", TRUSTED, "--endpoint-url", aws.url]
    done = natfwd_cli(aws, "provision", *common, *flags, "--yes")
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert everything(aws) == before


@pytest.mark.parametrize("flags", [("--ha",), ("--replicas", "2")])
def test_dry_run_shows_the_layout_and_creates_nothing(
    aws: Aws, world: World, flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    before = everything(aws)
    assert provision(aws, *flags, "--dry-run") == 0
    out = capsys.readouterr().out
    print(out)  # the plan of each layout, for the record
    assert "dry run: nothing was created or changed" in out
    assert "Auto Scaling    group natfwd-mycluster: min = max = desired = " in out
    assert "create launch template natfwd-mycluster (version 1)" in out
    if flags == ("--ha",):
        assert "allocate an Elastic IP (tagged; the group's instances claim it)" in out
    else:
        assert "load balancer   natfwd-mycluster: network, internet-facing, in us-east-1b, us-east-1c; cross" in out
        assert "    11212 -> natfwd-mycluster-11212" in out
        assert "allocate an Elastic IP for the load balancer in us-east-1c" in out
        assert "inbound   tcp 11211 from natfwd-mycluster-nlb" in out
    assert everything(aws) == before


def test_the_instance_policy_document_is_valid_json_for_each_layout(aws: Aws, world: World) -> None:
    assert provision(aws, "--replicas", "2", "--yes") == 0
    iam = client(aws, "iam")
    document = iam.get_role_policy(RoleName="natfwd-mycluster", PolicyName="natfwd")["PolicyDocument"]
    sids = [s["Sid"] for s in document["Statement"]]
    # replicas: no Elastic IP to claim (the load balancer holds them), but the box may report itself unhealthy.
    assert "NatfwdClaimAddress" not in sids and "NatfwdReportHealth" in sids
    assert json.loads(json.dumps(document)) == document
    assert destroy(aws) == 0


@pytest.mark.parametrize("flags", [("--ha",), ("--replicas", "2")])
def test_a_failure_halfway_rolls_back_the_group_and_the_load_balancer(
    aws: Aws, world: World, flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    before = everything(aws)
    # moto checks key pairs, so creating the group (its first launch) fails after the template and, for
    # --replicas, the load balancer exist.
    assert provision(aws, *flags, "--key-name", "no-such-key", "--yes") == 1
    err = capsys.readouterr().err
    assert "rolled back what this run created: launch template lt-" in err
    if flags != ("--ha",):
        assert "listener TCP 11211, listener TCP 11212, listener TCP 11213, target group natfwd-mycluster-11211" in err
        assert "Network Load Balancer natfwd-mycluster, Elastic IP" in err
    assert everything(aws) == before


def test_replicas_converge_a_client_change_in_place_and_refresh_the_instances(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert provision(aws, "--replicas", "2", "--yes") == 0
    elbv2 = client(aws, "elbv2")
    (balancer,) = elbv2.describe_load_balancers(Names=["natfwd-mycluster"])["LoadBalancers"]
    (balancer_group_id,) = balancer["SecurityGroups"]
    old = {i["InstanceId"] for i in the_group(aws)["Instances"]}
    addresses = aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"]
    INSTANCE_REFRESHES.clear()
    capsys.readouterr()

    assert provision(aws, "--replicas", "2", "--yes", cidr="203.0.113.0/24") == 0
    out = capsys.readouterr().out
    assert "  + inbound   tcp 11211 from 203.0.113.0/24       mycluster: clients to node 0001" in out
    assert "then an instance refresh replaces the instances one by one, each replacement healthy first" in out

    # The load balancer, its group and its addresses stay; only the clients' rules changed.
    (same,) = elbv2.describe_load_balancers(Names=["natfwd-mycluster"])["LoadBalancers"]
    assert same["LoadBalancerArn"] == balancer["LoadBalancerArn"]
    assert rules(aws, balancer_group_id)[0] == {Rule.tcp(port, "203.0.113.0/24") for port in PORTS}
    assert aws.ec2.describe_addresses(Filters=TAGGED)["Addresses"] == addresses
    # A template version with the new allowlist, rolled out by an instance refresh that never drops capacity.
    version = latest_template(aws)
    assert version["VersionNumber"] == 2
    assert [str(c) for c in embedded_config(version["LaunchTemplateData"]).allowed_clients] == ["203.0.113.0/24"]
    assert INSTANCE_REFRESHES == [("natfwd-mycluster", {"MinHealthyPercentage": 100, "MaxHealthyPercentage": 200})]
    assert not old & {i["InstanceId"] for i in the_group(aws)["Instances"]}
    assert destroy(aws) == 0


def test_replicas_resize_in_place(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision(aws, "--replicas", "2", "--yes") == 0
    template = latest_template(aws)
    capsys.readouterr()
    assert provision(aws, "--replicas", "3", "--yes") == 0
    out = capsys.readouterr().out
    assert "update Auto Scaling group natfwd-mycluster in place\n    size 2 -> 3\n" in out
    group = the_group(aws)
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"], len(group["Instances"])) == (3, 3, 3, 3)
    # The same template version: nothing the instances are launched with changed.
    assert latest_template(aws)["VersionNumber"] == template["VersionNumber"] == 1
    assert destroy(aws) == 0
