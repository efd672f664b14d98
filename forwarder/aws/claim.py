"""natfwd claim-address: move an Elastic IP onto this instance (its id read through IMDSv2), idempotently.

What an instance of the --ha layout runs at boot: its Auto Scaling group replaced a dead predecessor, and the
address clients allow-list must follow. The EC2 calls are made here with boto3 directly (DescribeAddresses, then
AssociateAddress only when the address is elsewhere), so the instance role needs nothing else.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from forwarder.errors import NatfwdError, UsageError

# For tests only: a stand-in for the instance metadata service, e.g. http://127.0.0.1:8111.
IMDS_URL_ENV = "NATFWD_IMDS_URL"
IMDS_URL = "http://169.254.169.254"
IMDS_TIMEOUT_S = 2.0
IMDS_TOKEN_TTL_S = 300
# botocore's standard mode backs off exponentially (with jitter) on throttling, 5xx and connection errors.
MAX_ATTEMPTS = 5

_ALLOCATION_ID = re.compile(r"eipalloc-[0-9a-f]{8,32}")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,32}")
_DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"}


@dataclass(frozen=True, slots=True)
class Claim:
    """What claim() found and did: `previous` held the address (an instance, else a network interface; None: nobody)."""

    public_ip: str
    allocation_id: str
    instance_id: str
    previous: str | None
    changed: bool

    def describe(self) -> str:
        """The one line the command prints."""
        address = f"{self.public_ip} ({self.allocation_id})"
        if not self.changed:
            return f"already claimed: {address} is on {self.instance_id}; nothing changed"
        was = f"was on {self.previous}" if self.previous else "was not associated"
        return f"claimed {address} for {self.instance_id} ({was})"


def parse_allocation_id(text: str) -> str:
    """Raises UsageError unless `text` looks like an Elastic IP allocation id."""
    if not _ALLOCATION_ID.fullmatch(text):
        raise UsageError(f"--allocation-id: {text!r} is not an Elastic IP allocation id (eipalloc-0123456789abcdef0)")
    return text


def parse_instance_id(text: str) -> str:
    """Raises UsageError unless `text` looks like an EC2 instance id."""
    if not _INSTANCE_ID.fullmatch(text):
        raise UsageError(f"--instance-id: {text!r} is not an EC2 instance id (i-0123456789abcdef0)")
    return text


class Imds:
    """The instance metadata service through IMDSv2: one session token (PUT), then GETs that present it."""

    def __init__(self, base_url: str | None = None, timeout_s: float = IMDS_TIMEOUT_S) -> None:
        self.base_url = (base_url or os.environ.get(IMDS_URL_ENV) or IMDS_URL).rstrip("/")
        self.timeout_s = timeout_s
        # Never through a proxy: the service answers only on the instance's own link.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None

    def _open(self, request: urllib.request.Request, what: str) -> str:
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                body: bytes = response.read()
                return body.decode().strip()
        except (OSError, urllib.error.URLError) as exc:
            raise NatfwdError(
                f"cannot read {what} from the instance metadata service at {self.base_url} ({exc}); "
                "run this on an EC2 instance with IMDS enabled, or pass --instance-id and --region"
            ) from exc

    def get(self, path: str) -> str:
        """The text at /latest/meta-data/`path`. Raises NatfwdError when the service does not answer."""
        if self._token is None:
            token_request = urllib.request.Request(
                f"{self.base_url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL_S)},
            )
            self._token = self._open(token_request, "a session token")
        request = urllib.request.Request(
            f"{self.base_url}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": self._token}
        )
        return self._open(request, path)


class _Ec2:
    """The two EC2 calls, with AWS errors turned into one line that says what to fix."""

    def __init__(self, client: Any, region: str, exceptions: Any) -> None:
        self._client = client
        self.region = region
        self._exceptions = exceptions

    def _fail(self, operation: str, exc: Exception, allocation_id: str, instance_id: str) -> NatfwdError:
        errors = self._exceptions
        where = f"AWS ec2 {operation}"
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = " ".join(str(error.get("Message", "")).split())
            if code == "InvalidAllocationID.NotFound":
                return NatfwdError(
                    f"no Elastic IP with allocation id {allocation_id} in {self.region}; check --allocation-id and "
                    "--region"
                )
            if code in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                return NatfwdError(f"instance {instance_id} not found in {self.region}; check --instance-id")
            if code in _DENIED:
                return NatfwdError(
                    f"{where} was denied ({code}); the instance role needs ec2:DescribeAddresses and "
                    f"ec2:AssociateAddress on {allocation_id} (allowed for addresses tagged natfwd:cluster-id)"
                )
            return NatfwdError(f"{where} failed: {code}: {message}")
        if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
            return NatfwdError(f"{where}: no AWS credentials found; on an instance, its instance profile gives them")
        if isinstance(exc, errors.EndpointConnectionError | errors.ConnectTimeoutError | errors.ReadTimeoutError):
            return NatfwdError(f"{where}: cannot reach the {self.region} endpoint ({exc}); check --region")
        return NatfwdError(f"{where} failed: {exc}")

    def _call(self, operation: str, allocation_id: str, instance_id: str, **params: Any) -> dict[str, Any]:
        from botocore import xform_name

        try:
            response: dict[str, Any] = getattr(self._client, xform_name(operation))(**params)
        except (self._exceptions.BotoCoreError, self._exceptions.ClientError) as exc:
            raise self._fail(operation, exc, allocation_id, instance_id) from exc
        return response

    def address(self, allocation_id: str) -> dict[str, Any]:
        found = self._call("DescribeAddresses", allocation_id, "", AllocationIds=[allocation_id])
        addresses: list[dict[str, Any]] = found.get("Addresses", [])
        if not addresses:
            raise NatfwdError(f"no Elastic IP with allocation id {allocation_id} in {self.region}")
        return addresses[0]

    def associate(self, allocation_id: str, instance_id: str) -> None:
        self._call(
            "AssociateAddress",
            allocation_id,
            instance_id,
            AllocationId=allocation_id,
            InstanceId=instance_id,
            AllowReassociation=True,
        )


def _ec2(region: str | None, endpoint_url: str | None, imds: Imds) -> _Ec2:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise NatfwdError(
            "boto3 is not installed; install natfwd with its aws extra: pip install 'natfwd[aws]'"
        ) from None
    session = boto3.session.Session(region_name=region)
    resolved = session.region_name or imds.get("placement/region")
    settings = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS}, connect_timeout=5, read_timeout=30
    )
    client = session.client("ec2", region_name=resolved, endpoint_url=endpoint_url, config=settings)
    return _Ec2(client, resolved, botocore.exceptions)


def claim(ec2: _Ec2, allocation_id: str, instance_id: str) -> Claim:
    """Associate the address with the instance unless it is already there (then nothing is written).

    AllowReassociation moves it from any other instance, such as a dead predecessor. Raises NatfwdError when the
    address or the instance does not exist, or the role may not read or move the address.
    """
    address = ec2.address(allocation_id)
    public_ip = str(address.get("PublicIp", "?"))
    # An address can also sit on a network interface of no instance (or of one that is gone).
    holder = address.get("InstanceId") or address.get("NetworkInterfaceId") or None
    if holder == instance_id:
        return Claim(public_ip, allocation_id, instance_id, holder, changed=False)
    ec2.associate(allocation_id, instance_id)
    return Claim(public_ip, allocation_id, instance_id, holder, changed=True)


def run(allocation_id: str, instance_id: str | None, region: str | None, endpoint_url: str | None) -> Claim:
    """The command: the instance id (and, if no region is configured, the region) from IMDSv2, then claim().

    Raises UsageError for malformed ids, NatfwdError when IMDS or AWS fail.
    """
    allocation_id = parse_allocation_id(allocation_id)
    if instance_id is not None:
        instance_id = parse_instance_id(instance_id)
    imds = Imds()
    ec2 = _ec2(region, endpoint_url, imds)
    if instance_id is None:
        instance_id = imds.get("instance-id")
    return claim(ec2, allocation_id, instance_id)
