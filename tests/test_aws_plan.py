"""Pure parts of provisioning, table-driven with exact text: input checks, subnet choice, cluster parsing, the plan,
the diff against what exists, rule conversion, the reports, and the instance waiter."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from typing import Any

import pytest
from awskit import EXAMPLE_PUBLIC_IP, EXAMPLE_SHA256, TRUSTED, example_plan

from forwarder.aws import apply, destroy, plan, plantext, report, subnets, userdata
from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.cluster import Cluster, NodeEndpoint, from_cache_cluster, from_replication_group
from forwarder.aws.inventory import Address, Bucket, Group, Instance, Inventory, Reference, Role
from forwarder.aws.rules import DEFAULT_EGRESS, Rule, from_permissions, to_permission
from forwarder.aws.waiter import Timing, wait_for_instances
from forwarder.errors import NatfwdError, UsageError

# -- command-line values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [("198.51.100.27/32", "198.51.100.27/32"), ("198.51.100.27", "198.51.100.27/32"), (" 10.0.0.0/8 ", "10.0.0.0/8")],
)
def test_trusted_cidr_accepted(text: str, network: str) -> None:
    assert plan.parse_trusted_cidr(text) == ipaddress.IPv4Network(network)


def test_trusted_cidrs_are_repeatable_mixed_and_deduplicated() -> None:
    texts = ["2001:db8::/64", "203.0.113.0/24", "198.51.100.27", "198.51.100.27/32", "2001:db8:1::7"]
    assert [str(n) for n in plan.parse_trusted_cidrs(texts)] == [
        "198.51.100.27/32",
        "203.0.113.0/24",
        "2001:db8::/64",
        "2001:db8:1::7/128",
    ]
    with pytest.raises(UsageError, match="at least one client network"):
        plan.parse_trusted_cidrs([])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("banana", "--trusted-cidr: 'banana' is not a CIDR; pass the client network, such as 198.51.100.27/32"),
        ("198.51.100.27/33", "--trusted-cidr: '198.51.100.27/33' is not a CIDR"),
        ("198.51.100.27/24", "--trusted-cidr: '198.51.100.27/24' has host bits set; did you mean 198.51.100.0/24?"),
        ("2001:db8::1/64", "--trusted-cidr: '2001:db8::1/64' has host bits set; did you mean 2001:db8::/64?"),
        (
            "0.0.0.0/0",
            "--trusted-cidr: 0.0.0.0/0 would let the whole internet reach the cache; pass the client network",
        ),
        ("::/0", "--trusted-cidr: ::/0 would let the whole internet reach the cache; pass the client network"),
    ],
)
def test_trusted_cidr_rejected(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        plan.parse_trusted_cidr(text)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("cluster_id", ["", "a b", "x" * 65, "semi;colon", "ünï"])
def test_cluster_id_rejected(cluster_id: str) -> None:
    with pytest.raises(UsageError, match="--cluster-id"):
        plan.parse_cluster_id(cluster_id)


# -- subnets ---------------------------------------------------------------------------------------------------------


def subnet(subnet_id: str, zone: str = "us-east-1a", vpc: str = "vpc-1") -> dict[str, Any]:
    return {"SubnetId": subnet_id, "AvailabilityZone": zone, "CidrBlock": "10.0.0.0/24", "VpcId": vpc}


def table(routes: list[dict[str, str]], *subnet_ids: str, main: bool = False, vpc: str = "vpc-1") -> dict[str, Any]:
    associations: list[dict[str, Any]] = [{"SubnetId": s} for s in subnet_ids]
    if main:
        associations.append({"Main": True})
    local = {"DestinationCidrBlock": "10.0.0.0/16", "GatewayId": "local", "State": "active"}
    return {"VpcId": vpc, "Associations": associations, "Routes": [local, *routes]}


IGW = {"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "igw-1", "State": "active"}


@pytest.mark.parametrize(
    ("route_tables", "public"),
    [
        ([table([IGW], "subnet-a")], ["subnet-a"]),
        ([table([IGW], main=True)], ["subnet-a", "subnet-b"]),  # no explicit association: the main table
        ([table([IGW], main=True), table([], "subnet-a")], ["subnet-b"]),  # an explicit table wins over main
        ([table([{**IGW, "State": "blackhole"}], "subnet-a")], []),
        ([table([{"DestinationCidrBlock": "0.0.0.0/0", "NatGatewayId": "nat-1"}], "subnet-a")], []),
        ([table([{"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "vgw-1"}], "subnet-a")], []),
        ([table([{**IGW, "DestinationCidrBlock": "198.51.100.0/24"}], "subnet-a")], []),
    ],
)
def test_public_subnets(route_tables: list[dict[str, Any]], public: list[str]) -> None:
    found = subnets.public_subnets([subnet("subnet-a"), subnet("subnet-b", "us-east-1b")], route_tables)
    assert [s.subnet_id for s in found] == public


def test_choice_is_stable_and_honours_subnet_id() -> None:
    all_subnets = [subnet("subnet-z", "us-east-1b"), subnet("subnet-y", "us-east-1a"), subnet("subnet-p")]
    tables = [table([IGW], "subnet-z", "subnet-y"), table([], "subnet-p")]
    assert subnets.choose(all_subnets, tables, "vpc-1", "c").subnet_id == "subnet-y"
    assert subnets.choose(all_subnets, tables, "vpc-1", "c", "subnet-z").subnet_id == "subnet-z"
    with pytest.raises(UsageError) as caught:
        subnets.choose(all_subnets, tables, "vpc-1", "c", "subnet-p")
    assert str(caught.value) == (
        "--subnet-id: subnet-p is not public (no 0.0.0.0/0 route to an internet gateway); "
        "public subnets of vpc-1: subnet-y, subnet-z"
    )
    with pytest.raises(UsageError, match="--subnet-id: subnet-elsewhere is not in vpc-1"):
        subnets.choose(all_subnets, tables, "vpc-1", "c", "subnet-elsewhere")
    with pytest.raises(subnets.NoPublicSubnet, match="VPC vpc-1 of cluster 'c' has no public subnet"):
        subnets.choose([subnet("subnet-p")], [table([], "subnet-p")], "vpc-1", "c")


def test_spread_takes_one_public_subnet_per_zone_and_needs_two_zones() -> None:
    all_subnets = [
        subnet("subnet-a1", "us-east-1a"),
        subnet("subnet-a2", "us-east-1a"),
        subnet("subnet-b1", "us-east-1b"),
        subnet("subnet-c1", "us-east-1c"),
        subnet("subnet-p", "us-east-1d"),
    ]
    tables = [table([IGW], "subnet-a1", "subnet-a2", "subnet-b1", "subnet-c1"), table([], "subnet-p")]
    picked = subnets.spread(all_subnets, tables, "vpc-1", "c", 2)
    assert [s.subnet_id for s in picked] == ["subnet-a1", "subnet-b1", "subnet-c1"]
    wanted = subnets.spread(all_subnets, tables, "vpc-1", "c", 2, "subnet-a2")
    assert [s.subnet_id for s in wanted] == ["subnet-a2", "subnet-b1", "subnet-c1"]
    one_zone = [table([IGW], "subnet-a1", "subnet-a2"), table([], "subnet-b1", "subnet-c1", "subnet-p")]
    with pytest.raises(subnets.NoPublicSubnet, match=r"public subnets in 1 availability zone\(s\) \(us-east-1a\)"):
        subnets.spread(all_subnets, one_zone, "vpc-1", "c", 2)


def test_replicas_and_layout() -> None:
    assert plan.parse_replicas(None) == 1
    assert plan.parse_replicas(3) == 3
    for bad in (0, 1, plan.MAX_REPLICAS + 1):
        with pytest.raises(UsageError, match=f"--replicas: {bad} is out of range"):
            plan.parse_replicas(bad)
    cidrs = plan.parse_trusted_cidrs(["198.51.100.27/32"])
    assert plan.ProvisionRequest("c", cidrs).layout == "single"
    assert plan.ProvisionRequest("c", cidrs, ha=True).layout == "ha"
    assert plan.ProvisionRequest("c", cidrs, ha=True, replicas=2).layout == "replicas"


# -- clusters --------------------------------------------------------------------------------------------------------


def endpoint_node(node_id: str, address: str, port: int) -> dict[str, Any]:
    return {"CacheNodeId": node_id, "Endpoint": {"Address": address, "Port": port}}


def test_cache_cluster_parsing() -> None:
    described = {
        "CacheClusterId": "vk",
        "Engine": "valkey",
        "CacheClusterStatus": "available",
        "CacheNodes": [endpoint_node("0002", "b", 6379), endpoint_node("0001", "a", 6379), {"CacheNodeId": "0003"}],
        "SecurityGroups": [{"SecurityGroupId": "sg-1", "Status": "active"}],
        "CacheSubnetGroupName": "subnets",
    }
    assert from_cache_cluster(described) == Cluster(
        "vk",
        "cache-cluster",
        "redis",
        "available",
        (NodeEndpoint("0001", "a", 6379), NodeEndpoint("0002", "b", 6379)),
        ("sg-1",),
        "subnets",
    )


def test_replication_group_parsing() -> None:
    group = {"ReplicationGroupId": "rg", "Status": "available", "ClusterEnabled": True, "Engine": "redis"}
    members = [
        {
            "CacheClusterId": f"rg-000{n}-001",
            "CacheNodes": [endpoint_node("0001", f"rg-000{n}-001.x", 6379)],
            "SecurityGroups": [{"SecurityGroupId": "sg-2"}, {"SecurityGroupId": "sg-1"}],
            "CacheSubnetGroupName": "subnets",
        }
        for n in (2, 1)
    ]
    parsed = from_replication_group(group, members)
    assert parsed.engine == "redis-cluster"
    assert parsed.nodes == (
        NodeEndpoint("rg-0001-001", "rg-0001-001.x", 6379),
        NodeEndpoint("rg-0002-001", "rg-0002-001.x", 6379),
    )
    assert parsed.security_group_ids == ("sg-2", "sg-1")
    assert parsed.subnet_group == "subnets"


# -- the plan --------------------------------------------------------------------------------------------------------

EXPECTED_PLAN = """\
natfwd provision plan for memcached cache cluster 'mycluster' (3 nodes) in us-east-1
  VPC             vpc-0cache
  subnet          subnet-0public (10.0.0.0/24, us-east-1a), public via igw-0gateway
  instance        t4g.micro (arm64), ami-0al2023 (Amazon Linux 2023), key pair mykey
  access          instance profile natfwd-mycluster: SSM Session Manager, ElastiCache Describe, the natfwd object
  natfwd          mode userspace, installs natfwd 0.1.0 as built here (sdist, sha256 f9c42a9bd5000bd1...)
  clients         198.51.100.27/32
  storage         S3 bucket natfwd-123456789012-us-east-1-mycluster (private, encrypted), natfwd's sdist in it
  Elastic IP      one for natfwd, associated with the instance
  forwards        (Elastic IP port -> node)
    11211 -> mycluster.abc123.0001.use1.cache.amazonaws.com:11211  node 0001
    11212 -> mycluster.abc123.0002.use1.cache.amazonaws.com:11211  node 0002
    11213 -> mycluster.abc123.0003.use1.cache.amazonaws.com:11211  node 0003
  security group  natfwd-mycluster in vpc-0cache, with exactly these rules
    inbound   tcp 11211 from 198.51.100.27/32     mycluster: forward to node 0001
    inbound   tcp 11212 from 198.51.100.27/32     mycluster: forward to node 0002
    inbound   tcp 11213 from 198.51.100.27/32     mycluster: forward to node 0003
    inbound   tcp 22    from 198.51.100.27/32     mycluster: SSH
    outbound  tcp 11211 to   sg-0cache            mycluster: cache nodes
    outbound  tcp 443   to   0.0.0.0/0            mycluster: HTTPS to dnf, pip, S3 (natfwd itself) and SSM
    (the default allow-all outbound rule is removed)
  cache security group sg-0cache
    inbound   tcp 11211 from natfwd-mycluster     natfwd-mycluster: NAT instance to cache nodes
  tags            natfwd:cluster-id=mycluster, Name=natfwd-mycluster on every resource"""


def test_plan_text_is_exact() -> None:
    assert plantext.render(example_plan()) == EXPECTED_PLAN
    assert plantext.render(example_plan("kernel")) == EXPECTED_PLAN.replace(
        "mode userspace, ", "mode kernel (natfwd serve with data_path: kernel, nftables DNAT), "
    )


def test_plan_rules_and_tags() -> None:
    the_plan = example_plan(ssh=False)
    assert the_plan.nat_ingress == tuple(Rule.tcp(port, TRUSTED) for port in (11211, 11212, 11213))
    assert the_plan.nat_egress == (Rule.tcp(11211, "sg-0cache"), Rule.tcp(443, "0.0.0.0/0"))
    assert the_plan.cache_ingress("sg-nat") == (Rule.tcp(11211, "sg-nat"),)
    assert the_plan.tags("security-group") == (
        ("natfwd:cluster-id", "mycluster"),
        ("Name", "natfwd-mycluster"),
        ("natfwd:role", "security-group"),
    )
    assert the_plan.tags("instance")[-1] == ("natfwd:mode", "userspace")


def test_plan_with_several_clients_and_ipv6() -> None:
    the_plan = example_plan(cidrs=(TRUSTED, "2001:db8::/64"))
    v6 = "2001:db8::/64"
    assert set(the_plan.nat_ingress) == {Rule.tcp(p, c) for c in (TRUSTED, v6) for p in (11211, 11212, 11213, 22)}
    assert len(the_plan.nat_ingress) == 8
    assert to_permission(Rule.tcp(11211, v6))["Ipv6Ranges"] == [{"CidrIpv6": v6}]
    assert "  - 2001:db8::/64" in userdata.render_config(the_plan, EXAMPLE_PUBLIC_IP).splitlines()


def test_port_22_only_with_a_key_pair() -> None:
    assert Rule.tcp(22, TRUSTED) in example_plan(ssh=True).nat_ingress
    assert all(rule.from_port != 22 for rule in example_plan(ssh=False).nat_ingress)


def test_instance_policy_is_the_discovery_reads_and_the_one_object() -> None:
    the_plan = example_plan()
    assert the_plan.artefact is not None
    assert the_plan.instance_policy()["Statement"] == [
        {
            "Sid": "NatfwdDiscovery",
            "Effect": "Allow",
            "Action": ["elasticache:DescribeCacheClusters", "elasticache:DescribeReplicationGroups"],
            "Resource": "*",
        },
        {
            "Sid": "NatfwdArtefact",
            "Effect": "Allow",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::natfwd-123456789012-us-east-1-mycluster/{the_plan.artefact.key}",
        },
    ]


@pytest.mark.parametrize(
    ("instance_type", "supported", "forced", "package", "chosen"),
    [
        ("t4g.micro", ["arm64"], None, None, "arm64"),
        ("t3.micro", ["i386", "x86_64"], None, None, "x86_64"),
        ("t3.micro", ["x86_64"], "x86_64", None, "x86_64"),
        ("t4g.micro", ["arm64"], None, "https://x/natfwd-0.1.0-cp311-cp311-linux_aarch64.whl", "arm64"),
        ("t4g.micro", ["arm64"], None, "https://x/natfwd-0.1.0-py3-none-any.whl", "arm64"),
    ],
)
def test_architecture_follows_the_instance_type(
    instance_type: str, supported: list[str], forced: Any, package: str | None, chosen: str
) -> None:
    assert plan.choose_architecture(instance_type, supported, forced, package) == chosen
    assert plan.ami_parameter(chosen).endswith(f"al2023-ami-kernel-default-{chosen}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("instance_type", "supported", "forced", "package", "message"),
    [
        (
            "t3.micro",
            ["x86_64"],
            "arm64",
            None,
            "--architecture arm64: t3.micro runs x86_64 only; pick an instance "
            "type of that architecture (t4g.micro) or drop --architecture",
        ),
        (
            "t4g.micro",
            ["arm64"],
            None,
            "https://x/natfwd-0.1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
            "--package: that wheel is built for x86_64, but t4g.micro runs arm64",
        ),
        ("mac1.metal", ["x86_64_mac"], None, None, "--instance-type: mac1.metal supports x86_64_mac architecture(s)"),
    ],
)
def test_architecture_mismatch_is_a_usage_error(
    instance_type: str, supported: list[str], forced: Any, package: str | None, message: str
) -> None:
    with pytest.raises(UsageError) as caught:
        plan.choose_architecture(instance_type, supported, forced, package)
    assert str(caught.value).startswith(message)


def test_plan_ports_follow_the_engine() -> None:
    base = example_plan()
    redis = dataclasses.replace(base.cluster, engine="redis")
    built = plan.build(base.request, redis, base.vpc_id, base.subnet, base.image_id, base.region)
    assert [f.port for f in built.forwards] == [6379, 6380, 6381]


@pytest.mark.parametrize(
    ("change", "mode", "error", "message"),
    [
        ({"nodes": ()}, "userspace", NatfwdError, "has no node endpoints yet (status available)"),
        ({"security_group_ids": ()}, "userspace", NatfwdError, "has no VPC security group"),
        ({"engine": "redis-cluster"}, "kernel", UsageError, "--mode kernel: kernel DNAT cannot rewrite"),
    ],
)
def test_plan_refusals(change: dict[str, Any], mode: str, error: type[Exception], message: str) -> None:
    base = example_plan(mode)
    cluster = dataclasses.replace(base.cluster, **change)
    with pytest.raises(error, match=re.escape(message)):
        plan.build(base.request, cluster, base.vpc_id, base.subnet, base.image_id, base.region)


# -- rules -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "permission"),
    [
        (
            Rule.tcp(22, "198.51.100.27/32"),
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "198.51.100.27/32"}]},
        ),
        (
            Rule.tcp(22, "2001:db8::/64"),
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/64"}]},
        ),
        (
            Rule.tcp(6379, "sg-1", "x"),
            {
                "IpProtocol": "tcp",
                "FromPort": 6379,
                "ToPort": 6379,
                "UserIdGroupPairs": [{"GroupId": "sg-1", "Description": "x"}],
            },
        ),
        (
            Rule("tcp", 1, 9, "pl-1"),
            {"IpProtocol": "tcp", "FromPort": 1, "ToPort": 9, "PrefixListIds": [{"PrefixListId": "pl-1"}]},
        ),
        (
            DEFAULT_EGRESS,
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "default allow-all outbound"}]},
        ),
    ],
)
def test_rule_conversion_round_trips(rule: Rule, permission: dict[str, Any]) -> None:
    assert to_permission(rule) == permission
    assert from_permissions([permission]) == [rule]


def test_from_permissions_flattens_and_ignores_descriptions_in_equality() -> None:
    permission = {
        "IpProtocol": "6",
        "FromPort": 11211,
        "ToPort": 11211,
        "IpRanges": [{"CidrIp": "10.0.0.0/8", "Description": "a"}, {"CidrIp": "10.1.0.0/16"}],
        "UserIdGroupPairs": [{"GroupId": "sg-9", "UserId": "123"}],
    }
    assert from_permissions([permission]) == [
        Rule.tcp(11211, "10.0.0.0/8"),
        Rule.tcp(11211, "10.1.0.0/16"),
        Rule.tcp(11211, "sg-9"),
    ]
    assert Rule.tcp(1, "sg-9", "one").render(inbound=False) == "outbound  tcp 1     to   sg-9                 one"


# -- the diff against what exists ------------------------------------------------------------------------------------


ROLE = "natfwd-mycluster"
SSM = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


def existing(the_plan: plan.Plan | None = None, **changes: Any) -> Inventory:
    """Everything `the_plan` (the example plan by default) would have made, as an inventory; `changes` replace parts."""
    the_plan = the_plan or example_plan()
    assert the_plan.artefact is not None
    policy = json.dumps(the_plan.instance_policy(), sort_keys=True)
    complete = Inventory(
        "mycluster",
        groups=(Group("sg-nat", "vpc-0cache", the_plan.nat_ingress, the_plan.nat_egress),),
        instances=(
            Instance(
                "i-1",
                "running",
                "subnet-0public",
                "userspace",
                the_plan.request.instance_type,
                userdata.render(the_plan, EXAMPLE_PUBLIC_IP),
            ),
        ),
        addresses=(Address("eipalloc-1", EXAMPLE_PUBLIC_IP, "eipassoc-1", "i-1"),),
        references=(Reference("sg-0cache", Rule.tcp(11211, "sg-nat")),),
        bucket=Bucket(the_plan.artefact.bucket, (the_plan.artefact.key,)),
        role=Role(ROLE, True, True, (ROLE,), ("natfwd",), (SSM,), policy),
    )
    return dataclasses.replace(complete, **changes)


def test_diff_of_nothing_creates_everything() -> None:
    the_plan = example_plan()
    changes = apply.diff(the_plan, Inventory("mycluster"))
    assert not changes.empty
    assert changes.lines(the_plan) == [
        "create S3 bucket natfwd-123456789012-us-east-1-mycluster (private, encrypted, tagged)",
        f"  upload artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz",
        "create IAM role and instance profile natfwd-mycluster",
        "create security group natfwd-mycluster with the rules above",
        "add the inbound rule from natfwd-mycluster in sg-0cache",
        "allocate an Elastic IP",
        "launch a t4g.micro instance in subnet-0public",
        "associate the Elastic IP with the instance",
    ]


def test_diff_of_everything_is_empty() -> None:
    the_plan = example_plan()
    changes = apply.diff(the_plan, existing())
    assert changes.empty
    assert changes.lines(the_plan) == [
        "keep S3 bucket natfwd-123456789012-us-east-1-mycluster (private, encrypted, tagged)",
        f"  keep artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz",
        "keep IAM role natfwd-mycluster",
        "keep security group sg-nat",
        "keep the inbound rule from natfwd-mycluster in sg-0cache",
        f"keep Elastic IP {EXAMPLE_PUBLIC_IP} (eipalloc-1)",
        "keep instance i-1 (running)",
    ]


def test_diff_repairs_drift() -> None:
    the_plan = example_plan()
    wide_open = Rule.tcp(11211, "0.0.0.0/0")
    group = Group("sg-nat", "vpc-0cache", (*the_plan.nat_ingress[1:], wide_open), (DEFAULT_EGRESS,))
    role = Role(ROLE, True, False, (), (), (), None)
    changes = apply.diff(
        the_plan,
        existing(
            groups=(group,),
            references=(),
            addresses=(Address("eipalloc-1", EXAMPLE_PUBLIC_IP, None, None),),
            role=role,
        ),
    )
    assert changes.revoke_ingress == (wide_open,)
    assert changes.authorize_ingress == (the_plan.nat_ingress[0],)
    assert changes.revoke_egress == (DEFAULT_EGRESS,)
    assert changes.authorize_egress == the_plan.nat_egress
    assert changes.cache_ports_missing == (11211,)
    assert changes.associate
    assert not changes.replace
    assert (changes.create_role, changes.put_policy, changes.attach_ssm, changes.create_profile) == (
        False,
        True,
        True,
        True,
    )


def test_diff_of_a_client_change_updates_rules_in_place_and_replaces_the_instance() -> None:
    before = example_plan()
    after = example_plan(cidrs=(TRUSTED, "203.0.113.0/24"), instance_type="t4g.small")
    changes = apply.diff(after, existing(before))
    assert changes.lines(after) == [
        "keep S3 bucket natfwd-123456789012-us-east-1-mycluster (private, encrypted, tagged)",
        f"  keep artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz",
        "keep IAM role natfwd-mycluster",
        "keep security group sg-nat",
        "  + inbound   tcp 11211 from 203.0.113.0/24       mycluster: forward to node 0001",
        "  + inbound   tcp 11212 from 203.0.113.0/24       mycluster: forward to node 0002",
        "  + inbound   tcp 11213 from 203.0.113.0/24       mycluster: forward to node 0003",
        "  + inbound   tcp 22    from 203.0.113.0/24       mycluster: SSH",
        "keep the inbound rule from natfwd-mycluster in sg-0cache",
        f"keep Elastic IP {EXAMPLE_PUBLIC_IP} (eipalloc-1)",
        "replace instance i-1 with a new t4g.small instance, then move the Elastic IP to it and terminate the old one",
        "  - instance type t4g.micro",
        "  + instance type t4g.small",
        "  user data (natfwd's config, unit or bootstrap):",
        "    + - 203.0.113.0/24",
        "associate the Elastic IP with the instance",
    ]
    removed = apply.diff(before, existing(after))
    assert [line for line in removed.lines(before) if line.startswith(("  -", "    -"))] == [
        "  - inbound   tcp 11211 from 203.0.113.0/24       mycluster: forward to node 0001",
        "  - inbound   tcp 11212 from 203.0.113.0/24       mycluster: forward to node 0002",
        "  - inbound   tcp 11213 from 203.0.113.0/24       mycluster: forward to node 0003",
        "  - inbound   tcp 22    from 203.0.113.0/24       mycluster: SSH",
        "  - instance type t4g.small",
        "    - - 203.0.113.0/24",
    ]


def test_diff_of_a_new_mode_or_package_replaces_the_instance_and_the_stale_object() -> None:
    the_plan = example_plan("kernel", package="natfwd==0.1.0")
    changes = apply.diff(the_plan, existing())
    assert changes.replace and changes.associate
    assert changes.stale_keys == (f"artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz",)
    assert not changes.upload and not changes.create_bucket
    lines = changes.lines(the_plan)
    assert lines[:2] == [
        "keep the S3 bucket, empty: --package replaces the natfwd stored there",
        f"  - artefacts/{EXAMPLE_SHA256}/natfwd-0.1.0.tar.gz",
    ]
    assert {
        "    - - gcc",
        "    + - nftables",
        "    + data_path: kernel",
        "    + ExecStartPre=+/usr/sbin/sysctl -qw net.ipv4.ip_forward=1",
    } <= set(lines)
    # A long difference is cut short: here, user data that has nothing in common with the plan's.
    (instance,) = existing().instances
    blank = existing(instances=(dataclasses.replace(instance, user_data="#cloud-config\n"),))
    changed = len(userdata.render(the_plan, EXAMPLE_PUBLIC_IP).splitlines()) - 1
    assert f"    ... and {changed - 40} more changed lines" in apply.diff(the_plan, blank).lines(the_plan)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"groups": (Group("sg-nat", "vpc-other", (), ()),)},
            "sg-nat is in vpc-other, not the cluster's vpc-0cache",
        ),
        (
            {"instances": (Instance("i-1", "stopped", "s", "userspace"),)},
            "instance i-1 is stopped; start it, or run natfwd destroy",
        ),
        ({"addresses": (Address("eipalloc-1", "x", "a", "i-other"),)}, "Elastic IP x is associated with i-other"),
        (
            {"instances": (Instance("i-1", "running", "s", "userspace"), Instance("i-2", "running", "s", "userspace"))},
            "found 2 instances tagged natfwd:cluster-id=mycluster",
        ),
    ],
)
def test_diff_conflicts(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(apply.Conflict, match=message):
        apply.diff(example_plan(), existing(**changes))


# -- reports ---------------------------------------------------------------------------------------------------------


def test_final_report_is_exact() -> None:
    outcome = apply.Outcome(example_plan(), "sg-nat", "i-1", "eipalloc-1", EXAMPLE_PUBLIC_IP, ())
    ip = EXAMPLE_PUBLIC_IP
    assert report.render(outcome, "natfwd destroy --cluster-id mycluster --region us-east-1") == (
        "natfwd is provisioned for memcached cluster 'mycluster' in us-east-1\n"
        f"  Elastic IP      {ip} (eipalloc-1)\n"
        "  instance        i-1 in subnet-0public, mode userspace\n"
        "  security group  sg-nat\n"
        "  ports\n"
        f"    {ip}:11211 -> node 0001 (mycluster.abc123.0001.use1.cache.amazonaws.com:11211)\n"
        f"    {ip}:11212 -> node 0002 (mycluster.abc123.0002.use1.cache.amazonaws.com:11211)\n"
        f"    {ip}:11213 -> node 0003 (mycluster.abc123.0003.use1.cache.amazonaws.com:11211)\n"
        "  client lines\n"
        "    from pymemcache.client.hash import HashClient; client = HashClient("
        f'[("{ip}", 11211), ("{ip}", 11212), ("{ip}", 11213)])\n'
        "  The instance installs natfwd at first boot: allow a few minutes before the first connection.\n"
        f"  Only {TRUSTED} is let in. To change the clients, run provision again with other --trusted-cidr flags.\n"
        "  A shell on the instance, through SSM Session Manager (no SSH needed):\n"
        "    aws ssm start-session --target i-1 --region us-east-1\n"
        "  Remove everything with: natfwd destroy --cluster-id mycluster --region us-east-1"
    )


@pytest.mark.parametrize(
    ("engine", "nodes", "lines"),
    [
        ("memcached", 1, ['from pymemcache.client.base import Client; client = Client(("203.0.113.9", 11211))']),
        ("redis", 2, ["redis-cli -h 203.0.113.9 -p 6379", "redis-cli -h 203.0.113.9 -p 6380"]),
        ("redis-cluster", 1, ["redis-cli -c -h 203.0.113.9 -p 6379"]),
    ],
)
def test_client_lines(engine: str, nodes: int, lines: list[str]) -> None:
    base = example_plan()
    cluster = dataclasses.replace(base.cluster, engine=engine, nodes=base.cluster.nodes[:nodes])
    built = plan.build(base.request, cluster, base.vpc_id, base.subnet, base.image_id, base.region)
    assert report.client_lines(built, "203.0.113.9") == lines


def test_destroy_text_lists_in_removal_order() -> None:
    assert destroy.render(existing(), "us-east-1") == (
        "natfwd destroy for cluster 'mycluster' in us-east-1 removes, in this order:\n"
        "  instance i-1 (running)\n"
        f"  Elastic IP {EXAMPLE_PUBLIC_IP} (eipalloc-1)\n"
        "  rule in sg-0cache: inbound tcp 11211 from sg-nat\n"
        "  security group sg-nat (in vpc-0cache)\n"
        "  S3 bucket natfwd-123456789012-us-east-1-mycluster and its 1 object\n"
        "  IAM instance profile natfwd-mycluster\n"
        "  IAM role natfwd-mycluster and its policies"
    )


# -- the waiter, with a scripted EC2 and a fake clock ----------------------------------------------------------------


class ScriptedEc2(AwsClient):
    """Answers DescribeInstances from a script of states; everything else is the real class."""

    def __init__(self, states: list[str]) -> None:
        super().__init__({}, "us-east-1", None, None)
        self.states = states

    def describe_instances(self, filters: Any) -> list[dict[str, Any]]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return [{"InstanceId": "i-1", "State": {"Name": state}}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_waiter_reports_progress_until_running() -> None:
    clock = FakeClock()
    seen: list[str] = []
    timing = Timing(timeout_s=60, poll_s=5, sleep=clock.sleep, clock=clock.clock)
    wait_for_instances(ScriptedEc2(["pending", "pending", "running"]), ["i-1"], "running", seen.append, timing)
    assert seen == [
        "waiting for running: i-1 pending (0 s)",
        "waiting for running: i-1 pending (5 s)",
        "instance i-1 is running",
    ]


def test_waiter_gives_up_and_spots_failed_launches() -> None:
    clock = FakeClock()
    timing = Timing(timeout_s=12, poll_s=5, sleep=clock.sleep, clock=clock.clock)
    with pytest.raises(AwsError, match="gave up after 12 s waiting for i-1 pending to become running"):
        wait_for_instances(ScriptedEc2(["pending"]), ["i-1"], "running", lambda _: None, timing)
    with pytest.raises(AwsError, match="instance did not start: i-1 is terminated"):
        wait_for_instances(ScriptedEc2(["terminated"]), ["i-1"], "running", lambda _: None, timing)


def test_settle_waits_for_eventual_consistency() -> None:
    clock = FakeClock()
    timing = Timing(timeout_s=60, poll_s=5, sleep=clock.sleep, clock=clock.clock)
    answers: list[Exception | str] = [
        AwsError("no", "InvalidGroup.NotFound"),
        AwsError("no", "InvalidGroup.NotFound"),
        "ok",
    ]

    def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert apply.settle(flaky, timing) == "ok"
    assert clock.now == 1 + 2

    def denied() -> None:
        raise AwsError("denied", "UnauthorizedOperation")

    with pytest.raises(AwsError, match="denied"):
        apply.settle(denied, timing)
    assert clock.now == 3  # no retry for other errors
    calls: list[int] = []

    def never() -> None:
        calls.append(1)
        raise AwsError("still no", "InvalidInstanceID.NotFound")

    with pytest.raises(AwsError, match="still no"):
        apply.settle(never, timing)
    assert len(calls) == 5


# -- the --ha and --replicas layouts -----------------------------------------------------------------------------


def test_replicas_plan_text_names_the_load_balancer_its_listeners_and_both_groups_rules() -> None:
    text = plantext.render(example_plan(ssh=False, replicas=2))
    start = text.index("  load balancer")
    end = text.index("    outbound  tcp 11211 to   sg-0cache")
    assert text[start:end] == (
        "  load balancer   natfwd-mycluster: network, internet-facing, in us-east-1a, us-east-1b; cross-zone, so "
        "each zone's address reaches every instance\n"
        "  listeners       (TCP port -> target group: the group's instances, TCP health checks, client IP kept)\n"
        "    11211 -> natfwd-mycluster-11211\n"
        "    11212 -> natfwd-mycluster-11212\n"
        "    11213 -> natfwd-mycluster-11213\n"
        "  NLB group       natfwd-mycluster-nlb in vpc-0cache, with exactly these rules\n"
        "    inbound   tcp 11211 from 198.51.100.27/32     mycluster: clients to node 0001\n"
        "    inbound   tcp 11212 from 198.51.100.27/32     mycluster: clients to node 0002\n"
        "    inbound   tcp 11213 from 198.51.100.27/32     mycluster: clients to node 0003\n"
        "    outbound  tcp 11211 to   natfwd-mycluster     mycluster: to the natfwd instances\n"
        "    outbound  tcp 11212 to   natfwd-mycluster     mycluster: to the natfwd instances\n"
        "    outbound  tcp 11213 to   natfwd-mycluster     mycluster: to the natfwd instances\n"
        "  security group  natfwd-mycluster in vpc-0cache, with exactly these rules\n"
        "    inbound   tcp 11211 from natfwd-mycluster-nlb mycluster: load balancer to node 0001\n"
        "    inbound   tcp 11212 from natfwd-mycluster-nlb mycluster: load balancer to node 0002\n"
        "    inbound   tcp 11213 from natfwd-mycluster-nlb mycluster: load balancer to node 0003\n"
    )
    assert "  Auto Scaling    group natfwd-mycluster: min = max = desired = 2, over us-east-1a, us-east-1b\n" in text
    assert "  health          the load balancer's TCP checks (ELB); 600 s grace for the first-boot install\n" in text


def test_ha_plan_text_shows_the_group_and_the_claimed_address() -> None:
    text = plantext.render(example_plan(ha=True))
    assert "  subnets         subnet-0public (10.0.0.0/24, us-east-1a), public via igw-0gateway\n" in text
    assert "                  subnet-0public2 (10.0.2.0/24, us-east-1b), public via igw-0gateway\n" in text
    assert "  Auto Scaling    group natfwd-mycluster: min = max = desired = 1, over us-east-1a, us-east-1b\n" in text
    assert "  Elastic IP      one for natfwd; the group's instance claims it at boot (natfwd claim-address)\n" in text
    assert "claim the cluster's Elastic IP, report its own health to the group\n" in text
    # The instances still admit the clients directly (and SSH with a key pair), as in the single layout.
    assert "    inbound   tcp 22    from 198.51.100.27/32     mycluster: SSH\n" in text
    assert "load balancer" not in text


def test_ha_instance_policy_claims_only_the_clusters_address_and_reports_only_to_its_group() -> None:
    statements = example_plan(ha=True).instance_policy()["Statement"]
    assert isinstance(statements, list)
    by_sid = {s["Sid"]: s for s in statements}
    assert by_sid["NatfwdClaimAddress"] == {
        "Sid": "NatfwdClaimAddress",
        "Effect": "Allow",
        "Action": "ec2:AssociateAddress",
        "Resource": [
            "arn:aws:ec2:*:*:elastic-ip/*",
            "arn:aws:ec2:*:*:instance/*",
            "arn:aws:ec2:*:*:network-interface/*",
        ],
        "Condition": {"StringEquals": {"aws:ResourceTag/natfwd:cluster-id": "mycluster"}},
    }
    assert by_sid["NatfwdFindAddress"]["Action"] == "ec2:DescribeAddresses"
    assert by_sid["NatfwdReportHealth"]["Condition"] == {
        "StringEquals": {"autoscaling:ResourceTag/natfwd:cluster-id": "mycluster"}
    }
    assert set(by_sid) == {
        "NatfwdDiscovery",
        "NatfwdArtefact",
        "NatfwdClaimAddress",
        "NatfwdFindAddress",
        "NatfwdReportHealth",
    }
    single = example_plan().instance_policy()["Statement"]
    assert isinstance(single, list) and {s["Sid"] for s in single} == {"NatfwdDiscovery", "NatfwdArtefact"}


def test_elastic_load_balancing_names_fit_32_characters() -> None:
    assert plan.balancer_name("mycluster") == "natfwd-mycluster"
    assert plan.target_group_name("mycluster", 11211) == "natfwd-mycluster-11211"
    long_id = "a" * 64
    names = {plan.balancer_name(long_id), plan.target_group_name(long_id, 6379), plan.target_group_name(long_id, 6380)}
    assert len(names) == 3
    assert all(len(name) <= 32 and re.fullmatch(r"[A-Za-z0-9-]+", name) for name in names)
    assert plan.balancer_name("b" * 64) != plan.balancer_name(long_id)


def test_a_template_version_is_needed_only_when_what_it_launches_changes() -> None:
    from forwarder.aws import fleet

    the_plan = example_plan(ha=True)
    claim = "eipalloc-0123456789abcdef0"
    data = fleet.template_data(the_plan, "sg-0nat", userdata.render(the_plan, "203.0.113.73", allocation_id=claim))
    assert fleet.template_changes(data, dict(data)) == ()
    other = fleet.template_data(
        example_plan(ha=True, instance_type="t3.micro"),
        "sg-0nat",
        userdata.render(the_plan, "203.0.113.9", allocation_id=claim),
    )
    reasons = fleet.template_changes(data, other)
    assert reasons[:2] == ("- instance type t4g.micro", "+ instance type t3.micro")
    assert "user data (natfwd's config, unit or bootstrap):" in reasons
    assert "  + public_address: 203.0.113.9" in reasons
