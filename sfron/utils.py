"""
Small pieces every script shares: the one-line error of bad input, the class-index check, the log file and
experiment folders.
"""
import logging
import os
import sys
from glob import glob


class UserError(Exception):
    """Bad input or a failed run: the scripts print its message as one line and exit with status 1."""


def first_line(error):
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_class_index(index, num_classes, flag, where):
    """A class index given by `flag` must be one of the num_classes classes of `where` (a folder, the model)."""
    if not 0 <= index < num_classes:
        raise UserError(f"{flag} {index} is outside the {num_classes} classes of {where} (0..{num_classes - 1})")


#################################################################################
#                         Logging and experiment folders                        #
#################################################################################

def create_logger(logging_dir, rank=0, name="sfron"):
    """A logger that writes to stdout and <logging_dir>/log.txt on rank 0 and stays silent elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0 and logging_dir is not None:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(logging_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def new_experiment_dir(results_dir, suffix):
    """results/NNN-<suffix>, NNN counting the folders already there (the official naming)."""
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob(os.path.join(results_dir, "*")))
    path = os.path.join(results_dir, f"{index:03d}-{suffix}")
    while os.path.exists(path):  # two runs started at once, or a file removed from the middle
        index += 1
        path = os.path.join(results_dir, f"{index:03d}-{suffix}")
    return path


def start_experiment(dist, results_dir, suffix):
    """Rank 0 creates results/NNN-<suffix>; every rank gets its path and a logger (silent off rank 0)."""
    path = new_experiment_dir(results_dir, suffix) if dist.is_main else None
    if dist.is_main:
        os.makedirs(path)
    path = dist.broadcast_object(path)
    return path, create_logger(path, dist.rank)
