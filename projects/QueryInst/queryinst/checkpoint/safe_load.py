"""Read pickle-based files (``.pth``, ``.pkl``, ``.pyth``) without running code from them.

A pickle names functions and classes that unpickling calls; ``pickle.load`` or ``torch.load``
outside its ``weights_only`` mode, on a file from elsewhere, can therefore run any command. Every
weights file this project reads (``MODEL.WEIGHTS``, official QueryInst / MMDetection files,
Detectron2 model-zoo ``.pkl`` files, this project's checkpoints and their RNG states,
``--resume``) goes through this module, which calls nothing that the file names except:

- torch's own tensor and storage rebuilding (``torch.load(weights_only=True)``);
- numpy array, scalar and dtype reconstruction (:data:`ALLOWED_NUMPY`);
- plain builtins (``set``, ``frozenset``, ``complex``, ``bytearray``, ``slice``,
  ``collections.OrderedDict``, ``_codecs.encode`` for bytes).

Public names:

- :func:`load_torch_file`: ``torch.load(weights_only=True)`` with the numpy allow-list. Objects
  of the packages that write MMDetection files (``mmengine``, ``mmcv``, ``mmdet``; e.g. the
  ``HistoryBuffer`` objects of an MMDetection 3.x ``message_hub``) and other numpy objects are
  read as inert placeholders (never imported, never called) and the entries holding them are
  dropped, with one log line naming them, unless they lie in the weights. Any other name
  (``os.system``, ``builtins.eval``, ...) refuses the file.
- :func:`load_pickle_file`: a Detectron2 ``.pkl`` (numpy arrays in plain containers, written by
  ``pickle.dump``) through a :class:`pickle.Unpickler` whose ``find_class`` resolves only the
  names above.
- :func:`unreadable_checkpoint_error`: the error for a file that cannot be read at all
  (truncated, empty, an HTML page, a Git LFS pointer).

Every refusal is a :class:`queryinst.checkpoint.errors.CheckpointFormatError` whose message is
one line naming the file and what it holds (never advice to turn the check off). This is the
only module of the project that may unpickle; ``tests/test_safe_loading.py`` checks that.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import logging
import pickle
import pickletools
import re
import zipfile
from typing import Any, BinaryIO, Iterator, Optional

import numpy as np
import torch

from .errors import CheckpointFormatError

__all__ = ["ALLOWED_NUMPY", "RestrictedUnpickler", "file_pickle_globals", "load_pickle_file",
           "load_torch_file", "pickle_globals", "python3_name", "unreadable_checkpoint_error"]

logger = logging.getLogger(__name__)

# Packages whose objects MMDetection / mmcv / mmengine put outside the weights (meta,
# message_hub): read as placeholders and dropped, never imported.
DROPPABLE_PACKAGES = ("mmengine", "mmcv", "mmdet", "numpy")
# Where the weights lie in the files read here (Detectron2, official, pycls): a placeholder
# there refuses the file instead of being dropped.
WEIGHT_KEYS = ("model", "state_dict", "model_state")

_ONLY = "which is not loaded: only tensors, arrays and plain containers are"


def _numpy_globals() -> dict:
    """Pickle name -> numpy object for array, scalar and dtype reconstruction (numpy 1 and 2
    names: ``numpy.core`` became ``numpy._core``)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    table = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for package in ("numpy.core", "numpy._core"):
        table[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        table[f"{package}.multiarray.scalar"] = multiarray.scalar
        table[f"{package}.numeric._frombuffer"] = numeric._frombuffer
    # dtype instances are rebuilt by np.dtype(...) and then given their state: torch's
    # unpickler checks the instance's class (Float32DType, ...) against the allow-list.
    for code in np.typecodes["All"]:
        cls = type(np.dtype(code))
        table[f"numpy.dtypes.{cls.__name__}"] = cls
    return table


#: Pickle names of numpy's array / scalar / dtype reconstruction, allowed in every file.
ALLOWED_NUMPY = _numpy_globals()
_ALLOWED_BUILTINS = {
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
    "builtins.bytearray": bytearray, "builtins.slice": slice,
    "collections.OrderedDict": collections.OrderedDict, "_codecs.encode": codecs.encode,
}
# Names torch's weights_only unpickler resolves itself (tensor and storage rebuilding, its
# plain builtins); anything it does not allow among them it refuses, and that is named too.
_TORCH_OWN = ("torch.", "collections.Counter")


# --------------------------------------------------------------------------- messages
def _first_line(text: str, limit: int = 160) -> str:
    """The first sentence of the first line of ``text``, at most ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split(". ")[0]
    return line if len(line) <= limit else line[:limit] + "..."


_CORRUPT = "it is truncated or corrupt"


def _open(path: str, content: Optional[bytes]) -> BinaryIO:
    """``path`` opened for reading, or ``content`` (the file's bytes, ``path`` only names it)."""
    return io.BytesIO(content) if content is not None else open(path, "rb")


def _what_it_is(path: str, content: Optional[bytes] = None) -> str:
    """A guess at what a file that is not a checkpoint holds, from its first bytes."""
    with _open(path, content) as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)"
    if head.lstrip().startswith(b"<"):
        return "it is an HTML/XML page (a failed download?)"
    if head.startswith((b"PK\x03\x04", b"\x80")):  # zip (torch.save) or pickle
        return _CORRUPT
    return f"it starts with {head[:16]!r}, which is neither a zip archive nor a pickle"


def _refused(path: str, name: str, where: str = "") -> CheckpointFormatError:
    """The one-line error for a file that names ``name`` (a function or class) to be called."""
    place = f" in {where}" if where else ""
    return CheckpointFormatError(f"{path}: holds a reference to {name}{place}, {_ONLY}")


def unreadable_checkpoint_error(path: str, exc: BaseException,
                                content: Optional[bytes] = None) -> CheckpointFormatError:
    """The error for a file that ``torch.load`` / the restricted unpickler cannot read.

    Names the file and says what it seems to be (truncated or corrupt, empty, an HTML page,
    a Git LFS pointer, or a pickle naming other Python objects). torch's own message is not
    passed on: it suggests leaving ``weights_only`` mode, which would run code in the file.

    Args:
        path: the file that failed to load.
        exc: what loading raised.
        content: the file's bytes when it was read from memory (``path`` only names it).

    Returns:
        CheckpointFormatError: to be raised (``from None``, so torch's advice is not shown).
    """
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return _refused(path, found.group(1))
    if re.search(r"Unsupported operand|Can only (build|create)|unrecognized function", text):
        return CheckpointFormatError(
            f"{path}: holds pickled objects other than tensors and plain containers, {_ONLY}")
    what = _what_it_is(path, content)
    if what == _CORRUPT and "weights_only" not in text and text.strip():
        what += f" ({type(exc).__name__}: {_first_line(text)})"
    return CheckpointFormatError(
        f"{path}: not a readable checkpoint: {what}. Download or copy the file again"
    )


# --------------------------------------------------------------------------- scanning
def _main_pickle_ops(path: str, content: Optional[bytes] = None) -> Iterator[tuple]:
    """The opcodes of a ``torch.save`` file's main pickle, read without unpickling anything.

    Zip format: its ``*/data.pkl``; legacy format (``_use_new_zipfile_serialization=False``,
    as mmdet's ``publish_model`` writes): the fourth pickle, after the magic number, the
    protocol version and the system information. A plain pickle (no magic number: e.g. a
    Detectron2 ``.pkl`` renamed) gives its own opcodes, so that what it names is reported.
    """
    with _open(path, content) as f:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is not None:
                    yield from pickletools.genops(zf.read(name))
            return
        f.seek(0)
        first = list(pickletools.genops(f))
        if not _is_magic_number(first):
            yield from first  # a plain pickle
            return
        for _ in range(2):  # protocol version, sys info
            for _ in pickletools.genops(f):
                pass
        yield from pickletools.genops(f)


def python3_name(module: str, name: str) -> str:
    """``module.name`` with Python 2 names mapped as :mod:`pickle` maps them (protocols 0-2,
    which ``torch.save`` uses, write e.g. ``collections.UserDict`` as
    ``UserDict.IterableUserDict`` and ``builtins.set`` as ``__builtin__.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _is_magic_number(ops: list) -> bool:
    """Whether a pickle's opcodes are those of torch's legacy-format magic number."""
    return any(arg == torch.serialization.MAGIC_NUMBER for _, arg, _ in ops)


def _is_plain_pickle(path: str, content: Optional[bytes]) -> bool:
    """Whether the file is one complete pickle that is not a ``torch.save`` file."""
    try:
        with _open(path, content) as f:
            return (not zipfile.is_zipfile(f) and f.seek(0) == 0
                    and not _is_magic_number(list(pickletools.genops(f))))
    except Exception:  # not even a pickle
        return False


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}


def pickle_globals(ops) -> list[str]:
    """The dotted names of the functions and classes a pickle refers to, in order, from
    ``pickletools.genops`` output; nothing is unpickled.

    ``STACK_GLOBAL`` (protocol 4+) takes its two names from the strings pushed before it,
    directly or through the memo.
    """
    names, recent, memo = [], [], {}
    for op, arg, _ in ops:
        if op.name == "GLOBAL":
            names.append(python3_name(*arg.split(" ", 1)))
            recent.append(None)
        elif op.name == "STACK_GLOBAL":
            pair = recent[-2:]
            names.append(python3_name(*pair) if len(pair) == 2 and None not in pair else "?")
            recent.append(None)
        elif op.name in _STRING_OPS:
            recent.append(arg)
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = recent[-1] if recent else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(arg))
        else:
            recent.append(None)
    return names


def file_pickle_globals(path: str, content: Optional[bytes] = None) -> list[str]:
    """:func:`pickle_globals` of a ``torch.save`` file's main pickle (``ValueError``,
    ``EOFError`` or ``zipfile.BadZipFile`` for a file that is not one); ``content``: the
    file's bytes, read from memory."""
    return pickle_globals(_main_pickle_ops(path, content))


