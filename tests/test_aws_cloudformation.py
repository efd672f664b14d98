"""provision --output cloudformation against a real moto server: cfn-lint, nothing created, the same user data,
and a deployed stack (moto's CloudFormation) holding what provision builds.

moto's CloudFormation does not model everything a real deploy does; each test says what it checks on the deployed
stack and what it checks on the template instead:
- AWS::EC2::EIPAssociation is not supported (skipped by moto);
- AWS::EC2::SecurityGroup ignores SecurityGroupEgress (and keeps the default rule) and IPv6 ingress;
- AWS::EC2::Instance ignores SecurityGroupIds and MetadataOptions;
- AWS::ElasticLoadBalancingV2::LoadBalancer ignores Type and SubnetMappings (it makes an application load
  balancer, which then refuses TCP listeners), and TargetGroupAttributes are ignored.
"""

from __future__ import annotations

import ast
import base64
import copy
import ipaddress
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from awskit import REGION, TRUSTED, Aws, World, build_world, example_plan, memcached_cluster, natfwd_cli, snapshot
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"

from forwarder import cli
from forwarder.aws import inventory, survey, userdata
from forwarder.aws.cloudformation import template
from forwarder.aws.plan import SSM_POLICY_ARN, Plan, ProvisionRequest
from forwarder.aws.plan import build as build_plan
from forwarder.aws.rules import Rule, from_permissions
from forwarder.aws.subnets import Subnet

PACKAGE = "natfwd==0.1.0"
LAYOUTS = {"single": (), "ha": ("--ha",), "replicas": ("--replicas", "2")}
# What cfn-lint sees: each layout, and the kernel data path (its own user data) behind the load balancer.
LINTED = {**LAYOUTS, "replicas-kernel": ("--replicas", "3", "--mode", "kernel")}
CIDR_V6 = "2001:db8::/64"
EXAMPLE_IP = "203.0.113.73"
EXAMPLE_ALLOCATION = "eipalloc-0123456789abcdef0"


def argv(aws: Aws, *extra: str, cidrs: tuple[str, ...] = (TRUSTED,)) -> list[str]:
    words = ["provision", "--cluster-id", "mycluster", "--endpoint-url", aws.url, "--region", REGION]
    for cidr in cidrs:
        words += ["--trusted-cidr", cidr]
    return [*words, *extra]


def destroy_argv(aws: Aws) -> list[str]:
    """`natfwd destroy --yes` for the cluster argv() provisions."""
    return ["destroy", "--cluster-id", "mycluster", "--endpoint-url", aws.url, "--region", REGION, "--yes"]


def template_text(
    aws: Aws, capsys: pytest.CaptureFixture[str], *extra: str, cidrs: tuple[str, ...] = (TRUSTED,)
) -> str:
    capsys.readouterr()
    assert cli.main(argv(aws, "--package", PACKAGE, "--output", "cloudformation", *extra, cidrs=cidrs)) == 0
    captured = capsys.readouterr()
    assert "nothing was created" in captured.err and "warning" not in captured.err
    return captured.out


def the_plan(aws: Aws, layout: str) -> Plan:
    """The plan provision makes for `layout` (survey.prepare is what provision and --dry-run call)."""
    request = ProvisionRequest(
        cluster_id="mycluster",
        trusted_cidrs=(ipaddress.ip_network(TRUSTED),),
        package=PACKAGE,
        ha=layout == "ha",
        replicas=2 if layout == "replicas" else 1,
    )
    return survey.prepare(aws.client, request)


def substitute(text: str, values: dict[str, str]) -> str:
    """Fn::Sub as CloudFormation evaluates it: ${!X} is the literal ${X}; any other ${X} must be in `values`."""

    def one(match: re.Match[str]) -> str:
        if match.group(1):
            return "${" + match.group(2) + "}"
        return values[match.group(2)]  # a KeyError: an unescaped ${...} of the script

    return re.sub(r"\$\{(!?)([^}]*)\}", one, text)


