"""The NAT instance booted for real, without AWS: provision against moto, then run the user data moto stored in a
lab NAT namespace, which fetches natfwd from moto's S3 with the instance's credentials, checks its sha256,
installs it and starts natfwd.service (with `--mode kernel`, serve on the kernel data path: its own nftables
table, no static rules); a client in the lab reaches every node through the public address. Also: the rendered
cloud-config passes cloud-init's own schema."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from awskit import REGION, TRUSTED, Aws, build_world, memcached_cluster, node_name
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"
from imdskit import serving_imds
from labkit import ROOT_MARKS, memcached_client, running_lab
from moto.server import ThreadedMotoServer
from test_aws_userdata import SYSCTL_SETTINGS

from forwarder import cli, iptables, kernelpath, netns
from forwarder.aws import survey, userdata
from forwarder.aws.claim import IMDS_URL_ENV
from forwarder.aws.plan import ProvisionRequest, parse_trusted_cidrs
from forwarder.lab import CLIENT_ADDRESS, PUBLIC_ADDRESS, PUBLIC_INTERFACE, Lab

HERE = Path(__file__).resolve().parent
# The box's own interpreter and AWS CLI (Amazon Linux 2023 has both): the Python this venv was made from, and the
# real AWS CLI found on PATH.
BOX_PYTHON_BIN = Path(sys.base_prefix) / "bin"
AWS_CLI = shutil.which("aws")
# Package index the box's pip uses: this machine's local mirror (the lab has no way out, as it should).
LOCAL_INDEX = Path("/opt/pypi/simple")
BOOT_TIMEOUT_S = 900  # the box builds natfwd's C extensions; only stops a hang
F = TypeVar("F", bound=Callable[..., object])


def user_data(aws: Aws, instance_id: str) -> str:
    value = aws.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def only_instance(aws: Aws) -> dict[str, Any]:
    reservations = aws.ec2.describe_instances(Filters=[{"Name": "tag:natfwd:cluster-id", "Values": ["mycluster"]}])
    (instance,) = [i for r in reservations["Reservations"] for i in r["Instances"] if i["State"]["Name"] == "running"]
    return instance


@pytest.fixture
def moto_in_nat(lab: Lab) -> Iterator[str]:
    """A second listener of the same moto backends, on the NAT namespace's own loopback: the box's "AWS"."""
    with netns.entered(lab.nat):  # the server thread is born in the namespace, so it binds there
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def lab() -> Iterator[Lab]:
    with running_lab("memcached") as built:
        # Like the VPC's public subnet: a default route out of the public interface (to the client, in the lab).
        subprocess.run(
            ["ip", "-n", built.nat, "route", "add", "default", "via", CLIENT_ADDRESS, "dev", PUBLIC_INTERFACE],
            check=True,
        )
        yield built


def _stubs(root: Path) -> Path:
    stubs = root / "stubs"
    stubs.mkdir()
    for name, command in (("dnf", "record dnf"), ("yum", "record yum"), ("service", "record service")):
        (stubs / name).write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "bootkit.py"} {command} "$@"\n')
    (stubs / "systemctl").write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "bootkit.py"} systemctl "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return stubs


def boot(
    lab: Lab, root: Path, text: str, endpoint: str, hosts: dict[str, str], more_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the user data in the lab's NAT namespace, in a private mount namespace (see bootkit.py); `more_env` is
    added to the box's environment."""
    (root / "user-data").write_text(text)
    (root / "hosts").write_text(
        "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for name, address in hosts.items())
    )
    stubs = _stubs(root)
    env = {
        "PATH": f"{stubs}:{BOX_PYTHON_BIN}:{Path(str(AWS_CLI)).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "BOOTKIT_ROOT": str(root),
        # The instance role, as far as the box can tell: credentials for moto, and moto as AWS.
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/natfwd-test-aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/natfwd-test-aws-credentials",
        "PIP_INDEX_URL": LOCAL_INDEX.as_uri(),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "5",
    }
    env.update(more_env or {})
    for name in ("PIP_FIND_LINKS", "PIP_CERT", "PYENV_ROOT", "PYENV_VERSION"):
        if name in os.environ:
            env[name] = os.environ[name]
    argv = ["ip", "netns", "exec", lab.nat, "unshare", "--mount", "--propagation", "private", "--"]
    argv += [sys.executable, str(HERE / "bootkit.py"), "box"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S)


