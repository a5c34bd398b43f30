#!/usr/bin/env python3
"""Time and memory of the data path up to the first training batch, QueryInst against
Detectron2's Mask R-CNN, on one COCO-format json (e.g. tools/make_coco_scale_json.py's).

For each run (a fresh process each, the same json, ``DATALOADER.NUM_WORKERS`` workers, the
same batch, random weights, CPU) measured in the same run, at the moment the first training
batch is in the training loop's hands:

- ``seconds``: from just before the process is started to then (imports, config, dataset
  load and checks, model, loader, workers, first batch);
- ``main_peak_rss_mb``: the main process's peak resident memory (``VmHWM``);
- ``worker_uss_mb``: each DataLoader worker's unique memory (USS: private pages, from
  ``/proc/PID/smaps_rollup``), i.e. what it does not share with the main process, taken
  after ``--uss-batches`` batches (default 10) once every worker is idle: the main process
  stops taking batches, so each worker finishes the samples it was given (at most
  ``prefetch_factor`` = 2 each) and then waits, its CPU time constant. Then each worker has
  mapped the same samples in every run, and none is caught halfway through an image (a
  decoded, resized image is several MB), which made a sample at an arbitrary moment vary by
  about 10 MB from run to run. ``worker_uss_first_batch_mb``: the same after the first
  batch. The other numbers are those at the first batch;
- ``dataset_loads``: how often the process parsed the json;
- ``memory_mb``: the main process's RSS and peak RSS after each ``DatasetCatalog.get``,
  before and after the model build, after the dicts' serialisation (``DatasetFromList``,
  QueryInst's ``SerializedList``)
  and at the first batch (where the peak arises).

The runs: ``queryinst``: ``train_net.py``'s ``main`` (its dataset checks included) with
``configs/queryinst_R50_FPN_1x_coco.yaml`` and the json as ``--dataset``; ``detectron2``:
Detectron2's ``DefaultTrainer`` with its model zoo's
``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml`` and ``register_coco_instances``
(what its ``tools/train_net.py`` does). Linux only (``/proc``).

With ``--rounds N`` both runs are repeated N times, interleaved (every other round
Detectron2's first), and "summary" holds each side's mean and standard deviation and those
of the per-round ratios (``summarise``).

Example::

    python tools/make_coco_scale_json.py --out output/coco_scale
    python tools/data_scale_benchmark.py --json output/coco_scale/annotations.json \\
        --images output/coco_scale/images --rounds 4 --output output/coco_scale/benchmark.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("queryinst", "detectron2")


def _kib(path: str, fields) -> int:
    """Sum of the kB ``fields`` of a /proc status-like file."""
    total = 0
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in fields:
                total += int(rest.split()[0])
    return total


def _children(pid: int) -> list:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def _timed(owner, name: str, spent: dict, key: str):
    """Add the seconds spent in ``owner.name`` to ``spent[key]``, and note the memory after
    each call (:func:`_note_memory`)."""
    original = getattr(owner, name)

    def timed(*a, **k):
        t = time.time()
        try:
            return original(*a, **k)
        finally:
            spent[key] = spent.get(key, 0.0) + time.time() - t
            _note_memory(f"after {getattr(owner, '__name__', type(owner).__name__)}.{name}")

    setattr(owner, name, timed)


def _note_memory(stage: str) -> None:
    """Append (stage, current RSS MB, peak RSS MB so far) to ``MEMORY``: where the peak
    arises."""
    status = "/proc/self/status"
    MEMORY.append((stage, round(_kib(status, ("VmRSS",)) / 1024),
                   round(_kib(status, ("VmHWM",)) / 1024)))


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of process ``pid``, all its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))


def _idle_worker_uss(timeout: float = 60.0, interval: float = 0.25) -> dict:
    """USS (MB) of each child process of this one, read once none of them has used CPU time
    for two successive ``interval``s (or after ``timeout`` seconds: then "idle" is False).

    Returns:
        dict: {"uss_mb": sorted list, "idle": bool, "wait_seconds": float}.
    """
    t0 = time.time()
    pids = _children(os.getpid())
    last, still = None, 0
    while time.time() - t0 < timeout and still < 2:
        time.sleep(interval)
        try:
            ticks = [_cpu_ticks(p) for p in pids]
        except (FileNotFoundError, ProcessLookupError):
            pids, ticks = _children(os.getpid()), None
        still = still + 1 if ticks is not None and ticks == last else 0
        last = ticks
    uss = []
    for pid in pids:
        try:
            uss.append(_kib(f"/proc/{pid}/smaps_rollup",
                            ("Private_Clean", "Private_Dirty", "Private_Hugetlb")) / 1024)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return {"uss_mb": sorted(uss), "idle": still >= 2, "wait_seconds": time.time() - t0}


def _measure(start: float, loads: list) -> dict:
    """This process at its first training batch (see the module docstring); the workers'
    USS follows (:func:`_add_worker_uss`)."""
    _note_memory("first batch")
    return {"seconds": time.time() - start,
            "main_peak_rss_mb": _kib("/proc/self/status", ("VmHWM",)) / 1024,
            "dataset_loads": len(loads),
            **{k: round(v, 3) for k, v in SPENT.items()},
            "memory_mb": [{"stage": s, "rss": r, "peak": h} for s, r, h in MEMORY]}


def _add_worker_uss(result: dict, batches, uss_batches: int) -> None:
    """Add the idle workers' USS after the first batch and after ``uss_batches`` batches
    (taking the batches in between from ``batches``) to ``result``."""
    first = _idle_worker_uss()
    for _ in range(uss_batches - 1):
        next(batches)
    later = _idle_worker_uss() if uss_batches > 1 else first
    result.update({
        "worker_uss_first_batch_mb": first["uss_mb"], "uss_batches": uss_batches,
        "worker_uss_mb": later["uss_mb"], "workers_idle": first["idle"] and later["idle"],
        "worker_uss_max_mb": max(later["uss_mb"], default=0.0),
        "worker_uss_mean_mb": sum(later["uss_mb"]) / max(1, len(later["uss_mb"]))})


# Seconds spent in parts of the run: "dataset_get_seconds" (DatasetCatalog.get: reading and
# checking the json), "model_build_seconds"; and "model_mb", the model's parameters.
SPENT: dict = {}
# (stage, RSS, peak RSS) of the main process after each dataset get, model build, loader.
MEMORY: list = []


def _stop_at_first_batch(trainer, start: float, loads: list, out: str, uss_batches: int):
    """Replace the trainer's batch iterator by one that measures at the first batch (and
    the workers' USS after ``uss_batches``), writes ``out`` and ends the process (the
    workers with it)."""
    inner = trainer._trainer
    batches = inner._data_loader_iter

    def first():
        next(batches)
        result = _measure(start, loads)
        _add_worker_uss(result, batches, uss_batches)
        with open(out, "w") as f:
            json.dump(result, f)
        os._exit(0)
        yield  # a generator

    inner._data_loader_iter = first()


def _count_loads(loads: list, json_file: str) -> None:
    """Count the parses of ``json_file`` (a ``json.loads`` of a text of its size: queryinst's
    reader and pycocotools' ``COCO``, which Detectron2's ``load_coco_json`` uses, both parse
    through it), and time / note the memory of the dataset gets, the model build and the
    training loader build."""
    from detectron2.data import DatasetCatalog
    from detectron2.engine import DefaultTrainer

    size = os.path.getsize(json_file)
    parse = json.loads

    def counted(text, *a, **k):
        if len(text) == size:
            loads.append(1)
        return parse(text, *a, **k)

    json.loads = counted
    _timed(DatasetCatalog, "get", SPENT, "dataset_get_seconds")
    build = DefaultTrainer.build_model.__func__

    def build_model(cls, cfg):
        _note_memory("before build_model")
        t = time.time()
        model = build(cls, cfg)
        SPENT["model_build_seconds"] = time.time() - t
        SPENT["model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        _note_memory("after build_model")
        return model

    DefaultTrainer.build_model = classmethod(build_model)
    from detectron2.data import DatasetFromList  # the training dicts' serialisation

    _timed(DatasetFromList, "__init__", SPENT, "serialize_seconds")


def _child(run: str, json_file: str, image_root: str, workers: int, batch: int, out: str,
           uss_batches: int):
    start = float(os.environ["DATA_SCALE_START"])
    loads: list = []
    common = ["DATASETS.TRAIN", "('scale_train',)", "DATASETS.TEST", "()",
              "DATALOADER.NUM_WORKERS", str(workers), "SOLVER.IMS_PER_BATCH", str(batch),
              "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "OUTPUT_DIR",
              tempfile.mkdtemp(prefix=f"data_scale_{run}_")]
    if run == "queryinst":
        sys.path.insert(0, REPO)
        import train_net

        _count_loads(loads, json_file)
        from queryinst.data.train_loader import SerializedList  # its serialisation

        _timed(SerializedList, "__init__", SPENT, "serialize_seconds")
        resume_or_load = train_net.Trainer.resume_or_load

        def resume_then_stop(self, resume=True):
            resume_or_load(self, resume=resume)
            _stop_at_first_batch(self, start, loads, out, uss_batches)

        train_net.Trainer.resume_or_load = resume_then_stop
        args = train_net.parse_args([
            "--config-file", os.path.join(REPO, "configs", "queryinst_R50_FPN_1x_coco.yaml"),
            "--dataset", f"scale_train:{json_file}:{image_root}", *common])
        train_net.main(args)
    else:
        from detectron2 import model_zoo
        from detectron2.config import get_cfg
        from detectron2.data.datasets import register_coco_instances
        from detectron2.engine import DefaultTrainer, default_setup

        _count_loads(loads, json_file)
        register_coco_instances("scale_train", {}, json_file, image_root)
        # queryinst's config reader (yaml.safe_load only), as a lone module: importing the
        # queryinst package would add its modules (~65 MB) to Detectron2's memory.
        spec = importlib.util.spec_from_file_location("config_loading", os.path.join(
            REPO, "projects", "QueryInst", "queryinst", "config_loading.py"))
        config_loading = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config_loading)
        assert not any(m.split(".")[0] == "queryinst" for m in sys.modules)
        cfg = config_loading.merge_config_file(get_cfg(), model_zoo.get_config_file(
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
        cfg.merge_from_list(common)
        cfg.freeze()
        default_setup(cfg, argparse.Namespace(config_file="", eval_only=False))
        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load(resume=False)
        _stop_at_first_batch(trainer, start, loads, out, uss_batches)
        trainer.train()
    raise SystemExit(f"ERROR: {run}: training ended without a first batch")


def run(which, json_file: str, image_root: str, workers: int = 4, batch: int = 8,
        timeout: float = 3600, uss_batches: int = 10) -> dict:
    """Measure each run of ``which`` in a fresh process; returns {run: measurements}.

    Raises:
        RuntimeError: a run failed (its last output in the message) or took over ``timeout``
            seconds.
    """
    results = {}
    for name in which:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            env = dict(os.environ, DATA_SCALE_START=repr(time.time()), CUDA_VISIBLE_DEVICES="")
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", name, "--json",
                 json_file, "--images", image_root, "--num-workers", str(workers),
                 "--batch", str(batch), "--uss-batches", str(uss_batches), "--output", out],
                env=env, capture_output=True, text=True, timeout=timeout)
            if not os.path.exists(out):
                raise RuntimeError(f"{name} run failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            with open(out) as f:
                results[name] = json.load(f)
    if len(results) == 2:
        q, d = results["queryinst"], results["detectron2"]
        results["ratio"] = {
            "seconds": q["seconds"] / d["seconds"],
            "main_peak_rss": q["main_peak_rss_mb"] / d["main_peak_rss_mb"],
            # largest and mean worker, idle after uss_batches batches
            "worker_uss": q["worker_uss_max_mb"] / d["worker_uss_max_mb"],
            "worker_uss_mean": q["worker_uss_mean_mb"] / d["worker_uss_mean_mb"],
            # the data path alone: the models differ (QueryInst's heads are ~4x Mask R-CNN's)
            "seconds_besides_model_build": ((q["seconds"] - q["model_build_seconds"])
                                            / (d["seconds"] - d["model_build_seconds"])),
            "main_peak_rss_besides_parameters": ((q["main_peak_rss_mb"] - q["model_mb"])
                                                 / (d["main_peak_rss_mb"] - d["model_mb"])),
            "dataset_get_seconds": q["dataset_get_seconds"] / d["dataset_get_seconds"],
        }
    return results


def summarise(rounds: list) -> dict:
    """Mean and sample standard deviation over ``rounds`` (results of :func:`run`) of each
    side's seconds, main peak RSS and largest / mean worker USS, and each round's ratios.

    Returns:
        dict: {"queryinst": {key: {"mean", "std", "values"}}, "detectron2": ...,
        "ratio": {key: {"mean", "std", "values"}}}; std is 0.0 for one round.
    """
    def stats(values):
        values = [float(v) for v in values]
        mean = sum(values) / len(values)
        var = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)
               if len(values) > 1 else 0.0)
        return {"mean": mean, "std": var ** 0.5, "values": values}

    keys = ("seconds", "main_peak_rss_mb", "worker_uss_max_mb", "worker_uss_mean_mb")
    out = {side: {k: stats([r[side][k] for r in rounds]) for k in keys}
           for side in RUNS if all(side in r for r in rounds)}
    if all("ratio" in r for r in rounds):
        out["ratio"] = {k: stats([r["ratio"][k] for r in rounds]) for k in rounds[0]["ratio"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="COCO instances json")
    parser.add_argument("--images", required=True, help="image folder of the json")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="SOLVER.IMS_PER_BATCH")
    parser.add_argument("--uss-batches", type=int, default=10,
                        help="take the workers' USS after this many batches (>= 1)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the runs this many times, interleaved (every other round "
                             "in the other order), and add their mean and std (\"summary\")")
    parser.add_argument("--output", help="write the results here (json) too")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.json, args.images, args.num_workers, args.batch, args.output,
               args.uss_batches)
        return 0
    for flag, value in (("--uss-batches", args.uss_batches), ("--rounds", args.rounds)):
        if value < 1:
            print(f"ERROR: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    for path in (args.json, args.images):
        if not os.path.exists(path):
            print(f"ERROR: {path} does not exist (make one with tools/make_coco_scale_json.py)",
                  file=sys.stderr)
            return 2
    rounds = [run(args.runs[::-1] if i % 2 else args.runs, os.path.abspath(args.json),
                  os.path.abspath(args.images), args.num_workers, args.batch,
                  uss_batches=args.uss_batches) for i in range(args.rounds)]
    results = rounds[0] if args.rounds == 1 else {"rounds": rounds,
                                                  "summary": summarise(rounds)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