def embedded_user_data(template: dict[str, Any]) -> str:
    resources = template["Resources"]
    if "Instance" in resources:
        encoded = resources["Instance"]["Properties"]["UserData"]
    else:
        encoded = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    assert list(encoded) == ["Fn::Base64"] and list(encoded["Fn::Base64"]) == ["Fn::Sub"]
    text: str = encoded["Fn::Base64"]["Fn::Sub"]
    return text


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    executable = Path(sys.executable).parent / "cfn-lint"
    return subprocess.run(
        [str(executable), "--format", "parseable", str(path)], capture_output=True, text=True, timeout=300
    )


def deploy(aws: Aws, body: str, name: str = "natfwd-mycluster") -> dict[str, str]:
    """create_stack in moto; returns the stack's outputs."""
    cloudformation = boto3.client("cloudformation", endpoint_url=aws.url, region_name=REGION)
    cloudformation.create_stack(StackName=name, TemplateBody=body, Capabilities=["CAPABILITY_NAMED_IAM"])
    (stack,) = cloudformation.describe_stacks(StackName=name)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", ())}


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or ()}


def template_tags(properties: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in properties["Tags"]}


def by_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in template["Resources"].items() if v["Type"] == kind}


def template_rules(entries: list[dict[str, Any]], groups: dict[str, str]) -> set[Rule]:
    """A template's SecurityGroupIngress/Egress entries as Rules; `groups` names the ids of Fn::GetAtt peers."""
    rules = set()
    for entry in entries:
        peer: Any = next(
            entry[key]
            for key in ("CidrIp", "CidrIpv6", "SourceSecurityGroupId", "DestinationSecurityGroupId")
            if key in entry
        )
        if isinstance(peer, dict):
            peer = groups[peer["Fn::GetAtt"][0]]
        rules.add(Rule(entry["IpProtocol"], entry.get("FromPort"), entry.get("ToPort"), peer))
    return rules


@pytest.fixture
def world(aws: Aws) -> World:
    found = build_world(aws, public_zones=("us-east-1b", "us-east-1c"))
    memcached_cluster(aws, found)
    return found


