"""Live node lookup for the `discovery` config section: the cluster's nodes, and the forwards built from them.

`describe_nodes` blocks on the ElastiCache API; the server calls it in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence

from forwarder import config
from forwarder.aws import cluster
from forwarder.aws.client import AwsClient
from forwarder.aws.cluster import NodeEndpoint

__all__ = ["NodeEndpoint", "build_forwards", "describe_nodes"]


def describe_nodes(discovery: config.Discovery, client: AwsClient | None = None) -> list[NodeEndpoint]:
    """The nodes of the cache cluster or replication group `discovery.cluster_id`, in node-id order.

    Nodes without an endpoint yet (still being created) are left out. Raises ClusterNotFound when the id is
    neither a cache cluster nor a replication group, and AwsError (both NatfwdError) when the API fails.
    """
    if client is None:
        client = AwsClient.create(region=discovery.region, endpoint_url=discovery.endpoint_url)
    return list(cluster.describe(client, discovery.cluster_id).nodes)


def build_forwards(nodes: Sequence[NodeEndpoint], first_port: int) -> tuple[config.Forward, ...]:
    """Node N (1-based, in the order given) gets listen port first_port + N - 1, targeting its endpoint name.

    Raises ConfigError when the last port would pass 65535.
    """
    last = first_port + len(nodes) - 1
    if nodes and last > 65535:
        raise config.ConfigError(
            f"discovery.first_port: {first_port} leaves no room for {len(nodes)} nodes (the last would be {last}); "
            "pick a lower first_port"
        )
    return tuple(
        config.Forward(first_port + index, config.Target(node.address, node.port)) for index, node in enumerate(nodes)
    )
