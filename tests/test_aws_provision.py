"""natfwd provision/destroy against a real moto server: what gets created, idempotency, rollback, exit codes."""

from __future__ import annotations

import base64
import re
import socket
from typing import Any

import pytest
import yaml
from awskit import (
    REGION,
    TRUSTED,
    Aws,
    World,
    build_world,
    memcached_cluster,
    natfwd_cli,
    redis_group,
    snapshot,
)
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"

from forwarder import cli, config
from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.plan import AMI_PARAMETER
from forwarder.aws.rules import Rule, from_permissions


def provision(aws: Aws, *extra: str, cluster_id: str = "mycluster", cidr: str = TRUSTED) -> int:
    argv = [
        "provision",
        "--cluster-id",
        cluster_id,
        "--trusted-cidr",
        cidr,
        "--endpoint-url",
        aws.url,
        "--region",
        REGION,
    ]
    return cli.main([*argv, *extra])


def destroy(aws: Aws, *extra: str, cluster_id: str = "mycluster") -> int:
    return cli.main(["destroy", "--cluster-id", cluster_id, "--endpoint-url", aws.url, "--region", REGION, *extra])


def tagged(aws: Aws, cluster_id: str = "mycluster") -> list[dict[str, str]]:
    return [{"Name": "tag:natfwd:cluster-id", "Values": [cluster_id]}]


def live_instances(aws: Aws, cluster_id: str = "mycluster") -> list[dict[str, Any]]:
    found = aws.ec2.describe_instances(Filters=tagged(aws, cluster_id))["Reservations"]
    return [i for r in found for i in r["Instances"] if i["State"]["Name"] != "terminated"]


def group(aws: Aws, group_id: str) -> dict[str, Any]:
    found: dict[str, Any] = aws.ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return found


def user_data(aws: Aws, instance_id: str) -> str:
    value = aws.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def embedded_config(text: str) -> config.Config:
    document = yaml.safe_load(text)
    files = {entry["path"]: entry["content"] for entry in document["write_files"]}
    return config.loads(files["/etc/natfwd/natfwd.yaml"])


@pytest.fixture
def world(aws: Aws) -> World:
    return build_world(aws)


