"""YouTube-VIS evaluation: the evaluator over tracked videos and the spatio-temporal AP."""
from .evaluator import YTVISEvaluator, results_from_tracks, track_dataset, write_submission
from .ytvis_metric import evaluate_ytvis, identity_switches

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
