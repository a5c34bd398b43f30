"""The measuring run of tools/benchmark.py: every candidate built, timed in interleaved
rounds (inference, and with ``--train`` a training step), its memory, FLOPs and profile, and
the JSON report (the script's docstring describes the options and keys).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.solver import build_optimizer as build_detectron2_optimizer
from detectron2.utils.events import EventStorage

from queryinst.checkpoint import config_as_opts, detect_official_config, load_official_state_dict
from queryinst.engine import build_optimizer as build_queryinst_optimizer
from queryinst.modeling.fast_inference import resolve_memory_format

from .measure import (
    PeakMemory,
    count_flops,
    interleaved_times,
    machine_info,
    phase_seconds,
    profile_top,
    release_freed_memory,
)
from .memory import measure_in_process, measure_pid
from .models import (
    _BASELINE_NAME,
    BASELINE_ZOO,
    Bench,
    Candidate,
    ExportedBench,
    ReferenceBench,
    baseline_cfg,
    is_resnet,
    log,
    queryinst_cfg,
    random_image,
    reference_variant,
    synthetic_instances,
)
from .reference import ReferenceError, ReferenceServer, setup_reference
from .report import reference_summary

def _under_peak_memory(device: str, step: Callable[[], None]):
    """Run ``step`` alone under ``PeakMemory``: (the sampler, peak MiB, growth MiB)."""
    release_freed_memory()
    with PeakMemory(device) as mem:
        step()
    return mem, round(mem.peak / 2**20, 1), round((mem.peak - mem.start) / 2**20, 1)


def measure_memory_and_outputs(bench: Bench, device: str) -> None:
    """One inference under ``PeakMemory``; records memory, detections and proposals."""
    _, peak, grown = _under_peak_memory(device, bench.infer)
    bench.result.update(
        peak_mem_mib=peak,
        infer_mem_mib=grown,
        detections_per_image=[len(o["instances"]) for o in bench.outputs],
        proposals_per_image=bench.proposals,
    )
    first = bench.outputs[0]["instances"]
    if first.has("query_indices") and first.has("pred_masks"):
        # QueryInst's mask head runs once per distinct query among the top-k detections.
        bench.result["mask_head_rois_per_image"] = [
            len(torch.unique(o["instances"].query_indices)) for o in bench.outputs
        ]
    bench.outputs = None


def measure_train_memory(bench: Bench, device: str) -> None:
    """One more training step under ``PeakMemory``; records its peak and growth in MiB."""
    mem, peak, grown = _under_peak_memory(device, bench.train_step)
    bench.result.update(train_peak_mem_mib=peak, train_mem_mib=grown)
    if device == "cuda":
        bench.result["train_peak_reserved_mib"] = round(mem.peak_reserved / 2**20, 1)


def measure_flops(bench: Bench) -> None:
    """FLOPs of one image (the first input), in total and per top-level module."""
    with torch.no_grad():
        flops = count_flops(bench.model, bench.inputs[:1])
        by_module = flops.by_module()
        total = flops.total()
    bench.result.update(
        gflops=round(total / 1e9, 2),
        # Detectron2 traces the model inside a TracingAdapter: names start with "model.".
        gflops_by_module={
            k: round(by_module.get(f"model.{k}", 0) / 1e9, 2)
            for k in ("backbone", "proposal_generator", "roi_heads")
        },
        flops_uncounted_ops=dict(flops.unsupported_ops()),
    )


def summarise(times: list[float], prefix: str) -> dict:
    """Median, p90 (numpy's linear interpolation) and all times, in seconds, of timed calls."""
    return {
        f"{prefix}_median_s": round(statistics.median(times), 4),
        f"{prefix}_p90_s": round(float(np.percentile(times, 90)), 4),
        f"{prefix}_times_s": [round(t, 4) for t in times],
    }


def queryinst_infers_channels_last(cfg: CfgNode, device: str) -> bool:
    """Whether QueryInst's inference runs its convolutions channels-last on ``device``
    (``MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT``); the baselines then get the same layout."""
    fmt = resolve_memory_format(cfg.MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT, device)
    return fmt is torch.channels_last


def measure_process_memory(benches: list[Bench], exported: list[ExportedBench], others,
                           images: list[torch.Tensor], workdir: contextlib.ExitStack) -> None:
    """``--memory``: the peak RSS of one inference of each QueryInst model (every setting),
    each exported graph and the reference, each in its own process (``qi_bench.memory``);
    into each result as ``process_peak_mib``, ``process_rss_before_mib`` and
    ``process_infer_mem_mib``."""
    tmp = Path(workdir.enter_context(tempfile.TemporaryDirectory(prefix="queryinst_memory_")))
    batch = tmp / "images.npy"
    np.save(batch, np.stack([im.numpy().astype(np.float32) for im in images]))
    threads = torch.get_num_threads()
    specs = []
    for i, bench in enumerate(b for b in benches if b.cand.name.startswith("queryinst")):
        weights, config = tmp / f"model_{i}.pth", tmp / f"config_{i}.yaml"
        torch.save({"model": bench.model.state_dict()}, weights)
        config.write_text(bench.cand.cfg.dump())
        specs.append((bench, {"kind": "pytorch", "config": str(config), "opts": [],
                              "weights": str(weights), "images": str(batch),
                              "threads": threads}))
    specs += [(e, {"kind": "exported", "path": e.path, "images": str(batch),
                   "threads": threads}) for e in exported]
    for bench, spec in specs:
        log(f"peak memory of {bench.result['name']} in its own process")
        bench.result.update({f"process_{k}": v for k, v in measure_in_process(spec).items()})
    for other in others:  # the reference: already alone in its process
        log(f"peak memory of {other.result['name']} (its own process)")
        mem = measure_pid(other.server.proc.pid, other.infer)
        other.result.update({f"process_{k}": v for k, v in mem.items()})


def measure_all(candidates: list[Candidate], args, images, train_batch,
                others: tuple = ()) -> list[dict]:
    """Build every model, then measure them; timed calls alternate between the models.

    ``others`` (e.g. a ``ReferenceBench``) and the ``--exported`` graphs take part in the
    inference rounds only. With ``args.memory``, then each model's peak RSS in its own
    process (:func:`measure_process_memory`).
    """
    with contextlib.ExitStack() as workdir:  # the exported files, kept to the end
        return _measure_all(candidates, args, images, train_batch, others, workdir)


def _measure_all(candidates, args, images, train_batch, others, workdir) -> list[dict]:
    height, width = args.input_size
    inputs = [{"image": im, "height": height, "width": width} for im in images]
    benches = []
    baselines_channels_last = queryinst_infers_channels_last(candidates[0].cfg, args.device)
    for cand in candidates:
        log(f"building {cand.name}")
        benches.append(Bench(cand, inputs, args.seed, args.channels_last,
                             baselines_channels_last))
    for bench in benches:
        log(f"memory and outputs of {bench.cand.name}")
        measure_memory_and_outputs(bench, args.device)
        if not args.no_flops:
            measure_flops(bench)
    exported = []
    for fmt in args.exported:
        log(f"exporting {benches[0].cand.name} to {fmt}")
        out_dir = workdir.enter_context(tempfile.TemporaryDirectory(prefix="queryinst_export_"))
        exported.append(ExportedBench(benches[0], fmt, out_dir, torch.get_num_threads()))
    log(f"timing inference: {args.warmup} warm-up + {args.iters} rounds")
    extras = exported + list(others)  # inference rounds only
    times = interleaved_times([b.infer for b in benches + extras], args.iters, args.warmup,
                              args.device)
    for extra, t in zip(extras, times[len(benches):]):
        median = statistics.median(t)
        extra.result.update(summarise(t, "infer"),
                            infer_per_image_s=round(median / len(images), 4),
                            images_per_s=round(len(images) / median, 3))
        if isinstance(extra, ReferenceBench):  # its own clock, without the pipe round trip
            extra.result["reference_self_times_s"] = [
                round(x, 4) for x in extra.self_times[-len(t):]]
    for bench, t in zip(benches, times):
        median = statistics.median(t)
        bench.result.update(
            summarise(t, "infer"),
            infer_per_image_s=round(median / len(images), 4),
            images_per_s=round(len(images) / median, 3),
        )
        if args.profile:
            log(f"profiling {bench.cand.name}")
            bench.result["profile_top"] = profile_top(bench.infer, args.profile, args.device)
            phases = [phase_seconds(bench.model, bench.infer) for _ in range(args.iters)]
            bench.result["phase_s"] = {
                k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]
            }
    if args.train:
        for bench in benches:
            bench.start_training(train_batch, args.amp)
        log(f"timing training: {args.warmup} warm-up + {args.iters} rounds")
        steps = [b.train_step for b in benches]
        if args.bf16:  # each model's fp32 step, then its bf16 step, in every round
            steps = [s for b in benches
                     for s in (b.train_step, functools.partial(b.train_step, torch.bfloat16))]
        with EventStorage():  # Detectron2's RPN and ROI heads log training statistics into it
            if args.profile:  # before any optimiser step: random baselines diverge after a few
                for bench in benches:
                    log(f"profiling forward + backward of a training step of {bench.cand.name}")
                    bench.forward_backward()  # warm-up (the first backward allocates)
                    bench.result["train_profile_top"] = profile_top(
                        bench.forward_backward, args.profile, args.device
                    )
            times = interleaved_times(steps, args.iters, args.warmup, args.device)
            for bench in benches:
                log(f"training memory of {bench.cand.name}")
                measure_train_memory(bench, args.device)
        if args.bf16:
            for bench, fp32, bf16 in zip(benches, times[::2], times[1::2]):
                bench.result.update(summarise(bf16, "train_bf16"))
                bench.result["train_bf16_vs_fp32"] = round(
                    statistics.median(b / f for b, f in zip(bf16, fp32)), 3
                )
            times = times[::2]
        for bench, t in zip(benches, times):
            bench.result.update(train_batch=len(train_batch), **summarise(t, "train"))
    if args.memory:
        measure_process_memory(benches, exported, others, images, workdir)
    results = [b.result for b in benches + extras]
    for r in results:
        r["latency_vs_queryinst"] = round(r["infer_median_s"] / results[0]["infer_median_s"], 3)
        r["round_ratio_vs_queryinst"] = round(statistics.median(
            a / b for a, b in zip(r["infer_times_s"], results[0]["infer_times_s"])), 3)
    return results