def test_full_provision_memcached(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    names = memcached_cluster(aws, world)
    assert provision(aws, "--yes") == 0
    out = capsys.readouterr().out

    # The instance: in the public subnet of the cluster's VPC (not the decoy's), current AL2023 AMI, IMDSv2.
    (instance,) = live_instances(aws)
    assert instance["SubnetId"] == world.public_subnet_id
    assert instance["VpcId"] == world.vpc_id != world.decoy_vpc_id
    ami = aws.client.parameter(AMI_PARAMETER)
    assert instance["ImageId"] == ami
    assert instance["InstanceType"] == "t3.micro"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    (nat_group_ref,) = instance["SecurityGroups"]
    nat_group_id = nat_group_ref["GroupId"]

    # The Elastic IP, tagged and associated with that instance.
    (address,) = aws.ec2.describe_addresses(Filters=tagged(aws))["Addresses"]
    assert address["InstanceId"] == instance["InstanceId"]
    eip = address["PublicIp"]

    # Security groups: exactly the page's rules, nothing beyond the trusted CIDR and the cache group.
    nat = group(aws, nat_group_id)
    assert nat["VpcId"] == world.vpc_id
    assert set(from_permissions(nat["IpPermissions"])) == {
        Rule.tcp(11211, TRUSTED),
        Rule.tcp(11212, TRUSTED),
        Rule.tcp(11213, TRUSTED),
        Rule.tcp(22, TRUSTED),
    }
    assert set(from_permissions(nat["IpPermissionsEgress"])) == {
        Rule.tcp(11211, world.cache_group_id),
        Rule.tcp(443, "0.0.0.0/0"),
    }
    cache = group(aws, world.cache_group_id)
    assert set(from_permissions(cache["IpPermissions"])) == {Rule.tcp(11211, nat_group_id)}

    # The user data carries the node endpoint names as targets, the EIP and the trusted CIDR.
    text = user_data(aws, instance["InstanceId"])
    assert text.startswith("#cloud-config\n")
    cfg = embedded_config(text)
    assert cfg.engine == "memcached"
    assert cfg.public_address == eip
    assert [str(n) for n in cfg.allowed_clients] == [TRUSTED]
    assert [(f.port, f.target.host, f.target.port) for f in cfg.forwards] == [
        (11211, names[0], 11211),
        (11212, names[1], 11211),
        (11213, names[2], 11211),
    ]
    assert "systemctl enable --now natfwd.service" in text

    # Every created resource carries the tags.
    for resource in (nat, instance, address):
        tags = {t["Key"]: t["Value"] for t in resource["Tags"]}
        assert tags["natfwd:cluster-id"] == "mycluster"
        assert tags["Name"] == "natfwd-mycluster"
    volumes = aws.ec2.describe_volumes(Filters=tagged(aws))["Volumes"]
    assert [v["Attachments"][0]["InstanceId"] for v in volumes] == [instance["InstanceId"]]

    # The report: plan first, then the EIP, one port per node, and the client line.
    assert out.index("natfwd provision plan") < out.index("natfwd is provisioned")
    for port, name in zip((11211, 11212, 11213), names, strict=True):
        assert f"{eip}:{port} -> node {port - 11210:04d} ({name}:11211)" in out
    pymemcache = f'HashClient([("{eip}", 11211), ("{eip}", 11212), ("{eip}", 11213)])'
    assert pymemcache in out
    assert f"natfwd destroy --cluster-id mycluster --region {REGION} --endpoint-url {aws.url}" in out


def test_rerun_is_idempotent(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    memcached_cluster(aws, world)
    assert provision(aws, "--yes") == 0
    first_out = capsys.readouterr().out
    after_first = snapshot(aws)
    # No --yes and no stdin: fine, because there is nothing to confirm.
    assert provision(aws) == 0
    out = capsys.readouterr().out
    assert "everything already exists; nothing to change" in out
    assert snapshot(aws) == after_first
    eip = re.search(r"Elastic IP +(\S+) \(eipalloc", first_out)
    assert eip is not None and f"Elastic IP      {eip.group(1)}" in out


def test_rerun_repairs_a_widened_security_group(aws: Aws, world: World) -> None:
    memcached_cluster(aws, world)
    assert provision(aws, "--yes") == 0
    (instance,) = live_instances(aws)
    nat_group_id = instance["SecurityGroups"][0]["GroupId"]
    world_open = {"IpProtocol": "tcp", "FromPort": 11211, "ToPort": 11211, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    aws.ec2.authorize_security_group_ingress(GroupId=nat_group_id, IpPermissions=[world_open])
    rules = aws.ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [world.cache_group_id]}])
    cache_rule_ids = [r["SecurityGroupRuleId"] for r in rules["SecurityGroupRules"] if not r["IsEgress"]]
    aws.ec2.revoke_security_group_ingress(GroupId=world.cache_group_id, SecurityGroupRuleIds=cache_rule_ids)
    assert group(aws, world.cache_group_id)["IpPermissions"] == []
    assert provision(aws, "--yes") == 0
    assert Rule.tcp(11211, "0.0.0.0/0") not in set(from_permissions(group(aws, nat_group_id)["IpPermissions"]))
    assert set(from_permissions(group(aws, world.cache_group_id)["IpPermissions"])) == {Rule.tcp(11211, nat_group_id)}
    assert len(live_instances(aws)) == 1


