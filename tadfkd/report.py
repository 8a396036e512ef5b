"""Report over a sweep, an entry point: ``python -m tadfkd.report <sweep dir | entity/project/group>
[--out DIR]`` (docs/sweeps.md): reads the jobs (tadfkd.analysis.jobs) and writes the report
(tadfkd.analysis.report)."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tadfkd.analysis.finding import parse_reference
from tadfkd.analysis.jobs import read_source
from tadfkd.analysis.report import write_report
from tadfkd.analysis.statistics import DEFAULT_COLLAPSE_BELOW
from tadfkd.base.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tadfkd.report",
        description="Summarise a sweep (a sweep directory, or a W&B group) into report.md, "
        "report.csv, pairs.csv, runs.csv and plots.",
    )
    parser.add_argument("source", help="sweep directory (multirun/...), or entity/project/group")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: the sweep directory, or reports/<group>)"
    )
    parser.add_argument(
        "--collapse-below",
        type=float,
        default=DEFAULT_COLLAPSE_BELOW,
        help="a job collapses when its student is below this fraction of its teacher's accuracy",
    )
    parser.add_argument(
        "--ceiling",
        type=Path,
        help="metadata .json of the student trained on real data (default: "
        "Pretrained_Teachers/<dataset>/ceiling_<student>.json when there is one)",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="NAME=FRACTION",
        help="a published accuracy the finding compares the best method with, e.g. "
        "'ZSKD (Nayak et al. 2019)=0.7962'; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        references = [parse_reference(text) for text in args.reference]
        runs, default_out = read_source(args.source)
        out = args.out or default_out
        write_report(runs, args.source, out, args.collapse_below, args.ceiling, references)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    done = sum(run.status == "done" for run in runs)
    print(f"report over {len(runs)} jobs ({done} done) written to {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
