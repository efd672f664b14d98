"""Pure summarising of per-round measurements: medians, paired ratios, the issue's targets, and results.md text."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.loads import FIGURES, LOADS, Figure
from benchmarks.paths import BASE_ID, KNOWN_PATHS

PATH_LABELS = {p.id: p.label for p in KNOWN_PATHS}
SHORT = {
    "direct": "direct",
    "kernel": "kernel",
    "natfwd-w1": "natfwd w1",
    "natfwd-w2": "natfwd w2",
    "natfwd-mux-w1": "natfwd mux w1",
    "natfwd-mux-w2": "natfwd mux w2",
    "haproxy-t1": "HAProxy t1",
    "haproxy-t2": "HAProxy t2",
    "haproxy-splice": "HAProxy t1 splice",
    "socat": "socat",
    "natfwd-py-w1": "natfwd py w1",
    "natfwd-py-mux-w1": "natfwd py mux w1",
    "natfwd-kernel": "natfwd kernel",
    BASE_ID: "natfwd base",
}
# What the C extensions buy: each natfwd path with the C extensions, and the same path on the pure-Python fallbacks.
C_AND_PYTHON = (("natfwd-w1", "natfwd-py-w1"), ("natfwd-mux-w1", "natfwd-py-mux-w1"))


@dataclass(frozen=True, slots=True)
class Target:
    """One row of the issue's target table: natfwd path over HAProxy path on one figure, at least `minimum`."""

    comparison: str
    test: str
    figure: str
    path: str
    base: str
    minimum: float