# -- the template itself -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LINTED)
def test_template_passes_cfn_lint_and_creates_nothing(
    aws: Aws, world: World, layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # IPv4 and IPv6 clients and a key pair (so SSH): every kind of rule the plan can hold.
    aws.ec2.create_key_pair(KeyName="mykey")
    before = snapshot(aws)
    text = template_text(aws, capsys, *LINTED[layout], "--key-name", "mykey", cidrs=(TRUSTED, CIDR_V6))
    path = tmp_path / f"{layout}.yaml"
    path.write_text(text)
    linted = cfn_lint(path)
    # No errors, no warnings, no informational findings.
    assert linted.returncode == 0 and linted.stdout == "", linted.stdout + linted.stderr

    assert snapshot(aws) == before
    assert inventory.find(aws.client, "mycluster").empty
    assert boto3.client("s3", endpoint_url=aws.url, region_name=REGION).list_buckets()["Buckets"] == []


def test_cfn_lint_catches_a_broken_template(
    aws: Aws, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lint test can fail: the same template with a listener on a port out of range is an error."""
    template = yaml.safe_load(template_text(aws, capsys, "--replicas", "2"))
    template["Resources"]["Listener11211"]["Properties"]["Port"] = 70000
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(template))
    linted = cfn_lint(path)
    assert linted.returncode & 2, linted.stdout
    assert "Listener11211" in linted.stdout or "70000" in linted.stdout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_template_embeds_provisions_user_data(
    aws: Aws, world: World, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    template = yaml.safe_load(template_text(aws, capsys, *LAYOUTS[layout]))
    plan = the_plan(aws, layout)
    text = embedded_user_data(template)
    if layout == "single":
        values = {"ElasticIp": EXAMPLE_IP}
        expected = userdata.render(plan, EXAMPLE_IP)
    elif layout == "ha":
        values = {"ElasticIp": EXAMPLE_IP, "ElasticIp.AllocationId": EXAMPLE_ALLOCATION}
        expected = userdata.render(plan, EXAMPLE_IP, allocation_id=EXAMPLE_ALLOCATION)
    else:
        # public_address is the load balancer's first address, so cluster-aware clients work through it.
        values = {"LoadBalancerIp1": EXAMPLE_IP}
        expected = userdata.render(plan, EXAMPLE_IP)
    assert substitute(text, values) == expected
    assert f"public_address: {EXAMPLE_IP}" in expected


def test_single_user_data_is_what_provision_launches(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    text = embedded_user_data(yaml.safe_load(template_text(aws, capsys)))
    assert cli.main(argv(aws, "--package", PACKAGE, "--yes")) == 0
    found = inventory.find(aws.client, "mycluster")
    (instance,) = found.instances
    (address,) = found.addresses
    assert substitute(text, {"ElasticIp": address.public_ip}) == instance.user_data

    # A template for a cluster provision already serves still prints, with a warning: the names would clash.
    capsys.readouterr()
    assert cli.main(argv(aws, "--package", PACKAGE, "--output", "cloudformation")) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["Resources"]["Instance"]
    assert "natfwd: warning: provision already made resources for 'mycluster'" in captured.err
    assert f"instance {instance.instance_id} (running)" in captured.err
    assert f"natfwd destroy --cluster-id mycluster --region {REGION}" in captured.err


def test_output_cloudformation_with_yes_and_rejections(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(aws)
    # --yes asks nothing anyway; --dry-run changes nothing either.
    template_text(aws, capsys, "--ha", "--yes")
    template_text(aws, capsys, "--replicas", "2", "--dry-run")

    unknown = natfwd_cli(aws, *argv(aws, "--package", PACKAGE, "--output", "terraform"))
    assert unknown.returncode == 2
    assert "--output: invalid choice: 'terraform'" in unknown.stderr
    assert "cloudformation" in unknown.stderr and unknown.stdout == ""

    no_package = natfwd_cli(aws, *argv(aws, "--output", "cloudformation", "--yes"))
    assert no_package.returncode == 2, no_package.stderr
    assert "--output cloudformation" in no_package.stderr and "--package SPEC" in no_package.stderr
    assert "Traceback" not in no_package.stderr and no_package.stdout == ""

    too_few = natfwd_cli(aws, *argv(aws, "--package", PACKAGE, "--output", "cloudformation", "--replicas", "1"))
    assert too_few.returncode == 2 and "--replicas: 1 is out of range" in too_few.stderr
    assert snapshot(aws) == before


# -- deployed: what a team that deploys the template gets ----------------------------------------------------------


def policy_document(document: Any) -> Any:
    """moto returns a policy a template created as the text of a Python dict, provision's as a dict."""
    return ast.literal_eval(document) if isinstance(document, str) else document


def facts_single(aws: Aws, world: World, public_ip: str) -> dict[str, Any]:
    """What exists for the single layout, as the facts a stack and provision are compared on."""
    iam = boto3.client("iam", endpoint_url=aws.url, region_name=REGION)
    (address,) = aws.ec2.describe_addresses(PublicIps=[public_ip])["Addresses"]
    reservations = aws.ec2.describe_instances(Filters=[{"Name": "tag:natfwd:cluster-id", "Values": ["mycluster"]}])
    (instance,) = [i for r in reservations["Reservations"] for i in r["Instances"] if i["State"]["Name"] == "running"]
    (nat,) = aws.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["natfwd-mycluster"]}])[
        "SecurityGroups"
    ]
    (cache,) = aws.ec2.describe_security_groups(GroupIds=[world.cache_group_id])["SecurityGroups"]
    own = {"natfwd:cluster-id", "Name", "natfwd:role", "natfwd:mode"}
    return {
        "nat_ingress": {r for r in from_permissions(nat["IpPermissions"])},
        "cache_ingress": {r.from_port for r in from_permissions(cache["IpPermissions"]) if r.peer == nat["GroupId"]},
        "nat_tags": {k: v for k, v in tags_of(nat).items() if k in own},
        "instance": (instance["ImageId"], instance["InstanceType"], instance["SubnetId"], instance.get("KeyName")),
        "instance_tags": {k: v for k, v in tags_of(instance).items() if k in own},
        "profile": instance["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1],
        "role_policy": policy_document(
            iam.get_role_policy(RoleName="natfwd-mycluster", PolicyName="natfwd")["PolicyDocument"]
        ),
        "role_tags": {k: v for k, v in tags_of(iam.get_role(RoleName="natfwd-mycluster")["Role"]).items() if k in own},
        "profile_roles": [
            r["RoleName"]
            for r in iam.get_instance_profile(InstanceProfileName="natfwd-mycluster")["InstanceProfile"]["Roles"]
        ],
        "user_data": base64.b64decode(
            aws.ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")["UserData"][
                "Value"
            ]
        )
        .decode()
        .replace(address["PublicIp"], "<EIP>"),
        "nat_group_id": nat["GroupId"],
    }


