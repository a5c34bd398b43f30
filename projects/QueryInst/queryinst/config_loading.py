"""Loading a config for the entry points: the default device and key-typo hints.

``train_net.py``, ``demo/demo.py`` and ``tools/run_demo.py`` build their configs with
:func:`merge_config`, so they pick the device the same way and explain a misspelled key.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional

import torch
from detectron2.config import CfgNode

__all__ = ["ConfigValueTypeError", "UnknownConfigKeyError", "default_device", "device_note",
           "inference_config", "merge_config"]

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
        UnknownConfigKeyError: an unknown key in the yaml file (or a file it inherits from)
            or in ``opts``; a ``KeyError`` and an ``AssertionError``, as yacs raises.
        ConfigValueTypeError: a value of another type than the key's default (a
            ``ValueError``, as yacs raises), naming the key, the source and the fix.
    """
    cfg.MODEL.DEVICE = default_device()
    steps = []
    if config_file:
        steps.append((cfg.merge_from_file, config_file, config_file))
    opts = list(opts)
    if opts:
        steps.append((cfg.merge_from_list, opts, "the command-line options"))
    for merge, value, source in steps:
        try:
            merge(value)
        except (KeyError, AssertionError) as exc:
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
        UnknownConfigKeyError, ConfigValueTypeError: as :func:`merge_config`.
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
