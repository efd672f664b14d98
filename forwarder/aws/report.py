"""What provision prints at the end: the Elastic IP, the port for each node and ready-to-paste client lines."""

from __future__ import annotations

from forwarder.aws.apply import Outcome
from forwarder.aws.plan import Plan


def client_lines(plan: Plan, public_ip: str) -> list[str]:
    """Client commands that reach every node through the Elastic IP: pymemcache for Memcached, redis-cli for Redis."""
    if plan.cluster.engine == "memcached":
        servers = ", ".join(f'("{public_ip}", {f.port})' for f in plan.forwards)
        if len(plan.forwards) == 1:
            return [f"from pymemcache.client.base import Client; client = Client({servers})"]
        return [f"from pymemcache.client.hash import HashClient; client = HashClient([{servers}])"]
    cluster_flag = " -c" if plan.cluster.engine == "redis-cluster" else ""
    return [f"redis-cli{cluster_flag} -h {public_ip} -p {f.port}" for f in plan.forwards]


def ssm_command(instance_id: str, region: str) -> str:
    """The command that opens a shell on the instance (needs the AWS CLI and its Session Manager plugin)."""
    return f"aws ssm start-session --target {instance_id} --region {region}"


def _group_lines(outcome: Outcome) -> list[str]:
    """The --ha and --replicas part of the report: the group, its instances, the addresses clients dial."""
    plan, group = outcome.plan, outcome.group
    assert group is not None
    members = ", ".join(group.instance_ids) or "launching"
    lines = [f"  group           Auto Scaling group {group.group_name} of {plan.size} over {', '.join(plan.zones)}"]
    lines.append(f"  instances       {members} (launch template {group.template_id})")
    if plan.layout == "ha":
        lines.insert(
            0, f"  Elastic IP      {outcome.public_ip} ({outcome.allocation_id}), claimed by each new instance"
        )
    else:
        lines.insert(0, f"  load balancer   {plan.balancer_name} ({group.dns_name})")
        addresses = ", ".join(f"{ip} ({zone})" for ip, zone in zip(group.public_ips, plan.zones, strict=True))
        lines.insert(1, f"  Elastic IPs     {addresses}: allow-list all of them")
    if group.rollout:
        lines.append(f"  new config      {group.rollout}")
    return lines


def render(outcome: Outcome, destroy_command: str) -> str:
    """The closing report (no trailing newline)."""
    plan = outcome.plan
    ip = outcome.public_ip
    if outcome.group is not None:
        return _render_group(outcome, destroy_command)
    lines = [
        f"natfwd is provisioned for {plan.cluster.engine} cluster {plan.cluster_id!r} in {plan.region}",
        f"  Elastic IP      {ip} ({outcome.allocation_id})",
        f"  instance        {outcome.instance_id} in {plan.subnet.subnet_id}, mode {plan.request.mode}",
        f"  security group  {outcome.group_id}",
        "  ports",
    ]
    lines += [f"    {ip}:{f.port} -> node {f.node.node_id} ({f.node.address}:{f.node.port})" for f in plan.forwards]
    lines.append("  client lines")
    lines += [f"    {line}" for line in client_lines(plan, ip)]
    if outcome.replaced:
        lines.append(f"  replaced        {outcome.replaced} (terminating); the Elastic IP moved to the new instance")
    clients = ", ".join(str(c) for c in plan.request.trusted_cidrs)
    lines += [
        "  The instance installs natfwd at first boot: allow a few minutes before the first connection.",
        f"  Only {clients} {'is' if len(plan.request.trusted_cidrs) == 1 else 'are'} let in. To change the clients, "
        "run provision again with other --trusted-cidr flags.",
        "  A shell on the instance, through SSM Session Manager (no SSH needed):",
        f"    {ssm_command(outcome.instance_id, plan.region)}",
        f"  Remove everything with: {destroy_command}",
    ]
    return "\n".join(lines)


def _render_group(outcome: Outcome, destroy_command: str) -> str:
    plan, ip = outcome.plan, outcome.public_ip
    lines = [f"natfwd is provisioned for {plan.cluster.engine} cluster {plan.cluster_id!r} in {plan.region}"]
    lines += _group_lines(outcome)
    lines.append(f"  security group  {outcome.group_id}, mode {plan.request.mode}")
    lines.append("  ports")
    lines += [f"    {ip}:{f.port} -> node {f.node.node_id} ({f.node.address}:{f.node.port})" for f in plan.forwards]
    lines.append("  client lines")
    lines += [f"    {line}" for line in client_lines(plan, ip)]
    lines += [
        "  Each instance installs natfwd at first boot: allow a few minutes before the first connection.",
        f"  A shell on an instance: {ssm_command(outcome.instance_id or 'INSTANCE-ID', plan.region)}",
        f"  Remove everything with: {destroy_command}",
    ]
    return "\n".join(lines)
