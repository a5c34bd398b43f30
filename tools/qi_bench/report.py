"""The report of tools/benchmark.py: the table printed for people, the comparison with the
reference, and the JSON line."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

COLUMNS = [  # (header, key, format)
    ("model", "name", "{}"),
    ("backbone", "backbone", "{}"),
    ("params (M)", "params", lambda v: f"{v / 1e6:.1f}"),
    ("GFLOPs", "gflops", "{:.1f}"),
    ("median (s)", "infer_median_s", "{:.3f}"),
    ("p90 (s)", "infer_p90_s", "{:.3f}"),
    ("per image (s)", "infer_per_image_s", "{:.3f}"),
    ("img/s", "images_per_s", "{:.2f}"),
    ("vs QueryInst", "latency_vs_queryinst", "{:.2f}x"),
    ("per round", "round_ratio_vs_queryinst", "{:.2f}x"),
    ("infer mem (MiB)", "infer_mem_mib", "{:.0f}"),
    ("own process peak (MiB)", "process_peak_mib", "{:.0f}"),
    ("dets/img", "detections_per_image", lambda v: "/".join(map(str, sorted(set(v))))),
    ("train iter (s)", "train_median_s", "{:.3f}"),
    ("train bf16 (s)", "train_bf16_median_s", "{:.3f}"),
    ("train mem (MiB)", "train_mem_mib", "{:.0f}"),
    ("train peak (MiB)", "train_peak_mem_mib", "{:.0f}"),
]


def format_table(models: list[dict], columns: list | None = None) -> str:
    """A plain-text table with one row per model; missing values print as '-'.

    ``columns``: (header, key, format) triples, default ``COLUMNS`` (tools/benchmark.py's).
    """
    columns = COLUMNS if columns is None else columns

    def cell(model, key, fmt):
        if key not in model:
            return "-"
        return fmt(model[key]) if callable(fmt) else fmt.format(model[key])

    rows = [[h for h, _, _ in columns]] + [[cell(m, k, f) for _, k, f in columns] for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def reference_summary(models: list[dict]) -> dict:
    """Ours against the reference (the first and the last model): the median of the
    per-round latency ratios, ours / reference, and the ratio of the medians."""
    ours, ref = models[0], models[-1]
    per_round = [o / r for o, r in zip(ours["infer_times_s"], ref["infer_times_s"])]
    summary = {
        "ours_over_reference_per_round_median": round(statistics.median(per_round), 3),
        "ours_over_reference_of_medians": round(ours["infer_median_s"] / ref["infer_median_s"], 3),
        "per_round": [round(x, 3) for x in per_round],
    }
    for m in models[:-1]:  # every other row against the reference, per round
        summary.setdefault("per_round_median_vs_reference", {})[m["name"]] = round(
            statistics.median(o / r for o, r in zip(m["infer_times_s"], ref["infer_times_s"])), 3)
    if "process_peak_mib" in ours and "process_peak_mib" in ref:
        summary["fp32_peak_over_reference"] = round(
            ours["process_peak_mib"] / ref["process_peak_mib"], 3)
    return summary


def print_report(report: dict, args) -> None:
    """Print the settings line, the table, the reference and profile lines, then the JSON
    line (also written to ``args.json_out`` when given)."""
    models = report["models"]
    height, width = args.input_size
    machine = report["machine"]
    print(
        f"{args.device} ({machine.get('gpu', machine['cpu'])}), {report['settings']['threads']} "
        f"threads, input {height}x{width}, batch {args.batch_size}, {args.iters} timed + "
        f"{args.warmup} warm-up iterations"
        + (", channels-last" if args.channels_last else "")
        + (f", training batch {args.train_batch_size}" if args.train else "")
        + (", AMP" if args.amp else "")
        + (", bf16 training step beside fp32" if args.bf16 else "")
        + f", torch {torch.__version__}, {report['date']}"
    )
    print(format_table(models))
    if args.reference:
        r = report["reference"]
        print(f"  ours / MMDetection 3.3.0 reference latency: "
              f"{r['ours_over_reference_per_round_median']:.3f} (median of the per-round ratios), "
              f"{r['ours_over_reference_of_medians']:.3f} (ratio of the medians)")
        for name, ratio in r["per_round_median_vs_reference"].items():
            print(f"  {name:<28} / reference: {ratio:.3f} (median of the per-round ratios)")
        if "fp32_peak_over_reference" in r:
            print(f"  peak RSS of one inference, ours (fp32) / reference: "
                  f"{r['fp32_peak_over_reference']:.3f}")
    for m in models:
        if "phase_s" in m:
            print(f"  {m['name']:<28} phases (s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in m["phase_s"].items()))
        for key, label in (("profile_top", ""), ("train_profile_top", " [train]")):
            for row in m.get(key, []):
                ms = row.get("self_device_ms", row["self_cpu_ms"])
                print(f"  {m['name'] + label:<28} {row['op']:<44} {ms:>10.1f} ms x{row['calls']}")
    line = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
