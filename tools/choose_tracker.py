#!/usr/bin/env python
"""Choose the tracker setting from ``tools/tune_tracker.py`` runs of several models (seeds).

The rule of docs/video.md (and of ``make demo``'s config): among the settings that every
model ran, keep those whose identity switches stay under ``--max-switch-rate`` of the GT
track-frames on the choosing dataset for every model (and that match ``--where``), and take
the highest mean VIS AP over the models on that dataset (ties: the first in the grid's
order). The held-out dataset (``--confirm``) is only reported for the chosen setting, never
used to choose.

Usage::

    python tools/choose_tracker.py --rows tune_s1.json tune_s2.json tune_s3.json \\
        --on ctc_psc_video_train --confirm ctc_psc_video_val \\
        --max-switch-rate 0.02 --where INIT_SCORE_THRESH=0.3

It prints the best settings, then the chosen one as config overrides
(``MODEL.QUERYINST_VIS.TRACKING.<KEY> <value>``) and its held-out VIS AP and switches per
model. Exit status 1 when no setting qualifies.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

# The keys of a tune_tracker row that are not tracker settings; make_row writes them.
METRICS = ("dataset", "AP", "AP50", "ID switches", "GT track-frames", "tracks")


def make_row(dataset: str, setting: dict, **metrics) -> dict:
    """One ``tools/tune_tracker.py`` row: the dataset, the setting's keys, then the metrics.

    The one place that fixes the row format that :func:`setting_of` reads back.

    Args:
        dataset (str): the video dataset scored.
        setting (dict): tracker keys (``MODEL.QUERYINST_VIS.TRACKING.<KEY>``) -> values.
        **metrics: ``AP``, ``AP50`` (VIS AP, percent), ``ID switches``, ``GT track-frames``,
            ``tracks`` (pass those with spaces as ``**{"ID switches": n}``).

    Raises:
        ValueError: a metric missing or unknown, or a setting key that is a metric name.
    """
    if set(metrics) != set(METRICS[1:]):
        raise ValueError(f"make_row: metrics must be {METRICS[1:]}, got {tuple(metrics)}")
    clash = set(setting) & set(METRICS)
    if clash:
        raise ValueError(f"make_row: setting keys {sorted(clash)} are metric names")
    return {"dataset": dataset, **setting, **{k: metrics[k] for k in METRICS[1:]}}


def setting_of(row: dict) -> tuple:
    """The tracker setting of a ``tune_tracker`` row: its (KEY, value) pairs in order."""
    return tuple((k, v) for k, v in row.items() if k not in METRICS)


def parse_where(items: list[str]) -> dict:
    """``KEY=value`` items -> {KEY: float value}.

    Raises:
        ValueError: an item without "=" or with a value that is not a number.
    """
    where = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            where[key] = float(value)
        except ValueError:
            raise ValueError(f"--where {item!r}: expected KEY=number, e.g. "
                             f"INIT_SCORE_THRESH=0.3") from None
    return where


def rank_settings(runs: list[list[dict]], on: str, max_switch_rate: float,
                  where: dict | None = None) -> list[dict]:
    """Settings run by every model, best first, with their mean VIS AP on ``on``.

    Args:
        runs: per model, the rows of one ``tune_tracker --out`` file.
        on: the dataset that chooses (e.g. the training clip).
        max_switch_rate: a setting qualifies when, for every model, its identity switches
            on ``on`` are below this fraction of the GT track-frames.
        where: {KEY: value} the setting must have (e.g. INIT_SCORE_THRESH 0.3).

    Returns:
        list of {"setting": {KEY: value}, "mean AP": float, "qualifies": bool,
        "rows": per model, {dataset: row}}, sorted by mean AP, highest first (stable: grid
        order among equals).

    Raises:
        ValueError: no runs, no setting has rows on ``on`` for every model, or a ``where``
            key is not a grid key of the rows (it would silently disqualify every setting).
    """
    if not runs:
        raise ValueError("no tune_tracker rows given (--rows)")
    where = where or {}
    per_setting: dict[tuple, list[dict]] = {}
    for model, rows in enumerate(runs):
        for row in rows:
            entry = per_setting.setdefault(setting_of(row), [{} for _ in runs])
            entry[model][row["dataset"]] = row
    ranked = []
    for setting, models in per_setting.items():
        if not all(on in m for m in models):
            continue
        values = dict(setting)
        chosen = [m[on] for m in models]
        ranked.append({
            "setting": values,
            "mean AP": statistics.mean(r["AP"] for r in chosen),
            "qualifies": all(values.get(k) == v for k, v in where.items()) and all(
                r["ID switches"] < max_switch_rate * r["GT track-frames"] for r in chosen),
            "rows": models,
        })
    if not ranked:
        raise ValueError(f"no setting has rows on {on!r} for all {len(runs)} models: "
                         f"were they tuned with --datasets {on}?")
    grid_keys = set().union(*(r["setting"] for r in ranked))
    unknown = sorted(set(where) - grid_keys)
    if unknown:
        raise ValueError(f"--where {', '.join(unknown)}: not a key of the tune_tracker rows "
                         f"(their grid keys: {', '.join(sorted(grid_keys))}); tune with "
                         f"--grid {unknown[0]}=... or drop it from --where")
    ranked.sort(key=lambda r: -r["mean AP"])
    return ranked


def _describe(setting: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in setting.items())


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", required=True, metavar="JSON",
                        help="tune_tracker --out files, one per model")
    parser.add_argument("--on", required=True, help="the dataset that chooses")
    parser.add_argument("--confirm", help="a held-out dataset, reported for the choice only")
    parser.add_argument("--max-switch-rate", type=float, default=0.02)
    parser.add_argument("--where", nargs="*", default=[], metavar="KEY=value")
    parser.add_argument("--top", type=int, default=10, help="settings listed")
    args = parser.parse_args(argv)
    runs = []
    for path in args.rows:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--rows {path}: cannot read tune_tracker rows ({e})") from e
    ranked = rank_settings(runs, args.on, args.max_switch_rate, parse_where(args.where))
    for r in ranked[:args.top]:
        print(f"[choose] {_describe(r['setting'])}: mean VIS AP on {args.on} "
              f"{r['mean AP']:.2f}{'' if r['qualifies'] else ' (does not qualify)'}")
    best = next((r for r in ranked if r["qualifies"]), None)
    if best is None:
        print(f"[choose] no setting qualifies (switches < {args.max_switch_rate:g} of the GT "
              f"track-frames on {args.on} for every model, --where {' '.join(args.where)})")
        return None
    opts = " ".join(f"MODEL.QUERYINST_VIS.TRACKING.{k} {int(v) if k == 'MAX_MISSED' else v:g}"
                    for k, v in best["setting"].items())
    print(f"[choose] chosen: {opts} (mean VIS AP on {args.on} {best['mean AP']:.2f})")
    if args.confirm:
        held = [m.get(args.confirm) for m in best["rows"]]
        if all(held):
            aps = [r["AP"] for r in held]
            std = statistics.stdev(aps) if len(aps) > 1 else 0.0
            print(f"[choose] {args.confirm}: VIS AP {', '.join(f'{a:.1f}' for a in aps)} "
                  f"({statistics.mean(aps):.1f} ± {std:.1f}), ID switches "
                  f"{', '.join(str(r['ID switches']) for r in held)}")
        else:
            print(f"[choose] {args.confirm}: not in every model's rows")
    return best


if __name__ == "__main__":
    try:
        sys.exit(0 if main() is not None else 1)
    except ValueError as e:
        sys.exit(f"ERROR: {e}")
