"""Loading a config for the entry points: safe yaml, the default device and key-typo hints.

``train_net.py``, ``demo/demo.py`` and the tools build their configs with :func:`merge_config`
(or read a yaml file with :func:`merge_config_file`), so they pick the device the same way,
explain a misspelled key, and never run code from a config: yaml files, their ``_BASE_``
files included, are read with ``yaml.safe_load`` only (a python tag is a
:class:`ConfigFileError`, where Detectron2's ``merge_from_file`` would fall back to fvcore's
unsafe loader, which runs it).
"""
from __future__ import annotations

import copy
import difflib
import glob
import os
import re
from typing import Iterable, Optional

import torch
import yaml
from detectron2.config import CfgNode

__all__ = ["CONFIG_ERRORS", "ConfigFileError", "ConfigFileNotFoundError",
           "ConfigValueTypeError", "UnknownConfigKeyError", "default_device", "device_note",
           "inference_config", "merge_config", "merge_config_file", "missing_config_message"]

# yacs's messages: merge_from_file raises KeyError("Non-existent config key: A.B"),
# merge_from_list AssertionError("Non-existent key: A.B").
_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: ([\w.]+)")


class UnknownConfigKeyError(KeyError, AssertionError):
    """A key that the config does not have, in a yaml file or an option list.

    The message names the key, where it came from and the closest existing keys. It is both
    of yacs's types (``KeyError`` from files, ``AssertionError`` from option lists), so code
    that catches either keeps working; entry points print it as one ``ERROR:`` line.
    """

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def default_device() -> str:
    """"cuda" when ``torch.cuda.is_available()``, else "cpu" (Detectron2's default is "cuda")."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_note(device: str) -> str:
    """A log line saying which device runs the model and why.

    Args:
        device: the config's ``MODEL.DEVICE``.

    Returns:
        str: e.g. "MODEL.DEVICE cpu: CUDA is not available (torch.cuda.is_available() is
        False); set MODEL.DEVICE to choose another device".
    """
    auto = default_device()
    if device.startswith("cuda") and auto == "cpu":
        return (f"MODEL.DEVICE {device}: set in the config, but CUDA is not available "
                "(torch.cuda.is_available() is False): set MODEL.DEVICE cpu")
    if device != auto:
        return f"MODEL.DEVICE {device}: set in the config (the default here would be {auto})"
    why = ("CUDA is available" if auto == "cuda"
           else "CUDA is not available (torch.cuda.is_available() is False)")
    return f"MODEL.DEVICE {device}: {why}; set MODEL.DEVICE to choose another device"


def _all_keys(node: CfgNode, prefix: str = "") -> list[str]:
    """Every full key of ``node``, sections included ("MODEL", "MODEL.QUERYINST", ...)."""
    keys = []
    for name, value in node.items():
        key = prefix + name
        keys.append(key)
        if isinstance(value, CfgNode):
            keys.extend(_all_keys(value, key + "."))
    return keys


def close_keys(cfg: CfgNode, key: str) -> list[str]:
    """Existing keys of ``cfg`` that ``key`` was probably meant to be, best first.

    Keys with the same last component in another section ("MODEL.NUM_PROPOSALS" ->
    "MODEL.QUERYINST.NUM_PROPOSALS"), then the closest full name
    (``difflib.get_close_matches``, cutoff 0.8). Empty when nothing is close.
    """
    keys = _all_keys(cfg)
    last = key.rsplit(".", 1)[-1]
    found = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    found += [k for k in difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
              if k not in found]
    return found


def _with_hint(cfg: CfgNode, exc: Exception, source: str) -> Optional[Exception]:
    """``exc`` (yacs's unknown-key error) again, naming ``source`` and the likely keys."""
    match = _UNKNOWN_KEY.search(str(exc.args[0]) if exc.args else "")
    if match is None:
        return None
    key = match.group(1)
    message = f"Non-existent config key: {key} (merging {source})"
    candidates = close_keys(cfg, key)
    if candidates:
        message += f"; did you mean {' or '.join(candidates)}?"
    return UnknownConfigKeyError(message)


def merge_config(cfg: CfgNode, config_file: Optional[str] = None,
                 opts: Iterable[str] = ()) -> CfgNode:
    """Set the default device, then merge ``config_file`` and ``opts`` into ``cfg``, in place.

    ``MODEL.DEVICE`` becomes :func:`default_device` before the merge, so a device named in
    the file or the options wins (as in Detectron2's demo); log :func:`device_note` to say
    which one runs. An unknown key raises yacs's error type with a hint: the file or option
    list it came from and the closest existing keys (``difflib``), e.g. ``KeyError:
    'Non-existent config key: MODEL.QUERYINST.NUM_PROPOSAL (in configs/x.yaml); did you mean
    MODEL.QUERYINST.NUM_PROPOSALS?'``.

    Args:
        cfg: a Detectron2 config with QueryInst's keys (``add_queryinst_config``).
        config_file: a yaml file (``_BASE_`` is followed), or None.
        opts: ``KEY VALUE`` pairs, as ``cfg.merge_from_list`` takes them.

    Returns:
        CfgNode: ``cfg``.

    Raises:
        ConfigFileNotFoundError: ``config_file`` (or a ``_BASE_`` file) does not exist.
        UnknownConfigKeyError: an unknown key in the yaml file (or a file it inherits from)
            or in ``opts``; a ``KeyError`` and an ``AssertionError``, as yacs raises.
        ConfigValueTypeError: a value of another type than the key's default (a
            ``ValueError``, as yacs raises), naming the key, the source and the fix.
        ConfigFileError: a yaml file that is not plain yaml (:func:`merge_config_file`).
    """
    if config_file and not os.path.isfile(config_file):
        raise ConfigFileNotFoundError(missing_config_message(config_file))
    cfg.MODEL.DEVICE = default_device()
    steps = []
    if config_file:
        steps.append((lambda path: merge_config_file(cfg, path), config_file, config_file))
    opts = list(opts)
    if opts:
        steps.append((cfg.merge_from_list, opts, "the command-line options"))
    for merge, value, source in steps:
        try:
            merge(value)
        except (KeyError, AssertionError) as exc:
            missing = _MISSING_FILE.search(str(exc))  # a _BASE_ file that does not exist
            if missing:
                raise ConfigFileNotFoundError(missing_config_message(missing.group(1))) from None
            hinted = _with_hint(cfg, exc, source)
            if hinted is None:
                raise
            raise hinted from None
        except ValueError as exc:
            match = _TYPE_MISMATCH.search(str(exc))
            if match is None:
                raise
            raise ConfigValueTypeError(_type_message(match, source)) from None
    return cfg


def inference_config(config_file: Optional[str], opts: Iterable[str] = ()) -> CfgNode:
    """The frozen config of an inference tool (``demo/demo.py``, ``tools/export_model.py``):
    QueryInst's keys, :func:`merge_config` of ``config_file`` and ``opts``, then the queries,
    classes, stages and depth that an official ``MODEL.WEIGHTS`` file implies
    (``queryinst.checkpoint.official_config_opts``).

    Raises:
        ConfigFileNotFoundError, UnknownConfigKeyError, ConfigValueTypeError, ConfigFileError:
            as :func:`merge_config`.
    """
    # Imported here: the config and checkpoint modules import Detectron2's model code.
    from detectron2.config import get_cfg

    from .checkpoint.checkpointer import official_config_opts
    from .config import add_queryinst_config

    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, config_file, opts)
    cfg.merge_from_list(official_config_opts(cfg.MODEL.WEIGHTS))
    cfg.freeze()
    return cfg