def test_dry_run_creates_nothing(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)
    assert provision(aws, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "natfwd provision plan for memcached cache cluster 'mycluster' (3 nodes)" in out
    assert "dry run: nothing was created or changed" in out
    assert snapshot(aws) == before


def test_missing_cluster_fails_naming_it(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)
    assert provision(aws, "--yes", cluster_id="nosuchcluster") == 1
    err = capsys.readouterr().err
    assert "natfwd: error: ElastiCache cluster 'nosuchcluster' not found in us-east-1" in err
    assert "Traceback" not in err
    assert snapshot(aws) == before


def test_no_public_subnet_fails_clearly(aws: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    world = build_world(aws, public=False)
    memcached_cluster(aws, world)
    before = snapshot(aws)
    assert provision(aws, "--yes") == 1
    err = capsys.readouterr().err
    assert f"natfwd: error: VPC {world.vpc_id} of cluster 'mycluster' has no public subnet" in err
    assert snapshot(aws) == before


def test_destroy_leaves_the_account_as_it_was(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)
    assert provision(aws, "--yes") == 0
    assert snapshot(aws) != before
    capsys.readouterr()
    assert destroy(aws, "--yes") == 0
    out = capsys.readouterr().out
    assert "destroyed 4 resources for cluster 'mycluster'" in out
    assert snapshot(aws) == before
    # Running it again finds nothing and succeeds.
    assert destroy(aws, "--yes") == 0
    assert "nothing to destroy" in capsys.readouterr().out


def test_failure_halfway_rolls_back(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)
    # moto checks key pairs (the aws fixture turns that on), so RunInstances fails after the security group,
    # the cache rule and the Elastic IP exist.
    assert provision(aws, "--yes", "--key-name", "no-such-key") == 1
    err = capsys.readouterr().err
    assert "RunInstances failed" in err
    assert "rolled back what this run created: Elastic IP" in err
    assert snapshot(aws) == before


def test_existing_resources_for_another_cidr_conflict(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    memcached_cluster(aws, world)
    assert provision(aws, "--yes") == 0
    after = snapshot(aws)
    capsys.readouterr()
    assert provision(aws, "--yes", cidr="203.0.113.0/24") == 1
    err = capsys.readouterr().err
    assert f"already exists with trusted CIDR {TRUSTED}; run natfwd destroy --cluster-id mycluster first" in err
    assert snapshot(aws) == after


def test_no_ssh_and_redis_replication_group(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    names = redis_group(aws, world)
    assert provision(aws, "--yes", "--no-ssh", cluster_id="myredis") == 0
    out = capsys.readouterr().out
    (instance,) = live_instances(aws, "myredis")
    nat_group_id = instance["SecurityGroups"][0]["GroupId"]
    assert set(from_permissions(group(aws, nat_group_id)["IpPermissions"])) == {
        Rule.tcp(6379, TRUSTED),
        Rule.tcp(6380, TRUSTED),
        Rule.tcp(6381, TRUSTED),
    }
    cfg = embedded_config(user_data(aws, instance["InstanceId"]))
    assert cfg.engine == "redis"
    assert [(f.port, f.target.host) for f in cfg.forwards] == list(zip((6379, 6380, 6381), names, strict=True))
    eip = cfg.public_address
    for port in (6379, 6380, 6381):
        assert f"redis-cli -h {eip} -p {port}\n" in out


def test_kernel_mode(aws: Aws, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    redis_group(aws, world, "shards", cluster_mode=True)
    before = snapshot(aws)
    assert provision(aws, "--yes", "--mode", "kernel", cluster_id="shards") == 2
    assert "kernel DNAT cannot rewrite node addresses in Redis Cluster redirects" in capsys.readouterr().err
    assert snapshot(aws) == before

    memcached_cluster(aws, world)
    assert provision(aws, "--yes", "--mode", "kernel") == 0
    (instance,) = live_instances(aws)
    text = user_data(aws, instance["InstanceId"])
    assert "natfwd emit-iptables --config /etc/natfwd/kernel.yaml --save amazon-linux > /etc/natfwd/rules.sh" in text
    assert "natfwd.service" not in text
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["natfwd:mode"] == "kernel"


# -- the command line, end to end, in a subprocess ---------------------------------------------------------------


def test_cli_end_to_end(aws: Aws, world: World) -> None:
    memcached_cluster(aws, world, nodes=1)
    before = snapshot(aws)
    common = ["--cluster-id", "mycluster", "--region", REGION, "--endpoint-url", aws.url]
    done = natfwd_cli(aws, "provision", *common, "--trusted-cidr", TRUSTED, "--yes")
    assert done.returncode == 0, done.stderr
    assert "natfwd: associated" in done.stderr
    (address,) = aws.ec2.describe_addresses(Filters=tagged(aws))["Addresses"]
    assert f'Client(("{address["PublicIp"]}", 11211))' in done.stdout
    done = natfwd_cli(aws, "destroy", *common, "--yes")
    assert done.returncode == 0, done.stderr
    assert snapshot(aws) == before


def test_cli_without_yes_and_without_stdin_creates_nothing(aws: Aws, world: World) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)
    done = natfwd_cli(
        aws, "provision", "--cluster-id", "mycluster", "--trusted-cidr", TRUSTED, "--endpoint-url", aws.url
    )
    assert done.returncode == 1
    assert "natfwd provision plan" in done.stdout
    assert "no answer on standard input, so nothing was done; pass --yes to provision without asking" in done.stderr
    assert snapshot(aws) == before


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("198.51.100.300/32", "is not a CIDR"),
        ("198.51.100.27/24", "has host bits set; did you mean 198.51.100.0/24?"),
        ("0.0.0.0/0", "would let the whole internet reach the cache"),
        ("2001:db8::/64", "is IPv6"),
    ],
)
def test_cli_bad_cidr_exits_2(aws: Aws, world: World, cidr: str, message: str) -> None:
    memcached_cluster(aws, world)
    done = natfwd_cli(aws, "provision", "--cluster-id", "mycluster", "--trusted-cidr", cidr, "--endpoint-url", aws.url)
    assert done.returncode == 2
    assert done.stderr.startswith("natfwd: error: --trusted-cidr:")
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_without_credentials_exits_1_with_hint(aws: Aws, world: World) -> None:
    env = aws.cli_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        del env[name]
    done = natfwd_cli(aws, "destroy", "--cluster-id", "mycluster", "--endpoint-url", aws.url, "--yes", env=env)
    assert done.returncode == 1
    assert "no AWS credentials found" in done.stderr
    assert "pass --profile" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_unreachable_endpoint_exits_1_with_hint(aws: Aws) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{closed_port}"
    done = natfwd_cli(aws, "destroy", "--cluster-id", "mycluster", "--endpoint-url", url, "--yes")
    assert done.returncode == 1
    assert f"cannot reach {url}" in done.stderr
    assert "check --endpoint-url, --region and the network" in done.stderr


def test_cli_destroy_without_yes_and_without_stdin_removes_nothing(aws: Aws, world: World) -> None:
    memcached_cluster(aws, world)
    assert provision(aws, "--yes") == 0
    after = snapshot(aws)
    done = natfwd_cli(aws, "destroy", "--cluster-id", "mycluster", "--endpoint-url", aws.url)
    assert done.returncode == 1
    assert "natfwd destroy for cluster 'mycluster' in us-east-1 removes, in this order:" in done.stdout
    assert "pass --yes to destroy without asking" in done.stderr
    assert snapshot(aws) == after


def test_failed_rollback_names_the_destroy_command_that_finishes_it(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)

    def release_denied(self: AwsClient, allocation_id: str) -> None:
        raise AwsError(f"AWS ec2 ReleaseAddress was denied for {allocation_id}", "UnauthorizedOperation")

    with monkeypatch.context() as patch:
        patch.setattr(AwsClient, "release_address", release_denied)
        assert provision(aws, "--yes", "--key-name", "no-such-key") == 1
    err = capsys.readouterr().err
    command = f"natfwd destroy --cluster-id mycluster --region {REGION} --endpoint-url {aws.url}"
    assert "rolling back failed too (AWS ec2 ReleaseAddress was denied" in err
    assert err.rstrip().endswith(f"remove what is left with: {command}")
    assert snapshot(aws) != before
    assert cli.main(command.split()[1:] + ["--yes"]) == 0
    assert snapshot(aws) == before
