"""COCO-scale data path (docs/benchmark.md "COCO-scale data"): the synthetic COCO-size json,
the dataset read once per process, no image headers read unless asked, and
tools/data_scale_benchmark.py on a 5,000-image version against Detectron2's Mask R-CNN.
"""
from __future__ import annotations

import gc
import itertools
import json
import os
import pickle

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import load_script
from queryinst.data import DatasetFormatError, register_coco_instances_checked
from queryinst.data.checks import check_dataset, keep_for_next_get
from queryinst.data.train_loader import (RELEASE_EVERY, SeededMapDataset,
                                         build_resumable_train_loader, gc_frozen)

gen = load_script("tools/make_coco_scale_json.py", "make_coco_scale_json")
bench = load_script("tools/data_scale_benchmark.py", "data_scale_benchmark")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

IMAGES = 5000


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco5k")
    json_path = gen.write(str(out), IMAGES, round(gen.COCO_INSTANCES * IMAGES / gen.COCO_IMAGES))
    with open(json_path) as f:
        return json_path, str(out / "images"), json.load(f)


def test_generator_draws_coco_like_counts_and_sizes(small_coco):
    _, image_root, data = small_coco
    assert len(data["images"]) == IMAGES
    assert len(data["annotations"]) == 36352  # 860,001 x 5,000 / 118,287, rounded
    # The full size: the per-image counts sum to COCO's total exactly.
    full = gen._counts(np.random.default_rng(0), gen.COCO_IMAGES, gen.COCO_INSTANCES)
    assert full.sum() == gen.COCO_INSTANCES and full.max() <= 93
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=IMAGES + 1)[1:]
    assert 0.002 < (per_image == 0).mean() < 0.05  # COCO: ~1 % of the images empty
    longer = np.array([max(im["width"], im["height"]) for im in data["images"]])
    assert longer.max() == 640 and 0.95 < (longer == 640).mean() < 0.99
    vertices = [len(p) // 2 for a in data["annotations"] for p in a["segmentation"]]
    assert min(vertices) >= 3 and 13 <= np.median(vertices) <= 19
    assert {c["id"] for c in data["categories"]} == set(range(1, 81))
    # One shared file per image size, of that size.
    from PIL import Image
    names = {im["file_name"]: (im["width"], im["height"]) for im in data["images"]}
    assert len(os.listdir(image_root)) == len(names) < IMAGES / 4
    name, size = next(iter(names.items()))
    assert Image.open(os.path.join(image_root, name)).size == size


def test_checked_training_set_is_read_once(small_coco):
    """check_dataset on DATASETS.TRAIN hands its dicts to the loader's DatasetCatalog.get;
    the get after that loads again."""
    json_path, image_root, _ = small_coco
    calls = []
    DatasetCatalog.register("scale_once", lambda: calls.append(1) or [{"annotations": []}])
    MetadataCatalog.get("scale_once").set(thing_classes=["a"])
    try:
        from test_model import small_cfg
        cfg = small_cfg(num_classes=1)
        check_dataset(cfg, "scale_once", key="DATASETS.TRAIN")
        first = DatasetCatalog.get("scale_once")
        assert len(calls) == 1
        assert DatasetCatalog.get("scale_once") is not first and len(calls) == 2
        keep_for_next_get("scale_once", first)
        assert DatasetCatalog.get("scale_once") is first and len(calls) == 2
    finally:
        DatasetCatalog.remove("scale_once")
        MetadataCatalog.remove("scale_once")


def _count_parses(monkeypatch, json_path):
    """A list that gets an item at every parse of ``json_path`` (a json.loads of a text of its
    size: queryinst's reader, and pycocotools' COCO, which Detectron2 uses, both go
    through it)."""
    size, parse, parses = os.path.getsize(json_path), json.loads, []

    def counted(text, *a, **k):
        if len(text) == size:
            parses.append(1)
        return parse(text, *a, **k)

    monkeypatch.setattr(json, "loads", counted)
    return parses


@pytest.fixture
def few_images(tmp_path):
    """A 12-image json of the generator (80 categories, 640-px images)."""
    json_path = gen.write(str(tmp_path / "data"), 12, 90)
    with open(json_path) as f:
        names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    return json_path, str(tmp_path / "data" / "images"), names


def _train_net_args(*argv):
    from test_train_net import CONFIG, TINY, train_net
    return train_net, train_net.parse_args(["--config-file", CONFIG, *argv, *TINY,
                                            "MODEL.QUERYINST.NUM_CLASSES", "80"])


def test_train_net_reads_the_training_set_once(few_images, tmp_path, monkeypatch):
    """train_net.py's path to training parses the json once in all: the check before
    training, the class names of config.yaml, the size note and the training loader."""
    json_path, image_root, names = few_images
    train_net, args = _train_net_args(
        "--dataset", f"once_train:{json_path}:{image_root}", "DATASETS.TRAIN", "('once_train',)",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out"))
    parses = _count_parses(monkeypatch, json_path)
    try:
        cfg = train_net.setup(args, check_datasets=True)
        loader = train_net.Trainer.build_train_loader(cfg)
        assert len(parses) == 1
        assert list(cfg.MODEL.QUERYINST.CLASS_NAMES) == names
        with open(tmp_path / "out" / "config.yaml") as f:
            assert f"- {names[-1]}" in f.read()
        with open(tmp_path / "out" / "log.txt") as f:  # 640-px images tested at 128 px
            assert "the median image of 'once_train' is " in f.read()
        assert len(next(iter(loader))) == 1
        DatasetCatalog.get("once_train")  # handed over once: a later get loads again
        assert len(parses) == 2
    finally:
        DatasetCatalog.remove("once_train")
        MetadataCatalog.remove("once_train")


def test_train_net_eval_only_reads_the_test_set_once(few_images, tmp_path, monkeypatch):
    """--eval-only: the check of DATASETS.TEST hands its dicts to the test loader."""
    json_path, image_root, _ = few_images
    train_net, args = _train_net_args(
        "--eval-only", "--dataset", f"once_val:{json_path}:{image_root}",
        "DATASETS.TEST", "('once_val',)", "OUTPUT_DIR", str(tmp_path / "out"))
    parses = _count_parses(monkeypatch, json_path)
    try:
        cfg = train_net.setup(args, check_datasets=True)
        loader = train_net.Trainer.build_test_loader(cfg, "once_val")
        assert len(parses) == 1 and len(loader) == 12
    finally:
        DatasetCatalog.remove("once_val")
        MetadataCatalog.remove("once_val")


class _Tracked:
    """An item that, when pickled, notes how many items before it are still alive."""
    refs: list = []
    alive_before: list = []

    def __init__(self, i):
        self.i = i

    def __getstate__(self):
        earlier = _Tracked.refs[:self.i]
        _Tracked.alive_before.append(sum(r() is not None for r in earlier))
        return {"i": self.i}


def test_serialized_list_equals_detectron2s_and_frees_items_as_it_goes(small_coco):
    """SerializedList gives the items of Detectron2's DatasetFromList(serialize=True); each
    item is released once pickled, and the serialised data exist once (tracemalloc peak
    well below DatasetFromList's, which holds every pickle twice while concatenating)."""
    import tracemalloc
    import weakref
    from detectron2.data import DatasetFromList
    from queryinst.data.train_loader import SerializedList

    json_path, image_root, _ = small_coco
    name = "serialize_5k"
    register_coco_instances_checked(name, {}, json_path, image_root)
    try:
        dicts = DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    theirs = DatasetFromList(list(dicts), copy=False, serialize=True)
    ours = SerializedList(list(dicts))
    assert len(ours) == len(theirs) == IMAGES
    assert all(ours[i] == theirs[i] for i in range(0, IMAGES, 7)) and ours[IMAGES - 1] == dicts[-1]
    with pytest.raises(IndexError):
        ours[IMAGES]

    peaks = []
    for build in (lambda lst: DatasetFromList(lst, copy=False, serialize=True), SerializedList):
        items = pickle.loads(pickle.dumps(dicts))  # held by `items` only
        tracemalloc.start()
        built = build(items)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del built, items
    assert peaks[1] < 0.7 * peaks[0], peaks

    _Tracked.refs, _Tracked.alive_before = [], []
    items = [_Tracked(i) for i in range(50)]
    _Tracked.refs = [weakref.ref(x) for x in items]
    tracked = SerializedList(items)
    assert items == [None] * 50 and _Tracked.alive_before == [0] * 50
    assert [tracked[i].i for i in (0, 17, 49)] == [0, 17, 49]


def test_image_headers_are_read_only_when_asked(tmp_path):
    """A file that exists but is no image: loading passes without verify_images (no header
    read), and names the file with it (train_net.py --verify-images)."""
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    for name, verify in (("scale_noverify", False), ("scale_verify", True)):
        register_coco_instances_checked(name, {}, str(tmp_path / "ann.json"), str(tmp_path),
                                        verify_images=verify)
    try:
        assert len(DatasetCatalog.get("scale_noverify")) == 1
        with pytest.raises(DatasetFormatError, match=r"a\.jpg cannot be read by PIL"):
            DatasetCatalog.get("scale_verify")
    finally:
        for name in ("scale_noverify", "scale_verify"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _varied_coco(tmp_path):
    """A small json with what load_coco_json treats specially: image ids out of order, an
    image without annotations, annotations out of image order, category ids neither sorted
    nor contiguous, compressed and uncompressed RLE, two-part polygons, keypoints, iscrowd,
    and keys that are dropped (area, id, attributes)."""
    from PIL import Image
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (20, 10)).save(tmp_path / name)
    square = [2.0, 2.0, 7.5, 2.0, 7.5, 7.0, 2.0, 7.0]
    data = {
        "images": [{"id": 30, "file_name": "c.png", "width": 20, "height": 10},
                   {"id": 4, "file_name": "a.png", "width": 20, "height": 10, "license": 1},
                   {"id": 17, "file_name": "b.png", "width": 20, "height": 10}],
        "categories": [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"},
                       {"id": 5, "name": "five"}],
        "annotations": [
            {"id": 1, "image_id": 30, "category_id": 5, "bbox": [2, 2, 5.5, 5],
             "segmentation": [square, [10, 1, 14, 1, 14, 4]], "area": 27.5, "iscrowd": 0},
            {"id": 8, "image_id": 4, "category_id": 9, "bbox": [0, 0, 3, 2], "iscrowd": 1,
             "segmentation": {"counts": [0, 2, 8, 2, 188], "size": [10, 20]}},
            {"id": 3, "image_id": 30, "category_id": 2, "bbox": [1, 1, 4, 4],
             "segmentation": {"counts": "0213", "size": [10, 20]}, "attributes": {"x": 1}},
            {"id": 5, "image_id": 4, "category_id": 2, "bbox": [3, 3, 2, 2],
             "segmentation": [square], "keypoints": [3, 4, 2, 0, 0, 0, 5, 6, 1],
             "num_keypoints": 2},
        ],
    }
    json_path = tmp_path / "varied.json"
    json_path.write_text(json.dumps(data))
    return str(json_path), str(tmp_path)


@pytest.mark.parametrize("named", [True, False])
def test_loaded_dicts_equal_detectron2s_load_coco_json(tmp_path, named):
    """load_coco_instances builds its dicts from its own (validated) parse, without
    pycocotools' COCO: they, and the metadata it sets, equal Detectron2's load_coco_json."""
    from detectron2.data.datasets import load_coco_json
    from queryinst.data import load_coco_instances
    json_path, root = _varied_coco(tmp_path)
    ours_name, d2_name = ("varied_ours", "varied_d2") if named else (None, None)
    try:
        ours = load_coco_instances(json_path, root, ours_name)
        theirs = load_coco_json(json_path, root, d2_name)
        assert ours == theirs
        assert [d["image_id"] for d in ours] == [4, 17, 30]
        assert [a["bbox"] for a in ours[2]["annotations"]] == [[2, 2, 5.5, 5], [1, 1, 4, 4]]
        assert ours[0]["annotations"][1]["keypoints"] == [3.5, 4.5, 2, 0.5, 0.5, 0, 5.5, 6.5, 1]
        assert isinstance(ours[0]["annotations"][0]["segmentation"]["counts"], bytes)
        if named:
            for key in ("thing_classes", "thing_dataset_id_to_contiguous_id"):
                assert (MetadataCatalog.get(ours_name).get(key)
                        == MetadataCatalog.get(d2_name).get(key)), key
            assert MetadataCatalog.get(ours_name).thing_classes == ["two", "five", "nine"]
            assert [a["category_id"] for a in ours[2]["annotations"]] == [1, 0]
        else:
            assert [a["category_id"] for a in ours[2]["annotations"]] == [5, 2]
    finally:
        for name in (ours_name, d2_name):
            if name:
                MetadataCatalog.remove(name)


def test_loading_leaves_pycocotools_alone(tmp_path, monkeypatch):
    """No global is patched while loading (pycocotools' COCO is not thread-safe to swap):
    loading works with COCO unusable and leaves it as it was."""
    import pycocotools.coco as pycoco
    from queryinst.data import load_coco_instances

    def refuse(*a, **k):
        raise AssertionError("pycocotools.coco.COCO used")

    monkeypatch.setattr(pycoco, "COCO", refuse)
    json_path, root = _varied_coco(tmp_path)
    assert len(load_coco_instances(json_path, root)) == 3
    assert pycoco.COCO is refuse


@pytest.mark.slow
def test_data_path_benchmark_on_5000_images(small_coco):
    """tools/data_scale_benchmark.py: train_net.py and Detectron2's Mask R-CNN each reach
    their first batch reading the json once, with 4 workers whose unique memory, idle after
    3 batches, is within 1.1x of Detectron2's (the dicts are serialised once and shared,
    the workers forked with gc frozen), and a main process whose memory besides the model
    parameters is within 1.25x of Detectron2's."""
    json_path, image_root, _ = small_coco
    res = bench.run(bench.RUNS, json_path, image_root, workers=4, batch=8, timeout=600,
                    uss_batches=3)
    for run in bench.RUNS:
        assert res[run]["dataset_loads"] == 1, run
        assert len(res[run]["worker_uss_mb"]) == 4 and res[run]["workers_idle"], run
        assert len(res[run]["worker_uss_first_batch_mb"]) == 4, run
        assert 0 < res[run]["seconds"] < 600
    assert res["ratio"]["worker_uss"] <= 1.1
    assert res["ratio"]["main_peak_rss_besides_parameters"] <= 1.25


# ------------------------------------------------------------- workers forked with gc frozen


def _report_gc(d):
    """A training 'mapper' that reports the garbage collector's state of the process that
    maps (a DataLoader worker)."""
    return {**d, "frozen": gc.get_freeze_count(), "gc_enabled": gc.isenabled(),
            "pid": os.getpid()}


@pytest.fixture
def gc_dataset():
    name = "test_gc_frozen_fork"
    DatasetCatalog.register(name, lambda: [
        {"file_name": f"{i}.jpg", "image_id": i, "width": 40 + i % 2, "height": 40,
         "annotations": []} for i in range(16)])
    yield name
    DatasetCatalog.remove(name)


def _loader_cfg(name, workers):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_workers_start_with_the_main_process_objects_frozen(gc_dataset):
    """The training loader's workers are forked with the main process's objects frozen
    (gc.freeze, so the workers' collections leave the inherited pages shared); the main
    process is unfrozen again after the fork. A plain DataLoader's workers, the control,
    inherit nothing frozen."""
    from torch.utils.data import DataLoader

    assert gc.get_freeze_count() == 0
    tracked = len(gc.get_objects())
    loader = build_resumable_train_loader(_loader_cfg(gc_dataset, 2), _report_gc, seed=3)
    it = iter(loader)
    samples = next(it) + next(it) + next(it)
    assert len({d["pid"] for d in samples}) == 2 and os.getpid() not in {d["pid"] for d in samples}
    for d in samples:  # about everything the main process tracked when it forked
        assert d["frozen"] > 0.9 * tracked and d["gc_enabled"]
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    del it

    control = DataLoader(list(range(4)), num_workers=2, batch_size=None,
                         collate_fn=lambda i: gc.get_freeze_count())
    assert list(control) == [0, 0, 0, 0]


def test_loader_leaves_the_callers_frozen_objects_and_main_process_loading_alone(gc_dataset):
    """Objects the caller froze stay frozen (no unfreeze of someone else's freeze); without
    workers nothing is frozen and no context is set."""
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        loader = build_resumable_train_loader(_loader_cfg(gc_dataset, 2), _report_gc, seed=3)
        next(iter(loader))
        assert gc.get_freeze_count() > 0.9 * before  # not unfrozen (some were freed since)
    finally:
        gc.unfreeze()
    loader = build_resumable_train_loader(_loader_cfg(gc_dataset, 0), _report_gc, seed=3)
    assert [d["frozen"] for d in next(iter(loader))] == [0, 0]
    assert loader.dataset.multiprocessing_context is None


def test_gc_frozen_freezes_inside_and_unfreezes_after():
    with gc_frozen() as froze:
        assert froze and gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def _own_uss_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f
                   if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def _churn(d):
    """A 'mapper' that reports its process's USS on entry, then writes and frees 20 MiB of
    64 KiB temporaries (heap-sized: below the mmap threshold)."""
    uss = _own_uss_mb()
    temporaries = [b"x" * (64 << 10) for _ in range(320)]
    del temporaries
    return {**d, "uss_entry": uss}


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux only")
def test_workers_give_freed_heap_pages_back_every_few_samples(gc_dataset):
    """The main process leaves a 40 MiB hole in its heap before the fork; a worker's
    temporaries land there, and each page written becomes its own. Given back after every
    RELEASE_EVERY samples (malloc_trim), the worker's USS when it starts the next sample is
    back where it was at its first; the control, the same dataset without release_every,
    keeps the 20 MiB."""
    from torch.utils.data import DataLoader

    hole = [b"h" * (64 << 10) for _ in range(640)]
    pin = b"p" * (64 << 10)  # after the hole: the freed hole is not the heap's top
    del hole
    n = RELEASE_EVERY + 1  # samples per worker: the last starts after a release

    def growth(samples):  # per worker: USS entering its n-th sample less entering its first
        by_pid = {}
        for d in sorted(samples, key=lambda d: d["call"]):
            by_pid.setdefault(d["pid"], []).append(d["uss_entry"])
        return [v[n - 1] - v[0] for v in by_pid.values()]

    calls = itertools.count()

    def with_pid(d):
        return {**_churn(d), "pid": os.getpid(), "call": next(calls)}

    loader = iter(build_resumable_train_loader(_loader_cfg(gc_dataset, 2), with_pid, seed=3))
    released = growth([d for _ in range(2 * n) for d in next(loader)])  # batches of 2
    del loader
    dicts = [{"file_name": f"{i}.jpg", "width": 40, "height": 40} for i in range(2 * n)]
    control = DataLoader(SeededMapDataset(dicts, with_pid, seed=3), num_workers=2,
                         sampler=[(i, i) for i in range(2 * n)], batch_size=None)
    kept = growth(list(control))
    del pin
    assert len(released) == 2 and all(g < 5 for g in released), released
    assert len(kept) == 2 and all(g > 15 for g in kept), kept


def test_benchmark_summary_is_mean_and_sample_std():
    def side(seconds, uss):
        return {"seconds": seconds, "main_peak_rss_mb": 2 * seconds,
                "worker_uss_max_mb": uss, "worker_uss_mean_mb": uss - 1}

    rounds = [{"queryinst": side(1.0, 10.0), "detectron2": side(2.0, 20.0),
               "ratio": {"worker_uss": 0.5}},
              {"queryinst": side(3.0, 14.0), "detectron2": side(2.0, 20.0),
               "ratio": {"worker_uss": 0.7}}]
    s = bench.summarise(rounds)
    assert s["queryinst"]["seconds"] == {"mean": 2.0, "std": pytest.approx(2 ** 0.5),
                                         "values": [1.0, 3.0]}
    assert s["queryinst"]["worker_uss_mean_mb"]["mean"] == 11.0
    assert s["detectron2"]["main_peak_rss_mb"]["std"] == 0.0
    assert s["ratio"]["worker_uss"]["mean"] == pytest.approx(0.6)
    assert s["ratio"]["worker_uss"]["std"] == pytest.approx(0.1 * 2 ** 0.5)