# yacs's message for a value of another type than the key's default.
_TYPE_MISMATCH = re.compile(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with "
                            r"values \((.*) vs\. (.*)\) for config key: ([\w.]+)")


class ConfigValueTypeError(ValueError):
    """A config value of another type than the key holds (e.g. ``0`` for a float key), in a
    yaml file or an option list; the message names the key, the source and the fix."""


def _type_message(match: "re.Match", source: str) -> str:
    key_type, given_type, default, given, key = match.groups()
    example = f" ({given}.0)" if (key_type, given_type) == ("float", "int") else ""
    return (f"{key} holds a {key_type} (default {default}), but it is {given} (type "
            f"{given_type}) in {source}: write a {key_type}{example}")


# Detectron2's own model zoo writes RetinaNet's anchor sizes as a python tag that evaluates
# this expression (Base-RetinaNet.yaml). Exactly this text, in a file of the installed
# Detectron2 model zoo, is read as its value, computed here once; nothing is evaluated.
_EVAL_TAG = "tag:yaml.org,2002:python/object/apply:eval"
_MODEL_ZOO_EXPRESSIONS = {
    "[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] for x in [32, 64, 128, 256, 512 ]]":
        [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
}


def _model_zoo_dir() -> str:
    import detectron2

    return os.path.join(os.path.dirname(os.path.abspath(detectron2.__file__)), "model_zoo", "")


def _model_zoo_expression(loader: yaml.SafeLoader, node: yaml.Node):
    """The value of a known Detectron2 model-zoo expression; anything else is refused as
    ``yaml.safe_load`` refuses it (``ConstructorError``)."""
    if isinstance(node, yaml.SequenceNode) and len(node.value) == 1 \
            and isinstance(node.value[0], yaml.ScalarNode) \
            and node.value[0].value in _MODEL_ZOO_EXPRESSIONS \
            and os.path.abspath(node.start_mark.name).startswith(_model_zoo_dir()):
        return copy.deepcopy(_MODEL_ZOO_EXPRESSIONS[node.value[0].value])
    return loader.construct_undefined(node)


# fvcore reads every config with yaml.safe_load: this one tag is taught to its SafeLoader.
yaml.SafeLoader.add_constructor(_EVAL_TAG, _model_zoo_expression)


class ConfigFileError(ValueError):
    """A yaml config that is not plain yaml: a python tag (``!!python/object/apply:...``,
    which an unsafe yaml loader would run), another tag, or a syntax error. The message is one
    line: ``<file>: line N: ...``, naming the ``_BASE_`` file where the problem lies."""


def _yaml_problem(config_file: str, exc: yaml.YAMLError) -> str:
    """The one-line :class:`ConfigFileError` message for ``exc`` raised reading ``config_file``."""
    mark = getattr(exc, "problem_mark", None)
    where = config_file
    if mark is not None and mark.name and not mark.name.startswith("<"):
        where = mark.name  # a _BASE_ file
    line = f": line {mark.line + 1}" if mark is not None else ""
    base = f", a _BASE_ of {config_file}" if where != config_file else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    tag = re.search(r"tag '([^']+)'", problem)
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        tag = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        if tag.startswith("!!python/"):
            return f"{where}{line}: python objects are not allowed in configs ({tag}{base})"
        return f"{where}{line}: yaml tags are not allowed in configs ({tag}{base})"
    return f"{where}{line}: not a valid yaml file ({problem}{base})"


def merge_config_file(cfg: CfgNode, config_file: str) -> CfgNode:
    """``cfg.merge_from_file(config_file)`` reading the file and its ``_BASE_`` files with
    ``yaml.safe_load`` only (``allow_unsafe=False``: fvcore's fallback to its unsafe
    loader, which runs python tags, is never reached).

    Returns:
        CfgNode: ``cfg``.

    Raises:
        ConfigFileError: the file or a ``_BASE_`` file is not plain yaml (python objects,
            other tags, a syntax error); one line naming the file and the line.
    """
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.YAMLError as exc:
        raise ConfigFileError(_yaml_problem(config_file, exc)) from None
    return cfg


# ---- a config file that does not exist ----------------------------------------------------

# Detectron2's CfgNode.merge_from_file (also for a _BASE_ file): AssertionError with this text.
_MISSING_FILE = re.compile(r"Config file '(.+)' does not exist")
# The repository's configs/ folder (queryinst/ -> QueryInst/ -> projects/ -> the checkout).
_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                            "configs")


