"""Read checkpoint files and load them into this model, official QueryInst checkpoints included.

Official files (hustvl/QueryInst, MMDetection; layout in docs/method.md §4) are renamed to this
project's names by :mod:`queryinst.checkpoint.official_layout`; this module reads files
safely, converts official ones, and offers a Detectron2 checkpointer that does the conversion on load, so
``MODEL.WEIGHTS`` may name an official ``.pth`` file directly.

Public names (``__all__`` also re-exports those of :mod:`queryinst.checkpoint.official_layout` and
:mod:`queryinst.checkpoint.errors`, so ``from queryinst.checkpoint import ...`` serves all):

- :func:`load_checkpoint_file`: reads a ``torch.save`` file without running code from it
  (:mod:`queryinst.checkpoint.safe_load`); a file it refuses or cannot read gets one message naming it
  and what it holds (:func:`unreadable_checkpoint_error`), never advice to drop the check.
- :func:`official_config_opts`: the config an official file implies, as overrides;
  :func:`load_official_state_dict`, :func:`convert_official_checkpoint`: read / convert one.
- :class:`QueryInstCheckpointer`: ``DetectionCheckpointer`` that also reads official files,
  with a ``strict`` mode for inference (no partial loads, no untrained model).
- :class:`CheckpointError` and its kinds :class:`CheckpointFormatError` (a file that is not a
  readable checkpoint of this model) and :class:`WeightsUnavailableError` (no file: missing,
  download failed, or no weights named where a trained model is needed).
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler
from torch import Tensor

from .errors import (
    _EXPECTED,
    _some,
    CheckpointError,
    CheckpointFormatError,
    WeightsUnavailableError,
)
from .class_init import ClassInit, remap_class_rows
from ..file_io import write_atomically
from .official_layout import (
    check_against_model,
    config_as_opts,
    convert_official_state_dict,
    detect_official_config,
    fill_num_batches_tracked,
    format_config_summary,
    is_official_state_dict,
    may_be_absent,
)
from .pretrained import (
    PRETRAINED_PREFIX,
    convert_torchvision_mobilenet_v2,
    is_torchvision_mobilenet_v2,
    resolve_pretrained,
)
from .safe_load import load_pickle_file, load_torch_file, unreadable_checkpoint_error

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "WeightsUnavailableError",
    "QueryInstCheckpointer",
    "check_against_model",
    "convert_official_checkpoint",
    "config_as_opts",
    "convert_official_state_dict",
    "detect_official_config",
    "fill_num_batches_tracked",
    "format_config_summary",
    "is_official_state_dict",
    "load_checkpoint_file",
    "write_atomically",
    "load_official_state_dict",
    "official_config_opts",
    "unreadable_checkpoint_error",
]

logger = logging.getLogger(__name__)

# "__author__" of a converted checkpoint; QueryInstCheckpointer loads such files strictly.
CONVERTED_AUTHOR = "QueryInst official (mmdet layout), converted by queryinst.checkpoint"


# --------------------------------------------------------------------------- file loading
def official_config_opts(path: str, fine_tuning: bool = False) -> list:
    """Config overrides for ``MODEL.WEIGHTS`` if it is a local official file, else ``[]``.

    For programs that accept official files in ``MODEL.WEIGHTS``: merge the result before
    building the model, so that e.g. a 300-query file gets a 300-query model. Cheap: a
    zip-format file is memory-mapped, and ``.pkl``/``.pyth``, URLs and missing paths are not
    opened at all. Detectron2 checkpoints give ``[]``. With ``fine_tuning`` (training) the
    class count is left to the config: the official model is fine-tuned to its classes.
    """
    if not path or path.endswith((".pkl", ".pyth")) or not os.path.isfile(path):
        return []
    try:
        data = load_checkpoint_file(path, mmap=True)
    except CheckpointError:
        return []  # not loadable as weights: QueryInstCheckpointer says why when loading it
    sd = data.get("state_dict") if isinstance(data, Mapping) else None
    if not isinstance(sd, Mapping) or not is_official_state_dict(sd):
        return []
    config = detect_official_config(sd)
    if fine_tuning:
        config.pop("MODEL.QUERYINST.NUM_CLASSES", None)
    return config_as_opts(config)


def load_checkpoint_file(path: str, mmap: bool = False) -> Any:
    """Read a ``torch.save`` file on the CPU without running code from it.

    :func:`queryinst.checkpoint.safe_load.load_torch_file`: ``torch.load(weights_only=True)`` with
    numpy arrays, scalars and dtypes allowed. Official files carry a ``meta`` dict (mmdet /
    mmcv versions, config text, class names, epoch), MMDetection 3.x files also a
    ``message_hub`` of mmengine objects: entries that hold objects of mmengine / mmcv / mmdet
    classes are dropped with one log line (the classes are never imported), the weights load.

    With ``mmap`` a zip-format file is memory-mapped: tensors are read from the file when
    used, so reading the config of a 700 MB file is cheap (the legacy format is read whole).
    Do not use it for files that may be rewritten while their tensors are in use.

    Raises:
        WeightsUnavailableError: ``path`` is not a file.
        CheckpointFormatError: a file that names other functions or classes (``holds a
            reference to os.system, which is not loaded: ...``), or that cannot be read
            (truncated, corrupt, not a checkpoint), see :func:`unreadable_checkpoint_error`.
    """
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"{path}: no such file")
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy format cannot be memory-mapped
    return load_torch_file(path, mmap=mmap)


def load_official_state_dict(path: str, mmap: bool = True) -> "OrderedDict[str, Tensor]":
    """The official ``state_dict`` of a file, or an error saying what was expected.

    ``mmap`` as in :func:`load_checkpoint_file` (the default here: the file is only read).
    """
    data = load_checkpoint_file(path, mmap=mmap)
    sd = data.get("state_dict") if isinstance(data, Mapping) else None
    if not isinstance(sd, Mapping) or not is_official_state_dict(sd):
        raise CheckpointFormatError(f"{path}: not an official QueryInst checkpoint; {_EXPECTED}")
    return sd


def convert_official_checkpoint(
    input_path: str, output_path: str | None = None,
    build_model_state: Callable[[Mapping[str, Any]], Mapping[str, Tensor]] | None = None,
) -> tuple["OrderedDict[str, Tensor]", "OrderedDict[str, Any]"]:
    """Convert an official file; optionally check it against a model and save it.

    Args:
        input_path: official ``.pth``.
        output_path: where to write the Detectron2 checkpoint
            ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``
            (loadable by ``DetectionCheckpointer``); None to skip writing.
        build_model_state: given the detected config, returns the ``state_dict()`` (or a
            dict of tensors with the same shapes) of the model it should fill; None to skip
            that check.

    Returns:
        (converted state dict, detected config).
    """
    official = load_official_state_dict(input_path)
    config = detect_official_config(official)
    converted = convert_official_state_dict(official)
    if build_model_state is not None:
        model_state = build_model_state(config)
        check_against_model(converted, model_state, config)
        fill_num_batches_tracked(converted, model_state)
    if output_path is not None:
        torch.save(
            {"model": converted, "__author__": CONVERTED_AUTHOR, "matching_heuristics": False},
            output_path,
        )
    return converted, config


# --------------------------------------------------------------------------- checkpointer
def _download_url(path: str) -> str:
    """The URL Detectron2's PathManager downloads for ``path`` (``detectron2://`` expanded)."""
    if path.startswith(Detectron2Handler.PREFIX):
        return Detectron2Handler.S3_DETECTRON2_PREFIX + path[len(Detectron2Handler.PREFIX):]
    return path


