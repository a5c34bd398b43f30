#!/usr/bin/env python3
"""QueryInst training and evaluation script (Detectron2's ``DefaultTrainer``).

It only wires Detectron2 to the ``queryinst`` package: the model, datasets and config keys
register on ``import queryinst``; the optimiser is ``queryinst.engine.solver.build_optimizer``
(AdamW with full-model gradient clipping, docs/method.md §2).

Examples::

    # train (on CUDA if available, else the CPU; MODEL.DEVICE chooses)
    python train_net.py --config-file configs/bundled/queryinst_R50_FPN_nuclei.yaml
    # continue from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file ... --resume
    # two processes: one per GPU (NCCL), or without CUDA two CPU processes (gloo)
    python train_net.py --config-file ... --num-gpus 2
    # started by torchrun (or srun): the processes join its job; with --max-restarts a
    # restarted job resumes from OUTPUT_DIR/last_checkpoint by itself
    torchrun --nnodes 1 --nproc-per-node 2 --max-restarts 1 train_net.py --config-file ...
    # evaluate a checkpoint
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
    # your own COCO-format data (docs/datasets.md, "Custom datasets")
    python train_net.py --config-file ... --dataset my_train:train.json:images/ \
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "()" MODEL.QUERYINST.NUM_CLASSES 3
"""
import os
import sys

# Use the package of this checkout, installed or not.
_REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_REPO, "projects", "QueryInst"))

import logging  # noqa: E402
import weakref  # noqa: E402