def start_reference(args, qcfg: CfgNode, images: list[torch.Tensor], workdir: str):
    """Set up and start the reference on ``images``; QueryInst's config on its checkpoint.

    The reference gets the images in BGR (MMDetection's input order), so both models see the
    same picture whatever ``INPUT.FORMAT`` is.

    Returns:
        (ReferenceBench, CfgNode): the running reference, and ``qcfg``'s config file and
        options plus the checkpoint's shape options, with ``MODEL.WEIGHTS`` the checkpoint.

    Raises:
        SystemExit: if the config does not match a reference variant, or the reference cannot
            be set up or started (the message says why).
    """
    try:
        variant = reference_variant(qcfg)
        log("setting up the reference (tools/reference/setup.sh; quick once done)")
        python = setup_reference(quiet=True)
        batch = np.stack([im.numpy() for im in images])
        if qcfg.INPUT.FORMAT == "RGB":
            batch = batch[:, ::-1]
        np.save(Path(workdir) / "images.npy", np.ascontiguousarray(batch))
        ckpt = str(Path(workdir) / f"reference_{variant}.pth")
        log(f"starting the reference ({variant} queries): builds and saves its checkpoint")
        server = ReferenceServer(python, variant, ckpt, str(Path(workdir) / "images.npy"),
                                 seed=args.seed, threads=torch.get_num_threads())
    except (ValueError, ReferenceError) as e:
        raise SystemExit(f"benchmark.py: error: {e}") from None
    shape_opts = config_as_opts(detect_official_config(load_official_state_dict(ckpt)))
    cfg = queryinst_cfg(args.config_file, args.opts + shape_opts, args.device, weights=ckpt)
    return ReferenceBench(server, variant), cfg


