"""natfwd claim-address against a real moto server: an explicit instance, this instance through an IMDSv2 stand-in,
idempotence, the failover of an Auto Scaling group of one, and the errors; AWS's throttling is retried. Then the
box's side, run for real: the --ha bootstrap claims the address before natfwd starts, and natfwd-health reports a
dead natfwd (not a dead cache node) to the group through the real AWS CLI."""

from __future__ import annotations

import dataclasses
import http.server
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from awskit import EXAMPLE_PUBLIC_IP, REGION, REPO, Aws, build_world, example_plan, natfwd_cli
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"
from conftest import free_port, free_ports, wait_port, write_config
from imdskit import Imds, running, serving_imds
from labkit import root, unique_name

from forwarder.aws import userdata
from forwarder.aws.claim import IMDS_URL_ENV
from forwarder.aws.plan import Plan, PortForward

REPLACEMENT_TIMEOUT_S = 60.0  # only stops a hang: moto launches the replacement at once


@pytest.fixture
def imds() -> Iterator[Imds]:
    with serving_imds() as state:
        yield state


def test_the_imds_stand_in_refuses_imdsv1(imds: Imds) -> None:
    """A GET without a token is refused, so the tests below prove claim-address speaks IMDSv2."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{imds.url}/latest/meta-data/instance-id", timeout=10)
    refused.value.close()
    assert refused.value.code == 401


# -- moto ------------------------------------------------------------------------------------------------------


def image_id(aws: Aws) -> str:
    found: str = aws.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return found


def instance(aws: Aws, subnet_id: str) -> str:
    created = aws.ec2.run_instances(
        ImageId=image_id(aws), InstanceType="t4g.micro", MinCount=1, MaxCount=1, SubnetId=subnet_id
    )
    instance_id: str = created["Instances"][0]["InstanceId"]
    return instance_id


def address(aws: Aws) -> tuple[str, str]:
    """A new Elastic IP tagged for the cluster: its allocation id and public IP."""
    allocated = aws.ec2.allocate_address(
        Domain="vpc",
        TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": [{"Key": "natfwd:cluster-id", "Value": "c"}]}],
    )
    return allocated["AllocationId"], allocated["PublicIp"]


def holder(aws: Aws, allocation_id: str) -> tuple[str | None, str | None]:
    """The instance holding the address, and its association id."""
    (found,) = aws.ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"]
    return found.get("InstanceId") or None, found.get("AssociationId") or None


def claim(aws: Aws, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = natfwd_cli(aws, "claim-address", "--endpoint-url", aws.url, *args, env=env)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def subnet(aws: Aws) -> str:
    world = build_world(aws)
    assert world.public_subnet_id is not None
    return world.public_subnet_id


def test_claim_with_an_explicit_instance(aws: Aws, subnet: str) -> None:
    instance_id = instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    assert holder(aws, allocation_id) == (None, None)
    code, out, err = claim(aws, "--allocation-id", allocation_id, "--instance-id", instance_id)
    assert (code, err) == (0, "")
    assert out == f"claimed {public_ip} ({allocation_id}) for {instance_id} (was not associated)\n"
    assert holder(aws, allocation_id)[0] == instance_id


def test_claim_for_this_instance_through_imdsv2(aws: Aws, subnet: str, imds: Imds) -> None:
    imds.instance_id = instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    env = aws.cli_env()
    env[IMDS_URL_ENV] = imds.url
    del env["AWS_DEFAULT_REGION"]  # the region too comes from the instance's metadata
    code, out, err = claim(aws, "--allocation-id", allocation_id, env=env)
    assert (code, err) == (0, "")
    assert out == f"claimed {public_ip} ({allocation_id}) for {imds.instance_id} (was not associated)\n"
    assert holder(aws, allocation_id)[0] == imds.instance_id
    # One token, then GETs that presented it: every answer was a 200.
    assert imds.requests == [
        ("PUT", "/latest/api/token", 200),
        ("GET", "/latest/meta-data/placement/region", 200),
        ("GET", "/latest/meta-data/instance-id", 200),
    ]


def test_a_second_claim_changes_nothing(aws: Aws, subnet: str) -> None:
    instance_id = instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    assert claim(aws, "--allocation-id", allocation_id, "--instance-id", instance_id)[0] == 0
    before = holder(aws, allocation_id)
    code, out, err = claim(aws, "--allocation-id", allocation_id, "--instance-id", instance_id)
    assert (code, err) == (0, "")
    assert out == f"already claimed: {public_ip} ({allocation_id}) is on {instance_id}; nothing changed\n"
    # The same association: no AssociateAddress was made (it would have made a new association id).
    assert holder(aws, allocation_id) == before


@dataclass
class Group:
    """An Auto Scaling group of one in moto, made with boto3 directly (as provision --ha would make it)."""

    autoscaling: Any
    name: str = "natfwd-c"

    def members(self) -> list[str]:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.name])
        return [i["InstanceId"] for i in groups["AutoScalingGroups"][0]["Instances"]]

    def health(self, instance_id: str) -> str:
        found = self.autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id])
        status: str = found["AutoScalingInstances"][0]["HealthStatus"]
        return status


def group_of_one(aws: Aws) -> Group:
    world = build_world(aws, public_zones=("us-east-1b", "us-east-1c"))
    group = Group(boto3.client("autoscaling", endpoint_url=aws.url, region_name=REGION))
    template = aws.ec2.create_launch_template(
        LaunchTemplateName=group.name, LaunchTemplateData={"ImageId": image_id(aws), "InstanceType": "t4g.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    group.autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=group.name,
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"},
        MinSize=1,
        MaxSize=1,
        DesiredCapacity=1,
        VPCZoneIdentifier=",".join(world.public_subnet_ids),
    )
    return group


def test_a_replacement_takes_the_address_from_its_dead_predecessor(aws: Aws) -> None:
    group = group_of_one(aws)
    autoscaling, members = group.autoscaling, group.members
    (first,) = members()
    allocation_id, public_ip = address(aws)
    code, out, _ = claim(aws, "--allocation-id", allocation_id, "--instance-id", first)
    assert code == 0 and holder(aws, allocation_id)[0] == first

    autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=first, ShouldDecrementDesiredCapacity=False)
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT_S
    while (current := members()) in ([], [first]):
        assert time.monotonic() < deadline, "moto launched no replacement"
        time.sleep(0.2)
    (replacement,) = current
    assert replacement != first
    state = aws.ec2.describe_instances(InstanceIds=[first])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")

    was_on = holder(aws, allocation_id)[0]
    assert was_on in (first, None)  # AWS drops a terminated instance's association; moto may keep showing it
    code, out, err = claim(aws, "--allocation-id", allocation_id, "--instance-id", replacement)
    assert (code, err) == (0, "")
    was = f"was on {was_on}" if was_on else "was not associated"
    assert out == f"claimed {public_ip} ({allocation_id}) for {replacement} ({was})\n"
    assert holder(aws, allocation_id)[0] == replacement


def test_a_live_holder_loses_the_address(aws: Aws, subnet: str) -> None:
    """AllowReassociation: the address moves even from a running instance (a predecessor that is not quite dead)."""
    old, new = instance(aws, subnet), instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    assert claim(aws, "--allocation-id", allocation_id, "--instance-id", old)[0] == 0
    code, out, err = claim(aws, "--allocation-id", allocation_id, "--instance-id", new)
    assert (code, err) == (0, "")
    assert out == f"claimed {public_ip} ({allocation_id}) for {new} (was on {old})\n"
    assert holder(aws, allocation_id)[0] == new


# -- errors: one line, no traceback ----------------------------------------------------------------------------


def test_an_unknown_allocation_id_is_one_clear_line(aws: Aws, subnet: str) -> None:
    instance_id = instance(aws, subnet)
    code, out, err = claim(aws, "--allocation-id", "eipalloc-0123456789abcdef0", "--instance-id", instance_id)
    assert (code, out) == (1, "")
    assert err == (
        "natfwd: error: no Elastic IP with allocation id eipalloc-0123456789abcdef0 in us-east-1; "
        "check --allocation-id and --region\n"
    )


def test_an_unknown_instance_is_one_clear_line(aws: Aws, subnet: str) -> None:
    allocation_id, _ = address(aws)
    code, out, err = claim(aws, "--allocation-id", allocation_id, "--instance-id", "i-0123456789abcdef0")
    assert (code, out) == (1, "")
    assert err == "natfwd: error: instance i-0123456789abcdef0 not found in us-east-1; check --instance-id\n"
    assert holder(aws, allocation_id) == (None, None)


def test_debug_shows_the_traceback(aws: Aws, subnet: str) -> None:
    code, _, err = claim(aws, "--allocation-id", "eipalloc-0123456789abcdef0", "--instance-id", "i-0123456789abcdef0",
                         "--debug")  # fmt: skip
    assert code == 1 and "Traceback" in err and "InvalidAllocationID.NotFound" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allocation-id", "203.0.113.73"], "--allocation-id: '203.0.113.73' is not an Elastic IP allocation id"),
        (
            ["--allocation-id", "eipalloc-0123456789abcdef0", "--instance-id", "mybox"],
            "--instance-id: 'mybox' is not an EC2 instance id",
        ),
        ([], "the following arguments are required: --allocation-id"),
    ],
)
def test_usage_errors_exit_2(aws: Aws, args: list[str], message: str) -> None:
    code, out, err = claim(aws, *args)
    assert (code, out) == (2, "")
    assert f"natfwd: error: {message}" in err and "Traceback" not in err


def test_without_imds_or_instance_id_it_says_what_to_pass(aws: Aws, imds: Imds) -> None:
    env = aws.cli_env()
    env[IMDS_URL_ENV] = imds.url.rsplit(":", 1)[0] + ":9"  # the discard port: nothing listens
    code, out, err = claim(aws, "--allocation-id", "eipalloc-0123456789abcdef0", env=env)
    assert (code, out) == (1, "")
    (line,) = err.splitlines()
    assert line.startswith("natfwd: error: cannot read a session token from the instance metadata service")
    assert line.endswith("run this on an EC2 instance with IMDS enabled, or pass --instance-id and --region")


# -- an AWS that answers with errors: access denied, and throttling that passes --------------------------------


@dataclass
class Front:
    """A stand-in EC2 endpoint: answers the first `errors` requests with `code`, then hands requests to moto."""

    url: str
    code: str = "RequestLimitExceeded"
    status: int = 503
    errors: int = 0
    seen: int = 0
    actions: list[str] = field(default_factory=list)  # the EC2 API operations that reached moto


@pytest.fixture
def front(aws: Aws) -> Iterator[Front]:
    import urllib.parse
    import urllib.request

    state: Front

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.seen += 1
            if state.seen <= state.errors:
                data = (
                    f"<Response><Errors><Error><Code>{state.code}</Code><Message>no\nluck</Message></Error></Errors>"
                    "<RequestID>x</RequestID></Response>"
                ).encode()
                status = state.status
            else:
                state.actions += urllib.parse.parse_qs(body.decode())["Action"]
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(aws.url + self.path, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=30) as answer:
                    data, status = answer.read(), answer.status
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Front(f"http://127.0.0.1:{server.server_address[1]}")
    with running(server):
        yield state


def test_throttling_is_retried(aws: Aws, subnet: str, front: Front) -> None:
    instance_id = instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    front.errors = 2
    done = natfwd_cli(aws, "claim-address", "--endpoint-url", front.url, "--allocation-id", allocation_id,
                      "--instance-id", instance_id)  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith(f"claimed {public_ip}")
    assert front.seen == 4  # two throttled, then DescribeAddresses and AssociateAddress
    assert holder(aws, allocation_id)[0] == instance_id


def test_access_denied_is_one_clear_line(aws: Aws, subnet: str, front: Front) -> None:
    instance_id = instance(aws, subnet)
    allocation_id, _ = address(aws)
    front.errors, front.code, front.status = 1000, "UnauthorizedOperation", 403
    done = natfwd_cli(aws, "claim-address", "--endpoint-url", front.url, "--allocation-id", allocation_id,
                      "--instance-id", instance_id)  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "natfwd: error: AWS ec2 DescribeAddresses was denied (UnauthorizedOperation); the instance role needs "
        f"ec2:DescribeAddresses and ec2:AssociateAddress on {allocation_id} (allowed for addresses tagged "
        "natfwd:cluster-id)\n"
    )
    assert front.seen == 1  # a denial is not retried
    assert holder(aws, allocation_id) == (None, None)


# -- the box: the --ha bootstrap and natfwd-health, run for real against moto and the IMDSv2 stand-in ---------------

AWS_CLI = shutil.which("aws")
IP = shutil.which("ip") or "/usr/sbin/ip"


def ha_plan(ports: list[int]) -> Plan:
    plan = example_plan()
    forwards = tuple(PortForward(port, plan.forwards[0].node) for port in ports)
    return dataclasses.replace(plan, request=dataclasses.replace(plan.request, ha=True), forwards=forwards)


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@dataclass
class Box:
    """Stand-ins for the box's tools in `root`/bin: `ip` reports ens5; `systemctl` logs its arguments to
    systemctl.log and answers `is-active` by whether the pid in natfwd.pid is alive; `natfwd` runs this checkout
    (except `check`, which would probe the cache). `aws`, `curl` and `ss` are the real ones."""

    root: Path
    env: dict[str, str]

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=self.env, timeout=300)

    def systemctl(self) -> list[str]:
        log = self.root / "systemctl.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def box(aws: Aws, imds: Imds, tmp_path: Path) -> Box:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "ip", "#!/bin/sh\necho 'default via 10.0.0.1 dev ens5 proto dhcp src 10.0.0.10 metric 512'\n")
    _executable(
        bin_dir / "systemctl",
        f'#!/bin/sh\necho "$@" >> {tmp_path}/systemctl.log\n'
        f'[ "$1" != is-active ] || kill -0 "$(cat {tmp_path}/natfwd.pid 2>/dev/null)" 2>/dev/null\n',
    )
    _executable(
        bin_dir / "natfwd",
        f'#!/bin/sh\n[ "$1" = check ] && exit 1\nPYTHONPATH={REPO} exec {sys.executable} -m forwarder "$@"\n',
    )
    env = aws.cli_env()
    # The instance role as far as the box can tell: boto3 and the AWS CLI both take moto as AWS.
    env.update({"AWS_ENDPOINT_URL": aws.url, IMDS_URL_ENV: imds.url})
    env["PATH"] = os.pathsep.join(filter(None, [str(bin_dir), os.path.dirname(AWS_CLI or ""), env["PATH"]]))
    (tmp_path / "etc").mkdir()
    return Box(tmp_path, env)


def bootstrap(box: Box, plan: Plan, allocation_id: str) -> str:
    """The --ha bootstrap from the interface step on (the venv and pip steps need the network), on box paths."""
    (box.root / "etc" / "natfwd.yaml").write_text(userdata.render_config(plan, EXAMPLE_PUBLIC_IP))
    script = userdata.render_bootstrap(plan, allocation_id)
    body = script[script.index("iface=") :]
    body = body.replace("/opt/natfwd/bin/natfwd", str(box.root / "bin" / "natfwd"))
    return "set -eu\n" + body.replace("/etc/natfwd/", f"{box.root}/etc/")


def test_the_ha_bootstrap_claims_the_address_then_starts_natfwd(aws: Aws, subnet: str, imds: Imds, box: Box) -> None:
    imds.instance_id = instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    done = box.run(bootstrap(box, ha_plan([11211, 11212, 11213]), allocation_id))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"claimed {public_ip} ({allocation_id}) for {imds.instance_id} (was not associated)\n"
    assert holder(aws, allocation_id)[0] == imds.instance_id
    assert box.systemctl() == ["daemon-reload", "enable --now natfwd.service", "enable --now natfwd-health.timer"]
    assert ("GET", "/latest/meta-data/instance-id", 200) in imds.requests


def test_an_ha_box_that_cannot_claim_gives_up_and_leaves_it_to_the_health_check(
    aws: Aws, subnet: str, imds: Imds, box: Box
) -> None:
    imds.instance_id = instance(aws, subnet)
    script = bootstrap(box, ha_plan([11211]), "eipalloc-0123456789abcdef0")
    # Two tries, no pause, instead of 30 tries 10 s apart.
    tries, pause = f"-ge {userdata.CLAIM_ATTEMPTS} ]", f"sleep {userdata.CLAIM_PAUSE_S}\n"
    assert script.count(tries) == 1 and script.count(pause) == 1
    done = box.run(script.replace(tries, "-ge 2 ]").replace(pause, "sleep 0\n"))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    unknown = "natfwd: error: no Elastic IP with allocation id eipalloc-0123456789abcdef0 in us-east-1; check"
    assert sum(line.startswith(unknown) for line in lines) == 2, done.stderr
    assert lines[-1] == "natfwd: could not claim the Elastic IP; natfwd-health will report this instance unhealthy"
    # natfwd never started; the health check did, and it will find natfwd down.
    assert box.systemctl() == ["daemon-reload", "enable --now natfwd-health.timer"]


@pytest.mark.skipif(AWS_CLI is None, reason="needs the AWS CLI (aws), as on Amazon Linux")
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (Debian package iproute2)")
def test_health_reports_a_dead_natfwd_and_not_a_dead_cache_node(aws: Aws, imds: Imds, box: Box) -> None:
    group = group_of_one(aws)
    (imds.instance_id,) = group.members()
    ports = free_ports(2)
    state = box.root / "failures"
    script = userdata.render_health(ha_plan(ports)).replace(userdata.HEALTH_STATE_PATH, str(state))
    assert str(state) in script
    # natfwd serving both ports; its cache node is down (nothing listens on the target).
    config = write_config(box.root / "natfwd.yaml", [(port, f"127.0.0.1:{free_port()}") for port in ports])
    serve = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "serve", "--config", str(config)],
        env=aws.cli_env(), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for port in ports:
            wait_port("127.0.0.1", port, process=serve)
        (box.root / "natfwd.pid").write_text(str(serve.pid))
        for _ in range(userdata.HEALTH_FAILURES + 1):
            done = box.run(script)
            assert (done.returncode, done.stderr) == (0, "")
        assert state.read_text() == "0\n"
        assert group.health(imds.instance_id) == "Healthy"
    finally:
        serve.kill()
        serve.wait(timeout=30)

    # natfwd down: the first failed checks are only counted; the last one reports the instance.
    for failures in range(1, userdata.HEALTH_FAILURES):
        done = box.run(script)
        assert done.returncode == 0, done.stderr
        assert f"natfwd is down ({failures} failed checks in a row" in done.stderr
        assert group.health(imds.instance_id) == "Healthy"
    assert imds.requests == []
    done = box.run(script)
    assert done.returncode == 0, done.stderr
    assert f"reporting {imds.instance_id} Unhealthy to its Auto Scaling group" in done.stderr
    assert group.health(imds.instance_id) == "Unhealthy"
    assert imds.requests == [("PUT", "/latest/api/token", 200), ("GET", "/latest/meta-data/instance-id", 200)]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (Debian package iproute2)")
def test_health_counts_a_lost_listener_and_forgets_failures_once_natfwd_is_back(imds: Imds, box: Box) -> None:
    ports = free_ports(2)
    state = box.root / "failures"
    script = userdata.render_health(ha_plan(ports)).replace(userdata.HEALTH_STATE_PATH, str(state))
    (box.root / "natfwd.pid").write_text(str(os.getpid()))  # natfwd.service "active"
    import socket

    with socket.socket() as first:
        first.bind(("127.0.0.1", ports[0]))
        first.listen()
        # One of the two listeners: the service is active but a forward is not served.
        done = box.run(script)
        assert "natfwd is down (1 failed checks in a row" in done.stderr
        with socket.socket() as second:
            second.bind(("127.0.0.1", ports[1]))
            second.listen()
            done = box.run(script)
            assert (done.returncode, done.stderr) == (0, "")
    assert state.read_text() == "0\n"
    assert imds.requests == []


def test_the_api_calls_a_claim_makes(aws: Aws, subnet: str, front: Front) -> None:
    """DescribeAddresses, then AssociateAddress only when the address is elsewhere: what the instance role needs."""
    instance_id = instance(aws, subnet)
    allocation_id, _ = address(aws)
    args = [
        "claim-address",
        "--endpoint-url",
        front.url,
        "--allocation-id",
        allocation_id,
        "--instance-id",
        instance_id,
    ]
    assert natfwd_cli(aws, *args).returncode == 0
    assert front.actions == ["DescribeAddresses", "AssociateAddress"]
    front.actions.clear()
    done = natfwd_cli(aws, *args)
    assert done.returncode == 0 and done.stdout.startswith("already claimed:")
    assert front.actions == ["DescribeAddresses"]  # no write when the address is already here


def test_an_address_on_a_bare_network_interface_is_taken_too(aws: Aws, subnet: str) -> None:
    instance_id = instance(aws, subnet)
    allocation_id, public_ip = address(aws)
    eni = aws.ec2.create_network_interface(SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
    aws.ec2.associate_address(AllocationId=allocation_id, NetworkInterfaceId=eni)
    code, out, err = claim(aws, "--allocation-id", allocation_id, "--instance-id", instance_id)
    assert (code, err) == (0, "")
    assert out == f"claimed {public_ip} ({allocation_id}) for {instance_id} (was on {eni})\n"
    assert holder(aws, allocation_id)[0] == instance_id


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace of its own (no interfaces up, no route anywhere), deleted afterwards."""
    name = f"{unique_name('hc')}-nat"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian package nftables)")
@root
def test_kernel_health_looks_for_serves_nftables_table(imds: Imds, box: Box, namespace: str) -> None:
    plan = ha_plan([11211])
    plan = dataclasses.replace(plan, request=dataclasses.replace(plan.request, mode="kernel"))
    state = box.root / "failures"
    script = userdata.render_health(plan).replace(userdata.HEALTH_STATE_PATH, str(state))
    (box.root / "natfwd.pid").write_text(str(os.getpid()))  # natfwd.service "active"

    def check() -> subprocess.CompletedProcess[str]:
        # IP, not `ip`: the box's PATH has the stand-in first.
        return subprocess.run([IP, "netns", "exec", namespace, "sh", "-c", script], capture_output=True,
                              text=True, env=box.env, timeout=60)  # fmt: skip

    # No listener on 11211, as on the kernel path; without serve's table, natfwd is down.
    assert "natfwd is down (1 failed checks in a row" in check().stderr
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "add", "table", "inet", "natfwd_serve"], check=True)
    done = check()
    assert (done.returncode, done.stderr) == (0, "")
    assert state.read_text() == "0\n"
