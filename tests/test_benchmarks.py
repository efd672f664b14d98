"""The benchmark harness: output parsers, the summary and its targets, the paths' configs, the Python-client agent
against real servers, and (as root) a tiny end-to-end run in the lab, including teardown on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import IN_CI, Node, require_binary
from labkit import root, unique_name

from benchmarks import agent, conntrack, cpu, loopback, packets, pool, report
from benchmarks.harness import measuring_order
from benchmarks.loads import (
    FIGURES,
    LOADS,
    parse_memcslap,
    parse_redis_benchmark_csv,
    redis_benchmark_argv,
    requests_per_run,
)
from benchmarks.paths import (
    KNOWN_PATHS,
    LOCAL_PORTS,
    MASQUERADE_PORTS,
    PATH_IDS,
    against,
    haproxy_config,
    natfwd_config,
    natfwd_env,
    nft_rules,
    socat_argv,
    unsupported,
)
from benchmarks.report import Measurement
from forwarder import config, lab, netns

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "benchmarks" / "run.py")]
PATH = {p.id: p for p in KNOWN_PATHS}

REDIS_BENCHMARK_CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","17241.38","0.296","0.064","0.279","0.455","0.839","2.687"
"GET","11764.71","0.439","0.048","0.455","0.695","1.015","2.527"
"""

MEMCSLAP = """\
Time to generate       2000 test keys:                0.003 seconds.
Time to set            2000 keys:                     0.019 seconds.
Time to start            50 threads:                  0.001 seconds.
--------------------------------------------------------------------
Time to get          100000 keys by   50 threads:     1.353 seconds.
--------------------------------------------------------------------
Time total:                                           1.376 seconds.
"""


# --- parsers ---------------------------------------------------------------------------------------------------
def test_redis_benchmark_csv_gives_requests_per_second_per_test() -> None:
    assert parse_redis_benchmark_csv(REDIS_BENCHMARK_CSV) == {"SET": 17241.38, "GET": 11764.71}


def test_redis_benchmark_without_results_is_an_error() -> None:
    with pytest.raises(ValueError, match="no results in redis-benchmark output"):
        parse_redis_benchmark_csv("Could not connect to Redis at 203.0.113.73:20021: Connection refused\n")


def test_memcslap_gives_keys_and_seconds_of_the_get_phase() -> None:
    assert parse_memcslap(MEMCSLAP) == (100000, 1.353)
    with pytest.raises(ValueError, match="no 'Time to get' line"):
        parse_memcslap("Failure to connect\n")


def test_redis_benchmark_command_line() -> None:
    argv = redis_benchmark_argv("203.0.113.73", 20021, 5000, {"clients": 8, "size": 262144, "tests": "set,get",
                                                                "dbnum": 1, "pipeline": 16})  # fmt: skip
    assert argv == ["redis-benchmark", "-h", "203.0.113.73", "-p", "20021", "-n", "5000", "-c", "8", "-t", "set,get",
                    "--csv", "-P", "16", "-d", "262144", "--dbnum", "1"]  # fmt: skip


# --- summary and targets ---------------------------------------------------------------------------------------
def _m(round_no: int, path: str, **values: float) -> Measurement:
    return Measurement(round_no, "x", path, {k.replace("_", "-"): v for k, v in values.items()}, 1.0)


def test_ratios_are_paired_within_rounds_and_latency_is_inverted() -> None:
    measurements = [
        _m(1, "direct", rb_get_c50=100.0, mc_1conn_p50=50.0),
        _m(1, "natfwd-w1", rb_get_c50=60.0, mc_1conn_p50=100.0),
        _m(1, "haproxy-t1", rb_get_c50=50.0, mc_1conn_p50=80.0),
        _m(2, "direct", rb_get_c50=200.0, mc_1conn_p50=50.0),
        _m(2, "natfwd-w1", rb_get_c50=100.0, mc_1conn_p50=100.0),
        _m(2, "haproxy-t1", rb_get_c50=100.0, mc_1conn_p50=100.0),
        _m(3, "natfwd-w1", rb_get_c50=90.0),  # no partner in round 3: left out of every ratio
    ]
    figures = report.summary(measurements)["figures"]
    c50 = figures["rb-get-c50"]
    assert c50["median"]["natfwd-w1"] == 90.0
    assert c50["vs_direct"]["natfwd-w1"] == pytest.approx((0.6 + 0.5) / 2)
    assert c50["vs_haproxy_t1"]["natfwd-w1"] == pytest.approx((1.2 + 1.0) / 2)
    p50 = figures["mc-1conn-p50"]
    assert p50["vs_direct"]["natfwd-w1"] == pytest.approx(0.5)  # twice the latency: half as good
    assert p50["vs_haproxy_t1"]["natfwd-w1"] == pytest.approx((0.8 + 1.0) / 2)


