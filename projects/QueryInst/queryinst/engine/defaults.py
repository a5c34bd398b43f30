"""Logging of the entry points: Detectron2's loggers, without colour codes off a terminal,
and the long reports (environment, config) in ``log.txt`` only.

Detectron2's ``default_setup`` prints about 40 lines of ``collect_env_info()`` and twice the
config (the file, then the full config, each hundreds of lines, coloured by pygments even
in a file) before anything happens, so an error line came after ~840 lines. Here the same
steps (Detectron2's ``setup_logger``, ``collect_env_info``, ``seed_all_rng``) log those
reports to ``OUTPUT_DIR/log.txt`` only, uncoloured; the console gets one summary line.
"""
from __future__ import annotations

import logging
import os
import sys

import detectron2
import torch
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

__all__ = ["FILE_ONLY", "console_color", "default_setup", "environment_summary",
           "setup_loggers", "log_environment"]

# ``logger.info(msg, extra=FILE_ONLY)``: into log.txt, not onto the console.
FILE_ONLY = {"file_only": True}


def console_color() -> bool:
    """Colour codes on the console only when stdout is a terminal (not a pipe or a file)."""
    return sys.stdout.isatty()


class _NotFileOnly(logging.Filter):
    """Drops the records logged with ``extra=FILE_ONLY`` (on the console handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_loggers(output_dir: str | None = None, rank: int = 0,
                  names=("fvcore", "detectron2")) -> logging.Logger:
    """Detectron2's ``setup_logger`` for each of ``names`` (console on rank 0, ``log.txt``
    in ``output_dir``), coloured only on a terminal (:func:`console_color`), with the
    console dropping ``FILE_ONLY`` records. Returns the last logger ("detectron2")."""
    color = console_color()
    for name in names:
        logger = setup_logger(output_dir, distributed_rank=rank, color=color, name=name)
        for handler in logger.handlers:
            if (getattr(handler, "stream", None) is sys.stdout
                    and not any(isinstance(f, _NotFileOnly) for f in handler.filters)):
                handler.addFilter(_NotFileOnly())
    return logger


def environment_summary(device: str) -> str:
    """"torch 2.x, detectron2 0.6, device cpu, 2 threads": the console's environment line.

    Args:
        device: the config's ``MODEL.DEVICE``.
    """
    return (f"torch {torch.__version__}, detectron2 {detectron2.__version__}, device {device}, "
            f"{torch.get_num_threads()} threads")


def log_environment(cfg, args) -> logging.Logger:
    """The first steps of :func:`default_setup`: create ``OUTPUT_DIR``, set up the loggers,
    log the rank, the console's :func:`environment_summary`, and into ``log.txt`` only the
    environment report, the command line, the config file and the full config as merged.
    ``train_net.py`` runs it before checking the datasets, so that a check's error still
    leaves the environment and the config in ``log.txt``.

    Args:
        cfg: the config (frozen or not).
        args: the parsed command line (``config_file`` read if present).

    Returns:
        logging.Logger: the "detectron2" logger.
    """
    output_dir = cfg.OUTPUT_DIR
    if comm.is_main_process() and output_dir:
        PathManager.mkdirs(output_dir)
    rank = comm.get_rank()
    logger = setup_loggers(output_dir, rank)
    log_file = os.path.join(output_dir, "log.txt") if output_dir else None
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info(environment_summary(cfg.MODEL.DEVICE)
                + (f" (environment report and full config in {log_file})" if log_file else ""))
    logger.info("Environment info:\n" + collect_env_info(), extra=FILE_ONLY)
    logger.info("Command line arguments: " + str(args))
    config_file = getattr(args, "config_file", "")
    if config_file:
        with PathManager.open(config_file, "r") as f:
            logger.info(f"Contents of args.config_file={config_file}:\n{f.read()}",
                        extra=FILE_ONLY)
    if comm.is_main_process():
        logger.info("Running with full config:\n" + cfg.dump(), extra=FILE_ONLY)
    return logger


def default_setup(cfg, args, environment_logged: bool = False) -> None:
    """Detectron2's ``default_setup``, quiet on the console.

    Same steps: create ``OUTPUT_DIR``, set up the "fvcore" and "detectron2" loggers
    (:func:`setup_loggers`), log the rank, the command line arguments, write
    ``OUTPUT_DIR/config.yaml`` (main process), seed the RNGs with ``SEED`` + rank (random
    when ``SEED`` < 0), and outside ``--eval-only`` set ``CUDNN_BENCHMARK``. The environment
    report (``collect_env_info``), the config file and the full config go to ``log.txt``
    only, uncoloured; the console gets :func:`environment_summary` instead.

    Args:
        cfg: the frozen config.
        args: the parsed command line (``config_file``, ``eval_only`` read if present).
        environment_logged: :func:`log_environment` already ran (its steps are skipped).
    """
    if environment_logged:
        logger = logging.getLogger("detectron2")
    else:
        logger = log_environment(cfg, args)
    output_dir = cfg.OUTPUT_DIR
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        with PathManager.open(path, "w") as f:
            f.write(cfg.dump())
        logger.info("Full config saved to %s", path)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