# Before Detectron2: registers the model, datasets, and imports Detectron2 without its
# torch.jit.script FutureWarnings.
import queryinst  # noqa: E402,F401

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import (  # noqa: E402
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, hooks  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402

import queryinst.data  # noqa: E402,F401  (registers the bundled datasets)
from queryinst import QueryInstDatasetMapper, add_queryinst_config  # noqa: E402
from queryinst.checkpoint import (  # noqa: E402
    CheckpointError,
    QueryInstCheckpointer,
    class_init_from_config,
    official_config_opts,
)
from queryinst.config_loading import CONFIG_ERRORS, device_note, merge_config  # noqa: E402
from queryinst.data import (  # noqa: E402
    ClassCountError,
    DatasetFormatError,
    MissingPackageError,
    add_dataset_argument,
    check_config_datasets,
    input_size_note,
    record_class_names,
    register_dataset_specs,
)
from queryinst.data.train_loader import (  # noqa: E402
    build_resumable_train_loader,
    rng_state,
    set_rng_state,
    train_stream_seed,
)
from queryinst.engine import (  # noqa: E402
    GatherRngStates,
    LaunchEnvError,
    build_optimizer,
    ddp_on_any_device,
    default_setup,
    distributed_env,
    elastic_restart_count,
    launch,
    run_in_env,
    log_environment,
    with_finite_loss_check,
    worker_note,
)
from queryinst.evaluation import build_image_evaluator  # noqa: E402
from queryinst.video import (  # noqa: E402
    YTVISEvaluator,
    build_vis_test_loader,
    build_vis_train_loader,
    check_video_model,
    is_video_dataset,
)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with COCO evaluation, QueryInst's optimiser, data and checkpoints.

    Training data go through ``QueryInstDatasetMapper`` (the paper's augmentations: resize,
    flip, and with ``INPUT.CROP_POLICY.ENABLED`` the 300-query crop policy; images without
    annotations dropped by ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``). Checkpoints load through
    ``QueryInstCheckpointer``, so ``MODEL.WEIGHTS`` may also be an official ``.pth``; with
    ``MODEL.QUERYINST.CLASS_INIT_FROM`` a checkpoint of other classes initialises the
    class rows it names (COCO -> Cityscapes, docs/method.md §7). With several processes the
    model is wrapped in DistributedDataParallel, on the CPU too (``queryinst.engine.launch``).
    """

    def __init__(self, cfg):
        # A bad MODEL.QUERYINST.CLASS_INIT_FROM fails here, before the model is built.
        class_init = class_init_from_config(cfg)
        with ddp_on_any_device():  # Detectron2 0.6 gives DDP device_ids, refused on the CPU
            super().__init__(cfg)
        self.checkpointer = QueryInstCheckpointer(
            self.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), class_init=class_init,
            class_names=cfg.MODEL.QUERYINST.CLASS_NAMES,
        )
        # The periodic checkpointer (model_<iter>.pth, model_final.pth) was built in
        # DefaultTrainer.__init__ with Detectron2's checkpointer: give it this one.
        for hook in self._hooks:
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer
        self._resumed_rng = None  # RNG states of a loaded checkpoint, set after the loader
        # A NaN or infinite loss term raises, naming it, before the optimizer step
        # (queryinst.engine.hooks; Detectron2 0.6 checks only the main process's sum).
        self._trainer = with_finite_loss_check(self._trainer)

    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        """The training loader with ``QueryInstDatasetMapper`` (docs/method.md §2), or, for
        ``QueryInstVIS``, Detectron2's over videos as (key, reference) frame pairs (§6.1).

        Images: ``queryinst.data.train_loader.build_resumable_train_loader``, Detectron2's
        ``TrainingSampler`` stream (seed ``SEED``) from iteration ``start_iter``, each sample
        augmented under its own seed, so a resumed run sees what an uninterrupted one would
        (docs/training.md, "Fault tolerance"). Another ``DATALOADER.SAMPLER_TRAIN`` gets Detectron2's
        loader, which restarts its stream on resume."""
        if cfg.MODEL.META_ARCHITECTURE == "QueryInstVIS":
            return build_vis_train_loader(cfg)
        mapper = QueryInstDatasetMapper(cfg, True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return build_detection_train_loader(cfg, mapper=mapper)
        return build_resumable_train_loader(cfg, mapper, train_stream_seed(cfg), start_iter)

    def resume_or_load(self, resume=True):
        """Detectron2's, then, when a run resumes at iteration k > 0, a training loader that
        starts at iteration k's samples, and the RNG states of the checkpoint."""
        super().resume_or_load(resume=resume)
        if self.start_iter > 0 and self.cfg.MODEL.META_ARCHITECTURE != "QueryInstVIS":
            # SimpleTrainer took iter() of the first loader in __init__; replace both.
            loader = self.build_train_loader(self.cfg, start_iter=self.start_iter)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)
        # Last: iter() of a DataLoader draws its base seed from torch's RNG.
        set_rng_state(self._resumed_rng)
        self._resumed_rng = None

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with ``QueryInstDatasetMapper`` (reads 16-bit images);
        one whole video per batch for video datasets."""
        if is_video_dataset(dataset_name):
            return build_vis_test_loader(cfg, dataset_name)
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=QueryInstDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP, and mask AP when ``MODEL.MASK_ON``; Cityscapes' AP too on Cityscapes.

        Args:
            cfg: the config.
            dataset_name (str): a registered dataset.
            output_folder (str or None): default ``OUTPUT_DIR/inference``.

        Returns:
            DatasetEvaluator: by the dataset's ``evaluator_type``
            (``queryinst.evaluation.build_image_evaluator``): ``COCOEvaluator``, whose
            ``evaluate()`` gives {"bbox": {"AP": ...}, "segm": {...}}; for Cityscapes also
            {"cityscapes": {"AP", "AP50"}} (cityscapesscripts' instance-level AP); for a
            video dataset, ``YTVISEvaluator`` (YouTube-VIS AP, docs/method.md §6.4).
        """
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if is_video_dataset(dataset_name):
            return YTVISEvaluator(dataset_name, output_dir=output_folder)
        return build_image_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        """Detectron2's hooks; with ``SOLVER.CHECKPOINTS_TO_KEEP`` > 0 the periodic
        checkpointer deletes all but that many newest ``model_<iter>.pth`` files (never
        ``model_final.pth``). Files of an earlier, resumed process are not tracked."""
        ret = super().build_hooks()
        # Every process's RNG states for the checkpoint, gathered before rank 0 writes it.
        first_checkpointer = next((i for i, h in enumerate(ret)
                                   if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))),
                                  len(ret))
        ret.insert(first_checkpointer, GatherRngStates(self.cfg.SOLVER.CHECKPOINT_PERIOD,
                                                       self.cfg.SOLVER.MAX_ITER))
        keep = self.cfg.SOLVER.CHECKPOINTS_TO_KEEP
        if keep > 0:
            ret = [hooks.PeriodicCheckpointer(h.checkpointer, h.period, max_to_keep=keep)
                   if isinstance(h, hooks.PeriodicCheckpointer) else h for h in ret]
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW / SGD with the backbone lr factor and full-model clipping (docs/method.md §2)."""
        return build_optimizer(cfg, model)

    # Detectron2 0.6's DefaultTrainer checkpoints only the iteration and the hooks (the LR
    # scheduler), not the optimizer: a resumed run restarted AdamW's moments and ran its
    # first iteration at the iteration-0 warmup lr. Later Detectron2 versions save the inner
    # trainer's state under "_trainer", as here.
    def state_dict(self):
        """Iteration, hook states, the optimizer (and AMP grad scaler) state, and the RNG
        states (Python, NumPy, torch; CUDA where used) for a resume that continues them;
        with several processes each process's ("rng_by_rank")."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["rng"] = rng_state()
        if getattr(self, "rng_by_rank", None):  # several processes: GatherRngStates
            ret["rng_by_rank"] = self.rng_by_rank
        return ret

    def load_state_dict(self, state_dict):
        """Inverse of :meth:`state_dict`; checkpoints without "_trainer" keep a new optimizer.
        The RNG states are applied by :meth:`resume_or_load`, after the new loader."""
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        by_rank = state_dict.get("rng_by_rank")
        if by_rank and len(by_rank) == comm.get_world_size():  # this process's own states
            self._resumed_rng = by_rank[comm.get_rank()]
        else:
            self._resumed_rng = state_dict.get("rng")


