#!/usr/bin/env python3
"""Time real training steps of a config and its variants side by side, taking turns.

Each variant is the config plus ``KEY VALUE`` overrides and gets its own ``train_net.Trainer``
(Detectron2's ``DefaultTrainer``: the config's own data loader, model and optimizer; ``SEED``
as configured). The variants take turns step by step in one process
(``qi_bench.measure.interleaved_times``): each round runs ``--warmup`` untimed and then
``--steps`` timed ``run_step`` calls of every variant, alternating, so that the load of a
shared machine falls on all of them alike. Printed per round: each
variant's median step time and its ratio to the first variant's; at the end, the median of
the per-round ratios (the number to report) and the CPU model. The learning-rate schedule
is not stepped (no hooks run): these are speed measurements, not training.

Run from the repository root::

    python tools/train_step_benchmark.py \\
        --config-file configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml \\
        --variant "MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME True" --variant "" \\
        [--rounds 3] [--steps 8] [--warmup 3] [--json-out FILE]

An empty ``--variant ""`` is the config as it is. Exits 2 with a message on a bad argument
(an odd number of words in a variant, fewer than two variants); a misspelled key raises the
config loader's error, which names the closest key.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # train_net.py (it puts the package of this checkout on the path)

import torch  # noqa: E402
import train_net  # noqa: E402  (registers the model and the bundled datasets)
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from qi_bench.measure import interleaved_times  # noqa: E402  (tools/qi_bench)
from qi_bench.results import cpu_model  # noqa: E402

from queryinst.modeling.fast_inference import cpuinfo_field  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--variant", action="append", default=[], metavar="'KEY VALUE ...'",
                        help="overrides of one variant (repeatable; '' = the config as is); "
                        "ratios are to the first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps a variant a round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--output-dir", default="output/train_step_benchmark",
                        help="the trainers' OUTPUT_DIR (one folder per variant; logs only)")
    parser.add_argument("--json-out", help="also write the results here")
    args = parser.parse_args(argv)
    if len(args.variant) < 2:
        parser.error("give at least two --variant (the first is the baseline; '' = the config)")
    args.variant_opts = [shlex.split(v) for v in args.variant]
    for text, opts in zip(args.variant, args.variant_opts):
        if len(opts) % 2:
            parser.error(f"--variant {text!r}: expected KEY VALUE pairs")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    return args


def build_trainer(config_file: str, opts: list[str], output_dir: str):
    """A ``train_net.Trainer`` for the config with ``opts``, its weights loaded (no resume)."""
    args = default_argument_parser().parse_args(
        ["--config-file", config_file, *opts, "OUTPUT_DIR", output_dir])
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=False)
    return trainer


def step_fn(trainer, storage: EventStorage):
    """One ``run_step`` of ``trainer`` in ``storage`` (whose iteration it advances)."""
    def step():
        trainer.storage = storage
        trainer.run_step()
        storage.iter += 1
    return step


def main(argv=None) -> dict:
    args = parse_args(argv)
    trainers = [build_trainer(args.config_file, opts, os.path.join(args.output_dir, f"v{i}"))
                for i, opts in enumerate(args.variant_opts)]
    rounds = []
    with EventStorage(0) as storage:
        for r in range(args.rounds):
            times = interleaved_times([step_fn(t, storage) for t in trainers],
                                      args.steps, args.warmup, "cpu")
            medians = [statistics.median(t) for t in times]
            rounds.append(medians)
            print(f"[train_step_benchmark] round {r + 1}: " + ", ".join(
                f"{v or '(config)'!r} {m:.3f} s ({m / medians[0]:.3f}x)"
                for v, m in zip(args.variant, medians)), flush=True)
    result = {
        "config_file": args.config_file,
        "variants": args.variant,
        "round_medians_s": rounds,
        "median_ratio_to_first": [
            statistics.median(r[i] / r[0] for r in rounds) for i in range(len(trainers))],
        "steps": args.steps, "warmup": args.warmup,
        # one lscpu name covers several generations, whose numbers differ
        "cpu": cpu_model(), "cpu_family_model": [cpuinfo_field("cpu family"),
                                                 cpuinfo_field("model")],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print("[train_step_benchmark] median of per-round ratios: " + ", ".join(
        f"{v or '(config)'!r} {x:.3f}x" for v, x in zip(args.variant,
                                                       result["median_ratio_to_first"])))
    family, model = result["cpu_family_model"]
    print(f"[train_step_benchmark] {result['cpu']} (family {family}, model {model}), "
          f"{result['threads']} threads, torch {result['torch']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
