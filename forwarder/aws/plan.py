"""The provision plan as pure data: what to create, the security group rules, ports and tags; renders as text."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from forwarder import __version__
from forwarder.aws.artefact import Artefact
from forwarder.aws.cluster import Cluster, NodeEndpoint
from forwarder.aws.rules import Rule
from forwarder.aws.subnets import Subnet
from forwarder.errors import NatfwdError, UsageError

Mode = Literal["userspace", "kernel"]
Architecture = Literal["arm64", "x86_64"]
# single: one instance holding the Elastic IP (the page's layout). ha: an Auto Scaling group of one over two or more
# zones; each instance claims the Elastic IP at boot. replicas: N instances behind a Network Load Balancer.
Layout = Literal["single", "ha", "replicas"]
Role = Literal[
    "security-group",
    "instance",
    "elastic-ip",
    "rule",
    "bucket",
    "iam-role",
    "instance-profile",
    "launch-template",
    "auto-scaling-group",
    "load-balancer",
    "target-group",
    "load-balancer-security-group",
]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ARCHITECTURES: tuple[Architecture, ...] = ("arm64", "x86_64")
AMI_PARAMETER_PREFIX = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-"
TAG_CLUSTER = "natfwd:cluster-id"
TAG_ROLE = "natfwd:role"
TAG_MODE = "natfwd:mode"
# On the load balancer's Elastic IPs: the zone each one serves (an NLB takes one address per zone, for good).
TAG_ZONE = "natfwd:zone"
# What the plan says about each mode: both run natfwd serve under natfwd.service.
MODE_NOTES: dict[Mode, str] = {
    "userspace": "",
    "kernel": " (natfwd serve with data_path: kernel, nftables DNAT)",
}
FIRST_PORT = {"memcached": 11211, "redis": 6379, "redis-cluster": 6379}
SSH_PORT = 22
# The box installs OS packages (dnf) and natfwd's dependencies (pip), fetches natfwd from S3 and talks to SSM,
# all over HTTPS only.
PACKAGE_PORT = 443
# Graviton: the cheapest instance that serves natfwd (see docs/aws.md for what each default costs).
DEFAULT_INSTANCE_TYPE = "t4g.micro"
# What the box needs for SSM Session Manager: the AWS managed policy, attached to the instance role.
SSM_POLICY_ARN = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
# An Auto Scaling group (--ha, --replicas) spans at least this many availability zones, so one zone's outage
# leaves somewhere to launch the replacement.
MIN_ZONES = 2
# A Network Load Balancer's listeners per load balancer are capped at 50 by AWS; natfwd needs one per node port.
MAX_REPLICAS = 20
# Seconds a new group instance is spared health checks: first boot installs natfwd (dnf, pip, building the C
# extensions) before it listens, so neither the load balancer's TCP checks nor the box's own report count yet.
GRACE_S = 600
# Stands for the load balancer's security group in the planned instance rules until that group exists.
BALANCER_GROUP = "sg-load-balancer"
# Elastic Load Balancing names: at most 32 letters, digits and hyphens.
_ELB_NAME_MAX = 32


def _elb_name(cluster_id: str, suffix: str = "") -> str:
    name = f"natfwd-{cluster_id}{suffix}"
    if len(name) <= _ELB_NAME_MAX:
        return name
    return f"natfwd-{hashlib.sha256(cluster_id.encode()).hexdigest()[:12]}{suffix}"


def balancer_name(cluster_id: str) -> str:
    """The Network Load Balancer's name (a digest of the id when the id is too long for ELB's 32 characters)."""
    return _elb_name(cluster_id)


def target_group_name(cluster_id: str, port: int) -> str:
    """The target group of one node port."""
    return _elb_name(cluster_id, f"-{port}")


def ami_parameter(architecture: Architecture) -> str:
    """The public SSM parameter holding the current Amazon Linux 2023 AMI for `architecture`."""
    return AMI_PARAMETER_PREFIX + architecture


_CLUSTER_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_PACKAGE_SPEC = re.compile(r"^[A-Za-z0-9._\-\[\],=<>!~+:/@#%?&]+$")


def parse_cluster_id(text: str) -> str:
    """Validate --cluster-id as ElastiCache spells ids: letters, digits and hyphens (raises UsageError)."""
    if not _CLUSTER_ID.match(text):
        raise UsageError(f"--cluster-id: {text!r} is not an ElastiCache id; ids are 1-64 letters, digits and hyphens")
    return text


def parse_trusted_cidr(text: str) -> Network:
    """Validate one --trusted-cidr: an IPv4 or IPv6 network (a bare address means /32 or /128), never everything.

    Raises UsageError (exit 2) saying what is wrong and what to pass instead.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise UsageError(
                f"--trusted-cidr: {text!r} is not a CIDR; pass the client network, such as 198.51.100.27/32"
            ) from None
        raise UsageError(f"--trusted-cidr: {text!r} has host bits set; did you mean {loose}?") from None
    if network.prefixlen == 0:
        raise UsageError(
            f"--trusted-cidr: {network} would let the whole internet reach the cache; pass the client network"
        )
    return network