def setup(args, check_datasets: bool = False):
    """Build the frozen config from ``args.config_file`` and ``args.opts``.

    Also registers the ``--dataset`` datasets, records the class names of
    ``DATASETS.TRAIN[0]`` in an empty ``MODEL.QUERYINST.CLASS_NAMES`` (training only; so
    OUTPUT_DIR/config.yaml and the checkpoints carry them to the demo and the export) and
    runs ``queryinst.engine.defaults.default_setup`` (Detectron2's steps: logging, config.yaml,
    seed; the environment report and the full config in log.txt only).
    ``MODEL.DEVICE`` defaults to "cuda" where CUDA is available, else "cpu"; the log says
    which. A misspelled key raises with the closest existing key
    (``queryinst.config_loading.merge_config``).

    With ``check_datasets`` (``main``), first the datasets of the config are checked against
    the model (``queryinst.data.check_config_datasets``: ``DATASETS.TRAIN`` and ``TEST``,
    with ``--eval-only`` ``TEST`` alone), and each is read once per process: the class names
    are those the check's load put in the metadata, the loader gets the dicts it loaded,
    and the note on the ``--dataset`` images' size (``queryinst.data.input_size_note``)
    takes their sizes from them. Without it, the class names of a ``--dataset`` json are read
    from its "categories".

    Args:
        args (argparse.Namespace): from ``default_argument_parser()`` (``--dataset``
            optional, see ``queryinst.data.add_dataset_argument``).
        check_datasets (bool): check the datasets (raises as ``main`` documents).

    Returns:
        CfgNode: the frozen config.
    """
    register_dataset_specs(getattr(args, "dataset", None) or [],
                           verify_images=getattr(args, "verify_images", False))
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    eval_only = getattr(args, "eval_only", False)
    # An official checkpoint in MODEL.WEIGHTS implies its queries / stages / depth, and for
    # --eval-only its classes (training fine-tunes it to the config's classes).
    cfg.merge_from_list(official_config_opts(cfg.MODEL.WEIGHTS, fine_tuning=not eval_only))
    image_sizes = None
    if check_datasets:
        # the environment and the config into log.txt first: a check's error keeps them
        log_environment(cfg, args)
        # kept: the datasets whose loader follows (its dicts are the check's)
        checked, kept = (("TEST",), ("TEST",)) if eval_only else (("TRAIN", "TEST"), ("TRAIN",))
        image_sizes = check_config_datasets(cfg, checked, keep=kept)
    if not eval_only:
        record_class_names(cfg)  # after the check: the names its load set, no other read
    cfg.freeze()
    default_setup(cfg, args, environment_logged=check_datasets)
    logger = logging.getLogger("detectron2")
    logger.info(device_note(cfg.MODEL.DEVICE))
    logger.info(worker_note())  # each process's log (log.txt, log.txt.rank1, ...)
    custom = {spec.name for spec in getattr(args, "dataset", None) or []}
    used = [n for n in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST) if n in custom]
    note = input_size_note(cfg, used, image_sizes) if check_datasets and used else None
    if note:  # e.g. 576x720 frames shrunk to the bundled configs' 256 px
        logger.warning(note)
    return cfg