def nft_tables(lab: Lab) -> list[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", lab.nat, "nft", "list", "tables"], capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def nat_sysctl(lab: Lab) -> dict[str, str]:
    """The NAT namespace's values of the keys the box's sysctl drop-in sets (both are per network namespace)."""
    values = {}
    for key in SYSCTL_SETTINGS:
        done = subprocess.run(
            ["ip", "netns", "exec", lab.nat, "sysctl", "-n", key], capture_output=True, text=True, check=True
        )
        values[key] = " ".join(done.stdout.split())
    return values


def _kill_service(root: Path) -> None:
    pid_file = root / "service.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


BOOT_MARKS = [
    pytest.mark.skipif(not LOCAL_INDEX.is_dir(), reason=f"needs a local package index at {LOCAL_INDEX}"),
    pytest.mark.skipif(AWS_CLI is None, reason="needs the AWS CLI (aws) for the box"),
    pytest.mark.skipif(not (BOX_PYTHON_BIN / "python3.11").exists(), reason="needs python3.11 for the box"),
]


def booted(test: F) -> F:
    """Mark a test that boots the user data in the lab: root, namespaces, and the box's tools."""
    for mark in (*ROOT_MARKS, *BOOT_MARKS):
        test = mark(test)
    return test


@booted
@pytest.mark.long
@pytest.mark.parametrize("mode", ["userspace", "kernel"])
def test_the_provisioned_instance_boots_and_serves_in_the_lab(
    aws: Aws, lab: Lab, moto_in_nat: str, tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    world = build_world(aws)
    names = memcached_cluster(aws, world)
    assert cli.main(["provision", "--cluster-id", "mycluster", "--trusted-cidr", TRUSTED, "--yes", "--mode", mode,
                     "--endpoint-url", aws.url, "--region", REGION]) == 0  # fmt: skip
    capsys.readouterr()
    text = user_data(aws, only_instance(aws)["InstanceId"])
    hosts = {name: node.address for name, node in zip(names, lab.nodes, strict=True)}
    root = tmp_path / "box"
    root.mkdir()
    if mode == "kernel":
        # Off, as on a fresh instance: the drop-in's ExecStartPre must turn it on (natfwd itself cannot, with
        # /proc/sys read-only under ProtectKernelTunables).
        subprocess.run(["ip", "netns", "exec", lab.nat, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)
    # The kernel's defaults, as on a fresh instance: the bootstrap applies the drop-in cloud-init wrote.
    assert all(value != SYSCTL_SETTINGS[key] for key, value in nat_sysctl(lab).items())
    try:
        done = boot(lab, root, text, moto_in_nat, hosts)
        service_log = (root / "service.log").read_text() if (root / "service.log").exists() else ""
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:] + service_log[-3000:]
        assert nat_sysctl(lab) == SYSCTL_SETTINGS
        assert "natfwd: could not apply" not in done.stderr
        commands = (root / "commands.log").read_text().splitlines()
        # cloud-init's packages step went through dnf; the box's pip installed from moto's S3, checked first.
        assert commands[0].startswith("dnf install -y python3.11 python3.11-pip")
        assert "sha256sum: WARNING" not in done.stderr
        # Both modes run the same unit; kernel mode adds its drop-in, whose ExecStartPre ran before natfwd.
        assert "systemctl daemon-reload" in commands and "systemctl enable --now natfwd.service" in commands
        assert "notify READY=1 STATUS=serving" in commands
        tables = nft_tables(lab)
        if mode == "userspace":
            assert commands[0] == "dnf install -y python3.11 python3.11-pip gcc python3.11-devel"
            assert not any(c.startswith("ExecStartPre") for c in commands)
            assert tables == []
        else:
            assert commands[0] == "dnf install -y python3.11 python3.11-pip nftables conntrack-tools"
            assert "ExecStartPre +/usr/sbin/sysctl -qw net.ipv4.ip_forward=1 exit=0" in commands
            # serve's own table, and no static rules: no emit-iptables `ip natfwd` table, no iptables nat table.
            assert tables == ["table inet natfwd_serve"]
            assert not any("iptables" in c for c in commands)
        # Nothing reached this host's own files.
        assert not Path("/opt/natfwd").exists() and not Path("/etc/natfwd").exists()

        # A client in the client namespace reaches every node through the public address; each port is its node.
        for index, node in enumerate(lab.nodes):
            with memcached_client(PUBLIC_ADDRESS, node.public_port, lab.client) as client:
                client.set(f"boot-{mode}", f"node{index}")
        for index, node in enumerate(lab.nodes):
            with memcached_client(PUBLIC_ADDRESS, node.public_port, lab.client) as client:
                assert client.get(f"boot-{mode}") == f"node{index}".encode()
        if mode == "kernel":
            # The kernel translated them: serve's DNAT counters moved, one per connection above, per port.
            listed = subprocess.run(
                ["ip", "netns", "exec", lab.nat, "nft", "-j", "list", "counters", "table", "inet", "natfwd_serve"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            counters = kernelpath.parse_counters(listed)
            for node in lab.nodes:
                assert counters[iptables.counter_name(node.public_port, "accepted")][0] == 2, counters
    finally:
        _kill_service(root)
    # The artefact it installed is the one provision stored: fetched with the instance's credentials.
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name=REGION)
    (bucket,) = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 1
    assert node_name("mycluster", 1) in text


@booted
def test_a_tampered_artefact_is_not_installed(
    aws: Aws, lab: Lab, moto_in_nat: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = build_world(aws)
    names = memcached_cluster(aws, world)
    assert cli.main(["provision", "--cluster-id", "mycluster", "--trusted-cidr", TRUSTED, "--yes",
                     "--endpoint-url", aws.url, "--region", REGION]) == 0  # fmt: skip
    capsys.readouterr()
    text = user_data(aws, only_instance(aws)["InstanceId"])
    s3 = boto3.client("s3", endpoint_url=aws.url, region_name=REGION)
    (bucket,) = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    (key,) = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    s3.put_object(Bucket=bucket, Key=key, Body=b"not what provision built")
    root = tmp_path / "box"
    root.mkdir()
    try:
        done = boot(lab, root, text, moto_in_nat, {name: n.address for name, n in zip(names, lab.nodes, strict=True)})
    finally:
        _kill_service(root)
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr  # sha256sum --check
    assert not any(line.startswith("systemctl") for line in (root / "commands.log").read_text().splitlines())
    assert not (root / "service.pid").exists()


@booted
@pytest.mark.long
def test_an_ha_instance_boots_claims_the_address_and_serves_in_the_lab(
    aws: Aws, lab: Lab, moto_in_nat: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ha's user data: the box takes the Elastic IP from the instance holding it (through IMDSv2 and moto), then
    starts natfwd and its health timer. provision (single) made the bucket, the artefact and that other instance."""
    world = build_world(aws, public_zones=("us-east-1b", "us-east-1c"))
    names = memcached_cluster(aws, world)
    assert cli.main(["provision", "--cluster-id", "mycluster", "--trusted-cidr", TRUSTED, "--yes",
                     "--endpoint-url", aws.url, "--region", REGION]) == 0  # fmt: skip
    capsys.readouterr()
    predecessor = only_instance(aws)
    (eip,) = aws.ec2.describe_addresses(Filters=[{"Name": "tag:natfwd:cluster-id", "Values": ["mycluster"]}])[
        "Addresses"
    ]
    assert eip["InstanceId"] == predecessor["InstanceId"]
    request = ProvisionRequest(cluster_id="mycluster", trusted_cidrs=parse_trusted_cidrs([TRUSTED]), ha=True)
    plan = survey.prepare(aws.client, request)
    text = userdata.render(plan, PUBLIC_ADDRESS, eip["AllocationId"])
    successor = aws.ec2.run_instances(
        ImageId=predecessor["ImageId"], InstanceType="t4g.micro", MinCount=1, MaxCount=1,
        SubnetId=world.public_subnet_ids[1],
    )["Instances"][0]["InstanceId"]  # fmt: skip
    root = tmp_path / "box"
    root.mkdir()
    hosts = {name: node.address for name, node in zip(names, lab.nodes, strict=True)}
    try:
        with serving_imds(lab.nat) as imds:
            imds.instance_id = successor
            done = boot(lab, root, text, moto_in_nat, hosts, {IMDS_URL_ENV: imds.url})
        service_log = (root / "service.log").read_text() if (root / "service.log").exists() else ""
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:] + service_log[-3000:]
        assert nat_sysctl(lab) == SYSCTL_SETTINGS
        claimed = (
            f"claimed {eip['PublicIp']} ({eip['AllocationId']}) for {successor} (was on {predecessor['InstanceId']})"
        )
        assert claimed in done.stdout.splitlines()
        assert ("GET", "/latest/meta-data/instance-id", 200) in imds.requests
        (moved,) = aws.ec2.describe_addresses(AllocationIds=[eip["AllocationId"]])["Addresses"]
        assert moved["InstanceId"] == successor
        commands = (root / "commands.log").read_text().splitlines()
        started = commands.index("systemctl enable --now natfwd.service")
        assert commands[started + 1 :].count("systemctl enable --now natfwd-health.timer") == 1
        assert "notify READY=1 STATUS=serving" in commands
        for index, node in enumerate(lab.nodes):
            with memcached_client(PUBLIC_ADDRESS, node.public_port, lab.client) as client:
                client.set("boot-ha", f"node{index}")
                assert client.get("boot-ha") == f"node{index}".encode()
    finally:
        _kill_service(root)


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="needs cloud-init (Debian package cloud-init)")
@pytest.mark.parametrize("mode", ["userspace", "kernel"])
def test_user_data_passes_cloud_init_schema(tmp_path: Path, mode: str) -> None:
    from awskit import EXAMPLE_PUBLIC_IP, example_plan

    from forwarder.aws import userdata

    path = tmp_path / "user-data"
    path.write_text(userdata.render(example_plan(mode), EXAMPLE_PUBLIC_IP))
    done = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Valid cloud-config:")
    # The schema really is checked: a wrong type fails it.
    path.write_text(path.read_text().replace("runcmd:\n", "runcmd: 7\nbogus:\n", 1))
    done = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