def run(args, stack: contextlib.ExitStack) -> dict:
    """Build and measure every candidate of ``args`` (tools/benchmark.py's parsed options).

    Args:
        args: the options of ``tools/benchmark.py``.
        stack: closes the reference process and its temporary directory (``--reference``).

    Returns:
        dict: the report (date, device, machine, settings, models and, with ``--reference``,
        ours against the reference) that the script prints as its last line.

    Raises:
        SystemExit: a baseline that cannot be built or a reference that cannot be started.
    """
    height, width = args.input_size
    gen = torch.Generator().manual_seed(args.seed)
    images = [random_image(height, width, gen) for _ in range(args.batch_size)]
    qcfg = queryinst_cfg(args.config_file, args.opts, args.device)
    others = ()
    if args.reference:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="queryinst_reference_"))
        reference, qcfg = start_reference(args, qcfg, images, workdir)
        stack.callback(reference.server.close)
        others = (reference,)
    candidates = [
        Candidate(
            "queryinst", qcfg, build_queryinst_optimizer,
            {"config": args.config_file, "opts": args.opts,
             "num_queries": qcfg.MODEL.QUERYINST.NUM_PROPOSALS,
             "weights": ("the reference's random checkpoint" if args.reference
                         else "random, FrozenBN calibrated")},
        )
    ]
    variants = [(f"queryinst {d}", ["MODEL.QUERYINST.INFERENCE_DTYPE", d])
                for d in args.inference_dtype]
    if args.unfolded:
        variants.append(("queryinst unfolded", ["MODEL.QUERYINST.FUSE_BN_INFERENCE", "False"]))
    for opts in args.also_opts:
        extra = opts.split()
        variants.append(("queryinst " + " ".join(
            f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(extra[::2], extra[1::2])), extra))
    for name, extra in variants:  # the same config and weights, one inference setting changed
        cfg = qcfg.clone()  # with --reference, its checkpoint too
        cfg.defrost()
        cfg.merge_from_list(extra)
        cfg.freeze()
        candidates.append(Candidate(name, cfg, build_queryinst_optimizer,
                                    {**candidates[0].extra, "opts": args.opts + extra}))
    for config_file in args.also_config:
        cfg = queryinst_cfg(config_file, args.opts, args.device)
        name = "queryinst " + Path(config_file).stem.replace("queryinst_", "")
        candidates.append(Candidate(
            name, cfg, build_queryinst_optimizer,
            {"config": config_file, "opts": args.opts,
             "num_queries": cfg.MODEL.QUERYINST.NUM_PROPOSALS}))
    if args.baselines is None:  # both at QueryInst's depth; none for another backbone
        args.baselines = ([f"{arch}_R_{qcfg.MODEL.RESNETS.DEPTH}_FPN" for arch in BASELINE_ZOO]
                          if is_resnet(qcfg) else [])
    for name in args.baselines:
        try:
            cfg = baseline_cfg(name, qcfg, args.device)
        except ValueError as e:
            raise SystemExit(f"benchmark.py: error: {e}") from None
        zoo = {"config": BASELINE_ZOO[_BASELINE_NAME.match(name)["arch"]]}
        candidates.append(Candidate(name, cfg, build_detectron2_optimizer, zoo))

    train_batch = [
        {"image": random_image(height, width, gen),
         "instances": synthetic_instances(
             height, width, qcfg.MODEL.QUERYINST.NUM_CLASSES, args.train_instances, gen)}
        for _ in range(args.train_batch_size)
    ] if args.train else None

    models = measure_all(candidates, args, images, train_batch, others)

    report = {
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "machine": machine_info(args.device),
        "settings": {
            "input_size": [height, width],
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "iters": args.iters,
            "warmup": args.warmup,
            "seed": args.seed,
            "channels_last": args.channels_last,
            "baselines_convs_channels_last": queryinst_infers_channels_last(
                candidates[0].cfg, args.device),
            "exported": args.exported,
            "memory_in_own_process": args.memory,
            "inference_dtype_variants": args.inference_dtype,
            "unfolded_variant": args.unfolded,
            "train_batch_size": args.train_batch_size if args.train else None,
            "train_instances_per_image": args.train_instances if args.train else None,
            "amp": args.amp,
            "bf16": args.bf16,
            "flops": "fvcore via detectron2.utils.analysis; 1 multiply-add = 1 flop; 1 image",
        },
        "models": models,
    }
    if args.reference:
        report["reference"] = reference_summary(models)
    return report
