"""YouTube-VIS evaluation of QueryInst-VIS: submission rows, zip, and the evaluator.

The metric itself (track AP/AR, identity switches) is in ``ytvis_metric`` (docs/method.md
§6.4). Here: model tracks -> official result rows, the ``results.json`` + zip the YouTube-VIS
server takes, and ``YTVISEvaluator``, a Detectron2 ``DatasetEvaluator``.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import zipfile
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..structures import VideoTrack, encode_mask
from .ytvis_metric import METRIC_NAMES, evaluate_ytvis, identity_switches

__all__ = ["results_from_tracks", "write_submission", "load_json", "track_dataset", "YTVISEvaluator"]

logger = logging.getLogger(__name__)


def results_from_tracks(video_id: int, tracks: Sequence[VideoTrack],
                        contiguous_to_dataset_id: Optional[Mapping[int, int]] = None
                        ) -> List[dict]:
    """The official result rows of one video, one row per track.

    Args:
        video_id: the dataset's video id.
        tracks: the model's tracks (``VideoTrack``: ``category`` contiguous, ``score`` float,
            ``masks`` T entries of bool (H, W) tensors in original-frame pixels or None).
        contiguous_to_dataset_id: contiguous class -> dataset category id (the inverse of
            ``thing_dataset_id_to_contiguous_id``); None keeps the class as is.

    Returns:
        list of ``{"video_id", "category_id", "score", "segmentations"}``, segmentations a list
        of T compressed RLEs (``counts`` str) or None where the track is absent. Tracks with
        no mask at all (box-only) are left out: the metric is on masks.

    Raises:
        ValueError: a mask that is not 2-D.
    """
    rows = []
    for track in tracks:
        if all(m is None for m in track.masks):
            continue
        category = int(track.category)
        if contiguous_to_dataset_id is not None:
            category = int(contiguous_to_dataset_id[category])
        rows.append({"video_id": int(video_id), "category_id": category,
                     "score": float(track.score),
                     "segmentations": [None if m is None else encode_mask(m) for m in track.masks]})
    return rows


def write_submission(results: Sequence[dict], output_dir: str) -> Tuple[str, str]:
    """Write ``results.json`` and the zip the YouTube-VIS server takes.

    Args:
        results: result rows; only the official keys (video_id, category_id, score,
            segmentations) are written.
        output_dir: created if missing.

    Returns:
        (json path, zip path): ``output_dir/results.json`` and ``output_dir/results.zip``,
        the zip holding ``results.json`` at its top level (no folder).
    """
    keys = ("video_id", "category_id", "score", "segmentations")
    rows = [{k: r[k] for k in keys} for r in results]
    PathManager.mkdirs(output_dir)
    json_path = os.path.join(output_dir, "results.json")
    zip_path = os.path.join(output_dir, "results.zip")
    with PathManager.open(json_path, "w") as f:
        json.dump(rows, f)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(json_path, arcname="results.json")
    return json_path, zip_path


def load_json(path: str, what: str):
    """Read a json file; errors name the file.

    Args:
        path: the file.
        what: what it should hold, for the message (e.g. "GT json").

    Raises:
        FileNotFoundError: no such file. ValueError: not valid json.
    """
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with PathManager.open(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path} is not valid json: {e}") from e


class YTVISEvaluator(DatasetEvaluator):
    """YouTube-VIS track AP/AR and identity switches of QueryInst-VIS (docs/method.md §6.4).

    ``process`` turns each video's tracks into result rows; ``evaluate`` gathers them from all
    processes, writes ``results.json`` and ``results.zip`` into ``output_dir`` (the
    server's submission) and, when the dataset's GT json has annotations, computes the metrics.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None,
                 distributed: bool = True):
        """
        Args:
            dataset_name: a registered YouTube-VIS dataset; its metadata gives ``json_file``
                and ``thing_dataset_id_to_contiguous_id``.
            output_dir: where the submission is written (nothing is written when None).
            distributed: gather results from all processes (only the main one evaluates).
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        meta = MetadataCatalog.get(dataset_name)
        self._json_file = meta.json_file
        to_contiguous = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        self._to_dataset_id = ({v: k for k, v in to_contiguous.items()}
                               if to_contiguous else None)
        self._results: List[dict] = []

    def reset(self):
        """Forget the result rows of earlier videos (called before each evaluation)."""
        self._results = []

    def process(self, inputs, outputs):
        """
        Args:
            inputs: test-mapper dicts, one per video, each with ``video_id``.
            outputs: the model's outputs, ``{"tracks": list[VideoTrack], "image_size": (H, W),
                "num_frames": T}`` per video.
        """
        for inp, out in zip(inputs, outputs):
            self._results.extend(
                results_from_tracks(inp["video_id"], out["tracks"], self._to_dataset_id))

    def evaluate(self) -> "OrderedDict[str, Dict[str, float]]":
        """Returns ``{"segm": {AP, AP50, AP75, APs, APm, APl, AR1, AR10 (percent),
        "ID switches", "GT track-frames"}}`` on the main process; ``{}`` elsewhere and when
        the GT has no annotations (a server-only split: only the submission is written)."""
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._results, dst=0)
            if not comm.is_main_process():
                return OrderedDict()
            results = list(itertools.chain(*gathered))
        else:
            results = self._results
        if self._output_dir:
            json_path, zip_path = write_submission(results, self._output_dir)
            logger.info(f"YouTube-VIS results: {json_path}, submission {zip_path}")
        gt = load_json(self._json_file, "GT json")
        if not gt.get("annotations"):
            logger.warning(f"{self._json_file} has no annotations: wrote the submission only")
            return OrderedDict()
        metrics, table = evaluate_ytvis(gt, results)
        ids = identity_switches(gt, results)
        logger.info(f"YouTube-VIS evaluation of {self._dataset_name}:\n{table}"
                    f"ID switches {ids['ID switches']} over {ids['GT track-frames']} "
                    f"GT track-frames")
        segm = OrderedDict((k, metrics[k]) for k in METRIC_NAMES)
        segm["ID switches"] = ids["ID switches"]
        segm["GT track-frames"] = ids["GT track-frames"]
        return OrderedDict(segm=segm)


def track_dataset(model, data_loader, evaluator: DatasetEvaluator):
    """Run a video model over a test loader, evaluate, and keep what it returned.

    Detectron2's ``inference_on_dataset`` without its timing logs, plus the outputs (for
    drawing): suited to the small bundled videos, since every track's masks stay in memory.

    Args:
        model: a ``QueryInstVIS`` model in eval mode.
        data_loader: ``build_vis_test_loader`` (one video per batch).
        evaluator: e.g. :class:`YTVISEvaluator`.

    Returns:
        tuple: (``evaluator.evaluate()``, list of (video input dict, model output dict)).
    """
    import torch

    evaluator.reset()
    kept = []
    with torch.no_grad():
        for inputs in data_loader:
            outputs = model(inputs)
            evaluator.process(inputs, outputs)
            kept.extend(zip(inputs, outputs))
    return evaluator.evaluate(), kept
