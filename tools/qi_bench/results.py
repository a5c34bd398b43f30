"""Runs of tools/results_table.py: launching one training per seed, reading each run's final
evaluation and config, checking they differ only in seed, statistics and the Markdown table
with its provenance (the script's docstring describes the table).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join("configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
ENTRIES = {"train_net": ["train_net.py"], "run_demo": [os.path.join("tools", "run_demo.py")]}
METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"),
           ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75")]
COMMAND_FILE = "results_table_command.txt"  # written next to each launched run
# Keys that may differ between runs of one table.
PER_RUN_KEYS = {"SEED", "OUTPUT_DIR"}


class RunError(RuntimeError):
    """A run directory is missing, unfinished or inconsistent; the message says which and why."""


@dataclass
class Run:
    """One finished training run.

    Attributes:
        path: the run directory as given.
        seed: ``SEED`` of its config.yaml (-1: Detectron2 drew a random seed).
        max_iter: ``SOLVER.MAX_ITER``.
        dataset: the evaluated test set (``DATASETS.TEST[0]``).
        metrics: {("bbox", "AP"): 23.4, ...}, COCO AP in percent (NaN when COCO gave NaN).
        config: the flattened config.yaml, {"SOLVER.MAX_ITER": 250, ...}.
        command: how this script launched it, or "" when it did not.
        logged_args: the "Command line arguments: ..." that Detectron2's ``default_setup``
            wrote to its log.txt, or "".
        finished: UTC time of the last write to metrics.json.
    """

    path: str
    seed: int
    max_iter: int
    dataset: str
    metrics: dict
    config: dict = field(repr=False)
    command: str = ""
    logged_args: str = ""
    finished: str = ""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(metrics_file: str) -> list[dict]:
    """The json lines of a Detectron2 ``metrics.json``.

    Raises:
        RunError: if a line is not json (the message names the file and line number).
    """
    records = []
    with open(metrics_file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunError(f"{metrics_file}:{n} is not json ({e})") from None
    return records


def final_evaluation(records: list[dict], max_iter: int, dataset: str) -> dict | None:
    """The metrics of the evaluation after the last iteration, or None if there is none.

    Args:
        records: :func:`read_metrics` output.
        max_iter: ``SOLVER.MAX_ITER`` (Detectron2 logs the final evaluation at this iteration).
        dataset: test set name, for keys of the form "<dataset>/bbox/AP" (several test sets).

    Returns:
        {("bbox", "AP"): value, ...} for the metrics of :data:`METRICS` present in the last
        record at iteration >= max_iter that has box AP; None when there is no such record.
    """
    found = None
    for record in records:
        if record.get("iteration", -1) < max_iter:
            continue
        for prefix in ("", f"{dataset}/"):
            if f"{prefix}bbox/AP" in record:
                found = {(task, name): float(record[f"{prefix}{task}/{name}"])
                         for task, name in METRICS if f"{prefix}{task}/{name}" in record}
    return found


def load_run(path: str) -> Run:
    """Read a finished run directory.

    Raises:
        RunError: if ``path`` is not a directory, lacks config.yaml or metrics.json, or has no
            evaluation at ``SOLVER.MAX_ITER`` (training unfinished or failed).
    """
    if not os.path.isdir(path):
        raise RunError(f"{path}: no such run directory")
    config_file = os.path.join(path, "config.yaml")
    metrics_file = os.path.join(path, "metrics.json")
    for f in (config_file, metrics_file):
        if not os.path.isfile(f):
            raise RunError(f"{path}: no {os.path.basename(f)}; not the OUTPUT_DIR of a "
                           f"train_net.py / tools/run_demo.py run (or it has not started)")
    with open(config_file) as f:
        config = _flatten(yaml.safe_load(f) or {})
    try:
        max_iter = int(config["SOLVER.MAX_ITER"])
        dataset = str(config["DATASETS.TEST"][0])
    except (KeyError, IndexError, TypeError):
        raise RunError(f"{config_file}: no SOLVER.MAX_ITER or DATASETS.TEST") from None
    metrics = final_evaluation(read_metrics(metrics_file), max_iter, dataset)
    if metrics is None:
        raise RunError(f"{path}: metrics.json has no evaluation at iteration {max_iter} "
                       f"(SOLVER.MAX_ITER): the run is unfinished or failed; see "
                       f"{os.path.join(path, 'log.txt')}")
    command = ""
    command_file = os.path.join(path, COMMAND_FILE)
    if os.path.isfile(command_file):
        with open(command_file) as f:
            command = f.read().strip()
    logged_args = ""
    log_file = os.path.join(path, "log.txt")
    if os.path.isfile(log_file):
        with open(log_file, errors="replace") as f:
            for line in f:
                if "Command line arguments: " in line:
                    logged_args = line.split("Command line arguments: ", 1)[1].strip()
    finished = datetime.datetime.fromtimestamp(os.path.getmtime(metrics_file),
                                               datetime.timezone.utc)
    return Run(path=path, seed=int(config.get("SEED", -1)), max_iter=max_iter, dataset=dataset,
               metrics=metrics, config=config, command=command, logged_args=logged_args,
               finished=finished.strftime("%Y-%m-%d %H:%M UTC"))


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs whose configs differ in anything but ``SEED`` / ``OUTPUT_DIR``.

    Raises:
        RunError: naming up to 10 differing keys and the two runs compared.
    """
    first = runs[0]
    for run in runs[1:]:
        keys = sorted(k for k in set(first.config) | set(run.config)
                      if k not in PER_RUN_KEYS and first.config.get(k) != run.config.get(k))
        if keys:
            shown = ", ".join(f"{k} ({first.config.get(k)!r} vs {run.config.get(k)!r})"
                              for k in keys[:10])
            raise RunError(f"{first.path} and {run.path} differ in more than SEED: {shown}; "
                           f"tabulate runs of one setting together")