def test_targets_pass_only_at_or_above_their_minimum() -> None:
    measurements = [_m(r, "natfwd-w1", rb_get_c50=v) for r, v in ((1, 110.0), (2, 109.0), (3, 120.0))]
    measurements += [_m(r, "haproxy-t1", rb_get_c50=100.0) for r in (1, 2, 3)]
    results = {(r.target.figure, r.target.path): r for r in report.evaluate_targets(measurements)}
    c50 = results[("rb-get-c50", "natfwd-w1")]
    assert c50.ratios == pytest.approx((1.10, 1.09, 1.20))
    assert c50.median == pytest.approx(1.10) and c50.passed
    assert results[("rb-get-c1", "natfwd-w1")].median is None and not results[("rb-get-c1", "natfwd-w1")].passed
    text = "\n".join(report.target_table(report.evaluate_targets(measurements)))
    assert (
        "| `workers: 1` vs `nbthread 1` | GET c50 | redis-benchmark GET c50 | 1.10, 1.09, 1.20 | 1.10 | 1.1 | **pass** |"
        in text
    )
    assert "| redis-benchmark GET c1 | – | – | 1 | not measured |" in text


@pytest.mark.parametrize(
    ("ratios", "p", "said"),
    [
        ([1.1, 1.2, 1.05, 1.3, 1.02], 2 / 32, "better"),  # 5 of 5 above: the smallest p five rounds can give
        ([0.9, 0.95, 0.8, 0.99, 0.97, 0.93], 2 / 64, "worse"),
        ([1.1, 0.9, 1.2, 0.95, 1.05], 1.0, "within noise"),  # 3 above, 2 below
        ([1.3, 1.2, 1.1, 1.4], 2 / 16, "within noise"),  # 4 of 4 is still p = 0.125
        ([1.1, 1.1, 1.1, 1.1, 1.1, 0.9], 14 / 64, "within noise"),
        ([1.0, 1.0], 1.0, "within noise"),  # ties say nothing
    ],
)
def test_the_ab_verdict_is_a_two_sided_sign_test(ratios: list[float], p: float, said: str) -> None:
    assert report.sign_test_p(ratios) == pytest.approx(p)
    assert report.verdict(ratios) == said


def test_the_sign_test_takes_a_reference_other_than_one() -> None:
    assert report.sign_test_p([1.05, 1.02, 1.08, 1.01, 1.04], 1.1) == pytest.approx(2 / 32)
    assert report.verdict([1.05, 1.02, 1.08, 1.01, 1.04], 1.1) == "worse"
    assert report.verdict([1.05, 1.02, 1.08, 1.01, 1.04]) == "better"


def _write_run(directory: Path, commit: str, natfwd: list[float]) -> Path:
    """A results.json as the harness writes it, with one GET c50 round per value (HAProxy at 100 in each)."""
    measurements = [_m(r, "natfwd-w1", rb_get_c50=v) for r, v in enumerate(natfwd, 1)]
    measurements += [_m(r, "haproxy-t1", rb_get_c50=100.0) for r in range(1, len(natfwd) + 1)]
    directory.mkdir()
    meta = {"date": f"2026-12-05 {commit}", "commit": commit}
    data = {"meta": meta, "measurements": [m.to_json() for m in measurements]}
    (directory / "results.json").write_text(json.dumps(data))
    return directory


def test_pooling_runs_tests_every_round_against_the_targets_minimum(tmp_path: Path) -> None:
    # Each run alone passes or fails on its median; the rounds together are below 1.1 in 5 of 6.
    first = _write_run(tmp_path / "a", "aaaaaaa", [112.0, 105.0, 104.0])
    second = _write_run(tmp_path / "b", "bbbbbbb", [103.0, 108.0, 106.0])
    runs = [pool.load_run(first), pool.load_run(second)]
    (c50,) = [p for p in pool.pool(runs) if (p.target.figure, p.target.path) == ("rb-get-c50", "natfwd-w1")]
    assert c50.ratios == pytest.approx((1.12, 1.05, 1.04, 1.03, 1.08, 1.06)) and c50.runs == 2
    assert c50.reaching == 1 and c50.p == pytest.approx(14 / 64) and c50.verdict == "within noise"
    assert {p.target.figure for p in pool.pool(runs)} == {"rb-get-c50"}  # what no run measured is left out
    said: list[str] = []
    assert pool.main([str(first), str(second), str(second)], said.append) == 0
    assert "aaaaaaa" in said[0] and "bbbbbbb" in said[0]
    row = next(line for line in said if "| redis-benchmark GET c50 |" in line)
    assert row.endswith("| 3 | 9 | 1.06 | 1/9 | 1.1 | 0.04 | missed |"), row