# --------------------------------------------------------------------------- placeholders
class _Unreadable:
    """Stands for an object of a class that is not loaded (e.g. mmengine's ``HistoryBuffer``):
    takes any arguments and state and keeps none of them; ``name`` is the class it replaces."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<{self.name}, not loaded>"


def _placeholder(name: str) -> type:
    return type("Unreadable", (_Unreadable,), {"name": name})


def _placeholders_in(value: Any, seen: set) -> list[str]:
    """Names of the placeholders anywhere in ``value`` (containers, object arrays)."""
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, _Unreadable) or (isinstance(value, type)
                                          and issubclass(value, _Unreadable)):
        return [value.name]
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    elif isinstance(value, np.ndarray) and value.dtype == object:
        items = list(value.flat)
    else:
        return []
    return [n for item in items for n in _placeholders_in(item, seen)]


def _drop_placeholders(data: dict, where: str, dropped: list, names: set) -> None:
    """Remove the entries of ``data`` (recursively through dicts) that hold placeholders."""
    for key in list(data):
        value, here = data[key], f"{where}[{key!r}]" if where else str(key)
        if isinstance(value, dict) and not _placeholders_in(key, set()):
            _drop_placeholders(value, here, dropped, names)
            continue
        found = _placeholders_in(key, set()) + _placeholders_in(value, set())
        if found:
            del data[key]
            dropped.append(here)
            names.update(found)


def _without_placeholders(path: str, data: Any) -> Any:
    """``data`` with the entries holding placeholders dropped and logged in one line; a
    placeholder in the weights (:data:`WEIGHT_KEYS`) or outside any dict refuses the file."""
    if not isinstance(data, dict):
        found = _placeholders_in(data, set())
        if found:
            raise _refused(path, found[0])
        return data
    dropped, names = [], set()
    _drop_placeholders(data, "", dropped, names)
    if not dropped:
        return data
    in_weights = [d for d in dropped if any(d == k or d.startswith(f"{k}[") for k in WEIGHT_KEYS)]
    if in_weights:
        raise _refused(path, sorted(names)[0], f"its weights ({in_weights[0]})")
    shown = ", ".join(dropped[:8]) + (", ..." if len(dropped) > 8 else "")
    logger.info("%s: dropped %d entries that cannot be read safely (objects of %s, not "
                "loaded; the weights are not affected): %s",
                path, len(dropped), ", ".join(sorted(names)), shown)
    return data


# --------------------------------------------------------------------------- loaders
def _is_allowed(name: str) -> bool:
    return name in ALLOWED_NUMPY or name.startswith(_TORCH_OWN) or name in (
        "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.complex",
        "builtins.bytearray")


def load_torch_file(path: str, mmap: bool = False, content: Optional[bytes] = None) -> Any:
    """``torch.load`` a ``torch.save`` file on the CPU without running code from it.

    First the names the file refers to are read from its pickle (nothing is unpickled). A
    name outside tensors, numpy arrays / scalars / dtypes, plain builtins and
    :data:`DROPPABLE_PACKAGES` refuses the file. Then ``torch.load(weights_only=True)`` reads
    it, with numpy's reconstruction allowed and each ``mmengine`` / ``mmcv`` / ``mmdet`` (or
    other numpy) name standing for an inert placeholder class; the entries that hold such
    placeholders are dropped with one INFO log line (an MMDetection 3.x ``message_hub``, a
    ``meta`` entry), unless they lie in the weights (``model``, ``state_dict``,
    ``model_state``), which refuses the file.

    Args:
        path: an existing file (zip or legacy ``torch.save`` format).
        mmap: memory-map the tensors (zip format only; the caller checks).
        content: the file's bytes, when it is read from memory (e.g. a member of a package);
            ``path`` then only names it in messages.

    Returns:
        What the file holds (usually a dict).

    Raises:
        CheckpointFormatError: the file names something else (``holds a reference to
            os.system, which is not loaded: ...``), or it cannot be read at all
            (:func:`unreadable_checkpoint_error`).
        MemoryError: as torch raises it.
    """
    try:
        names = file_pickle_globals(path, content)
    except Exception as e:  # not a torch file, truncated: named by what it looks like
        raise unreadable_checkpoint_error(path, e, content) from None
    stand_ins = {}
    for name in names:
        if name.split(".")[0] in DROPPABLE_PACKAGES and name not in ALLOWED_NUMPY:
            stand_ins.setdefault(name, _placeholder(name))
        elif not _is_allowed(name):
            raise _refused(path, name)
    if _is_plain_pickle(path, content):
        raise CheckpointFormatError(
            f"{path}: a plain pickle, not a file written by torch.save (a Detectron2 "
            "model-zoo file? Those end in .pkl: give it that extension)")
    allow = [(obj, name) for name, obj in ALLOWED_NUMPY.items()]
    allow += [(cls, name) for name, cls in stand_ins.items()]
    try:
        with torch.serialization.safe_globals(allow):
            data = torch.load(path if content is None else io.BytesIO(content),
                              map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as e:  # torch.load's errors for truncated or foreign files vary
        raise unreadable_checkpoint_error(path, e, content) from None
    return _without_placeholders(path, data) if stand_ins else data


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only numpy's array / scalar / dtype
    reconstruction (:data:`ALLOWED_NUMPY`) and plain builtins; any other name raises
    :class:`CheckpointFormatError` (``holds a reference to ...``) before anything is called.
    Python 2 names (``__builtin__``, ``copy_reg``) are mapped as :mod:`pickle` maps them."""

    def __init__(self, file, path: str, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str):
        full = python3_name(module, name)
        found = ALLOWED_NUMPY.get(full) or _ALLOWED_BUILTINS.get(full)
        if found is None:
            raise _refused(self.path, full)
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not supported")


def load_pickle_file(path: str) -> Any:
    """Unpickle a plain pickle (a Detectron2 ``.pkl``: numpy arrays in dicts) with
    :class:`RestrictedUnpickler` (``encoding="latin1"``, as Detectron2 reads Python 2 files).

    Raises:
        CheckpointFormatError: the file names another function or class, or cannot be read
            (:func:`unreadable_checkpoint_error`).
    """
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path, encoding="latin1").load()
    except CheckpointFormatError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # pickle's errors for truncated or foreign files vary
        raise unreadable_checkpoint_error(path, e) from None
