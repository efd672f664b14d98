"""Shared AWS test helpers: a real moto server on loopback, dummy credentials, a seeded VPC world, account snapshots.

Test modules get the fixtures `aws` and `moto_url` by importing their functions under their own names:
`from awskit import aws_account as aws_account` and `from awskit import moto_server as moto_server`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from forwarder.aws.artefact import Artefact
from forwarder.aws.client import AwsClient
from forwarder.aws.cluster import Cluster, NodeEndpoint
from forwarder.aws.plan import Plan, ProvisionRequest
from forwarder.aws.plan import build as build_plan
from forwarder.aws.subnets import Subnet

REPO = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
TRUSTED = "198.51.100.27/32"

# Dummy credentials, and no instance-metadata lookups: boto3 must never try 169.254.169.254 from a test.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/natfwd-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/natfwd-test-aws-credentials",
}
_CLEARED = ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def _fix_moto_launch_template_versions() -> None:
    """moto wraps a template's UserData as its Base64EncodedString in CreateLaunchTemplate but not in
    CreateLaunchTemplateVersion, and then fails (HTTP 500) launching from such a version. AWS treats both alike;
    give moto's version the same wrapping (a fix of the stand-in AWS, not of natfwd)."""
    from moto.ec2.models.launch_templates import LaunchTemplate
    from moto.ec2.utils import parse_user_data

    create_version = LaunchTemplate.create_version
    if getattr(create_version, "natfwd_fixed", False):
        return

    def fixed(self: Any, data: dict[str, Any], description: str) -> Any:
        if isinstance(data.get("UserData"), str):
            data = {**data, "UserData": parse_user_data(data["UserData"])}
        return create_version(self, data, description)

    fixed.natfwd_fixed = True  # type: ignore[attr-defined]
    LaunchTemplate.create_version = fixed  # type: ignore[method-assign]


# Every StartInstanceRefresh the stand-in below served: (group name, preferences).
INSTANCE_REFRESHES: list[tuple[str, dict[str, Any]]] = []


def _add_moto_instance_refresh() -> None:
    """moto has no StartInstanceRefresh. This stand-in leaves what a finished refresh leaves: every instance of
    the group replaced by one launched from the template's latest version (AWS does it one at a time, each
    replacement healthy first); it records the request in INSTANCE_REFRESHES."""
    import uuid

    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import ActionResult

    if hasattr(AutoScalingResponse, "start_instance_refresh"):
        return

    def start_instance_refresh(self: Any) -> Any:
        params = self._get_params()
        name = params["AutoScalingGroupName"]
        backend = self.autoscaling_backend
        group = backend.autoscaling_groups[name]
        INSTANCE_REFRESHES.append((name, dict(params.get("Preferences") or {})))
        for state in list(group.instance_states):
            backend.terminate_instance(state.instance.id, should_decrement=False)
        return ActionResult({"InstanceRefreshId": str(uuid.uuid4())})

    AutoScalingResponse.start_instance_refresh = start_instance_refresh  # type: ignore[attr-defined]


def _share_botocore_models() -> None:
    """Every botocore session in this process reads the service models (ec2's alone is megabytes of JSON) through
    one loader, so each is parsed once, not once per session: natfwd's AwsClient.create opens a session with eight
    clients each time provision, destroy or a test asks for one. Clients of one session already share what the
    loader returns; this widens that to the process. It changes what is parsed how often, not what any call sends."""
    import botocore.loaders
    import botocore.session

    register = botocore.session.Session._register_data_loader
    if getattr(register, "natfwd_shared", False):
        return
    loaders: dict[str | None, Any] = {}

    def shared(self: Any) -> None:
        def loader() -> Any:
            path = self.get_config_variable("data_path")
            if path not in loaders:
                loaders[path] = botocore.loaders.create_loader(path)
            return loaders[path]

        self._components.lazy_register_component("data_loader", loader)

    shared.natfwd_shared = True  # type: ignore[attr-defined]
    botocore.session.Session._register_data_loader = shared  # type: ignore[method-assign]


