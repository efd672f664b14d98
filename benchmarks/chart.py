"""The PNG chart: throughput relative to direct, and single-connection latencies, per path (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import SHORT

COLOURS = {
    "direct": "#7f7f7f",
    "kernel": "#bcbd22",
    "natfwd-w1": "#1f77b4",
    "natfwd-w2": "#17becf",
    "haproxy-t1": "#d62728",
    "haproxy-t2": "#ff9896",
    "socat": "#9467bd",
}


def draw(summary: Mapping[str, Any], path_ids: Sequence[str], out: Path, title: str) -> None:
    """Write the chart for `summary` (report.summary's output) to `out`; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display, and no backend probing
    import matplotlib.pyplot as plt

    figures: Mapping[str, Any] = summary["figures"]
    throughput = [fid for fid, f in figures.items() if f["higher_is_better"]]
    latency = [fid for fid, f in figures.items() if not f["higher_is_better"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.55 * max(len(throughput), len(latency)) + 2.5))
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
        else:
            axis.set_xscale("log")  # p50 on one connection and p99 on 200 differ by 100x
    left.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
