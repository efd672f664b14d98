"""natfwd provision/destroy against a real moto server: what gets created, idempotency, rollback, exit codes."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
from typing import Any

import boto3
import pytest
import yaml
from awskit import (
    ACCOUNT,
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
from conftest import free_port

from forwarder import cli, config
from forwarder.aws.client import AwsClient, AwsError
from forwarder.aws.plan import ami_parameter
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


def aws_client(aws: Aws, service: str) -> Any:
    return boto3.client(service, endpoint_url=aws.url, region_name=REGION)


def stored_artefact(aws: Aws, text: str) -> tuple[str, str, str]:
    """(bucket, key, sha256) of the natfwd the user data fetches and checks."""
    fetched = re.search(r"aws s3 cp --only-show-errors --region \S+ s3://([^/]+)/(\S+) ", text)
    checked = re.search(r'echo "([0-9a-f]{64})  ', text)
    assert fetched is not None and checked is not None
    return fetched.group(1), fetched.group(2), checked.group(1)


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
    # Graviton by default, so the arm64 AMI.
    ami = aws.client.parameter(ami_parameter("arm64"))
    assert instance["ImageId"] == ami
    assert instance["InstanceType"] == "t4g.micro"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["IamInstanceProfile"]["Arn"].endswith(":instance-profile/natfwd-mycluster")
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
    }  # no key pair, so no port 22
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
    assert "pip install" in text and "natfwd==" not in text

    # The artefact: this natfwd's sdist in a private, encrypted, tagged bucket; the user data names its sha256.
    bucket, key, sha256 = stored_artefact(aws, text)
    assert bucket == f"natfwd-{ACCOUNT}-{REGION}-mycluster"
    s3 = aws_client(aws, "s3")
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256
    with tarfile.open(fileobj=io.BytesIO(body)) as sdist:
        names_in = set(sdist.getnames())
    assert {"natfwd-0.1.0/pyproject.toml", "natfwd-0.1.0/forwarder/cli.py", "natfwd-0.1.0/forwarder/_crelay.c"} <= (
        names_in
    )
    assert all(not name.endswith((".so", ".pyc")) for name in names_in)
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    encryption = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    bucket_tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    assert bucket_tags["natfwd:cluster-id"] == "mycluster"

    # The instance role: SSM Session Manager, the discovery reads and s3:GetObject on that one object only.
    iam = aws_client(aws, "iam")
    attached = iam.list_attached_role_policies(RoleName="natfwd-mycluster")["AttachedPolicies"]
    assert [a["PolicyArn"] for a in attached] == ["arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"]
    document = iam.get_role_policy(RoleName="natfwd-mycluster", PolicyName="natfwd")["PolicyDocument"]
    statements = {st["Sid"]: st for st in document["Statement"]}
    assert statements["NatfwdArtefact"]["Action"] == "s3:GetObject"
    assert statements["NatfwdArtefact"]["Resource"] == f"arn:aws:s3:::{bucket}/{key}"
    assert statements["NatfwdDiscovery"]["Action"] == [
        "elasticache:DescribeCacheClusters",
        "elasticache:DescribeReplicationGroups",
    ]
    trust = iam.get_role(RoleName="natfwd-mycluster")["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert f"aws ssm start-session --target {instance['InstanceId']} --region {REGION}" in out

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
    assert "destroyed 7 resources for cluster 'mycluster'" in out
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
    assert "rolled back what this run created: instance" not in err
    assert re.search(r"rolled back what this run created: .*Elastic IP .*S3 bucket .*IAM role natfwd-mycluster", err)
    assert snapshot(aws) == before


def test_a_client_change_converges_in_place_under_the_same_elastic_ip(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    memcached_cluster(aws, world)
    assert provision(aws, "--yes") == 0
    (old,) = live_instances(aws)
    (address,) = aws.ec2.describe_addresses(Filters=tagged(aws))["Addresses"]
    nat_group_id = old["SecurityGroups"][0]["GroupId"]
    objects_before = aws_client(aws, "s3").list_objects_v2(Bucket=f"natfwd-{ACCOUNT}-{REGION}-mycluster")["KeyCount"]
    capsys.readouterr()

    # Two clients now (one of them IPv6), and a bigger instance: the plan shows + and -, then applies them.
    assert provision(aws, "--yes", "--trusted-cidr", "2001:db8::/64", cidr="203.0.113.0/24") == 0
    out = capsys.readouterr().out
    print(out)  # the plan of a CIDR change, for the record
    assert "  + inbound   tcp 11211 from 203.0.113.0/24" in out
    assert "  + inbound   tcp 11211 from 2001:db8::/64" in out
    assert f"  - inbound   tcp 11211 from {TRUSTED}" in out
    assert f"replace instance {old['InstanceId']} with a new t4g.micro instance" in out
    assert f"    - - {TRUSTED}" in out and "    + - 203.0.113.0/24" in out and "    + - 2001:db8::/64" in out

    # The Elastic IP stayed, and moved to the new instance; the old one is terminated; the group was kept.
    (new,) = live_instances(aws)
    assert new["InstanceId"] != old["InstanceId"]
    (moved,) = aws.ec2.describe_addresses(Filters=tagged(aws))["Addresses"]
    assert (moved["AllocationId"], moved["PublicIp"]) == (address["AllocationId"], address["PublicIp"])
    assert moved["InstanceId"] == new["InstanceId"]
    assert new["SecurityGroups"][0]["GroupId"] == nat_group_id
    assert set(from_permissions(group(aws, nat_group_id)["IpPermissions"])) == {
        Rule.tcp(port, cidr) for port in (11211, 11212, 11213) for cidr in ("203.0.113.0/24", "2001:db8::/64")
    }
    cfg = embedded_config(user_data(aws, new["InstanceId"]))
    assert [str(n) for n in cfg.allowed_clients] == ["203.0.113.0/24", "2001:db8::/64"]
    assert cfg.public_address == address["PublicIp"]
    assert aws_client(aws, "s3").list_objects_v2(Bucket=f"natfwd-{ACCOUNT}-{REGION}-mycluster")["KeyCount"] == (
        objects_before
    )

    # Another instance type replaces it again; the same request once more changes nothing.
    assert provision(aws, "--yes", "--instance-type", "t3.micro", cidr="203.0.113.0/24") == 0
    out = capsys.readouterr().out
    assert "  - instance type t4g.micro" in out and "  + instance type t3.micro" in out
    (third,) = live_instances(aws)
    assert third["InstanceType"] == "t3.micro"
    assert third["ImageId"] == aws.client.parameter(ami_parameter("x86_64"))
    after = snapshot(aws)
    assert provision(aws, "--instance-type", "t3.micro", cidr="203.0.113.0/24") == 0
    assert "everything already exists; nothing to change" in capsys.readouterr().out
    assert snapshot(aws) == after


def test_a_forced_architecture_mismatch_exits_2(aws: Aws, world: World) -> None:
    memcached_cluster(aws, world)
    before = snapshot(aws)
    common = ["--cluster-id", "mycluster", "--trusted-cidr", TRUSTED, "--endpoint-url", aws.url]
    done = natfwd_cli(aws, "provision", *common, "--instance-type", "t3.micro", "--architecture", "arm64")
    assert done.returncode == 2
    assert done.stderr == (
        "natfwd: error: --architecture arm64: t3.micro runs x86_64 only; pick an instance type of that architecture "
        "(t4g.micro) or drop --architecture\n"
    )
    done = natfwd_cli(aws, "provision", *common, "--instance-type", "t9z.nano", "--yes")
    assert done.returncode == 2
    assert "--instance-type: 't9z.nano' is not an EC2 instance type in us-east-1" in done.stderr
    assert snapshot(aws) == before


def test_ssh_with_a_key_pair_and_redis_replication_group(
    aws: Aws, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    names = redis_group(aws, world)
    aws.ec2.create_key_pair(KeyName="mykey")
    assert provision(aws, "--yes", "--key-name", "mykey", cluster_id="myredis") == 0
    out = capsys.readouterr().out
    (instance,) = live_instances(aws, "myredis")
    nat_group_id = instance["SecurityGroups"][0]["GroupId"]
    assert set(from_permissions(group(aws, nat_group_id)["IpPermissions"])) == {
        Rule.tcp(6379, TRUSTED),
        Rule.tcp(6380, TRUSTED),
        Rule.tcp(6381, TRUSTED),
        Rule.tcp(22, TRUSTED),
    }
    assert instance["KeyName"] == "mykey"
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
    # serve on the kernel path, under the same unit plus the drop-in that grants CAP_NET_ADMIN; no static rules.
    assert "\n      data_path: kernel\n" in text
    assert "  - path: /etc/systemd/system/natfwd.service.d/kernel-path.conf\n" in text
    assert "systemctl enable --now natfwd.service\n" in text
    assert "emit-iptables" not in text
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
        ("::/0", "would let the whole internet reach the cache"),
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
    closed_port = free_port()
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
