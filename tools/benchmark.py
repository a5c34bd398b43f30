#!/usr/bin/env python
"""CPU latency and size of a QueryInst model with random weights.

Builds the model of a config on the CPU (random init: no checkpoint is read), then times
inference on one random image of a fixed size (warm-up iterations excluded) and, with
``--train``, one training iteration (forward + backward + AdamW step) on a batch of two
random images with a few synthetic instances each. Prints a small table and, last, one JSON
line with the same numbers.

Example::

    python tools/benchmark.py --config-file configs/Base-QueryInst.yaml \\
        --input-size 800 1333 --iters 3 --warmup 1 --threads 2 --train

Extra ``KEY VALUE`` pairs override the config, as in ``train_net.py``
(e.g. ``MODEL.QUERYINST.NUM_PROPOSALS 300``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "QueryInst"))
from queryinst import add_queryinst_config  # noqa: E402

NUM_SYNTHETIC_INSTANCES = 5  # GT instances per training image


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="path to a QueryInst yaml config")
    parser.add_argument(
        "--input-size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"),
        help="height and width of the input image in pixels (no resize is applied)",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--train", action="store_true", help="also time a training iteration")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def setup_cfg(args):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_calls(fn, iters: int, warmup: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def random_image(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)


def synthetic_instances(height: int, width: int, num_classes: int, gen: torch.Generator):
    """A few random boxes, each with a filled-rectangle bitmask and a random class."""
    n = NUM_SYNTHETIC_INSTANCES
    x0 = torch.rand(n, generator=gen) * width * 0.7
    y0 = torch.rand(n, generator=gen) * height * 0.7
    x1 = x0 + 16 + torch.rand(n, generator=gen) * width * 0.3
    y1 = y0 + 16 + torch.rand(n, generator=gen) * height * 0.3
    boxes = torch.stack([x0, y0, x1.clamp(max=width), y1.clamp(max=height)], 1)
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for m, (a, b, c, d) in zip(masks, boxes.round().long().tolist()):
        m[b:d, a:c] = True
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(num_classes, (n,), generator=gen)
    inst.gt_masks = BitMasks(masks)
    return inst


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args)
    height, width = args.input_size

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = build_model(cfg)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    gen = torch.Generator().manual_seed(args.seed)
    image = random_image(height, width, gen)
    model.eval()
    num_detections = []

    def infer():
        with torch.no_grad():
            (out,) = model([{"image": image, "height": height, "width": width}])
        num_detections.append(len(out["instances"]))

    infer_times = time_calls(infer, args.iters, args.warmup)

    result = {
        "config": args.config_file,
        "opts": args.opts,
        "input_size": [height, width],
        "threads": torch.get_num_threads(),
        "params": params,
        "trainable_params": trainable,
        "build_s": round(build_s, 3),
        "iters": args.iters,
        "warmup": args.warmup,
        "infer_median_s": round(statistics.median(infer_times), 4),
        "infer_p90_s": round(percentile(infer_times, 90), 4),
        "infer_times_s": [round(t, 4) for t in infer_times],
        "detections": num_detections[-1],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }

    if args.train:
        batch = [
            {
                "image": random_image(height, width, gen),
                "instances": synthetic_instances(
                    height, width, cfg.MODEL.QUERYINST.NUM_CLASSES, gen
                ),
            }
            for _ in range(2)
        ]
        model.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        last_loss = []

        def train_step():
            losses = model(batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_loss.append(loss.item())

        train_times = time_calls(train_step, args.iters, args.warmup)
        result.update(
            train_batch=2,
            train_median_s=round(statistics.median(train_times), 4),
            train_p90_s=round(percentile(train_times, 90), 4),
            train_times_s=[round(t, 4) for t in train_times],
            train_last_loss=round(last_loss[-1], 4),
        )

    rows = [
        ("config", f"{args.config_file} {' '.join(args.opts)}".strip()),
        ("input (H x W)", f"{height} x {width}"),
        ("threads", str(result["threads"])),
        ("parameters", f"{params:,} ({trainable:,} trainable)"),
        ("inference median", f"{result['infer_median_s']:.3f} s"),
        ("inference p90", f"{result['infer_p90_s']:.3f} s"),
        ("iterations", f"{args.iters} timed, {args.warmup} warm-up"),
    ]
    if args.train:
        rows.append(("train iter median (batch 2)", f"{result['train_median_s']:.3f} s"))
        rows.append(("train iter p90 (batch 2)", f"{result['train_p90_s']:.3f} s"))
    width_col = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width_col}}  {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
