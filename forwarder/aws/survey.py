"""Read what a plan needs from AWS (the cluster, its VPC, a public subnet, the AMI for the instance's
architecture), build the natfwd package the instance installs, and build the plan."""

from __future__ import annotations

from forwarder.aws import artefact, cluster, plan, subnets
from forwarder.aws.client import AwsClient
from forwarder.errors import NatfwdError


def prepare(client: AwsClient, request: plan.ProvisionRequest) -> plan.Plan:
    """Only reads: nothing is created. Raises ClusterNotFound, NoPublicSubnet, AwsError or UsageError."""
    found = cluster.describe(client, request.cluster_id)
    if not found.subnet_group:
        raise NatfwdError(
            f"cluster {request.cluster_id!r} has no cache subnet group, so it is not in a VPC natfwd can use"
        )
    vpc_id = str(client.describe_cache_subnet_group(found.subnet_group)["VpcId"])
    described = client.describe_subnets(vpc_id)
    tables = client.describe_route_tables(vpc_id)
    if request.layout == "single":
        used: tuple[subnets.Subnet, ...] = (
            subnets.choose(described, tables, vpc_id, request.cluster_id, request.subnet_id),
        )
    else:
        used = subnets.spread(described, tables, vpc_id, request.cluster_id, plan.MIN_ZONES, request.subnet_id)
    supported = client.instance_architectures(request.instance_type)
    architecture = plan.choose_architecture(request.instance_type, supported, request.architecture, request.package)
    image_id = client.parameter(plan.ami_parameter(architecture))
    shipped = None
    if request.package is None:
        bucket = artefact.bucket_name(client.account_id(), client.region, request.cluster_id)
        shipped = artefact.build(bucket)
    return plan.build(request, found, vpc_id, used[0], image_id, client.region, architecture, shipped, used)
