"""discovery.describe_nodes against a real moto server, and build_forwards; boto3 stays out of `serve`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from awskit import ACCOUNT, AWS_ENV, REGION, REPO, Aws, build_world, memcached_cluster, node_name, redis_group
from awskit import aws_account as aws_account  # fixture "aws"
from awskit import moto_server as moto_server  # fixture "moto_url"

from forwarder import config
from forwarder.aws.cluster import ClusterNotFound, NodeEndpoint
from forwarder.aws.discovery import build_forwards, describe_nodes


def settings(aws: Aws, cluster_id: str, first_port: int = 11211) -> config.Discovery:
    return config.Discovery(cluster_id, REGION, 30.0, first_port, aws.url)


def test_cache_cluster_nodes_in_node_id_order(aws: Aws) -> None:
    memcached_cluster(aws, build_world(aws), "mc", nodes=3)  # seeded in reverse order
    assert describe_nodes(settings(aws, "mc")) == [
        NodeEndpoint("0001", node_name("mc", 1), 11211),
        NodeEndpoint("0002", node_name("mc", 2), 11211),
        NodeEndpoint("0003", node_name("mc", 3), 11211),
    ]


def test_nodes_without_an_endpoint_yet_are_left_out(aws: Aws) -> None:
    from moto.elasticache.models import elasticache_backends

    memcached_cluster(aws, build_world(aws), "mc", nodes=2)
    cluster = elasticache_backends[ACCOUNT][REGION].cache_clusters["mc"]
    cluster.cache_nodes = [*cluster.cache_nodes, {"CacheNodeId": "0003", "CacheNodeStatus": "creating"}]
    assert [node.node_id for node in describe_nodes(settings(aws, "mc"))] == ["0001", "0002"]


def test_replication_group_nodes_are_its_members(aws: Aws) -> None:
    names = redis_group(aws, build_world(aws), "rg")
    nodes = describe_nodes(settings(aws, "rg", 6379))
    assert nodes == [
        NodeEndpoint("rg-001", names[0], 6379),
        NodeEndpoint("rg-002", names[1], 6379),
        NodeEndpoint("rg-003", names[2], 6379),
    ]


def test_cluster_mode_replication_group(aws: Aws) -> None:
    redis_group(aws, build_world(aws), "shards", cluster_mode=True)
    nodes = describe_nodes(settings(aws, "shards", 6379))
    assert [node.node_id for node in nodes] == [
        "shards-0001-001",
        "shards-0001-002",
        "shards-0002-001",
        "shards-0002-002",
    ]


def test_missing_cluster_is_named(aws: Aws) -> None:
    with pytest.raises(ClusterNotFound, match="ElastiCache cluster 'ghost' not found in us-east-1"):
        describe_nodes(settings(aws, "ghost"))


def test_discovery_section_to_forwards(aws: Aws) -> None:
    names = memcached_cluster(aws, build_world(aws), "mc", nodes=3)
    cfg = config.loads(
        f"""
engine: memcached
public_address: 203.0.113.73
allowed_clients: [198.51.100.27/32]
discovery:
  cluster_id: mc
  region: {REGION}
  first_port: 21211
  endpoint_url: {aws.url}
"""
    )
    assert cfg.discovery is not None
    forwards = build_forwards(describe_nodes(cfg.discovery), cfg.discovery.first_port)
    assert forwards == tuple(config.Forward(21211 + i, config.Target(names[i], 11211)) for i in range(3))


def test_build_forwards_numbers_nodes_from_first_port() -> None:
    nodes = [NodeEndpoint("0001", "a.example", 6379), NodeEndpoint("0002", "b.example", 6380)]
    assert build_forwards(nodes, 7000) == (
        config.Forward(7000, config.Target("a.example", 6379)),
        config.Forward(7001, config.Target("b.example", 6380)),
    )
    assert build_forwards([], 11211) == ()
    with pytest.raises(config.ConfigError, match="discovery.first_port: 65535 leaves no room for 2 nodes"):
        build_forwards(nodes, 65535)


def test_boto3_is_loaded_only_when_an_aws_client_is_made() -> None:
    code = (
        "import sys\n"
        "import forwarder.cli, forwarder.aws.commands, forwarder.aws.discovery\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 imported eagerly'\n"
        "from forwarder.aws.client import AwsClient\n"
        "AwsClient.create('us-east-1', None, 'http://127.0.0.1:9')\n"
        "assert 'boto3' in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | AWS_ENV
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
