"""`python benchmarks/run.py [--quick] [--out DIR]`: natfwd against direct, kernel DNAT, HAProxy and socat.

Builds the lab topology with memcached and redis-server on a node, measures each path one at a time in
interleaved rounds, and writes results.json, results.md and results.png to DIR. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a fresh checkout

from benchmarks import harness, report  # noqa: E402
from benchmarks.loads import LOAD_IDS, LOADS  # noqa: E402
from benchmarks.paths import KNOWN_PATHS, PATH_IDS, REPO, unsupported  # noqa: E402
from forwarder.errors import NatfwdError, UsageError  # noqa: E402

QUICK = {"rounds": 3, "duration_s": 0.4}
FULL = {"rounds": 3, "duration_s": 2.0}


def _ids(kind: str, known: tuple[str, ...]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple[str, ...]:
        wanted = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [w for w in wanted if w not in known]
        if unknown or not wanted:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}"
            )
        return wanted

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short measurements (about 3 minutes in all)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the results")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per measurement (default 2, or 0.4 with --quick)"
    )
    parser.add_argument(
        "--paths",
        type=_ids("path", tuple(p.id for p in KNOWN_PATHS)),
        default=PATH_IDS,
        help="comma-separated path ids; haproxy-splice (HAProxy with option splice-auto) runs only when named",
    )
    parser.add_argument("--loads", type=_ids("load", LOAD_IDS), default=LOAD_IDS, help="comma-separated load ids")
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also run natfwd from git revision REV right beside the current one (--against-path) in every round, "
        "and report the paired ratios: an A/B of a change on the same machine state",
    )
    parser.add_argument(
        "--against-path",
        metavar="ID",
        default="natfwd-w1",
        help="the natfwd path that --against runs from REV too, with the same settings",
    )
    return parser


def settings_from(args: argparse.Namespace) -> harness.Settings:
    """Validated settings; raises UsageError for values that cannot work."""
    base = QUICK if args.quick else FULL
    rounds = base["rounds"] if args.rounds is None else args.rounds
    duration = base["duration_s"] if args.duration is None else args.duration
    if int(rounds) < 1:
        raise UsageError(f"--rounds: {rounds} is not valid; use 1 or more (3 gives the targets' median)")
    if not 0.05 <= float(duration) <= 600:
        raise UsageError(f"--duration: {duration} is not valid; use 0.05 to 600 seconds")
    named = tuple(p for p in KNOWN_PATHS if p.id in args.paths)
    skipped = tuple(note for p in named if (note := unsupported(p)) is not None)
    paths = tuple(p for p in named if unsupported(p) is None)
    if "direct" not in args.paths:
        raise UsageError("--paths: must include direct, the baseline every ratio (and the calibration) uses")
    natfwd_paths = [p.id for p in KNOWN_PATHS if p.kind == "natfwd"]
    if args.against_path not in natfwd_paths:
        raise UsageError(
            f"--against-path: {args.against_path!r} is not a natfwd path; use one of {', '.join(natfwd_paths)}"
        )
    if args.against is not None:
        if args.against_path not in args.paths:
            raise UsageError(f"--against: needs {args.against_path} in --paths, the natfwd it is compared with")
        known = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{args.against}^{{commit}}"],
            capture_output=True, check=False,
        )  # fmt: skip
        if known.returncode != 0:
            raise UsageError(f"--against: {args.against!r} is not a commit of this repository; try HEAD~1 or a hash")
    return harness.Settings(
        against=args.against,
        against_path=args.against_path,
        out=args.out.resolve(),
        rounds=int(rounds),
        duration_s=float(duration),
        paths=paths,
        loads=tuple(load for load in LOADS if load.id in args.loads),
        quick=args.quick,
        skipped=skipped,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM tears the lab down just like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = settings_from(args)
        for note in settings.skipped:
            say(note)
        results = harness.run(settings, say)
    except UsageError as exc:
        print(f"benchmarks/run.py: error: {exc}", file=sys.stderr)
        return 2
    except NatfwdError as exc:
        print(f"benchmarks/run.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; the lab is torn down, partial results are in {args.out}", file=sys.stderr)
        return 130
    out = settings.out
    say(f"results: {out / harness.RESULTS_MD}, {out / harness.RESULTS_JSON}, {out / harness.CHART_PNG}")
    for result in results:
        t = result.target
        verdict = "pass" if result.passed else ("FAIL" if result.median is not None else "not measured")
        shown = report.truncated(result.median)
        say(f"target {t.path}/{t.base} {t.figure}: {shown} (at least {t.minimum:g}) {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
