"""A training data stream that a resumed run continues, and the random state it checkpoints.

Detectron2 0.6's training loader (``build_detection_train_loader`` with ``TrainingSampler``)
restarts its index stream at the first shuffle on every start, ``--resume`` included, and its
augmentations draw from each process's (or DataLoader worker's) global NumPy RNG, whose state
is not checkpointed. A run killed at iteration k and resumed therefore trained on other images
with other flips and scales than an uninterrupted run.

Here the stream is a function of ``cfg.SEED`` and the stream position alone:

- :class:`ResumableTrainingSampler` yields the same infinite stream of dataset indices as
  ``TrainingSampler(size, seed=seed)`` (one ``torch.randperm`` per pass), each with its
  position in the stream, and can start at any position: a run resumed at iteration k starts
  at ``k * SOLVER.IMS_PER_BATCH`` (:func:`stream_start`).
- :class:`SeededMapDataset` maps the sample at position p with Python's, NumPy's and torch's
  global RNGs seeded from (seed, p), and puts the caller's RNG states back afterwards. The
  augmentation of a sample therefore depends neither on the worker that maps it nor on
  ``DATALOADER.NUM_WORKERS`` nor on a resume; two positions never share a seed (NumPy's
  ``SeedSequence`` of the pair), so workers cannot duplicate augmentations.
- :func:`rng_state` / :func:`set_rng_state`: the main process's RNG states in a form that
  ``torch.load(weights_only=True)`` reads (tensors, ints, tuples), for the checkpoint.
- :class:`GCFrozenForkContext`: the DataLoader workers are forked with the main process's
  objects frozen for Python's garbage collector (``gc.freeze``), so a worker's collections
  do not write to the headers of the objects it inherited (which would copy their pages
  into the worker); the main process unfreezes them right after each fork.
- :func:`release_free_heap`, in each worker every :data:`RELEASE_EVERY` samples: the heap
  pages that the samples' temporaries made the worker's own (copy-on-write, in free space
  of the heap inherited from the main process) go back to the system once freed.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import multiprocessing
import pickle
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["GCFrozenForkContext", "ResumableTrainingSampler", "SeededMapDataset",
           "SerializedList", "RELEASE_EVERY", "build_resumable_train_loader", "gc_frozen",
           "release_free_heap",
           "rng_state", "set_rng_state", "sample_seed", "stream_start", "train_stream_seed"]

logger = logging.getLogger(__name__)


def train_stream_seed(cfg) -> int:
    """The seed of the training stream: ``cfg.SEED`` when >= 0, else one drawn now and shared
    by all processes (Detectron2's ``comm.shared_random_seed``; a resumed run then draws
    another, so only a fixed ``SEED`` resumes the same stream)."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


def stream_start(start_iter: int, total_batch_size: int) -> int:
    """Stream position of the first sample of iteration ``start_iter`` (0-based): every
    iteration takes ``total_batch_size`` consecutive positions (all processes together)."""
    return start_iter * total_batch_size


