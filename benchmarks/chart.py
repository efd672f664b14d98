"""The PNG chart: the issue's targets, throughput relative to direct, and latencies, per path (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.paths import BASE_ID
from benchmarks.report import SHORT, truncated

COLOURS = {"direct": "#7f7f7f", "kernel": "#bcbd22", "natfwd-w1": "#1f77b4", "natfwd-w2": "#17becf",
           "haproxy-t1": "#d62728", "haproxy-t2": "#ff9896", "socat": "#9467bd", BASE_ID: "#aec7e8",
           "haproxy-splice": "#8c564b", "natfwd-mux-w1": "#2ca02c", "natfwd-mux-w2": "#98df8a",
           "natfwd-py-w1": "#aec7e8", "natfwd-py-mux-w1": "#006400", "natfwd-kernel": "#dbdb8d"}  # fmt: skip


def draw(summary: Mapping[str, Any], path_ids: Sequence[str], out: Path, title: str) -> None:
    """Write the chart for `summary` (report.summary's output) to `out`; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display, and no backend probing
    import matplotlib.pyplot as plt

    figures: Mapping[str, Any] = summary["figures"]
    throughput = [fid for fid, f in figures.items() if f["higher_is_better"]]
    latency = [fid for fid, f in figures.items() if not f["higher_is_better"]]
    rows = max(len(throughput), len(latency), len(summary["targets"]))
    fig, (targets, left, right) = plt.subplots(
        1, 3, figsize=(21, 0.5 * rows + 3), gridspec_kw={"width_ratios": [1, 1, 1]}
    )
    _targets(targets, summary["targets"], figures)
    for axis, ids, key, xlabel in (
        (left, throughput, "vs_direct", "throughput relative to direct (higher is better)"),
        (right, latency, "median", "latency, µs, log scale (lower is better)"),
    ):
        height = 0.8 / max(1, len(path_ids))
        for i, path in enumerate(path_ids):
            values = [figures[fid][key].get(path) or 0.0 for fid in ids]
            ys = [row + (i - (len(path_ids) - 1) / 2) * height for row in range(len(ids))]
            axis.barh(ys, values, height=height, color=COLOURS.get(path), label=SHORT[path])
        axis.set_yticks(range(len(ids)), [figures[fid]["label"] for fid in ids], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(xlabel)
        axis.grid(axis="x", alpha=0.3)
        if key == "vs_direct":
            axis.axvline(1.0, color="black", linewidth=0.8)
        elif ids:  # a run of --loads without latency figures has nothing to put on a log scale
            axis.set_xscale("log")  # p50 on one connection and p99 on 200 differ by 100x
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _targets(axis: Any, targets: Sequence[Mapping[str, Any]], figures: Mapping[str, Any]) -> None:
    """natfwd over HAProxy per target (median of the paired rounds), with each target's minimum marked."""
    labels = []
    for row, target in enumerate(targets):
        median = target["median"] or 0.0
        colour = COLOURS.get(target["path"], "#1f77b4")
        axis.barh(row, median, height=0.6, color=colour, alpha=1.0 if target["passed"] else 0.55)
        axis.plot([target["minimum"]] * 2, [row - 0.4, row + 0.4], color="black", linewidth=2)
        axis.text(median + 0.02, row, truncated(target["median"]), va="center", fontsize=8)
        workers = ("mux " if "mux" in target["path"] else "") + ("w1/t1" if target["path"].endswith("w1") else "w2/t2")
        labels.append(f"{figures.get(target['figure'], {}).get('label', target['figure'])} ({workers})")
    axis.set_yticks(range(len(targets)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.axvline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("natfwd / HAProxy, median of paired rounds (black: target)")
    axis.grid(axis="x", alpha=0.3)
