#!/usr/bin/env python3
"""Results tables with their provenance: box / mask AP of several runs, mean, spread, versions.

Two ways to use it, run from the repository root:

    # launch one training per seed (skipping finished ones), then write the table
    python tools/results_table.py --seeds 0 1 2 \\
        --config-file configs/bundled/queryinst_R50_FPN_nuclei.yaml [KEY VALUE ...]
    # or tabulate runs that already finished
    python tools/results_table.py --runs output/a output/b --out docs/results/mine.md

Config overrides (``KEY VALUE`` pairs) go last, after an option other than ``--seeds`` (whose
list would otherwise swallow them). With ``--seeds``, seed s trains with ``train_net.py --config-file FILE --resume [KEY VALUE
...] SEED s OUTPUT_DIR RUNS_ROOT/seed<s>`` (or ``tools/run_demo.py`` with ``--entry
run_demo``) in its own process, output in ``RUNS_ROOT/seed<s>/log.txt``. Resuming: a run
directory that holds a final evaluation is not trained again; an unfinished one continues
from its last checkpoint (``--resume``). So a killed session is re-run with the same command.

A run directory is what Detectron2's ``DefaultTrainer`` writes (``default_setup`` and the
``EvalHook``): ``config.yaml`` (the full config) and ``metrics.json``, one json object per
line, where the evaluation after the last iteration is the line with ``"iteration"`` equal
to ``SOLVER.MAX_ITER`` holding ``"bbox/AP"`` (and ``"segm/AP"`` with masks; with several test
sets the keys start with the dataset name). AP values are COCO AP in percent.

The table (markdown, default ``docs/results/<config name>.md``) has one row per run (seed,
box AP / AP50 / AP75, mask AP / AP50 / AP75), then the mean ± sample standard deviation
(n - 1 in the denominator) and the min to max range over the runs, a sentence stating the
run-to-run spread, the date (UTC), the commands (this one, and each launched run's), the git
commit, and the versions of Python, torch, torchvision, detectron2 (and whether its compiled
ops ``detectron2._C`` are present) and numpy of this process.

Runs must differ only in ``SEED`` and ``OUTPUT_DIR``; otherwise the mean would mix settings
and the script refuses, naming the differing keys. Exit status 1 (no table written) when a
run fails or a directory holds no final evaluation; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qi_bench.results import (  # noqa: E402
    DEFAULT_CONFIG,
    ENTRIES,
    REPO,
    RunError,
    check_comparable,
    load_run,
    render,
    run_seeds,
    versions,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="train one run per seed (finished runs are kept)")
    source.add_argument("--runs", nargs="+", metavar="DIR", help="finished run directories")
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"config of the --seeds runs (default {DEFAULT_CONFIG})")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="train_net",
                   help="script that trains each seed (default train_net: train + evaluate; "
                        "run_demo also draws the demo images)")
    p.add_argument("--runs-root", metavar="DIR",
                   help="where the --seeds runs go (default output/results/<config name>)")
    p.add_argument("--out", metavar="FILE",
                   help="markdown file to write (default docs/results/<config name>.md)")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides for the --seeds runs: KEY VALUE ...")
    args = p.parse_args(argv)
    name = os.path.splitext(os.path.basename(args.config_file))[0]
    if args.runs and args.opts:
        p.error(f"KEY VALUE overrides ({' '.join(args.opts)}) only apply with --seeds")
    if args.runs and not args.out:
        p.error("--out is required with --runs")
    if args.seeds and not os.path.isfile(os.path.join(REPO, args.config_file)) \
            and not os.path.isfile(args.config_file):
        sys.path.insert(0, os.path.join(REPO, "projects", "QueryInst"))
        from queryinst.config_loading import missing_config_message  # only on this path

        print(f"ERROR: --config-file {missing_config_message(args.config_file)}",
              file=sys.stderr)
        sys.exit(2)
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    args.runs_root = args.runs_root or os.path.join("output", "results", name)
    args.out = args.out or os.path.join("docs", "results", f"{name}.md")
    return args


def main(argv=None, now: datetime.datetime | None = None) -> int:
    """Run the script; see the module docstring. Returns the exit status (0, 1)."""
    args = parse_args(argv)
    command = shlex.join(["python", "tools/results_table.py",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        dirs = run_seeds(args) if args.seeds else args.runs
        runs = [load_run(d) for d in dirs]
        check_comparable(runs)
    except RunError as e:
        print(f"[results] error: {e}\n[results] no table written", file=sys.stderr)
        return 1
    now = now or datetime.datetime.now(datetime.timezone.utc)
    text = render(runs, command, versions(), now, args.config_file if args.seeds else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"[results] written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
