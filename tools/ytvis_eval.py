#!/usr/bin/env python3
"""Evaluate YouTube-VIS results against a GT json (docs/method.md §6.4).

Prints pycocotools' summary table, the identity switches and, as its last line, one JSON object
with AP, AP50, AP75, APs, APm, APl, AR1, AR10 in percent (null where undefined, e.g. APl
without large GT tracks). Exit code 0 on success, 1 with one ``ERROR:`` line naming the file
when a file is missing or malformed.

Usage: ``python tools/ytvis_eval.py --gt-json GT.json --results-json RESULTS.json``
(``RESULTS.json`` may also be the server's ``results.zip``).
"""
import argparse
import json
import math
import os
import sys
import zipfile

# Use the package of this checkout, installed or not.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "projects", "QueryInst"))


def _load_json(path: str, what: str):
    """The file's json; OSError / ValueError naming the file."""
    if path.endswith(".zip") and os.path.isfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("results.json"))
        except (zipfile.BadZipFile, KeyError, ValueError) as e:
            raise ValueError(f"{what} {path} has no valid top-level results.json: {e}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{what} {path} is not valid json: {e}") from e


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt-json", required=True, help="YouTube-VIS GT json")
    parser.add_argument("--results-json", required=True,
                        help="results json (list of video_id, category_id, score, "
                             "segmentations) or the submission zip")
    args = parser.parse_args(argv)
    try:  # the files first: their errors come before the (slow) imports of the package
        gt = _load_json(args.gt_json, "GT json")
        if not isinstance(gt, dict) or "videos" not in gt or "annotations" not in gt:
            raise ValueError(f"GT json {args.gt_json} is not a YouTube-VIS GT "
                             f"(needs 'videos' and 'annotations')")
        results = _load_json(args.results_json, "results json")
        if not isinstance(results, list):
            raise ValueError(f"results json {args.results_json} must hold a list of results")
        from queryinst.video.evaluation.ytvis_metric import evaluate_ytvis, identity_switches

        try:
            metrics, table = evaluate_ytvis(gt, results)
            ids = identity_switches(gt, results)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{args.gt_json} / {args.results_json}: {e}") from e
    except (OSError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(table, end="")
    print(f"ID switches {ids['ID switches']} over {ids['GT track-frames']} GT track-frames")
    print(json.dumps({k: (None if math.isnan(v) else round(v, 4)) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