# moto warns, in its server thread, that it skips the association (a warning is an error in this suite).
@pytest.mark.filterwarnings("ignore:Tried to parse AWS..EC2..EIPAssociation:UserWarning")
def test_deployed_single_stack_holds_what_provision_builds(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    aws.ec2.create_key_pair(KeyName="mykey")
    body = template_text(aws, capsys, "--key-name", "mykey")
    template = yaml.safe_load(body)

    # What provision builds, then removed again so the stack can take the same names.
    assert cli.main(argv(aws, "--package", PACKAGE, "--key-name", "mykey", "--yes")) == 0
    found = inventory.find(aws.client, "mycluster")
    provisioned = facts_single(aws, world, found.addresses[0].public_ip)
    (provisioned_group,) = found.groups
    assert found.role is not None
    provisioned_attached = list(found.role.attached_policies)
    assert cli.main(destroy_argv(aws)) == 0
    assert inventory.find(aws.client, "mycluster").empty

    outputs = deploy(aws, body)
    deployed = facts_single(aws, world, outputs["PublicAddress"])
    nat_group_id = deployed.pop("nat_group_id")
    provisioned.pop("nat_group_id")
    assert deployed == provisioned
    assert deployed["nat_ingress"] == {Rule.tcp(p, TRUSTED) for p in (11211, 11212, 11213)} | {Rule.tcp(22, TRUSTED)}
    assert deployed["role_policy"] == the_plan(aws, "single").instance_policy()
    public_ip = outputs["PublicAddress"]
    assert f"{public_ip}:11213 -> mycluster.x1y2z3.0003.use1.cache.amazonaws.com:11211" in outputs["Endpoints"]

    # What moto does not model, checked on the template against what provision made: exactly the planned egress
    # (listing it replaces AWS's default rule), IMDSv2, the instance in the NAT group, the address associated.
    group = by_type(template, "AWS::EC2::SecurityGroup")["NatSecurityGroup"]
    assert template_rules(group["SecurityGroupEgress"], {}) == set(provisioned_group.egress)
    # moto ignores ManagedPolicyArns: the template attaches what provision attached.
    role = template["Resources"]["InstanceRole"]["Properties"]
    assert role["ManagedPolicyArns"] == provisioned_attached == [SSM_POLICY_ARN]
    instance = template["Resources"]["Instance"]["Properties"]
    assert instance["MetadataOptions"] == {"HttpTokens": "required", "HttpEndpoint": "enabled"}
    assert instance["SecurityGroupIds"] == [{"Fn::GetAtt": ["NatSecurityGroup", "GroupId"]}]
    association = by_type(template, "AWS::EC2::EIPAssociation")["ElasticIpAssociation"]
    assert association == {
        "AllocationId": {"Fn::GetAtt": ["ElasticIp", "AllocationId"]},
        "InstanceId": {"Ref": "Instance"},
    }
    # Every taggable resource carries the cluster tag, so `natfwd destroy` finds a stack's resources too.
    for properties in [
        group,
        instance,
        *by_type(template, "AWS::EC2::EIP").values(),
        template["Resources"]["InstanceRole"]["Properties"],
    ]:
        assert template_tags(properties)["natfwd:cluster-id"] == "mycluster"
    assert nat_group_id in {
        r.peer
        for r in from_permissions(
            aws.ec2.describe_security_groups(GroupIds=[world.cache_group_id])["SecurityGroups"][0]["IpPermissions"]
        )
    }


def stack_inventory(aws: Aws) -> inventory.Inventory:
    """What natfwd finds of a deployed stack. moto keeps the template's inline policy as the text of a Python dict
    (policy_document), which inventory.find cannot read; AWS keeps JSON, so it is put back as JSON first."""
    iam = boto3.client("iam", endpoint_url=aws.url, region_name=REGION)
    policy = iam.get_role_policy(RoleName="natfwd-mycluster", PolicyName="natfwd")["PolicyDocument"]
    iam.put_role_policy(
        RoleName="natfwd-mycluster", PolicyName="natfwd", PolicyDocument=json.dumps(policy_document(policy))
    )
    return inventory.find(aws.client, "mycluster")


@pytest.mark.filterwarnings("ignore:Tried to parse AWS..EC2..EIPAssociation:UserWarning")
def test_provision_and_destroy_leave_a_stacks_resources_to_cloudformation(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stack name of the team's choosing: natfwd reads it from the tag CloudFormation puts on what it creates.
    deploy(aws, template_text(aws, capsys), name="team-cache-nat")
    found = stack_inventory(aws)
    # (moto's AWS::EC2::EIP drops its Tags: the address is not found, on AWS it is.)
    assert found.stacks == ("team-cache-nat",) and found.instances and found.groups
    before = snapshot(aws)

    assert cli.main(destroy_argv(aws)) == 2
    err = capsys.readouterr().err
    assert err.startswith("natfwd: error: the resources of cluster 'mycluster' belong to CloudFormation stack ")
    assert f"aws cloudformation delete-stack --stack-name team-cache-nat --region {REGION}" in err
    assert "Traceback" not in err

    assert cli.main(argv(aws, "--package", PACKAGE, "--yes")) == 2
    err = capsys.readouterr().err
    assert "natfwd provision would change them" in err
    deploy_command = (
        "aws cloudformation deploy --template-file TEMPLATE --capabilities CAPABILITY_NAMED_IAM "
        f"--stack-name team-cache-nat --region {REGION}"
    )
    assert deploy_command in err
    assert cli.main(argv(aws, "--package", PACKAGE, "--dry-run")) == 2
    assert snapshot(aws) == before

    # The template again, for an update of that stack: no warning to destroy what the stack holds.
    assert cli.main(argv(aws, "--package", PACKAGE, "--output", "cloudformation")) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["Resources"]
    assert "warning" not in captured.err and f"update it with: {deploy_command}" in captured.err
    assert snapshot(aws) == before

    # Once the stack is gone, nothing of it is left for natfwd to find.
    boto3.client("cloudformation", endpoint_url=aws.url, region_name=REGION).delete_stack(StackName="team-cache-nat")
    assert inventory.find(aws.client, "mycluster").stacks == ()


def launch_template_data(aws: Aws) -> dict[str, Any]:
    versions = aws.ec2.describe_launch_template_versions(LaunchTemplateName="natfwd-mycluster")
    (version,) = versions["LaunchTemplateVersions"]
    data: dict[str, Any] = version["LaunchTemplateData"]
    return data


def auto_scaling_group(aws: Aws) -> dict[str, Any]:
    autoscaling = boto3.client("autoscaling", endpoint_url=aws.url, region_name=REGION)
    (group,) = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["natfwd-mycluster"])["AutoScalingGroups"]
    return dict(group)


def test_deployed_ha_stack_is_a_group_of_one_whose_instance_claims_the_address(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    body = template_text(aws, capsys, "--ha")
    plan = the_plan(aws, "ha")
    outputs = deploy(aws, body)

    (address,) = aws.ec2.describe_addresses(PublicIps=[outputs["PublicAddress"]])["Addresses"]
    assert outputs["AllocationId"] == address["AllocationId"]
    # moto drops an EIP's tags from a template: checked on the template.
    eip = yaml.safe_load(body)["Resources"]["ElasticIp"]["Properties"]
    assert template_tags(eip) == dict(plan.tags("elastic-ip"))

    group = auto_scaling_group(aws)
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
    assert sorted(group["VPCZoneIdentifier"].split(",")) == sorted(world.public_subnet_ids)
    assert sorted(group["AvailabilityZones"]) == sorted(plan.zones) == ["us-east-1b", "us-east-1c"]
    assert tags_of(group)["natfwd:cluster-id"] == "mycluster"

    # natfwd leaves the stack's group to CloudFormation: found by its tags, and not destroyed.
    found = stack_inventory(aws)
    assert found.stacks == ("natfwd-mycluster",) and found.scaling_groups
    assert cli.main(destroy_argv(aws)) == 2
    assert "aws cloudformation delete-stack --stack-name natfwd-mycluster" in capsys.readouterr().err
    assert auto_scaling_group(aws)["DesiredCapacity"] == 1

    data = launch_template_data(aws)
    assert data["ImageId"] == plan.image_id
    assert data["InstanceType"] == "t4g.micro"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["IamInstanceProfile"]["Arn"].endswith(":instance-profile/natfwd-mycluster")
    (nat,) = aws.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["natfwd-mycluster"]}])[
        "SecurityGroups"
    ]
    assert data["SecurityGroupIds"] == [nat["GroupId"]]
    assert set(from_permissions(nat["IpPermissions"])) == set(plan.nat_ingress)
    specs = {s["ResourceType"]: tags_of(s) for s in data["TagSpecifications"]}
    assert specs["instance"] == dict(plan.tags("instance")) == specs["volume"]
    # The user data, resolved by CloudFormation: provision's, with this address and its allocation id.
    resolved = base64.b64decode(data["UserData"]).decode()
    assert resolved == userdata.render(plan, address["PublicIp"], allocation_id=address["AllocationId"])

    # The group launched its instance from the template, in one of the plan's subnets.
    (member,) = group["Instances"]
    reservations = aws.ec2.describe_instances(InstanceIds=[member["InstanceId"]])["Reservations"]
    (instance,) = [i for r in reservations for i in r["Instances"]]
    assert instance["SubnetId"] in world.public_subnet_ids
    assert instance["ImageId"] == plan.image_id


