"""Unmodified cluster clients through natfwd serve in the lab: emcache Auto Discovery, redis-py and redis-cli -c."""

from __future__ import annotations

import subprocess
from pathlib import Path

from clusterkit import config_endpoint, run_python, serve_in_nat
from conftest import wait_for
from labkit import memcached_client, root, running_lab

from forwarder.lab import PUBLIC_ADDRESS

KEYS = 60

EMCACHE_CLIENT = f"""
import asyncio, json, emcache
async def main():
    client = await emcache.create_client(
        [emcache.MemcachedHostAddress("{PUBLIC_ADDRESS}", 11210)], autodiscovery=True, timeout=5
    )
    nodes = sorted([n.address, n.port] for n in client.cluster_managment().nodes())
    for i in range({KEYS}):
        await client.set(b"key%d" % i, b"value%d" % i)
    got = [(await client.get(b"key%d" % i)) for i in range({KEYS})]
    await client.close()
    print(json.dumps({{"nodes": nodes, "values": [g.value.decode() if g else None for g in got]}}))
asyncio.run(main())
"""


@root
def test_emcache_auto_discovery_sees_public_nodes_and_spreads_keys(tmp_path: Path) -> None:
    with running_lab("memcached") as lab:
        # As ElastiCache lists them: the node's DNS name (unknown to natfwd, whose forwards use IPs), its IP, port.
        listed = [(f"mycluster.{n.index + 1:04d}.use1.cache.amazonaws.com", n.address, n.port) for n in lab.nodes]
        config = lab.config_text(metrics=False) + "auto_discovery:\n  port: 11210\n  target: 127.0.0.1:21211\n"
        with (
            config_endpoint(lab.nat, "127.0.0.1", 21211, listed),
            serve_in_nat(lab, config, [11210, 11211, 11212, 11213], tmp_path),
        ):
            result = run_python(lab, lab.client, EMCACHE_CLIENT)
        assert isinstance(result, dict)
        assert result["nodes"] == [[PUBLIC_ADDRESS, 11211], [PUBLIC_ADDRESS, 11212], [PUBLIC_ADDRESS, 11213]]
        assert result["values"] == [f"value{i}" for i in range(KEYS)]
        per_node = []
        for node in lab.nodes:
            with memcached_client(node.address, node.port, namespace=lab.nat) as direct:
                per_node.append(len(direct.get_many([f"key{i}" for i in range(KEYS)])))
        assert sum(per_node) == KEYS
        assert all(count > 0 for count in per_node), per_node


REDIS_PY_CLIENT = f"""
import json
from redis.cluster import RedisCluster
client = RedisCluster(host="{PUBLIC_ADDRESS}", port=6379, socket_timeout=5)
for i in range({KEYS}):
    client.set(f"key{{i}}", f"value{{i}}")
values = [client.get(f"key{{i}}").decode() for i in range({KEYS})]
nodes = sorted([n.host, n.port] for n in client.get_nodes())
client.close()
print(json.dumps({{"nodes": nodes, "values": values}}))
"""


def _start_redis_cluster(lab: object, directory: Path) -> None:
    from forwarder.lab import Lab

    assert isinstance(lab, Lab)
    for node in lab.nodes:
        argv = ["redis-server", "--bind", node.address, "--port", "6379", "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / f"nodes-{node.index}.conf"), "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]  # fmt: skip
        lab.popen(node.namespace, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=directory)
    for node in lab.nodes:
        lab.wait_listening(lab.nat, node.address, 6379)
    addresses = [f"{node.address}:6379" for node in lab.nodes]
    lab.run(lab.nodes[0].namespace, ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"], timeout=60)

    def ready() -> bool:
        return all(
            "cluster_state:ok" in lab.run(node.namespace, ["redis-cli", "-h", node.address, "cluster", "info"]).stdout
            for node in lab.nodes
        )

    wait_for(ready, "cluster_state:ok on every node", 30)


@root
def test_redis_cluster_clients_see_only_public_addresses(tmp_path: Path) -> None:
    with running_lab("redis", start=False) as lab:
        _start_redis_cluster(lab, tmp_path)
        config = lab.config_text(metrics=False).replace("engine: redis", "engine: redis-cluster")
        with serve_in_nat(lab, config, [6379, 6380, 6381], tmp_path):
            result = run_python(lab, lab.client, REDIS_PY_CLIENT)
            assert isinstance(result, dict)
            assert result["nodes"] == [[PUBLIC_ADDRESS, 6379], [PUBLIC_ADDRESS, 6380], [PUBLIC_ADDRESS, 6381]]
            assert result["values"] == [f"value{i}" for i in range(KEYS)]

            # redis-cli -c follows MOVED: every key from port 6379, whichever master holds it.
            cli = ["redis-cli", "-c", "-h", PUBLIC_ADDRESS, "-p", "6379"]
            for i in range(12):
                assert lab.run(lab.client, [*cli, "set", f"cli{i}", f"v{i}"]).stdout.strip() == "OK"
            for i in range(12):
                assert lab.run(lab.client, [*cli, "get", f"cli{i}"]).stdout.strip() == f"v{i}"

            # No private address in any CLUSTER reply, RESP2 or RESP3, on any forward.
            seen = []
            for port in (6379, 6380, 6381):
                for protocol in ("-2", "-3"):
                    for command in (["cluster", "slots"], ["cluster", "shards"], ["cluster", "nodes"]):
                        argv = ["redis-cli", protocol, "-h", PUBLIC_ADDRESS, "-p", str(port), *command]
                        out = lab.run(lab.client, argv).stdout
                        seen.append(out)
                        assert "10.0.1." not in out, (port, protocol, command, out)
            assert all(PUBLIC_ADDRESS in out for out in seen)

        keys_per_master = [
            int(lab.run(node.namespace, ["redis-cli", "-h", node.address, "dbsize"]).stdout) for node in lab.nodes
        ]
        assert sum(keys_per_master) == KEYS + 12
        assert all(count > 0 for count in keys_per_master), keys_per_master
