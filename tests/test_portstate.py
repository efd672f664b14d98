"""The port state file: each discovered node keeps its port across restarts, and workers agree through it."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path

import pytest

from forwarder import config
from forwarder.portstate import assign

IDS = ["0001", "0002", "0003"]


def test_a_restart_keeps_every_nodes_port(tmp_path: Path) -> None:
    state = tmp_path / "ports.json"
    assert assign(state, "mc", IDS, {}, 11211, frozenset()) == {"0001": 11211, "0002": 11212, "0003": 11213}
    # 0001 goes away; then natfwd restarts and knows nothing but the file.
    assert assign(state, "mc", ["0002", "0003"], {}, 11211, frozenset()) == {"0002": 11212, "0003": 11213}
    assert json.loads(state.read_text()) == {
        "cluster_id": "mc",
        "first_port": 11211,
        "ports": {"0002": 11212, "0003": 11213},
    }
    # A new node takes the lowest free port, as without a file.
    assert assign(state, "mc", ["0002", "0003", "0004"], {}, 11211, frozenset())["0004"] == 11211


def test_the_file_wins_over_what_a_worker_remembers(tmp_path: Path) -> None:
    state = tmp_path / "ports.json"
    assign(state, "mc", IDS, {}, 11211, frozenset())
    # This worker had 0003 on 11211 (it saw the cluster at another moment); the file has 0001 there.
    ports = assign(state, "mc", IDS, {"0003": 11211, "0001": 11300}, 11211, frozenset())
    assert ports == {"0001": 11211, "0002": 11212, "0003": 11213}


@pytest.mark.parametrize(
    ("cluster_id", "first_port"), [("other", 11211), ("mc", 20000)], ids=["another-cluster", "new-first-port"]
)
def test_a_file_for_another_cluster_or_first_port_is_not_used(tmp_path: Path, cluster_id: str, first_port: int) -> None:
    state = tmp_path / "ports.json"
    assign(state, "mc", ["0002", "0003"], {}, 11211, frozenset())  # 0002 on 11211
    assert assign(state, cluster_id, IDS, {}, first_port, frozenset()) == {
        "0001": first_port,
        "0002": first_port + 1,
        "0003": first_port + 2,
    }


def test_an_unreadable_file_is_ignored_and_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "ports.json"
    state.write_text("{not json")
    assert assign(state, "mc", IDS, {}, 11211, frozenset()) == {"0001": 11211, "0002": 11212, "0003": 11213}
    assert "ignoring an unreadable port state file" in caplog.text
    assert json.loads(state.read_text())["ports"]["0003"] == 11213


def test_a_stored_port_that_is_now_reserved_or_taken_twice_is_reassigned(tmp_path: Path) -> None:
    state = tmp_path / "ports.json"
    state.write_text(json.dumps({"cluster_id": "mc", "first_port": 11211, "ports": {"0001": 9108, "0002": 11212,
                                                                                       "0003": 11212}}))  # fmt: skip
    ports = assign(state, "mc", IDS, {}, 11211, frozenset({9108}))  # 9108 is now the metrics port
    assert ports["0002"] == 11212
    assert sorted(ports.values()) == [11211, 11212, 11213]


def test_a_directory_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        assign(tmp_path / "missing" / "ports.json", "mc", IDS, {}, 11211, frozenset())


def _assign_in_a_process(path: str, order_seed: int, results: multiprocessing.Queue[dict[str, int]]) -> None:
    ids = [f"{i:04d}" for i in range(1, 9)]
    random.Random(order_seed).shuffle(ids)  # each "worker" lists the nodes in its own order
    results.put(assign(Path(path), "mc", ids, {}, 11211, frozenset()))


def test_workers_that_assign_at_the_same_moment_agree(tmp_path: Path) -> None:
    state = tmp_path / "ports.json"
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[dict[str, int]] = context.Queue()
    processes = [context.Process(target=_assign_in_a_process, args=(str(state), seed, results)) for seed in range(8)]
    for process in processes:
        process.start()
    assignments = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert all(ports == assignments[0] for ports in assignments), assignments
    assert sorted(assignments[0].values()) == list(range(11211, 11219))


def test_state_file_is_a_discovery_key() -> None:
    base = {
        "engine": "memcached",
        "public_address": "127.0.0.1",
        "allowed_clients": ["127.0.0.0/8"],
        "discovery": {"cluster_id": "mc", "state_file": "/var/lib/natfwd/ports.json"},
    }
    parsed = config.parse(base)
    assert parsed.discovery is not None and parsed.discovery.state_file == Path("/var/lib/natfwd/ports.json")
    with pytest.raises(config.ConfigError, match=r"discovery\.state_file"):
        config.parse({**base, "discovery": {"cluster_id": "mc", "state_file": 7}})