_UNTRAINED = (
    "MODEL.WEIGHTS is empty: the model would keep its random initialisation, and its "
    "detections would mean nothing. Set MODEL.WEIGHTS to a trained checkpoint "
    "(model_final.pth of a training run, or an official .pth, see docs/official_weights.md)"
)


class QueryInstCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also loads official QueryInst files (docs/method.md §4).

    - An official ``.pth`` (``{"state_dict", "meta"}`` with ``roi_head.bbox_head.0.`` keys)
      is converted on load and must fill this model exactly (else
      :class:`CheckpointFormatError` with the keys and the config the file implies). Only
      for training (not ``strict``) may the class-dependent tensors differ (fine-tuning to
      another class count) and modules the official model lacks (the video track head) be
      left unfilled; queries, stages and depth must still match.
    - A converted file written by ``tools/convert_mmdet_checkpoint.py`` is loaded by the
      same rules.
    - ``queryinst://ImageNetPretrained/MobileNetV2`` and a bare torchvision MobileNetV2
      state dict load as the backbone's ImageNet weights (:mod:`queryinst.checkpoint.pretrained`).
    - Detectron2 checkpoints (``{"model": ...}``: this project's training outputs) and the
      ``.pkl`` / ``.pyth`` files Detectron2 reads (ImageNet-pretrained backbones) load as
      with ``DetectionCheckpointer``, but read by :mod:`queryinst.checkpoint.safe_load` (no file runs
      code: one naming another function or class is refused).
    - Any other ``.pth`` (a bare state dict such as torchvision's ResNet, another detector's
      mmdet checkpoint, a random dict) raises :class:`CheckpointFormatError` saying what
      was expected, instead of loading nothing and warning.
    - A file that cannot be read (truncated, corrupt, not a checkpoint) raises
      :class:`CheckpointFormatError` naming it; a missing file or a failed download (e.g.
      ``detectron2://ImageNetPretrained/...`` without network) raises
      :class:`WeightsUnavailableError` naming the URL and what to pass instead.

    Args:
        model, save_dir, checkpointables: as for ``DetectionCheckpointer``.
        strict: for inference (``demo.py``, ``train_net.py --eval-only``). A model tensor
            that the checkpoint does not fill, or fills with another shape, raises
            :class:`CheckpointFormatError` (count, first keys, and the likely cause: a
            ``config.yaml`` next to the checkpoint, as Detectron2's ``default_setup`` writes
            into OUTPUT_DIR, is named as the config to use; a backbone-only file is called
            one); an empty path raises :class:`WeightsUnavailableError`. Without ``strict``
            (training, fine-tuning e.g. with another class count) a partial load is allowed
            and logged as one warning, and an empty path as one line saying that the model
            starts from random initialisation. ``num_batches_tracked`` and
            ``pixel_mean``/``pixel_std`` may be absent in both modes. In strict mode the
            check runs after fvcore has copied the matching tensors, so a refused model is
            partly loaded: do not use it.
        class_init: training only (ignored when ``strict``): the class rows that a
            checkpoint with another class count gives the model's class-specific tensors
            (:func:`queryinst.checkpoint.class_init.remap_class_rows`, from
            ``MODEL.QUERYINST.CLASS_INIT_FROM``); None drops those tensors instead.
        class_names: the model's class names (``MODEL.QUERYINST.CLASS_NAMES``), saved
            in every checkpoint under "class_names" (when not empty); :meth:`load` returns
            them with the other non-model entries.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = False,
                 class_init: Optional[ClassInit] = None, class_names=(), **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self.class_init = class_init
        self.class_names = list(class_names)
        self._source = ""  # the path as given (a URL stays a URL), for messages

    # fvcore's Checkpointer.save and tag_last_checkpoint write straight into the final
    # files: a process killed mid-write left a truncated model_*.pth, or a last_checkpoint
    # naming it (or empty), and --resume then failed on it. Same files, written atomically.
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``save_dir/<name>.pth`` (model, checkpointables, "class_names", ``kwargs``)
        atomically, then point ``save_dir/last_checkpoint`` at it, atomically too
        (:func:`write_atomically`).

        Same content and file names as fvcore's ``Checkpointer.save`` (plus "class_names");
        nothing is written
        without a ``save_dir`` or off the main process (``save_to_disk`` False).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.class_names:
            data["class_names"] = self.class_names
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        write_atomically(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Write ``save_dir/last_checkpoint`` (the newest checkpoint's file name) atomically."""
        write_atomically(os.path.join(self.save_dir, "last_checkpoint"),
                         lambda f: f.write(last_filename_basename.encode("utf-8")))

    # fvcore logs "No checkpoint found. Initializing model from scratch" for any empty path,
    # also when there was nothing to look for; these two methods say what actually happens.
    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        """As fvcore's: with ``resume`` and an ``OUTPUT_DIR/last_checkpoint``, load that file
        (model and checkpointables), else the model from ``path``; logs which one."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            self.logger.info("Resuming from %s (named in %s/last_checkpoint)", last,
                             self.save_dir)
            return self.load(last)
        if resume:
            self.logger.info("Nothing to resume in %r (no last_checkpoint)", self.save_dir)
        return self.load(path, checkpointables=[])

    def load(self, path: str, checkpointables: list | None = None) -> dict:
        """Load ``path`` (local file, ``detectron2://`` or URL) as fvcore's ``load`` does.

        Raises:
            WeightsUnavailableError: empty ``path`` in strict mode; no such file; download
                failed (the message names the URL and what to pass instead).
            CheckpointFormatError: unreadable file, or (strict) a partial load.
        """
        if not path:
            if self.strict:
                raise WeightsUnavailableError(_UNTRAINED)
            self.logger.info("No weights to load (MODEL.WEIGHTS is empty): the model starts "
                             "from random initialisation")
            return {}
        self._source = path
        return super().load(self._local_path(path), checkpointables)

    def _local_path(self, path: str) -> str:
        if os.path.isfile(path):
            return path
        if path.startswith(PRETRAINED_PREFIX):  # fetched and converted once, then cached
            return resolve_pretrained(path)
        if "://" in path:  # detectron2://, https://, ...: downloaded (or cached) by iopath
            try:
                path = self.path_manager.get_local_path(path)
            except OSError as e:  # urllib's URLError / HTTPError
                raise WeightsUnavailableError(self._download_failed(path, e)) from None
        if not os.path.isfile(path):
            raise WeightsUnavailableError(f"{path}: no such file (named as MODEL.WEIGHTS)")
        return path

    def _download_failed(self, path: str, exc: OSError) -> str:
        url = _download_url(path)
        reason = getattr(exc, "reason", None) or exc
        local = f"path/to/{os.path.basename(urlparse(url).path) or 'weights.pth'}"
        instead = (
            "set MODEL.WEIGHTS to a trained checkpoint (model_final.pth of a training run, "
            "or an official .pth)" if self.strict else
            f"download it where there is network access and set MODEL.WEIGHTS {local}, or "
            "train from random initialisation with MODEL.WEIGHTS \"\""
        )
        return f"cannot download MODEL.WEIGHTS {path} from {url} ({reason}); {instead}"

    def _load_file(self, filename: str) -> dict:
        """Read ``filename`` without running code from it (:mod:`queryinst.checkpoint.safe_load`) and
        return Detectron2's checkpoint dict; official files are converted."""
        if filename.endswith(".pkl"):
            return self._detectron2_pkl(filename)
        if filename.endswith(".pyth"):  # pycls, read as DetectionCheckpointer reads it
            data = load_checkpoint_file(filename)
            if not isinstance(data, Mapping) or not isinstance(data.get("model_state"), Mapping):
                raise CheckpointFormatError(f"{filename}: a .pyth file (pycls) holds "
                                            "'model_state'; this one does not")
            return {"model": {k: v for k, v in data["model_state"].items()
                              if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        data = load_checkpoint_file(filename)
        if not isinstance(data, Mapping):
            raise CheckpointFormatError(f"{filename}: holds a {type(data).__name__}; {_EXPECTED}")
        sd = data.get("state_dict")
        if isinstance(sd, Mapping) and is_official_state_dict(sd):
            config = detect_official_config(sd)
            self.logger.info(
                "Converting the official QueryInst checkpoint %s; its config:\n%s",
                filename, format_config_summary(config),
            )
            return {
                "model": convert_official_state_dict(sd),
                "__author__": CONVERTED_AUTHOR,
                "matching_heuristics": False,
                "official_config": config,
            }
        model = data.get("model")
        if isinstance(model, Mapping):
            if not any(k in self.model.state_dict() for k in model):
                raise CheckpointFormatError(
                    f"{filename}: its 'model' has no tensor of this model "
                    f"(e.g. {next(iter(model), None)!r}); {_EXPECTED}"
                )
            return dict(data)
        if is_torchvision_mobilenet_v2(data):
            return {
                "model": convert_torchvision_mobilenet_v2(data, source=filename),
                "__author__": "torchvision MobileNetV2",
                "matching_heuristics": False,
            }
        keys = list(data)[:5]
        raise CheckpointFormatError(f"{filename}: top-level keys {keys}...; {_EXPECTED}")

    def _detectron2_pkl(self, filename: str) -> dict:
        """A Detectron2 / Detectron ``.pkl`` (numpy arrays), read by the restricted
        unpickler and returned as ``DetectionCheckpointer._load_file`` returns it: model-zoo
        files (``model`` and ``__author__``) as they are, Caffe2 files (``blobs`` or bare)
        with name-matching heuristics and without ``*_momentum``."""
        data = load_pickle_file(filename)
        if not isinstance(data, dict):
            raise CheckpointFormatError(f"{filename}: holds a {type(data).__name__}; {_EXPECTED}")
        if "model" in data and "__author__" in data:
            self.logger.info("Reading a file from '%s'", data["__author__"])
            return data
        data = data.get("blobs", data)
        return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint: dict):
        config = checkpoint.pop("official_config", None)
        if self.class_init is not None and not self.strict:
            remap_class_rows(checkpoint["model"], self.model.state_dict(), self.class_init,
                             source=self._source or "MODEL.WEIGHTS")
        if checkpoint.get("__author__") == CONVERTED_AUTHOR:
            model_state = self.model.state_dict()
            # Training may fine-tune an official model to other classes or add modules (the
            # VIS track head); inference (strict) takes only a file that fills the model.
            check_against_model(checkpoint["model"], model_state, config,
                                fine_tuning=not self.strict)
            fill_num_batches_tracked(checkpoint["model"], model_state)
        incompatible = super()._load_model(checkpoint)
        if self.strict:
            problem = self._partial_load_problem(incompatible)
            if problem:
                raise CheckpointFormatError(problem)
        return incompatible

    def _split(self, incompatible):
        """(missing, incorrect shapes, unexpected) without the keys that may be absent; fvcore
        also lists the tensors it skipped for their shapes as missing: not repeated here."""
        shapes = [s for s in incompatible.incorrect_shapes if not may_be_absent(s[0])]
        skipped = {k for k, _, _ in shapes}
        return (
            [k for k in incompatible.missing_keys
             if not may_be_absent(k) and k not in skipped],
            shapes,
            [k for k in incompatible.unexpected_keys if not may_be_absent(k)],
        )

    def _loaded_only_the_backbone(self, missing, shapes) -> bool:
        skipped = set(missing) | {k for k, _, _ in shapes}
        loaded = [k for k in self.model.state_dict()
                  if k not in skipped and not may_be_absent(k)]
        return bool(loaded) and all(k.startswith("backbone.bottom_up.") for k in loaded)

    def _describe(self, missing, shapes, unexpected) -> str:
        parts = []
        if missing:
            parts.append(f"model tensors not in the checkpoint: {_some(missing)}")
        if shapes:
            shown = [f"{k} {tuple(c)} in the checkpoint, {tuple(m)} in the model"
                     for k, c, m in shapes]
            parts.append(f"tensors of another shape: {_some(shown, 3)}")
        if unexpected:
            parts.append(f"checkpoint tensors the model does not have: {_some(unexpected)}")
        return "; ".join(parts)

    def _likely_cause(self) -> str:
        # Detectron2's default_setup writes OUTPUT_DIR/config.yaml beside the checkpoints, at
        # the start of a run: a newer one was rewritten later (e.g. by this very run, if its
        # OUTPUT_DIR is the checkpoint's folder) and may not be the training config.
        saved = os.path.join(os.path.dirname(self._source), "config.yaml")
        if not (os.path.isfile(self._source) and os.path.isfile(saved)):
            return ("It was probably trained with another config (e.g. another "
                    "MODEL.QUERYINST.NUM_CLASSES, NUM_STAGES, HIDDEN_DIM or "
                    "MODEL.RESNETS.DEPTH): use the config it was trained with")
        if os.path.getmtime(saved) <= os.path.getmtime(self._source):
            return (f"It was probably trained with another config: {saved} lies next to it; "
                    f"run with --config-file {saved}")
        return (f"It was probably trained with another config; {saved} lies next to it but "
                "was written after it (by a later run with that OUTPUT_DIR?): if it is the "
                f"training config, run with --config-file {saved}")

    def _partial_load_problem(self, incompatible) -> str:
        """The strict-mode error message, or "" when every model tensor was filled."""
        missing, shapes, unexpected = self._split(incompatible)
        if not (missing or shapes):
            return ""
        if self._loaded_only_the_backbone(missing, shapes):
            cause = ("It holds only a backbone (an ImageNet-pretrained one initialises "
                     "training), not a trained QueryInst model: set MODEL.WEIGHTS to a trained "
                     "checkpoint (model_final.pth of a training run, or an official .pth)")
        else:
            cause = self._likely_cause()
        return (f"{self._source} does not fit this model (refusing a partial load for "
                f"inference): {self._describe(missing, shapes, unexpected)}. {cause}.")

    def _log_incompatible_keys(self, incompatible) -> None:
        """One summary instead of fvcore's line per key (strict mode raised already)."""
        missing, shapes, unexpected = self._split(incompatible)
        if not (missing or shapes or unexpected):
            return
        if self._loaded_only_the_backbone(missing, shapes):
            self.logger.info(
                "%s filled the backbone only; the other %d model tensors (FPN, proposals, "
                "heads) start from random initialisation", self._source, len(missing) + len(shapes))
            return
        self.logger.warning(
            "Partial load of %s: %s. The model tensors it did not fill start from random "
            "initialisation (fine for fine-tuning, e.g. with another class count).",
            self._source, self._describe(missing, shapes, unexpected))