@pytest.fixture(scope="session", name="moto_url")
def moto_server() -> Iterator[str]:
    """One moto server for the session, on a free loopback port; tests reset it (see `aws`)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    _share_botocore_models()
    _fix_moto_launch_template_versions()
    _add_moto_instance_refresh()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class Aws:
    """A freshly reset moto account: boto3 clients for arranging and checking, and natfwd's own client."""

    url: str
    ec2: Any
    elasticache: Any
    client: AwsClient

    def cli_env(self) -> dict[str, str]:
        """Environment for a `python -m forwarder` subprocess talking to this moto server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENV)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return env


@pytest.fixture(name="aws")
def aws_account(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Aws:
    """Reset moto, set dummy credentials, and make moto validate key pairs and AMIs as AWS does."""
    import moto.settings

    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(moto.settings, "ENABLE_KEYPAIR_VALIDATION", True)
    monkeypatch.setattr(moto.settings, "ENABLE_AMI_VALIDATION", True)
    request = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    _seed_managed_policy("AmazonSSMManagedInstanceCore")
    ec2 = boto3.client("ec2", endpoint_url=moto_url, region_name=REGION)
    elasticache = boto3.client("elasticache", endpoint_url=moto_url, region_name=REGION)
    return Aws(moto_url, ec2, elasticache, AwsClient.create(REGION, None, moto_url))


def _seed_managed_policy(name: str) -> None:
    """AWS's managed policies exist in every account; moto loads all of them only on request, slowly, so add one."""
    import json

    from moto.iam.aws_managed_policies import aws_managed_policies_data
    from moto.iam.models import AWSManagedPolicy, iam_backends

    data = json.loads(aws_managed_policies_data)[name]
    policy = AWSManagedPolicy.from_data(name, ACCOUNT, "aws", data)
    iam_backends[ACCOUNT]["aws"].managed_policies[policy.arn] = policy