def test_deployed_replicas_stack_balances_over_the_group(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    body = template_text(aws, capsys, "--replicas", "2")
    template = yaml.safe_load(body)
    plan = the_plan(aws, "replicas")
    ports = (11211, 11212, 11213)

    # The load balancer and its listeners, on the template (moto cannot create them; see the module docstring).
    balancer = template["Resources"]["LoadBalancer"]["Properties"]
    assert (balancer["Type"], balancer["Scheme"]) == ("network", "internet-facing")
    mappings = balancer["SubnetMappings"]
    assert [m["SubnetId"] for m in mappings] == [s.subnet_id for s in plan.subnets]
    assert [m["AllocationId"]["Fn::GetAtt"] for m in mappings] == [
        [f"LoadBalancerIp{n}", "AllocationId"] for n in range(1, len(plan.subnets) + 1)
    ]
    assert balancer["SecurityGroups"] == [{"Fn::GetAtt": ["LoadBalancerSecurityGroup", "GroupId"]}]
    listeners = by_type(template, "AWS::ElasticLoadBalancingV2::Listener")
    assert sorted(
        (p["Port"], p["Protocol"], p["DefaultActions"][0]["TargetGroupArn"]["Ref"]) for p in listeners.values()
    ) == [(port, "TCP", f"TargetGroup{port}") for port in ports]
    for properties in by_type(template, "AWS::ElasticLoadBalancingV2::TargetGroup").values():
        attributes = {a["Key"]: a["Value"] for a in properties["TargetGroupAttributes"]}
        assert attributes["preserve_client_ip.enabled"] == "true"
    # The load balancer's group: the trusted networks on the node ports in, the NAT group on them out.
    lb_group = by_type(template, "AWS::EC2::SecurityGroup")["LoadBalancerSecurityGroup"]
    groups = {"NatSecurityGroup": "sg-nat", "LoadBalancerSecurityGroup": "sg-lb"}
    assert template_rules(lb_group["SecurityGroupIngress"], groups) == {Rule.tcp(p, TRUSTED) for p in ports}
    assert template_rules(lb_group["SecurityGroupEgress"], groups) == {Rule.tcp(p, "sg-nat") for p in ports}
    nat_group = by_type(template, "AWS::EC2::SecurityGroup")["NatSecurityGroup"]
    assert template_rules(nat_group["SecurityGroupEgress"], groups) == set(plan.nat_egress)

    # Deploy the rest: moto's load balancer is an application one, so it and its listeners are left out.
    trimmed = copy.deepcopy(template)
    for name in ["LoadBalancer", *listeners]:
        del trimmed["Resources"][name]
    del trimmed["Resources"]["AutoScalingGroup"]["DependsOn"]
    trimmed["Outputs"] = {k: v for k, v in trimmed["Outputs"].items() if k != "LoadBalancerDnsName"}
    outputs = deploy(aws, json.dumps(trimmed))

    public_ips = outputs["PublicAddresses"].split(",")
    assert len(aws.ec2.describe_addresses(PublicIps=public_ips)["Addresses"]) == len(plan.zones) == 2
    assert public_ips[0] == outputs["PublicAddress"]
    for n in (1, 2):
        eip = template["Resources"][f"LoadBalancerIp{n}"]["Properties"]
        assert template_tags(eip) == dict(plan.tags("elastic-ip"))

    elbv2 = boto3.client("elbv2", endpoint_url=aws.url, region_name=REGION)
    target_groups = elbv2.describe_target_groups()["TargetGroups"]
    assert sorted((t["Port"], t["Protocol"], t["HealthCheckProtocol"], t["VpcId"]) for t in target_groups) == [
        (port, "TCP", "TCP", world.vpc_id) for port in ports
    ]

    group = auto_scaling_group(aws)
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (2, 2, 2)
    assert group["HealthCheckType"] == "ELB"
    assert sorted(group["TargetGroupARNs"]) == sorted(t["TargetGroupArn"] for t in target_groups)
    assert sorted(group["VPCZoneIdentifier"].split(",")) == sorted(world.public_subnet_ids)
    assert len(group["Instances"]) == 2

    # The instances admit the node ports from the load balancer's group only.
    described = aws.ec2.describe_security_groups(Filters=[{"Name": "tag:natfwd:cluster-id", "Values": ["mycluster"]}])
    by_role = {tags_of(g)["natfwd:role"]: g for g in described["SecurityGroups"]}
    nat, lb = by_role["security-group"], by_role["load-balancer-security-group"]
    assert set(from_permissions(nat["IpPermissions"])) == {Rule.tcp(p, lb["GroupId"]) for p in ports}
    assert set(from_permissions(lb["IpPermissions"])) == {Rule.tcp(p, TRUSTED) for p in ports}
    data = launch_template_data(aws)
    assert data["SecurityGroupIds"] == [nat["GroupId"]]
    resolved = base64.b64decode(data["UserData"]).decode()
    assert resolved == userdata.render(plan, outputs["PublicAddress"])


def test_long_cluster_ids_give_short_unique_load_balancer_names() -> None:
    """AWS caps load balancer and target group names at 32 characters; two long ids that share a prefix still
    get different names, and no name starts or ends with a hyphen."""
    names: set[str] = set()
    for cluster_id in ("a" * 40 + "-one", "a" * 40 + "-two"):
        plan = example_plan()
        request = replace(plan.request, cluster_id=cluster_id, package=PACKAGE, replicas=2)
        spread = (plan.subnet, Subnet("subnet-0second", "us-east-1b", "10.0.2.0/24", plan.subnet.gateway_id))
        plan = build_plan(request, plan.cluster, plan.vpc_id, plan.subnet, plan.image_id, REGION, spread=spread)
        resources = template(plan)["Resources"]
        kinds = ("AWS::ElasticLoadBalancingV2::LoadBalancer", "AWS::ElasticLoadBalancingV2::TargetGroup")
        found = [r["Properties"]["Name"] for r in resources.values() if r["Type"] in kinds]
        assert len(found) == 4
        assert all(len(n) <= 32 and not n.startswith("-") and not n.endswith("-") for n in found), found
        names.update(found)
    assert len(names) == 8
