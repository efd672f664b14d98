"""The provision plan as pure data: what to create, the security group rules, ports and tags; renders as text."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from forwarder import __version__
from forwarder.aws.cluster import Cluster, NodeEndpoint
from forwarder.aws.rules import Rule
from forwarder.aws.subnets import Subnet
from forwarder.errors import NatfwdError, UsageError

Mode = Literal["userspace", "kernel"]
Role = Literal["security-group", "instance", "elastic-ip", "rule"]

AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
TAG_CLUSTER = "natfwd:cluster-id"
TAG_ROLE = "natfwd:role"
TAG_TRUSTED_CIDR = "natfwd:trusted-cidr"
TAG_MODE = "natfwd:mode"
FIRST_PORT = {"memcached": 11211, "redis": 6379, "redis-cluster": 6379}
SSH_PORT = 22
# The box installs natfwd (pip) and OS packages (dnf) at first boot, both over HTTPS only.
PACKAGE_PORT = 443
DEFAULT_PACKAGE = f"natfwd=={__version__}"

_CLUSTER_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_PACKAGE_SPEC = re.compile(r"^[A-Za-z0-9._\-\[\],=<>!~+:/@#%?&]+$")


def parse_cluster_id(text: str) -> str:
    """Validate --cluster-id as ElastiCache spells ids: letters, digits and hyphens (raises UsageError)."""
    if not _CLUSTER_ID.match(text):
        raise UsageError(f"--cluster-id: {text!r} is not an ElastiCache id; ids are 1-64 letters, digits and hyphens")
    return text


def parse_trusted_cidr(text: str) -> ipaddress.IPv4Network:
    """Validate --trusted-cidr: an IPv4 network (a bare address means /32), never 0.0.0.0/0.

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
    if not isinstance(network, ipaddress.IPv4Network):
        raise UsageError(f"--trusted-cidr: {text!r} is IPv6, but the Elastic IP is IPv4; pass an IPv4 CIDR")
    if network.prefixlen == 0:
        raise UsageError(
            "--trusted-cidr: 0.0.0.0/0 would let the whole internet reach the cache; pass the client network"
        )
    return network


def parse_package(text: str) -> str:
    """Validate --package: one pip requirement or URL, with no spaces or quotes (it goes into a shell script)."""
    if not _PACKAGE_SPEC.match(text):
        raise UsageError(f"--package: {text!r} is not a single pip requirement; pass e.g. natfwd==0.1.0 or a wheel URL")
    return text


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """What the user asked for on the command line, validated."""

    cluster_id: str
    trusted_cidr: ipaddress.IPv4Network
    mode: Mode = "userspace"
    instance_type: str = "t3.micro"
    ssh: bool = True
    key_name: str | None = None
    subnet_id: str | None = None
    package: str = DEFAULT_PACKAGE


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
        if role == "security-group":
            tags.append((TAG_TRUSTED_CIDR, str(self.request.trusted_cidr)))
        if role == "instance":
            tags.append((TAG_MODE, self.request.mode))
        return tuple(tags)

    def cache_ingress(self, nat_group_id: str) -> tuple[Rule, ...]:
        """The rules added to the cache security group: each node port, from the NAT security group only."""
        return tuple(
            Rule.tcp(port, nat_group_id, f"{self.name}: NAT instance to cache nodes") for port in self.node_ports
        )


def build(request: ProvisionRequest, cluster: Cluster, vpc_id: str, subnet: Subnet, image_id: str, region: str) -> Plan:
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
    trusted = str(request.trusted_cidr)
    cache_group = cluster.security_group_ids[0]
    ingress = [Rule.tcp(f.port, trusted, f"{request.cluster_id}: forward to node {f.node.node_id}") for f in forwards]
    if request.ssh:
        ingress.append(Rule.tcp(SSH_PORT, trusted, f"{request.cluster_id}: SSH"))
    egress = [Rule.tcp(port, cache_group, f"{request.cluster_id}: cache nodes") for port in cluster.node_ports]
    egress.append(Rule.tcp(PACKAGE_PORT, "0.0.0.0/0", f"{request.cluster_id}: package downloads at boot (dnf, pip)"))
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
    )


def render(plan: Plan) -> str:
    """The plan as the text provision prints before acting (no trailing newline)."""
    request = plan.request
    cluster = plan.cluster
    kind = "cache cluster" if cluster.kind == "cache-cluster" else "replication group"
    count = len(cluster.nodes)
    key = f"key pair {request.key_name}" if request.key_name else "no key pair"
    lines = [
        f"natfwd provision plan for {cluster.engine} {kind} {plan.cluster_id!r} ({count} node{'s' * (count != 1)}) "
        f"in {plan.region}",
        f"  VPC             {plan.vpc_id}",
        f"  subnet          {plan.subnet.subnet_id} ({plan.subnet.cidr}, {plan.subnet.availability_zone}), "
        f"public via {plan.subnet.gateway_id}",
        f"  instance        {request.instance_type}, {plan.image_id} (Amazon Linux 2023), {key}",
        f"  natfwd          mode {request.mode}, installs {request.package}",
        "  Elastic IP      one for natfwd, associated with the instance",
        "  forwards        (Elastic IP port -> node)",
    ]
    lines += [f"    {f.port:<5} -> {f.node.address}:{f.node.port}  node {f.node.node_id}" for f in plan.forwards]
    lines.append(f"  security group  {plan.name} in {plan.vpc_id}, with exactly these rules")
    lines += [f"    {rule.render(inbound=True)}" for rule in plan.nat_ingress]
    lines += [f"    {rule.render(inbound=False)}" for rule in plan.nat_egress]
    lines.append("    (the default allow-all outbound rule is removed)")
    lines.append(f"  cache security group {plan.cache_security_group_id}")
    lines += [f"    {rule.render(inbound=True, peer_name=plan.name)}" for rule in plan.cache_ingress("sg-new")]
    tags = ", ".join(f"{k}={v}" for k, v in plan.tags("instance")[:2])
    lines.append(f"  tags            {tags} on every resource")
    return "\n".join(lines)