def test_pooling_a_directory_without_results_says_which(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.pool", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'results.json'}: not the results of a benchmark run" in result.stderr


def test_a_ratio_just_below_a_target_never_prints_as_reaching_it() -> None:
    assert report.truncated(0.996) == "0.99"
    assert report.truncated(1.0) == "1.00"
    assert (
        report.human(1234567) == "1.23M" and report.human(12345) == "12.3k" and report.human(12.34, "µs") == "12.3 µs"
    )


def test_every_target_names_a_figure_the_loads_produce() -> None:
    assert all(t.figure in FIGURES for t in report.TARGETS)


def test_results_markdown_has_the_targets_tables_and_failures() -> None:
    measurements = [_m(1, p, rb_get_c50=v) for p, v in (("direct", 100.0), ("natfwd-w1", 55.0), ("haproxy-t1", 50.0))]
    measurements.append(Measurement(1, "rb-get-c1", "natfwd-w1", {}, 1.0, "redis-benchmark exited 1: refused"))
    text = report.markdown(measurements, {"date": "today", "rounds": 1}, ["direct", "natfwd-w1", "haproxy-t1"], "c.png")
    assert "## Targets (issues 6 and 22)" in text
    assert "| redis-benchmark GET c50 | req/s | 100 | 55.0 | 50.0 |" in text
    assert "| redis-benchmark GET c50 | 0.55 | 0.50 |" in text  # relative to direct
    assert "| redis-benchmark GET c50 | 2.00 | 1.10 |" in text  # relative to HAProxy t1
    assert "- round 1, rb-get-c1 on natfwd-w1: redis-benchmark exited 1: refused" in text
    assert "![natfwd benchmark chart](c.png)" in text


def test_the_chart_draws_a_run_without_latency_figures(tmp_path: Path) -> None:
    """--loads with throughput figures only (no agent load): nothing for the log-scaled latency panel."""
    _require_matplotlib()
    from benchmarks import chart

    measurements = [
        _m(1, p, rb_get_c50_new=v) for p, v in (("direct", 100.0), ("natfwd-w1", 40.0), ("haproxy-t1", 60.0))
    ]
    chart.draw(report.summary(measurements), ["direct", "natfwd-w1", "haproxy-t1"], tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_natfwd_is_measured_right_next_to_its_haproxy_and_every_group_leads_in_turn() -> None:
    firsts = set()
    for turn in range(10):
        order = [p.id for p in measuring_order(KNOWN_PATHS, turn)]
        assert sorted(order) == sorted(PATH)
        pairs = ("natfwd-w1", "haproxy-t1"), ("natfwd-w2", "haproxy-t2"), ("natfwd-mux-w1", "haproxy-t1")
        for natfwd, haproxy in (*pairs, ("natfwd-mux-w2", "haproxy-t2")):
            assert abs(order.index(natfwd) - order.index(haproxy)) == 1
        firsts.add(order[0])
    # the `nbthread 1` group leads too (its ends are the pure-Python twins)
    assert {"direct", "socat"} <= firsts and firsts & {"natfwd-py-w1", "natfwd-py-mux-w1"}
    assert firsts & {"kernel", "natfwd-kernel"}


def test_each_path_compared_with_another_runs_right_next_to_it() -> None:
    pairs = ("natfwd-py-w1", "natfwd-w1"), ("natfwd-py-mux-w1", "natfwd-mux-w1"), ("natfwd-kernel", "kernel")
    for turn in range(6):
        order = [p.id for p in measuring_order(KNOWN_PATHS, turn)]
        for path, beside in pairs:
            assert abs(order.index(path) - order.index(beside)) == 1, order
        # ...without parting the C paths from their HAProxy
        assert abs(order.index("natfwd-w1") - order.index("haproxy-t1")) == 1, order
        assert abs(order.index("natfwd-mux-w1") - order.index("haproxy-t1")) == 1, order


@pytest.mark.parametrize("mirrored", ["natfwd-w1", "natfwd-mux-w1", "natfwd-mux-w2"])
def test_the_against_base_runs_right_next_to_the_path_it_copies_which_stays_next_to_its_haproxy(mirrored: str) -> None:
    base = against(PATH[mirrored])
    assert (base.id, base.multiplex, base.threads) == ("natfwd-base", PATH[mirrored].multiplex, PATH[mirrored].threads)
    haproxy = "haproxy-t1" if PATH[mirrored].threads == 1 else "haproxy-t2"
    for turn in range(6):
        order = [p.id for p in measuring_order((*KNOWN_PATHS, base), turn)]
        assert abs(order.index("natfwd-base") - order.index(mirrored)) == 1, order
        assert abs(order.index(mirrored) - order.index(haproxy)) == 1, order


@pytest.mark.parametrize("mirrored", ["natfwd-kernel", "natfwd-py-w1", "natfwd-py-mux-w1"])
def test_the_against_base_keeps_the_data_path_and_the_pure_python_of_the_path_it_copies(mirrored: str) -> None:
    of = PATH[mirrored]
    base = against(of)
    assert (base.data_path, base.pure_python, base.multiplex) == (of.data_path, of.pure_python, of.multiplex)
    assert ("data_path: kernel" in natfwd_config(base, "10.0.1.230", 9111)) == (of.data_path == "kernel")


# --- paths -----------------------------------------------------------------------------------------------------
def test_natfwd_config_is_the_labs_with_this_paths_ports_and_workers() -> None:
    cfg = config.loads(natfwd_config(PATH["natfwd-w2"], "10.0.1.230", 9111))
    assert [(f.port, str(f.target)) for f in cfg.forwards] == [(20030, "10.0.1.230:11211"), (20031, "10.0.1.230:6379")]
    assert cfg.workers == 2 and cfg.listen_address == lab.PUBLIC_ADDRESS
    assert cfg.is_allowed(lab.CLIENT_ADDRESS) and not cfg.is_allowed("198.51.100.28")


def test_multiplexing_paths_run_one_natfwd_per_engine_framed_as_that_engine() -> None:
    for engine, port in (("memcached", 20090), ("redis", 20091)):
        cfg = config.loads(natfwd_config(PATH["natfwd-mux-w1"], "10.0.1.230", 9111, engine))
        assert cfg.engine == engine and cfg.multiplex and cfg.workers == 1
        assert [f.port for f in cfg.forwards] == [port]
    assert not config.loads(natfwd_config(PATH["natfwd-w1"], "10.0.1.230", 9111)).multiplex
    # Two multiplexing workers are pinned and steered (README: cpu_affinity); the transparent ones are not.
    assert config.loads(natfwd_config(PATH["natfwd-mux-w2"], "10.0.1.230", 9111, "redis")).cpu_affinity
    assert not config.loads(natfwd_config(PATH["natfwd-w2"], "10.0.1.230", 9111)).cpu_affinity


def test_pure_python_paths_are_the_c_paths_without_extensions() -> None:
    for py, c in (("natfwd-py-w1", "natfwd-w1"), ("natfwd-py-mux-w1", "natfwd-mux-w1")):
        mine = config.loads(natfwd_config(PATH[py], "10.0.1.230", 9111, "redis"))
        theirs = config.loads(natfwd_config(PATH[c], "10.0.1.230", 9111, "redis"))
        assert (mine.multiplex, mine.workers) == (theirs.multiplex, theirs.workers)
        assert {f.port for f in mine.forwards}.isdisjoint(f.port for f in theirs.forwards)
        assert natfwd_env(PATH[py])["NATFWD_NO_EXTENSIONS"] == "1"
        assert "NATFWD_NO_EXTENSIONS" not in natfwd_env(PATH[c])


def test_the_pure_python_env_really_loads_no_extension(tmp_path: Path) -> None:
    probe = "from forwarder import rawmode; from forwarder.protocols import framing; print(rawmode.CRELAY, framing.C)"
    for spec, expected in ((PATH["natfwd-py-w1"], "None None"), (PATH["natfwd-w1"], None)):
        result = subprocess.run([sys.executable, "-c", probe], env=natfwd_env(spec), cwd=tmp_path,
                                capture_output=True, text=True, check=True)  # fmt: skip
        if expected is None:
            assert "None" not in result.stdout, result.stdout  # the C path has both (scripts/setup builds them)
        else:
            assert result.stdout.strip() == expected


def test_the_kernel_data_path_runs_only_on_a_natfwd_that_has_one() -> None:
    spec = PATH["natfwd-kernel"]
    text = natfwd_config(spec, "10.0.1.230", 9111)
    assert "data_path: kernel\n" in text and "drain_timeout_s: 0\n" in text  # stopped after each measurement
    assert "data_path" not in natfwd_config(PATH["natfwd-w1"], "10.0.1.230", 9111)
    assert unsupported(PATH["natfwd-w1"]) is None and unsupported(PATH["kernel"]) is None
    note = unsupported(spec)
    try:
        config.loads(natfwd_config(spec, "10.0.1.230", 9111))
    except config.ConfigError:
        assert note is not None and note.startswith("natfwd-kernel skipped: ") and "data_path" in note
    else:
        assert note is None


@pytest.mark.parametrize(
    ("path_id", "present", "absent"),
    [
        (
            "haproxy-t2",
            ["nbthread 2", "cpu-map auto:1/1-2 0-1", f"bind {lab.PUBLIC_ADDRESS}:20050"],
            ["splice", "maxpipes"],
        ),
        (
            "haproxy-splice",
            ["nbthread 1", f"bind {lab.PUBLIC_ADDRESS}:20080", "option splice-auto", "maxpipes 512"],
            ["cpu-map"],
        ),
    ],
)
def test_haproxy_config_is_valid_for_haproxy(
    tmp_path: Path, path_id: str, present: list[str], absent: list[str]
) -> None:
    binary = require_binary("haproxy")
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config(PATH[path_id], "10.0.1.230"))
    result = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    assert all(line in text for line in present) and not any(word in text for word in absent), text


def test_spliced_haproxy_runs_only_when_asked_for() -> None:
    assert "haproxy-splice" not in PATH_IDS  # not in a default run: the targets compare plain HAProxy


def test_kernel_path_uses_the_emitted_nft_rules_for_its_own_ports() -> None:
    rules = nft_rules(PATH["kernel"], "10.0.1.230")
    assert "tcp dport 20010 dnat to 10.0.1.230:11211" in rules
    assert "tcp dport 20011 dnat to 10.0.1.230:6379" in rules
    # Masqueraded to ports outside the NAT namespace's local range, so no flow takes a proxy connection's 4-tuple.
    assert rules.count(f"masquerade to :{MASQUERADE_PORTS}\n") == 2 and " masquerade\n" not in rules
    high = int(LOCAL_PORTS.split()[1])
    assert high < int(MASQUERADE_PORTS.split("-")[0])


def test_socat_relays_with_nodelay_and_the_allowlist() -> None:
    assert socat_argv(PATH["socat"], "redis", "10.0.1.230") == [
        "socat",
        f"TCP4-LISTEN:20061,bind={lab.PUBLIC_ADDRESS},reuseaddr,fork,backlog=1024,nodelay,range={lab.CLIENT_ADDRESS}/32",
        "TCP4:10.0.1.230:6379,nodelay",
    ]


# --- the agent against real servers ----------------------------------------------------------------------------
def test_proc_stat_lines_parse_even_with_a_parenthesised_command_name() -> None:
    tick = cpu.TICK_S
    own, reaped = cpu.parse_stat("42 (a) (b c)) S 1 42 42 0 -1 4194560 0 0 0 0 250 50 30 20 20 0 1 0 5 0 0")
    assert (own.user_s, own.sys_s, reaped.user_s, reaped.sys_s) == pytest.approx(
        (250 * tick, 50 * tick, 30 * tick, 20 * tick)
    )
    busy = cpu.parse_proc_stat("cpu  100 5 40 9000 7 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert (busy.user_s, busy.sys_s) == pytest.approx((105 * tick, 46 * tick))  # idle and iowait left out


def test_a_process_trees_cpu_counts_live_and_reaped_children() -> None:
    # A parent that lets one child burn CPU and exit (reaped), then starts another that burns and stays alive.
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    script = (
        "import subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
        f"live = subprocess.Popen([sys.executable, '-c', {burn!r} + 'time.sleep(30)'])\n"
        "print('ready', flush=True)\n"
        "live.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 10
        while cpu.tree([parent.pid]).total_s < 0.55 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu.tree([parent.pid]).total_s >= 0.55  # 0.3 s reaped + 0.3 s live, minus tick rounding
        assert cpu.tree([2**22 + 1]) == cpu.Cpu()  # a pid that cannot exist counts nothing
    finally:
        for child in cpu._children(parent.pid):
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


def test_fixed_count_loads_know_their_requests_and_timed_ones_do_not() -> None:
    loads = {load.id: load for load in LOADS}
    assert requests_per_run(loads["rb-get-c50"], 1000) == 1000
    assert requests_per_run(loads["rb-256k"], 300) == 600  # SET and GET
    assert requests_per_run(loads["ms-get-c50"], 1020) == 1000  # whole requests per thread
    assert requests_per_run(loads["mc-1conn"], 0) is None


def test_cpu_per_request_table_shows_the_proxy_and_the_machine() -> None:
    def run(path: str, round_no: int, proxy: bool) -> Measurement:
        spent = {"machine_s": 0.2 * round_no, "requests": 10000.0}
        if proxy:
            spent |= {"proxy_user_s": 0.02, "proxy_sys_s": 0.08}
        return Measurement(round_no, "rb-get-c50", path, {"rb-get-c50": 1e5}, 1.0, cpu=spent)

    measurements = [run(p, r, p != "direct") for p in ("direct", "natfwd-w1") for r in (1, 2, 3)]
    assert measurements[3].cpu_per_request_us("proxy") == pytest.approx(10.0)
    assert measurements[0].cpu_per_request_us("proxy") is None
    text = "\n".join(report.cpu_tables(measurements, ["direct", "natfwd-w1"]))
    assert "| redis-benchmark GET, 50 connections | 10.0 (2.0) |" in text
    assert "| redis-benchmark GET, 50 connections | 40.0 | 40.0 |" in text  # machine: median of 20, 40, 60
    assert Measurement.from_json(measurements[3].to_json()) == measurements[3]


def test_the_c_table_pairs_each_c_path_with_its_pure_python_twin() -> None:
    def run(path: str, round_no: int, us: float, rps: float) -> Measurement:
        spent = {"machine_s": 1.0, "requests": 10000.0, "proxy_user_s": us / 1e6 * 10000 / 2,
                 "proxy_sys_s": us / 1e6 * 10000 / 2}  # fmt: skip
        return Measurement(round_no, "rb-get-c50-new", path, {"rb-get-c50-new": rps}, 1.0, cpu=spent)

    measurements = [run("natfwd-w1", r, 10.0 * r, 1000.0 * r) for r in (1, 2, 3)]
    measurements += [run("natfwd-py-w1", r, 15.0 * r, 800.0 * r) for r in (1, 2, 3)]
    measurements.append(run("natfwd-mux-w1", 1, 5.0, 1.0))  # no pure-Python twin measured: no row
    text = "\n".join(report.c_table(measurements))
    assert "### What the C extensions buy" in text
    # medians: C 20 µs and 2.00k, Python 30 µs and 1.60k; paired ratios 1.5 (CPU) and 1.25 (throughput)
    row = (
        "| redis-benchmark GET c50, new conn each | natfwd w1 | 20.0 | 30.0 | 1.50 | 2.00k req/s | 1.60k req/s | 1.25 |"
    )
    assert row in text, text
    assert "natfwd mux w1" not in text
    assert report.c_table(measurements[:3]) == []
    assert "### What the C extensions buy" in report.markdown(measurements, {}, ["natfwd-w1", "natfwd-py-w1"], None)


def test_new_connections_and_the_kernel_data_path_have_targets() -> None:
    wanted = {(t.figure, t.path, t.base, t.minimum) for t in report.TARGETS}
    assert ("rb-get-c50-new", "natfwd-w1", "haproxy-t1", 1.0) in wanted
    assert {("rb-get-c50", "natfwd-kernel", "kernel", 0.95), ("rb-256k-get", "natfwd-kernel", "kernel", 0.95)} <= wanted


def _link(name: str, received: int, sent: int) -> dict[str, object]:
    """One interface as `ip -s -j link show` prints it (the fields parse_links reads, and some it must skip)."""
    return {
        "ifindex": 2, "ifname": name, "flags": ["UP"], "mtu": 1500, "link_type": "ether",
        "stats64": {"rx": {"bytes": received * 100, "packets": received, "errors": 0, "dropped": 0},
                    "tx": {"bytes": sent * 100, "packets": sent, "errors": 0, "dropped": 0}},
    }  # fmt: skip


def test_packets_are_counted_on_the_nats_public_side_and_bridge_only() -> None:
    # node1 is a bridge port: its packets are br0's again, and lo carries none of the paths' traffic.
    links = [_link("lo", 1000, 1000), _link("eth0", 30, 50), _link("br0", 50, 22), _link("node1", 50, 22)]
    assert packets.parse_links(json.dumps(links)) == packets.Packets(80, 72)
    assert packets.Packets(80, 72) - packets.Packets(30, 2) == packets.Packets(50, 70)
    assert packets.namespace("no-such-namespace-natfwd") is None  # `ip` fails: the measurement goes without


def test_packets_per_request_table() -> None:
    def run(path: str, round_no: int, sent: float) -> Measurement:
        spent = {"machine_s": 0.2, "requests": 1000.0}
        net = {"nat_received": 8000.0, "nat_sent": sent * round_no}
        return Measurement(round_no, "rb-256k", path, {"rb-256k-set": 1e4}, 1.0, cpu=spent, net=net)

    measurements = [run(p, r, s) for p, s in (("kernel", 10000.0), ("natfwd-w1", 7000.0)) for r in (1, 2, 3)]
    measurements.append(Measurement(1, "mc-1conn", "natfwd-w1", {"mc-1conn-p50": 80.0}, 1.0, net={"nat_sent": 5.0}))
    assert measurements[0].packets_per_request("sent") == 10.0
    assert measurements[-1].packets_per_request("sent") is None  # a timed load has no request count
    text = "\n".join(report.packet_table(measurements, ["kernel", "natfwd-w1"]))
    assert "| redis-benchmark SET and GET of 256 KiB values, 8 connections | 8.00 / 20.00 | 8.00 / 14.00 |" in text
    assert "pymemcache" not in text
    assert Measurement.from_json(measurements[3].to_json()) == measurements[3]
    assert report.packet_table(measurements[-1:], ["natfwd-w1"]) == []


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert agent.percentile(values, 0.5) == 50.0 and agent.percentile(values, 0.99) == 99.0
    assert agent.percentile([], 0.5) == 0.0


@pytest.mark.parametrize("engine", ["memcached", "redis"])
def test_agent_jobs_against_real_servers(
    engine: str, start_memcached: Callable[..., Node], start_redis: Callable[..., Node]
) -> None:
    node = start_memcached() if engine == "memcached" else start_redis()
    one = agent.latency(engine, node.host, node.port, 0.2)
    assert one["ops"] > 100 and 0 < one["p50_us"] <= one["p99_us"]
    many = agent.many(engine, node.host, node.port, 0.2, connections=20, threads=2, processes=2)
    assert many["ops"] > 100 and many["p99_us"] > 0
    if engine == "memcached":
        bulk = agent.bulk(engine, node.host, node.port, 0.2, 256 * 1024)
        assert bulk["set_ops"] > 10 and bulk["get_ops"] > 10


def test_many_reports_why_a_process_could_not_connect(
    start_redis: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot for two processes of one connection each: the one refused raises redis' own error, and the one that
    connected stops waiting for it at once (the barrier is aborted). Its wait is made longer than the test's own
    timeout, so a barrier left standing fails the test as a hang instead of passing late."""
    import redis

    monkeypatch.setattr(agent, "START_TIMEOUT_S", 3600.0)  # the forked processes inherit it
    node = start_redis(None, "127.0.0.1", "--maxclients", "1")
    with pytest.raises(redis.exceptions.ConnectionError, match="max number of clients reached"):
        agent.many("redis", node.host, node.port, 0.2, connections=2, threads=1, processes=2)


def test_agent_reports_a_wrong_value_as_an_error(start_redis: Callable[..., Node]) -> None:
    node = start_redis()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.agent"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        job = {"job": "latency", "engine": "redis", "host": node.host, "port": node.port, "duration_s": 0.1}
        stdout, _ = process.communicate(json.dumps(job) + "\n" + json.dumps({**job, "job": "nope"}) + "\n", 30)
    finally:
        process.kill()
    first, second = (json.loads(line) for line in stdout.splitlines())
    assert first["result"]["ops"] > 0
    assert second["error"].startswith("KeyError")
    with pytest.raises(RuntimeError, match="wrong value through the path: expected 3 bytes"):
        agent._check(b"abd", b"abc")


# --- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "--rounds: 0 is not valid"),
        (["--duration", "0"], "--duration: 0.0 is not valid"),
        (["--paths", "natfwd-w1,haproxy-t1"], "--paths: must include direct"),
        (["--against", "no-such-revision"], "--against: 'no-such-revision' is not a commit of this repository"),
        (["--against", "HEAD", "--paths", "direct,haproxy-t1"], "--against: needs natfwd-w1 in --paths"),
        (
            ["--against", "HEAD", "--against-path", "natfwd-mux-w1", "--paths", "direct,natfwd-w1"],
            "--against: needs natfwd-mux-w1 in --paths",
        ),
        (["--against-path", "haproxy-t1"], "--against-path: 'haproxy-t1' is not a natfwd path; use one of natfwd-w1,"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"benchmarks/run.py: error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_an_unknown_path_is_a_usage_error() -> None:
    result = subprocess.run([*RUN, "--paths", "direct,nginx"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "unknown path nginx; choose from direct, kernel" in result.stderr


# --- end to end in the lab (root) ------------------------------------------------------------------------------
def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("matplotlib is not installed; the README's test command installs it")
        pytest.skip("matplotlib is not installed")


def _lab_namespaces(stderr: str) -> set[str]:
    """The namespaces that exist now of the lab a run said it built (`building lab NAME ...` on its stderr).

    Only this run's own lab: other tests (in parallel workers) and benchmarks build and remove bench-* labs meanwhile.
    """
    match = re.search(r"^building lab (bench-\w+) ", stderr, re.MULTILINE)
    assert match, f"the run did not say which lab it built:\n{stderr[-3000:]}"
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith(f"{match[1]}-")}
    except FileNotFoundError:
        return set()


@root
def test_a_tiny_run_measures_every_path_and_writes_all_outputs(tmp_path: Path) -> None:
    _require_matplotlib()
    for tool in ("memcached", "redis-server", "redis-benchmark", "haproxy", "nft"):
        require_binary(tool)
    out = tmp_path / "out"
    result = subprocess.run(
        [*RUN, "--rounds", "1", "--duration", "0.2", "--paths",
         "direct,natfwd-w1,haproxy-t1,natfwd-mux-w1,natfwd-py-w1,natfwd-kernel", "--loads", "rb-get-c50,mc-1conn",
         "--against", "HEAD", "--against-path", "natfwd-mux-w1", "--out", str(out)],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    kernel_note = unsupported(PATH["natfwd-kernel"])
    total = 14 if kernel_note is None else 12  # natfwd-kernel is measured only where natfwd has it
    assert f"[round 1/1  {total}/{total}" in result.stderr, result.stderr[-3000:]
    assert "target natfwd-w1/haproxy-t1 rb-get-c50:" in result.stderr
    data = json.loads((out / "results.json").read_text())
    done = {(m["load"], m["path"]) for m in data["measurements"] if m["error"] is None}
    # natfwd-base: natfwd-mux-w1 at this very commit, via --against and --against-path
    paths = ["direct", "natfwd-w1", "haproxy-t1", "natfwd-mux-w1", "natfwd-py-w1", "natfwd-base"]
    if kernel_note is None:
        paths.append("natfwd-kernel")
    else:  # skipped, and said so
        assert kernel_note in result.stderr and kernel_note in (out / "results.md").read_text()
        assert data["meta"]["skipped"] == [kernel_note]
    assert done == {(load, path) for load in ("rb-get-c50", "mc-1conn") for path in paths}
    assert "### What the C extensions buy" in (out / "results.md").read_text()
    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:forwarder/relay.py"], capture_output=True)
    assert (out / "against" / "forwarder" / "relay.py").read_bytes() == committed.stdout
    # ...with its C extensions built, or natfwd-base would run the pure-Python fallbacks against this C.
    imported = subprocess.run(
        [sys.executable, "-c", "import forwarder._crelay, forwarder.protocols._cframing as c; print(c.__file__)"],
        env={**os.environ, "PYTHONPATH": str(out / "against")}, cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert imported.stdout.strip().startswith(str(out / "against")), imported.stderr
    assert "### natfwd mux w1 over itself at " in (out / "results.md").read_text()
    assert data["meta"]["against_path"] == "natfwd-mux-w1"
    base_configs = sorted(p.name for p in (out / "logs").glob("natfwd-base*.yaml"))
    assert base_configs == ["natfwd-base-memcached.yaml", "natfwd-base-redis.yaml"]  # multiplexing: one per engine
    assert "multiplex: true" in (out / "logs" / "natfwd-base-redis.yaml").read_text()
    assert data["summary"]["figures"]["rb-get-c50"]["median"]["natfwd-w1"] > 1000
    spent = {(m["load"], m["path"]): m["cpu"] for m in data["measurements"]}
    counts = {load["id"]: load["requests_per_run"] for load in data["loads"]}
    assert spent[("rb-get-c50", "natfwd-w1")]["requests"] == counts["rb-get-c50"]
    assert spent[("rb-get-c50", "natfwd-w1")]["proxy_sys_s"] > 0  # natfwd did the relaying
    assert "proxy_sys_s" not in spent[("rb-get-c50", "direct")]  # no proxy on the direct path
    assert "requests" not in spent[("mc-1conn", "natfwd-w1")]  # the agent's loads run for a time, not a count
    assert all(cost["machine_s"] > 0 for cost in spent.values())
    assert "### CPU per request" in (out / "results.md").read_text()
    net = {(m["load"], m["path"]): m["net"] for m in data["measurements"]}
    assert all(counted["nat_received"] > 0 and counted["nat_sent"] > 0 for counted in net.values())
    assert "### Packets per request" in (out / "results.md").read_text()
    assert "## Targets (issues 6 and 22)" in (out / "results.md").read_text()
    pooled = subprocess.run([sys.executable, "-m", "benchmarks.pool", str(out), str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert "| redis-benchmark GET c50 | 2 | 2 |" in pooled  # one round per run, the same run given twice
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _lab_namespaces(result.stderr)


@root
def test_sigterm_mid_run_tears_the_lab_down(tmp_path: Path) -> None:
    _require_matplotlib()
    process = subprocess.Popen([*RUN, "--duration", "5", "--paths", "direct,socat", "--out", str(tmp_path)],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    said = ""
    try:
        assert process.stderr is not None
        for line in process.stderr:
            said += line
            if line.startswith("calibrated") or line.startswith("[round"):
                break
        else:
            pytest.fail(f"the run ended before measuring (exit {process.wait()})")
        assert _lab_namespaces(said), "the run's lab should exist while it measures"
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(60) == 130, rest
        assert "interrupted; the lab is torn down" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    deadline = time.monotonic() + 10
    while _lab_namespaces(said) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _lab_namespaces(said)
    assert (tmp_path / "results.json").exists()


# --- the loopback tool (benchmarks/loopback.py) ------------------------------------------------------------------
STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 31.20    0.101000           5     20000           accept4
 20.10    0.065000           1     80000       250 read
  0.00    0.000000           0         3           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.166000           1    100003       250 total
"""


def test_strace_summary_gives_calls_per_system_call() -> None:
    assert loopback.parse_strace_c(STRACE_C) == {"accept4": 20000, "read": 80000, "getpid": 3}


def test_the_loopback_tool_measures_natfwd_and_haproxy_per_request() -> None:
    for tool in ("redis-server", "redis-benchmark", "haproxy"):
        require_binary(tool)
    # Enough requests that even haproxy's CPU time spans several of /proc's clock ticks: with a few hundred it could
    # read as 0 ticks, and the tool divides by it.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.loopback", "--requests", "3000", "--rounds", "1", "--kinds",
         "natfwd,natfwd-py,haproxy"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| natfwd") or line.startswith("| hap")]
    assert [row.split(" | ")[0] for row in rows] == ["| natfwd", "| natfwd-py", "| haproxy"], result.stdout
    assert "natfwd-py over natfwd, paired medians: CPU per request " in result.stdout


@root
def test_a_namespaces_conntrack_table_is_emptied() -> None:
    name = unique_name("ct")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "set", "lo", "up"], ["nft", "-f", "-"]):
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True, text=True, input=CONNTRACK_ON)
        with netns.entered(name), socket.create_server(("127.0.0.1", 0)) as server:
            for _ in range(3):
                socket.create_connection(server.getsockname()).close()
                server.accept()[0].close()
        table = Path("/proc/net/nf_conntrack")
        with netns.entered(name):
            if not table.exists():
                pytest.skip("the kernel has no /proc/net/nf_conntrack (CONFIG_NF_CONNTRACK_PROCFS)")
            assert len(table.read_text().splitlines()) >= 3
        conntrack.flush_namespace(name)
        with netns.entered(name):
            assert table.read_text() == ""
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


CONNTRACK_ON = "table inet t {\n chain out {\n  type filter hook output priority 0;\n  ct state new counter\n }\n}\n"
