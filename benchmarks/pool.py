"""`python -m benchmarks.pool DIR...`: the targets over the rounds of several full runs, pooled.

One run's 3 rounds cannot tell a target met from one missed by a few percent: a sign test needs 5 rounds to say
anything, and a run's median moves by 0.1 here. This reads each run's results.json, pairs path and base within
each round of each run (as the run's own target table does), pools those ratios, and tests them against each
target's minimum. Pool runs of the same design only: the table lists the commits it covers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import report
from benchmarks.harness import RESULTS_JSON
from benchmarks.loads import FIGURES


@dataclass(frozen=True, slots=True)
class Run:
    """One full run's results: its date and commit, and its measurements."""

    date: str
    commit: str
    measurements: tuple[report.Measurement, ...]


@dataclass(frozen=True, slots=True)
class Pooled:
    """A target's ratios from every run, in run order."""

    target: report.Target
    ratios: tuple[float, ...]
    runs: int

    @property
    def median(self) -> float | None:
        return report.median(self.ratios)

    @property
    def reaching(self) -> int:
        return sum(1 for r in self.ratios if r >= self.target.minimum)

    @property
    def p(self) -> float:
        return report.sign_test_p(self.ratios, self.target.minimum)

    @property
    def verdict(self) -> str:
        """'met', 'missed' or 'within noise': the sign test of the ratios against the minimum."""
        return {"better": "met", "worse": "missed"}.get(report.verdict(self.ratios, self.target.minimum),
                                                       "within noise")  # fmt: skip


def load_run(directory: Path) -> Run:
    """The run written to `directory`; raises ValueError naming the file when it is not a harness results.json."""
    path = directory / RESULTS_JSON
    try:
        data = json.loads(path.read_text())
        meta = data["meta"]
        measurements = tuple(report.Measurement.from_json(m) for m in data["measurements"])
        return Run(str(meta["date"]), str(meta["commit"]), measurements)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not the results of a benchmark run ({exc}); give the --out DIR of run.py") from exc


def pool(runs: Sequence[Run]) -> list[Pooled]:
    """Every target's paired ratios from each run, pooled; targets no run measured are left out."""
    by_target: dict[report.Target, list[float]] = {t: [] for t in report.TARGETS}
    counted: dict[report.Target, int] = {t: 0 for t in report.TARGETS}
    for run in runs:
        for result in report.evaluate_targets(run.measurements):
            if result.ratios:
                by_target[result.target] += result.ratios
                counted[result.target] += 1
    return [Pooled(t, tuple(ratios), counted[t]) for t, ratios in by_target.items() if ratios]


def markdown(runs: Sequence[Run], pooled: Sequence[Pooled]) -> list[str]:
    listed = ", ".join(f"{run.date} ({run.commit})" for run in runs)
    lines = [
        f"Targets over {len(runs)} runs: {listed}. Each round's ratio is path over base within that round; the "
        f"verdict is a two-sided sign test of the rounds against the minimum (p < {report.SIGN_TEST_ALPHA}).",
        "",
        "| comparison | test | measured by | runs | rounds | median | rounds at or above | at least | sign test p "
        "| verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in pooled:
        t = p.target
        lines.append(
            f"| {t.comparison} | {t.test} | {FIGURES[t.figure].label} | {p.runs} | {len(p.ratios)} | "
            f"{report.truncated(p.median)} | {p.reaching}/{len(p.ratios)} | {t.minimum:g} | {p.p:.2f} | {p.verdict} |"
        )
    return lines


def main(argv: Sequence[str] | None = None, say: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pool", description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="the --out directory of each run.py run")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.runs]
    except ValueError as exc:
        print(f"benchmarks.pool: error: {exc}", file=sys.stderr)
        return 2
    for line in markdown(runs, pool(runs)):
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