def parse_trusted_cidrs(texts: list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    """Validate every --trusted-cidr (repeatable); duplicates are dropped, the order is IPv4 then IPv6, sorted."""
    if not texts:
        raise UsageError("--trusted-cidr: pass at least one client network, such as 198.51.100.27/32")
    networks = {parse_trusted_cidr(text) for text in texts}
    return tuple(sorted(networks, key=lambda n: (n.version, n)))


def parse_replicas(value: int | None) -> int:
    """Validate --replicas: None (not given) means 1; otherwise 2 to MAX_REPLICAS instances behind the NLB."""
    if value is None:
        return 1
    if not 2 <= value <= MAX_REPLICAS:
        raise UsageError(
            f"--replicas: {value} is out of range; pass 2 to {MAX_REPLICAS} instances behind the load balancer, "
            "or --ha for one instance that is replaced when it fails"
        )
    return value


def parse_package(text: str) -> str:
    """Validate --package: one pip requirement or URL, with no spaces or quotes (it goes into a shell script)."""
    if not _PACKAGE_SPEC.match(text):
        raise UsageError(f"--package: {text!r} is not a single pip requirement; pass e.g. natfwd==0.1.0 or a wheel URL")
    return text


def package_architecture(spec: str) -> Architecture | None:
    """The architecture a --package wheel is built for, from its platform tag (None: pure, or not a wheel)."""
    name = spec.rsplit("/", 1)[-1].split("#", 1)[0]
    if not name.endswith(".whl"):
        return None
    if "aarch64" in name:
        return "arm64"
    if "x86_64" in name:
        return "x86_64"
    return None


def choose_architecture(
    instance_type: str, supported: list[str], forced: Architecture | None, package: str | None
) -> Architecture:
    """The AMI architecture for `instance_type` (whose `supported` architectures EC2 reported).

    Raises UsageError when what the user forced (--architecture, or a --package wheel's platform) does not run
    on that instance type.
    """
    usable = [a for a in ARCHITECTURES if a in supported]
    if not usable:
        raise UsageError(
            f"--instance-type: {instance_type} supports {', '.join(supported) or 'no'} architecture(s); natfwd's "
            "Amazon Linux 2023 AMIs are arm64 (Graviton, e.g. t4g.micro) and x86_64 (e.g. t3.micro)"
        )
    if forced is not None and forced not in usable:
        raise UsageError(
            f"--architecture {forced}: {instance_type} runs {' and '.join(usable)} only; pick an instance type "
            f"of that architecture ({'t4g.micro' if forced == 'arm64' else 't3.micro'}) or drop --architecture"
        )
    wheel = package_architecture(package) if package else None
    if wheel is not None and wheel not in usable:
        raise UsageError(
            f"--package: that wheel is built for {wheel}, but {instance_type} runs {' and '.join(usable)}; pass a "
            "wheel for that architecture, an sdist, or another --instance-type"
        )
    return forced or wheel or usable[0]


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """What the user asked for on the command line, validated."""

    cluster_id: str
    trusted_cidrs: tuple[Network, ...]
    mode: Mode = "userspace"
    instance_type: str = DEFAULT_INSTANCE_TYPE
    key_name: str | None = None
    subnet_id: str | None = None
    # None: ship the natfwd that runs provision (see artefact.py); else a pip requirement or URL to install.
    package: str | None = None
    architecture: Architecture | None = None
    ha: bool = False
    # 1: no load balancer; 2 or more: that many instances behind a Network Load Balancer (implies an ASG).
    replicas: int = 1

    @property
    def layout(self) -> Layout:
        if self.replicas >= 2:
            return "replicas"
        return "ha" if self.ha else "single"

    @property
    def ssh(self) -> bool:
        """Port 22 is opened only for a key pair: without one, nobody could log in through it."""
        return self.key_name is not None


@dataclass(frozen=True, slots=True)
class PortForward:
    """A public port on the Elastic IP and the node it reaches."""

    port: int
    node: NodeEndpoint


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything provision will create, before anything is created."""

    request: ProvisionRequest
    region: str
    cluster: Cluster
    vpc_id: str
    subnet: Subnet
    image_id: str
    forwards: tuple[PortForward, ...]
    cache_security_group_id: str
    nat_ingress: tuple[Rule, ...]
    nat_egress: tuple[Rule, ...]
    architecture: Architecture = "x86_64"
    artefact: Artefact | None = None
    # The public subnets the layout uses, one per availability zone: just `subnet` for single, two or more
    # (the group's zones, and the load balancer's) for ha and replicas.
    subnets: tuple[Subnet, ...] = ()

    @property
    def layout(self) -> Layout:
        return self.request.layout

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(s.availability_zone for s in self.subnets or (self.subnet,))

    @property
    def role_name(self) -> str:
        """The instance role, and the instance profile of the same name (IAM names are at most 64 chars)."""
        return self.name[:64]

    @property
    def install_source(self) -> str:
        if self.artefact is not None:
            return f"natfwd {__version__} as built here (sdist, sha256 {self.artefact.sha256[:16]}...)"
        return str(self.request.package)

    @property
    def balancer_name(self) -> str:
        return balancer_name(self.cluster_id)

    @property
    def balancer_group_name(self) -> str:
        """The load balancer's security group (security group names are unique in a VPC)."""
        return f"{self.name}-nlb"

    @property
    def group_name(self) -> str:
        """The Auto Scaling group and its launch template (--ha, --replicas)."""
        return self.name

    @property
    def size(self) -> int:
        """How many instances the Auto Scaling group keeps."""
        return self.request.replicas

    @property
    def health_check_type(self) -> str:
        """replicas: the load balancer's TCP checks replace an instance; ha: EC2 status checks plus the box's own
        SetInstanceHealth report (written by its user data)."""
        return "ELB" if self.layout == "replicas" else "EC2"

    def nat_ingress_with(self, balancer_group_id: str) -> tuple[Rule, ...]:
        """The instances' inbound rules, with the load balancer's security group id filled in (replicas)."""
        return tuple(
            Rule(r.protocol, r.from_port, r.to_port, balancer_group_id, r.description)
            if r.peer == BALANCER_GROUP
            else r
            for r in self.nat_ingress
        )

    def balancer_ingress(self) -> tuple[Rule, ...]:
        """The load balancer's inbound rules: each node port from each trusted CIDR, nothing else."""
        return tuple(
            Rule.tcp(f.port, str(cidr), f"{self.cluster_id}: clients to node {f.node.node_id}")
            for cidr in self.request.trusted_cidrs
            for f in self.forwards
        )

    def balancer_egress(self, nat_group_id: str) -> tuple[Rule, ...]:
        """The load balancer's outbound rules: each node port to the instances (traffic and health checks)."""
        return tuple(
            Rule.tcp(f.port, nat_group_id, f"{self.cluster_id}: to the natfwd instances") for f in self.forwards
        )

    def instance_policy(self) -> dict[str, object]:
        """The instance role's own policy: the discovery reads, and the one artefact object (SSM is attached).

        ha adds what the box's user data does at boot and when natfwd fails: claim the cluster's Elastic IP and
        report itself unhealthy to its group, both limited by the cluster's tag.
        """
        statements: list[dict[str, object]] = [
            {
                "Sid": "NatfwdDiscovery",
                "Effect": "Allow",
                "Action": ["elasticache:DescribeCacheClusters", "elasticache:DescribeReplicationGroups"],
                "Resource": "*",
            }
        ]
        if self.artefact is not None:
            statements.append(
                {"Sid": "NatfwdArtefact", "Effect": "Allow", "Action": "s3:GetObject", "Resource": self.artefact.arn}
            )
        if self.layout != "single":
            statements += self._group_statements()
        return {"Version": "2012-10-17", "Statement": statements}

    def _group_statements(self) -> list[dict[str, object]]:
        # AssociateAddress is authorised on the Elastic IP, the instance and its network interface: the launch
        # template tags all three, so one tag condition covers each of them (an untagged address is refused).
        statements: list[dict[str, object]] = []
        if self.layout == "ha":
            statements += [
                {
                    "Sid": "NatfwdClaimAddress",
                    "Effect": "Allow",
                    "Action": "ec2:AssociateAddress",
                    "Resource": [
                        "arn:aws:ec2:*:*:elastic-ip/*",
                        "arn:aws:ec2:*:*:instance/*",
                        "arn:aws:ec2:*:*:network-interface/*",
                    ],
                    "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG_CLUSTER}": self.cluster_id}},
                },
                {"Sid": "NatfwdFindAddress", "Effect": "Allow", "Action": "ec2:DescribeAddresses", "Resource": "*"},
            ]
        statements.append(
            {
                "Sid": "NatfwdReportHealth",
                "Effect": "Allow",
                "Action": "autoscaling:SetInstanceHealth",
                "Resource": f"arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/{self.group_name}",
                "Condition": {"StringEquals": {f"autoscaling:ResourceTag/{TAG_CLUSTER}": self.cluster_id}},
            }
        )
        return statements

    @property
    def cluster_id(self) -> str:
        return self.request.cluster_id

    @property
    def name(self) -> str:
        return f"natfwd-{self.request.cluster_id}"

    @property
    def node_ports(self) -> tuple[int, ...]:
        return self.cluster.node_ports

    def tags(self, role: Role) -> tuple[tuple[str, str], ...]:
        """Tags for one resource; destroy and idempotent re-runs find resources by TAG_CLUSTER."""
        tags: list[tuple[str, str]] = [(TAG_CLUSTER, self.cluster_id), ("Name", self.name), (TAG_ROLE, role)]
        if role == "instance":
            tags.append((TAG_MODE, self.request.mode))
        return tuple(tags)

    def cache_ingress(self, nat_group_id: str) -> tuple[Rule, ...]:
        """The rules added to the cache security group: each node port, from the NAT security group only."""
        return tuple(
            Rule.tcp(port, nat_group_id, f"{self.name}: NAT instance to cache nodes") for port in self.node_ports
        )