class ConfigFileNotFoundError(FileNotFoundError):
    """A config file (``--config-file`` or a ``_BASE_``) that does not exist; the message
    names it and the closest existing config files."""

    def __str__(self) -> str:  # FileNotFoundError's str() would add "[Errno ...]"
        return str(self.args[0]) if self.args else ""


def missing_config_message(path: str, n: int = 3) -> str:
    """"<path>: config file does not exist; nearest: a.yaml, b.yaml, c.yaml".

    The ``n`` yaml files of the repository's ``configs/`` (and of the folder ``path`` names,
    if it exists) whose file names are closest to ``path``'s (``difflib``), shown relative to
    the working directory when inside it; ``Base-*`` files only for a ``Base-*`` path.
    """
    folders = {os.path.normpath(_CONFIGS_DIR)}
    if os.path.isdir(os.path.dirname(path) or "."):
        folders.add(os.path.normpath(os.path.dirname(path) or "."))
    files = sorted({os.path.abspath(f) for d in folders
                    for f in glob.glob(os.path.join(d, "**", "*.yaml"), recursive=True)})
    base = os.path.basename(path).startswith("Base-")  # Base-*: inherited, not run as such
    by_name = {}
    for f in files:
        if os.path.basename(f).startswith("Base-") == base:
            shown = os.path.relpath(f)
            by_name.setdefault(os.path.basename(f), f if shown.startswith("..") else shown)
    nearest = difflib.get_close_matches(os.path.basename(path), list(by_name), n=n, cutoff=0)
    hint = f"; nearest: {', '.join(by_name[k] for k in nearest)}" if nearest else ""
    return f"{path}: config file does not exist{hint}"


# What entry points print as one ERROR: line when loading a config.
CONFIG_ERRORS = (ConfigFileNotFoundError, ConfigFileError, UnknownConfigKeyError,
                 ConfigValueTypeError)