TARGETS: tuple[Target, ...] = (
    Target(
        "`workers: 1` vs `nbthread 1`", "GET, 1 connection (latency-bound)", "rb-get-c1", "natfwd-w1", "haproxy-t1", 1.0
    ),
    Target(
        "`workers: 1` vs `nbthread 1`",
        "GET, 1 connection (latency-bound)",
        "mc-1conn-p50",
        "natfwd-w1",
        "haproxy-t1",
        1.0,
    ),
    Target(
        "`workers: 1` vs `nbthread 1`",
        "GET, 1 connection (latency-bound)",
        "redis-1conn-p50",
        "natfwd-w1",
        "haproxy-t1",
        1.0,
    ),
    Target("`workers: 1` vs `nbthread 1`", "GET c50", "rb-get-c50", "natfwd-w1", "haproxy-t1", 1.1),
    Target("`workers: 1` vs `nbthread 1`", "GET c50", "ms-get-c50", "natfwd-w1", "haproxy-t1", 1.1),
    Target("`workers: 1` vs `nbthread 1`", "GET c50 pipeline 16", "rb-get-c50-p16", "natfwd-w1", "haproxy-t1", 1.25),
    Target("`workers: 1` vs `nbthread 1`", "256 KiB SET and GET", "rb-256k-set", "natfwd-w1", "haproxy-t1", 2.0),
    Target("`workers: 1` vs `nbthread 1`", "256 KiB SET and GET", "rb-256k-get", "natfwd-w1", "haproxy-t1", 2.0),
    Target("`workers: 2` vs `nbthread 2`", "GET c50", "rb-get-c50", "natfwd-w2", "haproxy-t2", 1.2),
    Target("`workers: 2` vs `nbthread 2`", "GET c50", "ms-get-c50", "natfwd-w2", "haproxy-t2", 1.2),
)
# The same targets for `multiplex: true`, which shares node connections between clients (forwarder/mux.py).
TARGETS += tuple(
    Target(
        t.comparison.replace("`workers: ", "`multiplex`, `workers: "),
        t.test,
        t.figure,
        t.path.replace("natfwd-", "natfwd-mux-"),
        t.base,
        t.minimum,
    )
    for t in TARGETS
)
# Issue 22: a new connection per request at HAProxy's rate, and the kernel data path at the static rules' speed.
TARGETS += (
    Target("`workers: 1` vs `nbthread 1`", "GET c50, a new connection per request", "rb-get-c50-new", "natfwd-w1",
           "haproxy-t1", 1.0),
    Target("`data_path: kernel` vs static nft rules", "GET c50", "rb-get-c50", "natfwd-kernel", "kernel", 0.95),
    Target("`data_path: kernel` vs static nft rules", "256 KiB GET", "rb-256k-get", "natfwd-kernel", "kernel", 0.95),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Measurement:
    """One load run on one path in one round; `values` maps figure id to value, empty when it failed.

    `cpu` holds what the run cost: `proxy_user_s`/`proxy_sys_s` (the path's processes in the NAT namespace, for
    paths that have some), `machine_s` (every CPU's busy time) and `requests` (for the fixed-count tools). `net` holds
    the packets the NAT namespace received and sent meanwhile (`nat_received`, `nat_sent`; benchmarks/packets.py).
    """

    round: int
    load: str
    path: str
    values: Mapping[str, float]
    seconds: float
    error: str | None = None
    cpu: Mapping[str, float] = field(default_factory=dict)
    net: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "load": self.load,
            "path": self.path,
            "values": dict(self.values),
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "cpu": {k: round(v, 4) for k, v in self.cpu.items()},
            "net": dict(self.net),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Measurement:
        return Measurement(
            int(data["round"]),
            str(data["load"]),
            str(data["path"]),
            {str(k): float(v) for k, v in data["values"].items()},
            float(data["seconds"]),
            data.get("error"),
            {str(k): float(v) for k, v in data.get("cpu", {}).items()},
            {str(k): float(v) for k, v in data.get("net", {}).items()},
        )

    def cpu_per_request_us(self, key: str) -> float | None:
        """µs of `key` (`proxy`, `proxy_user` or `machine`) per request; None when not known."""
        requests = self.cpu.get("requests")
        if not requests or self.error:
            return None
        if key == "proxy":
            if "proxy_user_s" not in self.cpu:
                return None
            seconds = self.cpu["proxy_user_s"] + self.cpu["proxy_sys_s"]
        elif f"{key}_s" in self.cpu:
            seconds = self.cpu[f"{key}_s"]
        else:
            return None
        return seconds / requests * 1e6

    def packets_per_request(self, key: str) -> float | None:
        """Packets the NAT namespace `received` or `sent` per request; None when not known."""
        requests = self.cpu.get("requests")
        value = self.net.get(f"nat_{key}")
        if not requests or self.error or value is None:
            return None
        return value / requests


def per_round(measurements: Iterable[Measurement]) -> dict[str, dict[str, dict[int, float]]]:
    """figure -> path -> round -> value."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for m in measurements:
        for figure, value in m.values.items():
            table.setdefault(figure, {}).setdefault(m.path, {})[m.round] = value
    return table


def performance_ratio(figure: Figure, value: float, base: float) -> float:
    """How many times better `value` is than `base`: a throughput ratio, or the inverse ratio of latencies."""
    if value <= 0 or base <= 0:
        return 0.0
    return value / base if figure.higher_is_better else base / value


def paired_ratios(rounds: Mapping[str, Mapping[int, float]], figure: Figure, path: str, base: str) -> list[float]:
    """The per-round performance ratios of `path` over `base`, for the rounds in which both were measured."""
    mine = rounds.get(path, {})
    theirs = rounds.get(base, {})
    return [performance_ratio(figure, mine[r], theirs[r]) for r in sorted(mine) if r in theirs]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True, slots=True)
class TargetResult:
    target: Target
    ratios: tuple[float, ...]
    median: float | None

    @property
    def passed(self) -> bool:
        return self.median is not None and self.median >= self.target.minimum


def evaluate_targets(measurements: Iterable[Measurement]) -> list[TargetResult]:
    """Each target's paired path/base ratios per round (natfwd over HAProxy, or over the static rules), and their median."""
    table = per_round(measurements)
    results = []
    for target in TARGETS:
        ratios = paired_ratios(table.get(target.figure, {}), FIGURES[target.figure], target.path, target.base)
        results.append(TargetResult(target, tuple(ratios), median(ratios)))
    return results


def summary(measurements: Sequence[Measurement]) -> dict[str, Any]:
    """Medians and paired-ratio medians per figure and path, and the targets, as plain data for results.json."""
    table = per_round(measurements)
    figures: dict[str, Any] = {}
    for figure_id, by_path in table.items():
        figure = FIGURES[figure_id]
        figures[figure_id] = {
            "label": figure.label,
            "unit": figure.unit,
            "higher_is_better": figure.higher_is_better,
            "median": {path: median(list(rounds.values())) for path, rounds in by_path.items()},
            "vs_direct": {path: median(paired_ratios(by_path, figure, path, "direct")) for path in by_path},
            "vs_haproxy_t1": {path: median(paired_ratios(by_path, figure, path, "haproxy-t1")) for path in by_path},
            "natfwd_w2_vs_haproxy_t2": median(paired_ratios(by_path, figure, "natfwd-w2", "haproxy-t2")),
        }
    targets = [
        {
            "comparison": r.target.comparison,
            "test": r.target.test,
            "figure": r.target.figure,
            "path": r.target.path,
            "base": r.target.base,
            "minimum": r.target.minimum,
            "ratios": list(r.ratios),
            "median": r.median,
            "passed": r.passed,
        }
        for r in evaluate_targets(measurements)
    ]
    errors = [m.to_json() for m in measurements if m.error]
    return {"figures": figures, "targets": targets, "errors": errors}


# --- markdown ------------------------------------------------------------------------------------------------
def human(value: float | None, unit: str = "") -> str:
    """Compact number: 1234567 -> 1.23M, 12345 -> 12.3k, 12.34 -> 12.3."""
    if value is None:
        return "–"
    magnitude = abs(value)
    if magnitude >= 1e6:
        text = f"{value / 1e6:.2f}M"
    elif magnitude >= 1e4:
        text = f"{value / 1e3:.1f}k"
    elif magnitude >= 1e3:
        text = f"{value / 1e3:.2f}k"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    else:
        text = f"{value:.1f}"
    return f"{text} {unit}".rstrip()


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def truncated(value: float | None) -> str:
    """A ratio cut (not rounded) to two decimals, so a 0.996 that misses a 1.0 target never shows as 1.00."""
    return "–" if value is None else f"{math.floor(value * 100) / 100:.2f}"


def _figure_order(present: Iterable[str]) -> list[str]:
    wanted = set(present)
    return [f.id for load in LOADS for f in load.figures if f.id in wanted]


def target_table(results: Sequence[TargetResult]) -> list[str]:
    lines = [
        "| comparison | test | measured by | path/base per round | median | at least | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.target
        per = ", ".join(truncated(x) for x in r.ratios) or "–"
        verdict = "**pass**" if r.passed else ("**FAIL**" if r.median is not None else "not measured")
        lines.append(
            f"| {t.comparison} | {t.test} | {FIGURES[t.figure].label} | {per} | {truncated(r.median)} | "
            f"{t.minimum:g} | {verdict} |"
        )
    return lines


def tables(measurements: Sequence[Measurement], path_ids: Sequence[str]) -> list[str]:
    """The medians table, the ratio-to-direct table and the ratio-to-HAProxy table."""
    data = summary(measurements)["figures"]
    order = _figure_order(data)
    head = "| figure | unit | " + " | ".join(SHORT[p] for p in path_ids) + " |"
    rule = "|---|---|" + "---:|" * len(path_ids)
    lines = ["### Medians", "", head, rule]
    for fid in order:
        row = data[fid]
        cells = " | ".join(human(row["median"].get(p)) for p in path_ids)
        lines.append(f"| {row['label']} | {row['unit']} | {cells} |")
    others = [p for p in path_ids if p != "direct"]
    if "direct" in path_ids and others:
        lines += [
            "",
            "### Relative to direct (higher is better; latency figures are inverted)",
            "",
            "| figure | " + " | ".join(SHORT[p] for p in others) + " |",
            "|---|" + "---:|" * len(others),
        ]
        for fid in order:
            row = data[fid]
            lines.append(f"| {row['label']} | " + " | ".join(ratio(row["vs_direct"].get(p)) for p in others) + " |")
    versus = [p for p in path_ids if p != "haproxy-t1"]
    if "haproxy-t1" in path_ids and versus:
        w2 = "natfwd-w2" in path_ids and "haproxy-t2" in path_ids
        lines += [
            "",
            "### Relative to HAProxy `nbthread 1` (and natfwd w2 to HAProxy `nbthread 2`)",
            "",
            "| figure | " + " | ".join(SHORT[p] for p in versus) + (" | natfwd w2 / HAProxy t2 |" if w2 else " |"),
            "|---|" + "---:|" * (len(versus) + (1 if w2 else 0)),
        ]
        for fid in order:
            row = data[fid]
            cells_t1 = [ratio(row["vs_haproxy_t1"].get(p)) for p in versus]
            if w2:
                cells_t1.append(ratio(row["natfwd_w2_vs_haproxy_t2"]))
            lines.append(f"| {row['label']} | " + " | ".join(cells_t1) + " |")
    return lines


def _median_us(runs: Sequence[Measurement], key: str) -> float | None:
    return median([v for m in runs if (v := m.cpu_per_request_us(key)) is not None])


def _per_load_table(
    by_load: Mapping[str, Mapping[str, Sequence[Measurement]]], paths: Sequence[str], column: str,
    cell: Callable[[Sequence[Measurement]], str],
) -> list[str]:  # fmt: skip
    """One row per load (in LOADS order), one `cell(runs)` per path."""
    lines = ["| load | " + " | ".join(f"{SHORT[p]} {column}" for p in paths) + " |", "|---|" + "---:|" * len(paths)]
    for load in LOADS:
        if load.id in by_load:
            cells = [cell(by_load[load.id].get(p, [])) for p in paths]
            lines.append(f"| {load.label} | " + " | ".join(cells) + " |")
    return lines


def _proxy_cell(runs: Sequence[Measurement]) -> str:
    total, user = _median_us(runs, "proxy"), _median_us(runs, "proxy_user")
    return "–" if total is None else f"{total:.1f} ({user or 0:.1f})"


def _machine_cell(runs: Sequence[Measurement]) -> str:
    value = _median_us(runs, "machine")
    return "–" if value is None else f"{value:.1f}"


def cpu_tables(measurements: Sequence[Measurement], path_ids: Sequence[str]) -> list[str]:
    """CPU per request for the fixed-count loads: the proxy's own (user share in brackets) and the machine's."""
    by_load: dict[str, dict[str, list[Measurement]]] = {}
    for m in measurements:
        if m.cpu.get("requests") and not m.error:
            by_load.setdefault(m.load, {}).setdefault(m.path, []).append(m)
    if not by_load:
        return []
    proxies = [
        p for p in path_ids if any(_median_us(runs.get(p, []), "proxy") is not None for runs in by_load.values())
    ]
    lines = [
        "### CPU per request",
        "",
        "Medians over rounds, from /proc while each measurement ran (10 ms ticks). The proxy's figure is every "
        "process the path started in the NAT namespace, children and threads included; the machine's is all CPUs' "
        "busy time (client, proxy, node, kernel). Kernel DNAT and `data_path: kernel` forward in softirq, which "
        "/proc charges to no process: their proxy figure (natfwd's control plane, for the latter) leaves that out, "
        "and only the machine's figure counts it.",
        "",
    ]
    if proxies:
        lines += [*_per_load_table(by_load, proxies, "µs (user)", _proxy_cell), ""]
    return lines + _per_load_table(by_load, path_ids, "machine µs", _machine_cell)


def _packets_cell(runs: Sequence[Measurement]) -> str:
    received = median([v for m in runs if (v := m.packets_per_request("received")) is not None])
    sent = median([v for m in runs if (v := m.packets_per_request("sent")) is not None])
    return "–" if received is None or sent is None else f"{received:.2f} / {sent:.2f}"


def packet_table(measurements: Sequence[Measurement], path_ids: Sequence[str]) -> list[str]:
    """Packets the NAT namespace received and sent per request, for the fixed-count loads."""
    by_load: dict[str, dict[str, list[Measurement]]] = {}
    for m in measurements:
        if m.cpu.get("requests") and m.net and not m.error:
            by_load.setdefault(m.load, {}).setdefault(m.path, []).append(m)
    if not by_load:
        return []
    return [
        "### Packets per request",
        "",
        "Medians over rounds: packets the NAT namespace received / sent on its public side (eth0) and its private "
        "side (br0) together, per request, ACKs included. A relay that cuts what it passes on into more or smaller "
        "segments than the sender did shows here.",
        "",
        *_per_load_table(by_load, path_ids, "in / out", _packets_cell),
    ]


def c_table(measurements: Sequence[Measurement]) -> list[str]:
    """What the C extensions buy: per load, natfwd's CPU per request and throughput with them and without (the
    pure-Python fallbacks), medians over rounds, and their paired ratios."""
    table = per_round(measurements)
    runs: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        if not m.error:
            runs.setdefault((m.load, m.path), []).append(m)
    rows: list[str] = []
    for c_path, py_path in C_AND_PYTHON:
        for load in LOADS:
            c_runs, py_runs = runs.get((load.id, c_path), []), runs.get((load.id, py_path), [])
            if not c_runs or not py_runs:
                continue
            c_us, py_us = _median_us(c_runs, "proxy"), _median_us(py_runs, "proxy")
            cpu_ratios = _paired_cpu_ratios(c_runs, py_runs)
            for figure in load.figures:
                by_path = table.get(figure.id, {})
                c_value, py_value = by_path.get(c_path, {}), by_path.get(py_path, {})
                faster = median(paired_ratios(by_path, figure, c_path, py_path))
                rows.append(
                    f"| {figure.label} | {SHORT[c_path]} | {_us(c_us)} | {_us(py_us)} | {ratio(median(cpu_ratios))} | "
                    f"{human(median(list(c_value.values())), figure.unit)} | "
                    f"{human(median(list(py_value.values())), figure.unit)} | {ratio(faster)} |"
                )
    if not rows:
        return []
    return [
        "### What the C extensions buy",
        "",
        "natfwd with its C extensions (`_crelay`, the raw-mode relay thread; `_cframing`, the multiplexing scanners) "
        "against the same path with `NATFWD_NO_EXTENSIONS=1`, measured next to each other in every round. CPU is "
        "natfwd's own (user + system µs per request, for the loads with a request count; medians over rounds); "
        "the ratios are paired within a round, medians over rounds: above 1, the C extensions save CPU (Python/C) "
        "or go faster (C/Python).",
        "",
        "| figure | path | C µs/req | Python µs/req | CPU Python/C | C | Python | C/Python |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _paired_cpu_ratios(c_runs: Sequence[Measurement], py_runs: Sequence[Measurement]) -> list[float]:
    """Per round: the pure-Python path's CPU per request over the C path's."""
    c_by_round = {m.round: v for m in c_runs if (v := m.cpu_per_request_us("proxy")) is not None}
    return [
        v / c_by_round[m.round]
        for m in py_runs
        if (v := m.cpu_per_request_us("proxy")) is not None and c_by_round.get(m.round)
    ]


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


SIGN_TEST_ALPHA = 0.1


def sign_test_p(ratios: Sequence[float], reference: float = 1.0) -> float:
    """Two-sided sign test of paired ratios against `reference` (ties dropped): how likely at least this lopsided a
    split of rounds above and below it is when the true median is `reference`. It assumes nothing about the noise's
    shape."""
    above = sum(1 for r in ratios if r > reference)
    below = sum(1 for r in ratios if r < reference)
    n = above + below
    if n == 0:
        return 1.0
    tail: float = sum(math.comb(n, k) for k in range(min(above, below) + 1)) / 2**n
    return min(1.0, 2 * tail)


def verdict(ratios: Sequence[float], reference: float = 1.0) -> str:
    """'better', 'worse' or 'within noise' than `reference`, by the sign test at SIGN_TEST_ALPHA."""
    if sign_test_p(ratios, reference) >= SIGN_TEST_ALPHA:
        return "within noise"
    return "better" if sum(1 for r in ratios if r > reference) > len(ratios) / 2 else "worse"


def against_table(measurements: Sequence[Measurement], revision: str, path_id: str = "natfwd-w1") -> list[str]:
    """`--against`: `path_id` over natfwd-base (the same path at `revision`), paired within each round (above 1: the
    change is better)."""
    table = per_round(measurements)
    lines = [
        f"### {SHORT.get(path_id, path_id)} over itself at {revision} (`--against`)",
        "",
        "Both ran right beside each other in every round; above 1 means the current code is better. The verdict is a "
        f"two-sided sign test on the rounds (p < {SIGN_TEST_ALPHA}); it needs 5 rounds or more to say anything.",
        "",
        "| figure | per round | median | rounds above 1 | sign test p | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for fid in _figure_order(table):
        ratios = paired_ratios(table[fid], FIGURES[fid], path_id, BASE_ID)
        if ratios:
            per = ", ".join(f"{r:.2f}" for r in ratios)
            above = sum(1 for r in ratios if r > 1)
            lines.append(
                f"| {FIGURES[fid].label} | {per} | {ratio(median(ratios))} | {above}/{len(ratios)} "
                f"| {sign_test_p(ratios):.2f} | {verdict(ratios)} |"
            )
    return lines


def per_round_table(measurements: Sequence[Measurement], path_ids: Sequence[str]) -> list[str]:
    table = per_round(measurements)
    rounds = sorted({m.round for m in measurements})
    lines = [
        "| figure | path | " + " | ".join(f"round {r}" for r in rounds) + " |",
        "|---|---|" + "---:|" * len(rounds),
    ]
    for fid in _figure_order(table):
        for path in path_ids:
            values = table[fid].get(path, {})
            lines.append(
                f"| {FIGURES[fid].label} | {SHORT[path]} | " + " | ".join(human(values.get(r)) for r in rounds) + " |"
            )
    return lines


def markdown(
    measurements: Sequence[Measurement], meta: Mapping[str, Any], path_ids: Sequence[str], chart_name: str | None
) -> str:
    """The whole results.md."""
    lines = [
        "# natfwd benchmark results",
        "",
        f"{meta.get('date', '')} on {meta.get('host', '')}: {meta.get('cpus', '?')} CPUs, kernel {meta.get('kernel', '?')}, "
        f"{meta.get('rounds', '?')} interleaved rounds of {meta.get('duration_s', '?')} s per measurement"
        f"{' (--quick)' if meta.get('quick') else ''}; commit {meta.get('commit', '?')}.",
        "",
        "Every path is measured in each round, one at a time, with the paths of one load back to back; ratios are "
        "paired within a round and the median over rounds is shown. Latency ratios are inverted (base/path), so "
        "above 1 always means better.",
        "",
        "## Targets (issues 6 and 22)",
        "",
        *target_table(evaluate_targets(measurements)),
        "",
        *tables(measurements, path_ids),
        "",
    ]
    cpu = cpu_tables(measurements, path_ids)
    if cpu:
        lines += [*cpu, ""]
    extensions = c_table(measurements)
    if extensions:
        lines += [*extensions, ""]
    net = packet_table(measurements, path_ids)
    if net:
        lines += [*net, ""]
    if BASE_ID in path_ids:
        revision = str(meta.get("against") or "the --against revision")
        lines += [*against_table(measurements, revision, str(meta.get("against_path") or "natfwd-w1")), ""]
    if chart_name:
        lines += [f"![natfwd benchmark chart]({chart_name})", ""]
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["## Paths not measured", ""]
        lines += [f"- {note}" for note in skipped]
        lines.append("")
    errors = [m for m in measurements if m.error]
    if errors:
        lines += ["## Failed measurements", ""]
        lines += [f"- round {m.round}, {m.load} on {m.path}: {m.error}" for m in errors]
        lines.append("")
    lines += ["## Versions", ""]
    lines += [f"- {name}: {version}" for name, version in meta.get("versions", {}).items()]
    lines += [
        "",
        "## Per-round values",
        "",
        "<details><summary>every measurement</summary>",
        "",
        *per_round_table(measurements, path_ids),
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)