def build(
    request: ProvisionRequest,
    cluster: Cluster,
    vpc_id: str,
    subnet: Subnet,
    image_id: str,
    region: str,
    architecture: Architecture = "x86_64",
    artefact: Artefact | None = None,
    spread: tuple[Subnet, ...] = (),
) -> Plan:
    """Turn the request and the facts read from AWS into a plan.

    Raises NatfwdError when the cluster has no reachable nodes or no VPC security group, UsageError when the
    mode cannot serve the engine (kernel DNAT cannot rewrite Redis Cluster redirects).
    """
    if not cluster.nodes:
        raise NatfwdError(
            f"cluster {cluster.cluster_id!r} has no node endpoints yet (status {cluster.status}); "
            "wait until it is available and run provision again"
        )
    if not cluster.security_group_ids:
        raise NatfwdError(
            f"cluster {cluster.cluster_id!r} has no VPC security group; give it one so the NAT instance can be let in"
        )
    if request.mode == "kernel" and cluster.engine == "redis-cluster":
        raise UsageError(
            "--mode kernel: kernel DNAT cannot rewrite node addresses in Redis Cluster redirects; use --mode userspace"
        )
    first_port = FIRST_PORT[cluster.engine]
    forwards = tuple(PortForward(first_port + index, node) for index, node in enumerate(cluster.nodes))
    cache_group = cluster.security_group_ids[0]
    if request.layout == "replicas":
        # The load balancer's group admits the clients; the instances admit the node ports from that group only.
        # AWS: a target whose security group references the NLB's accepts the NLB's health checks, and its
        # traffic even with client IP preservation on (the packets keep the client's source address).
        ingress = [
            Rule.tcp(f.port, BALANCER_GROUP, f"{request.cluster_id}: load balancer to node {f.node.node_id}")
            for f in forwards
        ]
    else:
        ingress = [
            Rule.tcp(f.port, str(cidr), f"{request.cluster_id}: forward to node {f.node.node_id}")
            for cidr in request.trusted_cidrs
            for f in forwards
        ]
    if request.ssh:
        ingress += [Rule.tcp(SSH_PORT, str(cidr), f"{request.cluster_id}: SSH") for cidr in request.trusted_cidrs]
    egress = [Rule.tcp(port, cache_group, f"{request.cluster_id}: cache nodes") for port in cluster.node_ports]
    egress.append(
        Rule.tcp(PACKAGE_PORT, "0.0.0.0/0", f"{request.cluster_id}: HTTPS to dnf, pip, S3 (natfwd itself) and SSM")
    )
    return Plan(
        request=request,
        region=region,
        cluster=cluster,
        vpc_id=vpc_id,
        subnet=subnet,
        image_id=image_id,
        forwards=forwards,
        cache_security_group_id=cache_group,
        nat_ingress=tuple(ingress),
        nat_egress=tuple(egress),
        architecture=architecture,
        artefact=artefact,
        subnets=spread or (subnet,),
    )
