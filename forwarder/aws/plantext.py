"""The provision plan as the text provision prints before acting: what each layout makes, rules and ports."""

from __future__ import annotations

from forwarder.aws.plan import (
    BALANCER_GROUP,
    GRACE_S,
    MODE_NOTES,
    Layout,
    Plan,
    target_group_name,
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
        *_subnet_lines(plan),
        *([f"  layout          {LAYOUT_NOTES[plan.layout]}"] if plan.layout != "single" else []),
        *_instance_lines(plan, key),
        f"  access          instance profile {plan.role_name}: SSM Session Manager, ElastiCache Describe"
        + (", the natfwd object" if plan.artefact else "")
        + ACCESS_NOTES[plan.layout],
        f"  natfwd          mode {request.mode}{MODE_NOTES[request.mode]}, installs {plan.install_source}",
        f"  clients         {', '.join(str(c) for c in request.trusted_cidrs)}",
    ]
    if plan.artefact is not None:
        lines.append(f"  storage         S3 bucket {plan.artefact.bucket} (private, encrypted), natfwd's sdist in it")
    lines += _address_lines(plan)
    lines += [f"    {f.port:<5} -> {f.node.address}:{f.node.port}  node {f.node.node_id}" for f in plan.forwards]
    if plan.layout == "replicas":
        lines += _balancer_lines(plan)
    lines.append(f"  security group  {plan.name} in {plan.vpc_id}, with exactly these rules")
    balancer_group = plan.balancer_group_name
    lines += [
        f"    {rule.render(inbound=True, peer_name=balancer_group if rule.peer == BALANCER_GROUP else None)}"
        for rule in plan.nat_ingress
    ]
    lines += [f"    {rule.render(inbound=False)}" for rule in plan.nat_egress]
    lines.append("    (the default allow-all outbound rule is removed)")
    lines.append(f"  cache security group {plan.cache_security_group_id}")
    lines += [f"    {rule.render(inbound=True, peer_name=plan.name)}" for rule in plan.cache_ingress("sg-new")]
    tags = ", ".join(f"{k}={v}" for k, v in plan.tags("instance")[:2])
    lines.append(f"  tags            {tags} on every resource")
    return "\n".join(lines)


# What the instance role adds per layout (Plan.instance_policy), each limited to the cluster's tagged resources.
ACCESS_NOTES: dict[Layout, str] = {
    "single": "",
    "ha": ", claim the cluster's Elastic IP, report its own health to the group",
    "replicas": ", report its own health to the group",
}
LAYOUT_NOTES: dict[Layout, str] = {
    "single": "single: one instance holding the Elastic IP",
    "ha": "ha: an Auto Scaling group of one; a replacement claims the Elastic IP at boot",
    "replicas": "replicas: instances behind an internet-facing Network Load Balancer",
}


def _subnet_lines(plan: Plan) -> list[str]:
    lines = []
    for index, subnet in enumerate(plan.subnets or (plan.subnet,)):
        label = "subnet" if len(plan.subnets) <= 1 else ("subnets" if index == 0 else "")
        lines.append(
            f"  {label:<15} {subnet.subnet_id} ({subnet.cidr}, {subnet.availability_zone}), "
            f"public via {subnet.gateway_id}"
        )
    return lines


def _instance_lines(plan: Plan, key: str) -> list[str]:
    request = plan.request
    machine = f"{request.instance_type} ({plan.architecture}), {plan.image_id} (Amazon Linux 2023), {key}"
    if plan.layout == "single":
        return [f"  instance        {machine}"]
    checks = (
        "the load balancer's TCP checks (ELB)"
        if plan.layout == "replicas"
        else "EC2 status checks, and the box reports itself unhealthy when natfwd fails"
    )
    return [
        f"  launch template {plan.group_name}: {machine}; IMDSv2 required, public IP for the first-boot install",
        f"  Auto Scaling    group {plan.group_name}: min = max = desired = {plan.size}, over {', '.join(plan.zones)}",
        f"  health          {checks}; {GRACE_S} s grace for the first-boot install",
    ]


def _address_lines(plan: Plan) -> list[str]:
    if plan.layout == "single":
        return [
            "  Elastic IP      one for natfwd, associated with the instance",
            "  forwards        (Elastic IP port -> node)",
        ]
    if plan.layout == "ha":
        return [
            "  Elastic IP      one for natfwd; the group's instance claims it at boot (natfwd claim-address)",
            "  forwards        (Elastic IP port -> node)",
        ]
    return [
        f"  Elastic IPs     one per zone for the load balancer ({', '.join(plan.zones)}); the first is public_address",
        "  forwards        (load balancer port -> node, on every instance)",
    ]


def _balancer_lines(plan: Plan) -> list[str]:
    lines = [
        f"  load balancer   {plan.balancer_name}: network, internet-facing, in {', '.join(plan.zones)}; "
        "cross-zone, so each zone's address reaches every instance",
        "  listeners       (TCP port -> target group: the group's instances, TCP health checks, client IP kept)",
    ]
    lines += [f"    {f.port:<5} -> {target_group_name(plan.cluster_id, f.port)}" for f in plan.forwards]
    lines.append(f"  NLB group       {plan.balancer_group_name} in {plan.vpc_id}, with exactly these rules")
    lines += [f"    {rule.render(inbound=True)}" for rule in plan.balancer_ingress()]
    lines += [f"    {rule.render(inbound=False, peer_name=plan.name)}" for rule in plan.balancer_egress("sg-new")]
    return lines
