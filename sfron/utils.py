"""
Small pieces every script shares: the one-line error of bad input, atomic file writes, safe loading,
the log file, experiment folders and seeding.
"""
import argparse
import json
import logging
import os
import pickle
import sys
import tempfile
from glob import glob

import torch


class UserError(Exception):
    """Bad input or a failed run: the scripts print its message as one line and exit with status 1."""


def first_line(error):
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_main(main, args):
    """Runs main(args); a UserError becomes one 'error: ...' line on stderr and exit status 1."""
    try:
        main(args)
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the worker's own line
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


#################################################################################
#                         Atomic writes and safe loading                        #
#################################################################################

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write_fn, durable=True):
    """
    Calls write_fn(file object) on a temporary file beside `path`, then renames it over `path`: readers see the
    old file or the whole new one, never a part. durable=False skips the fsync (for many small files).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written file at `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_dump(obj, path):
    """Writes obj as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_save_image(image, path, durable=True):
    """Saves a PIL image as PNG, atomically."""
    atomic_write(path, lambda f: image.save(f, format="PNG"), durable)


def safe_torch_load(path, what="file"):
    """
    Loads a torch file without unpickling arbitrary objects (weights_only=True; argparse.Namespace is allowed
    because DiT train.py checkpoints store their args in one). Any failure is a UserError naming the file.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain containers "
                        f"({first_line(e)})") from None
    except Exception as e:  # a truncated archive, a text file, an old non-zip pickle ...
        raise UserError(f"{path} is not a readable torch {what} ({type(e).__name__}: {first_line(e)})") from None


def strip_module_prefix(state_dict):
    """Drops the 'module.' prefix that DataParallel/DDP put on every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


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


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """Steps the EMA weights towards the model's: ema = decay * ema + (1 - decay) * model."""
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)


def seeded_generator(*keys):
    """A CPU torch.Generator seeded from a tuple of integers (e.g. seed, stream, step)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)
