"""Find an ElastiCache cluster: a Memcached/Redis cache cluster or a Redis replication group, its nodes and network."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from forwarder.aws.client import AwsClient
from forwarder.config import Engine
from forwarder.errors import NatfwdError

Kind = Literal["cache-cluster", "replication-group"]


class ClusterNotFound(NatfwdError):
    """Neither a cache cluster nor a replication group has this id in the region."""


@dataclass(frozen=True, slots=True)
class NodeEndpoint:
    """One cache node: its id, and the DNS name and port AWS publishes for it.

    `node_id` is the cache node id ("0001") for a cache cluster, and the member cache cluster id ("mygroup-002")
    for a replication group, where each member holds one node. Sorting by it gives the console's node order.
    """

    node_id: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Cluster:
    """What provision and discovery need to know about a cluster."""

    cluster_id: str
    kind: Kind
    engine: Engine
    status: str
    nodes: tuple[NodeEndpoint, ...]
    security_group_ids: tuple[str, ...]
    subnet_group: str | None

    @property
    def node_ports(self) -> tuple[int, ...]:
        """The distinct node ports, ascending (one in practice: a cluster has one port)."""
        return tuple(sorted({node.port for node in self.nodes}))


def _engine(name: object, cluster_mode: bool) -> Engine:
    if name == "memcached":
        return "memcached"
    # Valkey speaks the Redis protocol; natfwd forwards it the same way.
    return "redis-cluster" if cluster_mode else "redis"


def cache_cluster_nodes(cluster: Mapping[str, Any]) -> tuple[NodeEndpoint, ...]:
    """Nodes of a DescribeCacheClusters entry (with ShowCacheNodeInfo) in node-id order; nodes still
    being created have no endpoint yet and are left out."""
    nodes = []
    for node in cluster.get("CacheNodes") or ():
        endpoint = node.get("Endpoint") or {}
        if endpoint.get("Address") and endpoint.get("Port"):
            nodes.append(NodeEndpoint(str(node["CacheNodeId"]), str(endpoint["Address"]), int(endpoint["Port"])))
    return tuple(sorted(nodes, key=lambda node: node.node_id))


def member_nodes(members: Iterable[Mapping[str, Any]]) -> tuple[NodeEndpoint, ...]:
    """Nodes of a replication group's member cache clusters, named by member id, in member-id order."""
    nodes = []
    for member in members:
        member_id = str(member["CacheClusterId"])
        own = cache_cluster_nodes(member)
        for node in own:
            node_id = member_id if len(own) == 1 else f"{member_id}/{node.node_id}"
            nodes.append(NodeEndpoint(node_id, node.address, node.port))
    return tuple(sorted(nodes, key=lambda node: node.node_id))


def from_cache_cluster(cluster: Mapping[str, Any]) -> Cluster:
    """A Cluster from one DescribeCacheClusters entry."""
    return Cluster(
        cluster_id=str(cluster["CacheClusterId"]),
        kind="cache-cluster",
        engine=_engine(cluster.get("Engine"), cluster_mode=False),
        status=str(cluster.get("CacheClusterStatus", "unknown")),
        nodes=cache_cluster_nodes(cluster),
        security_group_ids=tuple(str(group["SecurityGroupId"]) for group in cluster.get("SecurityGroups") or ()),
        subnet_group=cluster.get("CacheSubnetGroupName"),
    )


def from_replication_group(group: Mapping[str, Any], members: Iterable[Mapping[str, Any]]) -> Cluster:
    """A Cluster from a DescribeReplicationGroups entry and its member cache clusters' entries.

    The security groups and subnet group are read from the members: the replication group does not report them.
    """
    members = list(members)
    engine_name = group.get("Engine") or next((m.get("Engine") for m in members if m.get("Engine")), "redis")
    security_groups: dict[str, None] = {}
    for member in members:
        for entry in member.get("SecurityGroups") or ():
            security_groups[str(entry["SecurityGroupId"])] = None
    subnet_group = next((m["CacheSubnetGroupName"] for m in members if m.get("CacheSubnetGroupName")), None)
    return Cluster(
        cluster_id=str(group["ReplicationGroupId"]),
        kind="replication-group",
        engine=_engine(engine_name, cluster_mode=bool(group.get("ClusterEnabled"))),
        status=str(group.get("Status", "unknown")),
        nodes=member_nodes(members),
        security_group_ids=tuple(security_groups),
        subnet_group=subnet_group,
    )


def describe(client: AwsClient, cluster_id: str) -> Cluster:
    """Look the id up as a cache cluster, then as a replication group.

    Raises ClusterNotFound (exit 1) naming the id and region when it is neither; AwsError for API failures.
    """
    cache_cluster = client.describe_cache_cluster(cluster_id)
    if cache_cluster is not None:
        return from_cache_cluster(cache_cluster)
    group = client.describe_replication_group(cluster_id)
    if group is None:
        raise ClusterNotFound(
            f"ElastiCache cluster {cluster_id!r} not found in {client.region} "
            "(no cache cluster and no replication group has that id); check --cluster-id and --region"
        )
    members = []
    for member_id in sorted(group.get("MemberClusters") or ()):
        member = client.describe_cache_cluster(member_id)
        if member is not None:
            members.append(member)
    return from_replication_group(group, members)