def sample_seed(seed: int, position: int) -> int:
    """The 32-bit seed of the sample at ``position`` of the stream of ``seed`` (NumPy's
    ``SeedSequence([seed, position])``: distinct pairs give independent seeds)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class ResumableTrainingSampler(Sampler):
    """Detectron2's ``TrainingSampler`` stream from any position, with the positions.

    The stream is ``randperm(size) + randperm(size) + ...`` drawn from a ``torch.Generator``
    seeded with ``seed`` (exactly ``TrainingSampler(size, shuffle=True, seed=seed)``'s
    indices); process ``rank`` of ``world_size`` takes positions ``start + rank``,
    ``start + rank + world_size``, ... . Items are ``(position, index)`` pairs for
    :class:`SeededMapDataset`.

    Args:
        size (int): number of dataset dicts (> 0).
        seed (int): the shuffle's seed, the same in every process.
        start (int): first stream position (>= 0), :func:`stream_start` on resume.

    Raises:
        ValueError: ``size`` <= 0 or ``start`` < 0.
    """

    def __init__(self, size: int, seed: int, start: int = 0):
        if size <= 0:
            raise ValueError(f"ResumableTrainingSampler: size must be > 0, got {size}")
        if start < 0:
            raise ValueError(f"ResumableTrainingSampler: start must be >= 0, got {start}")
        self._size, self._seed, self._start = int(size), int(seed), int(start)
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def _stream(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            yield from torch.randperm(self._size, generator=g).tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        # Skipping whole passes draws (and drops) their permutations: the generator's state
        # must advance exactly as in the uninterrupted stream.
        positions = enumerate(self._stream())
        yield from itertools.islice(positions, self._start + self._rank, None, self._world_size)


class SerializedList(Dataset):
    """A list of picklable items held as one byte buffer: Detectron2's
    ``DatasetFromList(lst, copy=False, serialize=True)`` storage, filled while ``items``
    empties.

    Detectron2 pickles every item into its own array while ``lst`` still holds all the
    dicts, then concatenates those arrays into a second copy: at the peak the dicts and the
    serialised data twice (for COCO's 118k images ~0.8 GB of pickles). Here each item is
    pickled straight onto the end of one growing buffer and its slot in ``items`` is set to
    None at once, so the dicts are freed while the buffer grows and the pickles exist once.
    As with Detectron2's, ``DataLoader`` workers share the buffer copy-on-read; each
    ``[i]`` is a new unpickled object.

    Args:
        items (list): the items (e.g. Detectron2 dataset dicts). It is emptied: every slot
            is None afterwards; pass a list that nothing else needs (its items stay alive
            only where something else refers to them).

    Raises:
        pickle.PicklingError, TypeError: an item cannot be pickled.
    """

    def __init__(self, items: list):
        buffer = bytearray()
        ends = np.empty(len(items), dtype=np.int64)
        for i in range(len(items)):
            buffer += pickle.dumps(items[i], protocol=pickle.HIGHEST_PROTOCOL)
            items[i] = None
            ends[i] = len(buffer)
        self._buffer, self._ends = np.frombuffer(buffer, dtype=np.uint8), ends
        logger.info("Serialised %d items into one buffer of %.2f MiB", len(ends),
                    len(buffer) / 2**20)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int):
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[index])]))


class SeededMapDataset(Dataset):
    """``dataset[(position, index)]``: ``mapper(dataset_dicts[index])`` under per-sample seeds.

    During the call, Python's ``random``, NumPy's global RNG and torch's CPU RNG are seeded
    with :func:`sample_seed` ``(seed, position)``; the caller's states are restored after it,
    so mapping in the main process (``NUM_WORKERS`` 0) does not disturb the model's RNG.

    Args:
        dataset_dicts: Detectron2 dataset dicts.
        mapper: dict -> mapped dict (e.g. ``QueryInstDatasetMapper``); must not return None.
        seed (int): the stream's seed.
        release_every (int): in a DataLoader worker, :func:`release_free_heap` after every
            ``release_every`` samples it maps (0: never; the main process's heap is always
            left alone).

    Raises (on access):
        ValueError: the mapper returned None (Detectron2's ``MapDataset`` would silently
            train on another, random image instead; this stream must stay a function of the
            position).
    """

    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable[[dict], dict],
                 seed: int, release_every: int = 0):
        self._dicts, self._mapper, self._seed = dataset_dicts, mapper, int(seed)
        self._release_every, self._mapped = int(release_every), 0  # per process (worker)

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, item: Tuple[int, int]) -> dict:
        position, index = item
        saved = rng_state(cuda=False)
        s = sample_seed(self._seed, position)
        random.seed(s)
        np.random.seed(s)
        torch.random.default_generator.manual_seed(s)  # CPU only: CUDA's is not restored
        try:
            data = self._mapper(self._dicts[index])
        finally:
            set_rng_state(saved)
        if data is None:
            raise ValueError(f"the training mapper returned None for "
                             f"{self._dicts[index].get('file_name', index)!r}")
        if self._release_every > 0 and torch.utils.data.get_worker_info() is not None:
            self._mapped += 1
            if self._mapped % self._release_every == 0:
                release_free_heap()
        return data


@contextmanager
def gc_frozen():
    """Within the block, every object Python's garbage collector tracks is frozen
    (``gc.freeze``: moved to its permanent generation, which collections skip); on leaving,
    they are unfrozen (``gc.unfreeze``: back to the oldest generation).

    A process forked inside the block keeps its inherited objects frozen, so its collections
    never write to their ``PyGC_Head`` and pages it shares copy-on-write with the parent stay
    shared (Python's ``gc.freeze`` documentation recommends freezing right before ``fork``).
    Where objects are frozen already (by the caller), nothing is done: unfreezing would undo
    the caller's freeze.

    Yields:
        bool: whether this block froze (and will unfreeze) the objects.
    """
    if gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()


class _GCFrozenForkProcess(multiprocessing.context.ForkProcess):
    def start(self):
        with gc_frozen():
            super().start()


class GCFrozenForkContext(multiprocessing.context.ForkContext):
    """The "fork" start method, forking each process inside :func:`gc_frozen`.

    For ``DataLoader(multiprocessing_context=GCFrozenForkContext())``: each worker starts
    with the main process's objects frozen for its garbage collector; the main process's
    own collector is as before once the worker is started. POSIX only (``fork``).
    """

    Process = _GCFrozenForkProcess


# DataLoader workers give their freed heap pages back every this many samples
# (release_free_heap; SeededMapDataset's release_every).
RELEASE_EVERY = 4


def release_free_heap() -> bool:
    """Give the free pages of glibc malloc's heap back to the system (``malloc_trim(0)``,
    ``man 3 malloc_trim``), the free pages inside the heap too, not only at its top.

    In a forked DataLoader worker, the mapping of a sample allocates and frees its
    temporaries in free space of the heap inherited from the main process; every page
    written there becomes the worker's own copy and, once freed, stays resident, a new
    stretch with each sample as the allocator moves on. Called every few samples
    (:data:`RELEASE_EVERY`), the worker keeps little more than what it still holds. Each
    call costs a pass over the allocator's free lists, and the pages given back are faulted
    in again when next written: after every sample that made mapping ~1.5x slower (COCO-size
    json, 640-px images), after every 2nd 1.3x, after every 4th 1.00-1.05x
    (docs/benchmark.md).

    Returns:
        bool: whether memory was given back; False also where the C library has no
        ``malloc_trim`` (macOS, musl).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


def _fork_with_gc_frozen(loader) -> None:
    """Give the torch ``DataLoader`` ``loader`` a :class:`GCFrozenForkContext` when it has
    workers and would fork them anyway (no context of its own, and "fork" is, or would be,
    this process's start method); otherwise leave it as it is."""
    if loader.num_workers == 0 or loader.multiprocessing_context is not None:
        return
    method = (multiprocessing.get_start_method(allow_none=True)
              or multiprocessing.get_all_start_methods()[0])  # the first: the default
    if method == "fork":
        loader.multiprocessing_context = GCFrozenForkContext()


def build_resumable_train_loader(cfg, mapper: Callable[[dict], dict], seed: int,
                                 start_iter: int = 0):
    """Detectron2's training loader, but over :class:`ResumableTrainingSampler` and
    :class:`SeededMapDataset`, starting at iteration ``start_iter``.

    Same dataset dicts (``DATASETS.TRAIN``, ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), batching
    (``SOLVER.IMS_PER_BATCH`` over all processes, ``DATALOADER.ASPECT_RATIO_GROUPING``) and
    workers (``DATALOADER.NUM_WORKERS``, Detectron2's ``worker_init_reset_seed``) as
    ``build_detection_train_loader``; only ``DATALOADER.SAMPLER_TRAIN: TrainingSampler``.
    Where workers are forked, they are forked inside :func:`gc_frozen`
    (:class:`GCFrozenForkContext`), and each worker runs :func:`release_free_heap` every
    :data:`RELEASE_EVERY` samples.

    Args:
        cfg: the config.
        mapper: the training mapper.
        seed (int): :func:`train_stream_seed`.
        start_iter (int): the first iteration this loader serves (0, or the resumed one).

    Returns:
        iterable of list[dict]: per process, batches of ``IMS_PER_BATCH / world_size`` dicts.

    Raises:
        ValueError: ``DATALOADER.SAMPLER_TRAIN`` is not ``TrainingSampler``.
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(f"build_resumable_train_loader: only DATALOADER.SAMPLER_TRAIN "
                         f"'TrainingSampler', got {cfg.DATALOADER.SAMPLER_TRAIN!r}")
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    start = stream_start(start_iter, cfg.SOLVER.IMS_PER_BATCH)
    logger.info("Training stream: seed %d, from iteration %d (sample %d)", seed, start_iter,
                start)
    # Serialised once into one buffer, as Detectron2's loader does: DataLoader workers then
    # share it copy-on-read (a list of dicts would be copied page by page into every worker
    # as reference counts change). The list empties as the buffer fills (SerializedList).
    dicts = SerializedList(dicts)
    loader = build_batch_data_loader(
        SeededMapDataset(dicts, mapper, seed, release_every=RELEASE_EVERY),
        ResumableTrainingSampler(len(dicts), seed, start),
        cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    # A DataLoader draws its workers' base seed from its generator, by default torch's
    # global RNG, each time it is iterated. The aspect-ratio-grouped loader iterates its
    # DataLoader only at the first batch: in a resumed run after the checkpoint's RNG states
    # were restored, so that extra draw shifted every later random number of the model
    # (dropout) against the uninterrupted run. A generator of its own leaves the global RNG
    # to the model; the samples' augmentations are seeded by position (SeededMapDataset).
    torch_loader = loader if isinstance(loader, DataLoader) else getattr(loader, "dataset", None)
    if isinstance(torch_loader, DataLoader):
        torch_loader.generator = torch.Generator().manual_seed(seed)
        # Workers forked with the main process's objects frozen for the garbage collector
        # (gc_frozen): pages of inherited objects stay shared instead of being copied
        # into each worker by its collections.
        _fork_with_gc_frozen(torch_loader)
    return loader


def rng_state(cuda: bool = True) -> dict:
    """The process's global RNG states: {"random": tuple, "numpy": {...}, "torch": uint8
    tensor, and with ``cuda`` where CUDA is initialised "cuda": list of uint8 tensors}.
    Only tensors, ints, floats and tuples: readable with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    """Inverse of :func:`rng_state` (None: nothing; CUDA states only where CUDA is up)."""
    if not state:
        return
    random.setstate(state["random"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

