"""natfwd claim-address against a real moto server: an explicit instance, this instance through an IMDSv2 stand-in,
idempotence, the failover of an Auto Scaling group of one, and the errors; AWS's throttling is retried."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from awskit import REGION, Aws, build_world, natfwd_cli
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"

from forwarder.aws.claim import IMDS_URL_ENV

REPLACEMENT_TIMEOUT_S = 60.0  # only stops a hang: moto launches the replacement at once


# -- an IMDSv2 stand-in: a session token from PUT, and only GETs that present it are answered -------------------


@dataclass
class Imds:
    url: str
    instance_id: str = ""
    region: str = REGION
    token: str = "natfwd-test-token"
    requests: list[tuple[str, str, int]] = field(default_factory=list)


class _ImdsHandler(http.server.BaseHTTPRequestHandler):
    imds: Imds

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: str = "") -> None:
        self.imds.requests.append((self.command, self.path, status))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._answer(200, self.imds.token)
        else:
            self._answer(400)

    def do_GET(self) -> None:
        # IMDSv2 only, as `HttpTokens: required` makes it: no token, no answer.
        if self.headers.get("X-aws-ec2-metadata-token") != self.imds.token:
            self._answer(401)
            return
        answers = {
            "/latest/meta-data/instance-id": self.imds.instance_id,
            "/latest/meta-data/placement/region": self.imds.region,
        }
        if self.path in answers:
            self._answer(200, answers[self.path])
        else:
            self._answer(404)


@pytest.fixture
def imds() -> Iterator[Imds]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImdsHandler)
    state = Imds(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = type("Handler", (_ImdsHandler,), {"imds": state})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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


def test_a_replacement_takes_the_address_from_its_dead_predecessor(aws: Aws) -> None:
    world = build_world(aws, public_zones=("us-east-1b", "us-east-1c"))
    autoscaling = boto3.client("autoscaling", endpoint_url=aws.url, region_name=REGION)
    template = aws.ec2.create_launch_template(
        LaunchTemplateName="natfwd-c", LaunchTemplateData={"ImageId": image_id(aws), "InstanceType": "t4g.micro"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="natfwd-c",
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"},
        MinSize=1,
        MaxSize=1,
        DesiredCapacity=1,
        VPCZoneIdentifier=",".join(world.public_subnet_ids),
    )

    def members() -> list[str]:
        (group,) = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["natfwd-c"])["AutoScalingGroups"]
        return [i["InstanceId"] for i in group["Instances"]]

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


@pytest.fixture
def front(aws: Aws) -> Iterator[Front]:
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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
