"""Discovered nodes' listen ports kept in a file: shared by the workers, and kept across restarts."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from forwarder import config as config_mod

log = logging.getLogger("natfwd.discovery")

SHARED_FILE_ENV = "NATFWD_PORTS_FILE"
"""Set by the supervisor for its workers when discovery has no state_file: the file they share."""


def assign_ports(
    node_ids: Sequence[str], previous: Mapping[str, int], first_port: int, reserved: frozenset[int] = frozenset()
) -> dict[str, int]:
    """Listen port per node id (ids in node-id order).

    With no previous assignment, node N gets the N-th port from first_port (skipping `reserved` ports, such as
    the auto_discovery one). Afterwards a node keeps its port for as long as it exists, so clients that hold an
    address keep reaching the same node; an added node takes the lowest free port from first_port, and a removed
    node's port is freed. Raises ConfigError when a port would pass 65535.
    """
    ports = {node_id: previous[node_id] for node_id in node_ids if node_id in previous}
    used = set(ports.values()) | set(reserved)
    candidate = first_port
    for node_id in node_ids:
        if node_id in ports:
            continue
        while candidate in used:
            candidate += 1
        if candidate > 65535:
            raise config_mod.ConfigError(
                f"discovery.first_port: {first_port} leaves no room for {len(node_ids)} nodes; pick a lower first_port"
            )
        ports[node_id] = candidate
        used.add(candidate)
    return ports


def _stored(path: Path, cluster_id: str, first_port: int) -> dict[str, int]:
    """The assignment in `path` for this cluster and first_port; {} when there is none or it cannot be used."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable port state file", extra={"path": str(path), "error": str(exc)})
        return {}
    if not isinstance(data, dict) or data.get("cluster_id") != cluster_id or data.get("first_port") != first_port:
        return {}  # another cluster, or a new first_port that renumbers everything
    ports = data.get("ports")
    if not isinstance(ports, dict):
        return {}
    return {str(node): port for node, port in ports.items() if isinstance(port, int) and 0 < port < 65536}


def assign(
    path: Path,
    cluster_id: str,
    node_ids: Sequence[str],
    previous: Mapping[str, int],
    first_port: int,
    reserved: frozenset[int],
) -> dict[str, int]:
    """assign_ports(), starting from what `path` holds, and store the result there; one process at a time.

    The file wins over this process's `previous`, so workers that saw the cluster change at different moments
    agree on the next poll. Raises OSError when the file or its lock cannot be written.
    """
    with open(path.with_name(path.name + ".lock"), "a", encoding="utf-8") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        wanted = set(node_ids)
        base: dict[str, int] = {}
        taken = set(reserved)
        for source in (_stored(path, cluster_id, first_port), previous):
            for node, port in source.items():
                if node in wanted and node not in base and port not in taken:
                    base[node] = port
                    taken.add(port)
        ports = assign_ports(node_ids, base, first_port, reserved)
        data = {"cluster_id": cluster_id, "first_port": first_port, "ports": dict(sorted(ports.items()))}
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return ports