def natfwd_cli(aws: Aws, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m forwarder ARGS` with no stdin, against moto unless `env` says otherwise."""
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
        env=env if env is not None else aws.cli_env(),
        cwd=REPO,
    )


# -- a VPC world ---------------------------------------------------------------------------------------------


@dataclass
class World:
    """The ids of what `build_world` made."""

    vpc_id: str
    public_subnet_id: str | None
    private_subnet_id: str
    cache_group_id: str
    subnet_group: str
    decoy_vpc_id: str
    decoy_subnet_id: str
    # Every public subnet of the cache VPC, one per zone, `public_subnet_id` first.
    public_subnet_ids: tuple[str, ...] = ()


def _vpc(ec2: Any, cidr: str, name: str) -> str:
    vpc_id: str = ec2.create_vpc(
        CidrBlock=cidr, TagSpecifications=[{"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": name}]}]
    )["Vpc"]["VpcId"]
    return vpc_id


def _public_subnet(ec2: Any, vpc_id: str, cidr: str, zone: str) -> tuple[str, str]:
    """A subnet routed to a new internet gateway; returns its id and its route table's."""
    subnet_id: str = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"]["SubnetId"]
    gateway = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc_id)
    table: str = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway)
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet_id)
    return subnet_id, table


def build_world(aws: Aws, *, public: bool = True, public_zones: tuple[str, ...] = ("us-east-1b",)) -> World:
    """The page's VPC: a private subnet for the cache, public ones (routed to an internet gateway) in
    `public_zones` unless `public` is false, and a decoy VPC with its own public subnet that provision must not
    pick. --ha and --replicas need two zones or more: pass e.g. ("us-east-1b", "us-east-1c")."""
    ec2 = aws.ec2
    decoy_vpc = _vpc(ec2, "10.9.0.0/16", "decoy")
    decoy_subnet, _ = _public_subnet(ec2, decoy_vpc, "10.9.0.0/24", "us-east-1a")
    vpc_id = _vpc(ec2, "10.0.0.0/16", "cache-vpc")
    private = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]
    public_ids: list[str] = []
    if public:
        first, table = _public_subnet(ec2, vpc_id, "10.0.0.0/24", public_zones[0])
        public_ids.append(first)
        for index, zone in enumerate(public_zones[1:], start=2):
            other = ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.0.{index}.0/24", AvailabilityZone=zone)
            ec2.associate_route_table(RouteTableId=table, SubnetId=other["Subnet"]["SubnetId"])
            public_ids.append(other["Subnet"]["SubnetId"])
    public_id = public_ids[0] if public_ids else None
    group = ec2.create_security_group(GroupName="cache", Description="ElastiCache nodes", VpcId=vpc_id)["GroupId"]
    aws.elasticache.create_cache_subnet_group(
        CacheSubnetGroupName="cache-subnets", CacheSubnetGroupDescription="cache", SubnetIds=[private["SubnetId"]]
    )
    return World(
        vpc_id, public_id, private["SubnetId"], group, "cache-subnets", decoy_vpc, decoy_subnet, tuple(public_ids)
    )


def _seed(cluster_id: str, nodes: list[dict[str, Any]], group_id: str) -> None:
    """moto omits node endpoints and security groups from DescribeCacheClusters: set them on its backend."""
    from moto.elasticache.models import elasticache_backends

    cluster = elasticache_backends[ACCOUNT][REGION].cache_clusters[cluster_id]
    cluster.cache_nodes = nodes
    cluster.security_groups = [{"SecurityGroupId": group_id, "Status": "active"}]


def node_name(cluster_id: str, node: int) -> str:
    return f"{cluster_id}.x1y2z3.{node:04d}.use1.cache.amazonaws.com"


def memcached_cluster(aws: Aws, world: World, cluster_id: str = "mycluster", nodes: int = 3) -> list[str]:
    """A Memcached cluster with `nodes` nodes in the world's VPC; returns the node endpoint names."""
    aws.elasticache.create_cache_cluster(
        CacheClusterId=cluster_id,
        Engine="memcached",
        NumCacheNodes=nodes,
        CacheNodeType="cache.t3.micro",
        CacheSubnetGroupName=world.subnet_group,
        SecurityGroupIds=[world.cache_group_id],
        Port=11211,
    )
    names = [node_name(cluster_id, n) for n in range(1, nodes + 1)]
    # Listed out of order on purpose: natfwd must sort by node id.
    seeded = [
        {
            "CacheNodeId": f"{n:04d}",
            "CacheNodeStatus": "available",
            "Endpoint": {"Address": names[n - 1], "Port": 11211},
        }
        for n in reversed(range(1, nodes + 1))
    ]
    _seed(cluster_id, seeded, world.cache_group_id)
    return names


def redis_group(aws: Aws, world: World, group_id: str = "myredis", *, cluster_mode: bool = False) -> list[str]:
    """A Redis replication group (3 members, or 2 shards x 2 when `cluster_mode`) whose member cache
    clusters carry the endpoints; returns the endpoint names in member-id order."""
    shape: dict[str, Any] = (
        {"ClusterMode": "enabled", "NumNodeGroups": 2, "ReplicasPerNodeGroup": 1}
        if cluster_mode
        else {"ReplicasPerNodeGroup": 2}
    )
    created = aws.elasticache.create_replication_group(
        ReplicationGroupId=group_id,
        ReplicationGroupDescription="test",
        Engine="redis",
        CacheNodeType="cache.t3.micro",
        CacheSubnetGroupName=world.subnet_group,
        SecurityGroupIds=[world.cache_group_id],
        **shape,
    )["ReplicationGroup"]
    members = sorted(created["MemberClusters"])
    names = []
    for member in members:
        aws.elasticache.create_cache_cluster(
            CacheClusterId=member,
            ReplicationGroupId=group_id,
            Engine="redis",
            CacheNodeType="cache.t3.micro",
            CacheSubnetGroupName=world.subnet_group,
            SecurityGroupIds=[world.cache_group_id],
        )
        name = f"{member}.x1y2z3.use1.cache.amazonaws.com"
        node = {"CacheNodeId": "0001", "CacheNodeStatus": "available", "Endpoint": {"Address": name, "Port": 6379}}
        _seed(member, [node], world.cache_group_id)
        names.append(name)
    return names


# -- account snapshots ------------------------------------------------------------------------------------------


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "ResponseMetadata"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def snapshot(aws: Aws) -> dict[str, Any]:
    """Every EC2, S3 and IAM resource provision could touch, as comparable data.

    Terminated instances are left out, and so is what moto keeps of them but AWS deletes with them: their primary
    network interface (DeleteOnTermination) and the subnet addresses it holds (AvailableIpAddressCount).
    """
    ec2 = aws.ec2
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name=REGION)
    iam = boto3.client("iam", endpoint_url=aws.url, region_name=REGION)
    all_instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    gone = {i["InstanceId"] for i in all_instances if i["State"]["Name"] in ("terminated", "shutting-down")}
    interfaces = [
        n
        for n in ec2.describe_network_interfaces()["NetworkInterfaces"]
        if n.get("Attachment", {}).get("InstanceId") not in gone
    ]
    subnets = [
        {k: v for k, v in s.items() if k != "AvailableIpAddressCount"} for s in ec2.describe_subnets()["Subnets"]
    ]
    return _strip(
        {
            "security_groups": sorted(ec2.describe_security_groups()["SecurityGroups"], key=lambda g: g["GroupId"]),
            "security_group_rules": sorted(
                ec2.describe_security_group_rules()["SecurityGroupRules"], key=lambda r: r["SecurityGroupRuleId"]
            ),
            "instances": [i for i in all_instances if i["InstanceId"] not in gone],
            "addresses": ec2.describe_addresses()["Addresses"],
            "volumes": sorted(ec2.describe_volumes()["Volumes"], key=lambda v: v["VolumeId"]),
            "network_interfaces": sorted(interfaces, key=lambda n: n["NetworkInterfaceId"]),
            "subnets": sorted(subnets, key=lambda s: s["SubnetId"]),
            "route_tables": sorted(ec2.describe_route_tables()["RouteTables"], key=lambda t: t["RouteTableId"]),
            "vpcs": sorted(ec2.describe_vpcs()["Vpcs"], key=lambda v: v["VpcId"]),
            "buckets": sorted(b["Name"] for b in s3.list_buckets()["Buckets"]),
            "roles": sorted(r["RoleName"] for r in iam.list_roles()["Roles"]),
            "instance_profiles": sorted(
                p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
            ),
        }
    )


# -- a fixed plan for exact-text tests and the deploy/ example ---------------------------------------------------

EXAMPLE_PUBLIC_IP = "203.0.113.73"


EXAMPLE_SHA256 = hashlib.sha256(b"natfwd example sdist").hexdigest()
EXAMPLE_ARTEFACT = Artefact(
    "natfwd-123456789012-us-east-1-mycluster",
    f"artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz",
    EXAMPLE_SHA256,
    "natfwd-0.1.0.tar.gz",
)


def example_plan(
    mode: str = "userspace",
    *,
    ssh: bool = True,
    package: str | None = None,
    cidrs: tuple[str, ...] = (TRUSTED,),
    instance_type: str = "t4g.micro",
    ha: bool = False,
    replicas: int = 1,
) -> Plan:
    """The page's example: a 3-node Memcached cluster, the client 198.51.100.27, fixed AWS ids, natfwd shipped
    through the cluster's bucket unless `package` is given, a key pair (so SSH) when `ssh`; `ha` or `replicas`
    spread it over a second public subnet in us-east-1b."""
    nodes = tuple(
        NodeEndpoint(f"{n:04d}", f"mycluster.abc123.{n:04d}.use1.cache.amazonaws.com", 11211) for n in (1, 2, 3)
    )
    cluster = Cluster("mycluster", "cache-cluster", "memcached", "available", nodes, ("sg-0cache",), "cache-subnets")
    request = ProvisionRequest(
        cluster_id="mycluster",
        trusted_cidrs=tuple(ipaddress.ip_network(c) for c in cidrs),
        mode=mode,  # type: ignore[arg-type]
        instance_type=instance_type,
        key_name="mykey" if ssh else None,
        package=package,
        ha=ha,
        replicas=replicas,
    )
    subnet = Subnet("subnet-0public", "us-east-1a", "10.0.0.0/24", "igw-0gateway")
    spread = (subnet,)
    if request.layout != "single":
        spread += (Subnet("subnet-0public2", "us-east-1b", "10.0.2.0/24", "igw-0gateway"),)
    artefact = None if package else EXAMPLE_ARTEFACT
    return build_plan(request, cluster, "vpc-0cache", subnet, "ami-0al2023", REGION, "arm64", artefact, spread)


def layout_snapshot(aws: Aws) -> dict[str, Any]:
    """The --ha and --replicas resources snapshot() does not cover: launch templates and their versions, Auto
    Scaling groups, load balancers, target groups (with attributes) and listeners."""
    autoscaling = boto3.client("autoscaling", endpoint_url=aws.url, region_name=REGION)
    elbv2 = boto3.client("elbv2", endpoint_url=aws.url, region_name=REGION)
    templates = aws.ec2.describe_launch_templates()["LaunchTemplates"]
    versions = [
        aws.ec2.describe_launch_template_versions(LaunchTemplateId=t["LaunchTemplateId"])["LaunchTemplateVersions"]
        for t in templates
    ]
    balancers = elbv2.describe_load_balancers()["LoadBalancers"]
    target_groups = elbv2.describe_target_groups()["TargetGroups"]
    return _strip(
        {
            "launch_templates": templates,
            "launch_template_versions": versions,
            "auto_scaling_groups": autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"],
            "load_balancers": balancers,
            "target_groups": target_groups,
            "target_group_attributes": [
                elbv2.describe_target_group_attributes(TargetGroupArn=t["TargetGroupArn"])["Attributes"]
                for t in target_groups
            ],
            "listeners": [
                elbv2.describe_listeners(LoadBalancerArn=b["LoadBalancerArn"])["Listeners"] for b in balancers
            ],
        }
    )