def main(args):
    """Train (``--resume``: continue from ``OUTPUT_DIR/last_checkpoint``) or evaluate.

    Under torchrun, after a restart of the workers (``TORCHELASTIC_RESTART_COUNT`` > 0,
    ``torchrun --max-restarts``), training resumes from the last complete checkpoint as with
    ``--resume``, and the log says so.

    Args:
        args (argparse.Namespace): from ``default_argument_parser()``.

    Returns:
        dict: evaluation results, {dataset: {"bbox": {...}, "segm": {...}}} for several
        test sets or {"bbox": ..., "segm": ...} for one; after training, those of the last
        evaluation (Detectron2's ``EvalHook`` always evaluates after the last iteration,
        and every ``TEST.EVAL_PERIOD`` iterations).

    Raises:
        queryinst.checkpoint.CheckpointError: ``MODEL.WEIGHTS`` cannot be used: missing,
            unreadable, not downloadable; with ``--eval-only`` also empty or not filling the
            model (a checkpoint of another config); ``ClassInitError``, one of them, for a
            ``MODEL.QUERYINST.CLASS_INIT_FROM`` that cannot be applied.
        queryinst.data.ClassCountError: a dataset's class count differs from
            ``MODEL.QUERYINST.NUM_CLASSES`` (e.g. 1-class data and NUM_CLASSES 2).
        queryinst.data.DatasetFormatError: a dataset of the config cannot be read (e.g. a
            missing Cityscapes folder or gtFine file, named in the message);
            ``MissingPackageError``: a package it needs (cityscapesscripts) is missing.
        Run as a script, each is one ``ERROR:`` line and exit status 1.
    """
    # Class count and masks of every dataset against the model, before anything is trained;
    # each dataset read once per process (the loader gets the check's dicts).
    cfg = setup(args, check_datasets=True)
    check_video_model(cfg)  # video datasets need QueryInstVIS
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # strict: a partial load or no weights at all is an error (CheckpointError)
        QueryInstCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    restarts = elastic_restart_count()
    trainer.resume_or_load(resume=args.resume or restarts > 0)
    if restarts > 0:
        logging.getLogger("detectron2").info(
            "torchrun restart %d: resumed automatically from the last complete checkpoint "
            "of %s (training continues at iteration %d)", restarts, cfg.OUTPUT_DIR,
            trainer.start_iter)
    trainer.train()
    # Set by DefaultTrainer's evaluation hook (TEST.EVAL_PERIOD and at the end of training).
    return getattr(trainer, "_last_eval_results", {})


def parse_args(argv=None):
    """``default_argument_parser()``'s arguments plus ``--dataset`` and ``--verify-images``
    (``queryinst.data.add_dataset_argument``).

    ``--num-gpus N``: N processes per machine (``--num-machines``, ``--machine-rank``,
    ``--dist-url`` as in Detectron2), one per GPU with NCCL where CUDA is available, else N
    CPU processes over gloo, each with 1/N of the CPU threads (``queryinst.engine.launch``).
    Started by torchrun or srun, the process joins that job instead, and these flags are
    a usage error (the launcher has already decided the processes)."""
    return add_dataset_argument(default_argument_parser()).parse_args(argv)


# Flags of the spawning launch, which torchrun's and srun's jobs replace.
SPAWN_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank")


def spawn_flags_given(argv) -> list:
    """The flags of :data:`SPAWN_FLAGS` found in the command line ``argv``, as typed
    (``--num-gpus 2`` or ``--num-gpus=2``)."""
    return [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in SPAWN_FLAGS]


if __name__ == "__main__":
    args = parse_args()
    print("Command Line Args:", args)
    try:
        env = distributed_env()
        flags = spawn_flags_given(sys.argv[1:])
        if env is not None and flags:
            print(f"ERROR: {', '.join(flags)} given, but this process "
                  f"was started by {env.launcher} (rank {env.rank} of {env.world_size}): the "
                  f"launcher decides the processes. Leave out --num-gpus / --num-machines / "
                  f"--machine-rank, or run python train_net.py --num-gpus N without "
                  f"{env.launcher}.", file=sys.stderr)
            sys.exit(2)
        if env is not None:
            run_in_env(main, env, args=(args,))
        else:
            launch(
                main,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    except LaunchEnvError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    # Unusable MODEL.WEIGHTS (or one refused because it would run code), a missing config
    # file or one that is not plain yaml, a misspelled key, a dataset that cannot
    # be read (e.g. no Cityscapes folder) or of another class count: the message says what
    # is wrong and what to pass instead.
    except (CheckpointError, *CONFIG_ERRORS, ClassCountError, DatasetFormatError,
            MissingPackageError) as e:
        sys.exit(f"ERROR: {e}")