def summarise(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1), min and max of the finite values.

    Returns:
        {"n", "mean", "std", "min", "max"}; std is NaN for fewer than 2 values, everything
        NaN for none. NaN inputs (COCO AP of a run without detections) are left out of n.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"n": len(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else math.nan,
            "min": min(finite), "max": max(finite)}


def cpu_model() -> str:
    """The CPU's model name: ``lscpu``'s "Model name", else ``platform.processor()``, else
    the "model name" of ``/proc/cpuinfo``, else "unknown". Results depend on it: the same
    seed and thread count give other digits on another CPU kind (other SIMD kernels)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, LC_ALL="C")).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    if platform.processor():
        return platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return "unknown"


def versions() -> dict:
    """Versions of this process's Python, torch, torchvision, detectron2 (with its build) and
    numpy, the platform and the git commit of this checkout (``-dirty`` with local changes)."""
    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        compiled = importlib.util.find_spec("detectron2._C") is not None
    except ModuleNotFoundError:
        compiled = False
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout
        commit += "-dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {
        "python": platform.python_version(),
        "torch": dist("torch"),
        "torchvision": dist("torchvision"),
        "detectron2": dist("detectron2") + (" (compiled ops detectron2._C)" if compiled
                                            else " (pure Python, no detectron2._C)"),
        "numpy": dist("numpy"),
        "CPU model": cpu_model(),
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "git commit": commit,
    }


def _fmt(v: float, digits: int = 1) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def render(runs: list[Run], command: str, env: dict, now: datetime.datetime,
           config_file: str | None = None) -> str:
    """The markdown document for ``runs`` (see the module docstring).

    Args:
        runs: finished runs of one setting.
        command: this script's command line.
        env: :func:`versions` output.
        now: the date written.
        config_file: the config the runs were launched with (named in the title), if known.
    """
    cols = [m for m in METRICS if all(m in r.metrics for r in runs)]
    names = {"bbox": "box", "segm": "mask"}
    header = ["run", "seed"] + [f"{names[t]} {n}" for t, n in cols]
    lines = [
        f"# Results: {runs[0].dataset}, {len(runs)} run(s) of "
        + (f"`{config_file}`" if config_file else "one config"),
        "",
        f"Written by `tools/results_table.py` on {now.strftime('%Y-%m-%d %H:%M UTC')}; "
        "regenerate it with the command below rather than editing it. COCO AP in percent "
        f"on `{runs[0].dataset}` after {runs[0].max_iter} iterations; the runs differ only in "
        "`SEED` (-1: Detectron2 drew a random seed). Measured on "
        f"{env.get('CPU model', 'an unrecorded CPU')}: a seed gives the same digits only on "
        "the same CPU model and thread count.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in runs:
        cells = [f"`{r.path}`", str(r.seed)] + [_fmt(r.metrics[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    stats = {c: summarise([r.metrics[c] for r in runs]) for c in cols}
    lines.append("| mean ± std | | " + " | ".join(
        f"{_fmt(stats[c]['mean'])} ± {_fmt(stats[c]['std'])}" for c in cols) + " |")
    lines.append("| min to max | | " + " | ".join(
        f"{_fmt(stats[c]['min'])} to {_fmt(stats[c]['max'])}" for c in cols) + " |")
    lines.append("")
    lines.append(spread_sentence(stats, cols, len(runs)))
    lines += ["", "## Commands", "", "This table:", "", "```bash", command, "```", ""]
    launched = [r for r in runs if r.command]
    if launched:
        lines += ["Each run (launched by this script; log in `<run>/log.txt`):", "", "```bash"]
        lines += [r.command for r in launched] + ["```", ""]
    unknown = [r for r in runs if not r.command]
    if unknown:
        lines += ["Not launched by this script, so their commands are not recorded; the "
                  "arguments their `log.txt` names:", ""]
        lines += [f"- `{r.path}`: {r.logged_args or 'none found'}" for r in unknown] + [""]
    lines += ["## Environment", "",
              "Of the process that wrote this table (and ran the runs it launched):", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "Runs finished (last write of `metrics.json`):", ""]
    lines += [f"- `{r.path}`: {r.finished}" for r in runs] + [""]
    return "\n".join(lines)


def spread_sentence(stats: dict, cols: list, n: int) -> str:
    """One sentence on the run-to-run spread of box and mask AP."""
    if n < 2:
        return ("Run-to-run spread: unknown from a single run; tabulate several seeds "
                "(`--seeds 0 1 2`) before comparing numbers.")
    parts = []
    for task, name in (("bbox", "box AP"), ("segm", "mask AP")):
        s = stats.get((task, "AP"))
        if s and s["n"] > 1:
            parts.append(f"{name} spans {_fmt(s['max'] - s['min'])} points "
                         f"({_fmt(s['min'])} to {_fmt(s['max'])}, std {_fmt(s['std'])})")
    return ("Run-to-run spread over " + f"{n} runs: " + "; ".join(parts) +
            ". A difference smaller than this spread says nothing; compare means of several "
            "seeds.")


def launch(cmd: list[str], run_dir: str) -> int:
    """Run one training command from the repository root; stdout and stderr go to
    ``run_dir/launch.log`` (Detectron2's own ``log.txt`` is written next to it).

    Returns:
        int: the process's exit status.
    """
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "launch.log"), "a") as log:
        return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode


def run_seeds(args) -> list[str]:
    """Launch the unfinished seeds one after the other; return their run directories.

    Raises:
        RunError: a directory that belongs to another seed, or a run that exits non-zero
            or leaves no final evaluation.
    """
    dirs = []
    for seed in args.seeds:
        run_dir = os.path.join(args.runs_root, f"seed{seed}")
        dirs.append(run_dir)
        try:
            load_run(run_dir)
            print(f"[results] {run_dir}: finished earlier, not trained again")
            continue
        except RunError:
            pass
        config_file = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(config_file):  # unfinished: resume only the same seed
            with open(config_file) as f:
                old_seed = (yaml.safe_load(f) or {}).get("SEED")
            if old_seed != seed:
                raise RunError(f"{run_dir} holds a run with SEED {old_seed}, not {seed}; "
                               f"choose another --runs-root or delete it")
        cmd = [sys.executable, *ENTRIES[args.entry], "--config-file", args.config_file]
        if args.entry == "train_net":
            cmd.append("--resume")  # continue a killed run from OUTPUT_DIR/last_checkpoint
        cmd += [*args.opts, "SEED", str(seed), "OUTPUT_DIR", run_dir]
        shown = shlex.join(["python", *cmd[1:]])
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, COMMAND_FILE), "w") as f:
            f.write(shown + "\n")
        print(f"[results] {run_dir}: {shown}", flush=True)
        status = launch(cmd, run_dir)
        if status != 0:
            raise RunError(f"{run_dir}: the run exited with status {status}; see "
                           f"{os.path.join(run_dir, 'launch.log')}")
        load_run(run_dir)  # raises if it left no final evaluation
    return dirs
