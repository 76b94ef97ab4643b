"""
What a resumed run must keep. A run records its frozen settings dataclasses (the unlearning settings, the model
spec, the data and the mask) in every checkpoint; a resumed run compares the same dataclasses, built from its own
command line, field by field and refuses to go on where anything differs. Nothing is listed by hand: a new field
of a settings dataclass is pinned by being there. `--resume auto` finds the run to continue by the same record.
"""
import json
import os
from dataclasses import asdict, dataclass
from glob import glob
from typing import Callable, Optional

from .files import as_read_back, remove_stale_temporaries, safe_torch_load
from .utils import UserError, start_experiment

CHECKPOINT_PATTERN = "[0-9]" * 7 + ".pt"
RUN_RECORD = "run.json"  # an experiment folder's pinned settings, written when the run starts (--resume auto)
FORGET_RESUME_KEYS = ("model", "opt", "run", "train_steps")  # what a forget.py checkpoint needs to be continued


@dataclass(frozen=True)
class RunLookup:
    """Where a script's run lives: its --results-dir, its --resume (None, "auto", or a folder or checkpoint), the
    suffix of a new experiment folder, and what a checkpoint of this script must hold to be continued."""
    results_dir: str
    resume: Optional[str]
    new_name: str
    script: str = "forget.py"
    required: tuple = FORGET_RESUME_KEYS
    upgrade: Optional[Callable] = None  # an older run.json's sections as they read now (a UserError: not this run)


def pinned_record(sections):
    """{section: {field: value}} of {section: frozen dataclass (or plain dict)}, as saved in a checkpoint's "run"."""
    return {name: asdict(value) if not isinstance(value, dict) else dict(value) for name, value in sections.items()}


def _flag(key):
    return "--" + key.replace("_", "-")


def _difference(section, key, recorded, current):
    """One line saying what differs, naming the flag to change."""
    if section == "mask" and key == "file":
        if recorded is None:
            return "the resumed run used no saliency mask; resume without --mask-path"
        if current is None:
            return f"the resumed run used the mask {recorded}; resume with --mask-path {recorded}"
        return f"--mask-path/--threshold select the mask {current}, but the resumed run used {recorded}"
    if section == "mask" and key == "sha256":
        return "the mask file has changed since the run started (its SHA-256 differs); restore it or start a new run"
    if section == "replay" and key == "sampling":
        return (f"the replay samples would be drawn with {current} (--sampler, --num-sampling-steps, --cfg-scale), "
                f"the resumed run's with {recorded}; resume with the original command")
    if key == "processes":
        return f"the run saved the running sums of {recorded} processes; continue it on {recorded}, not {current}"
    if key in ("fingerprint", "data_fingerprint"):
        return "the images under --data-path differ from those the resumed run started with"
    if section == "model" and key == "learn_sigma":
        return f"the checkpoint's learned variance ({current}) differs from the resumed run's ({recorded})"
    return f"{_flag(key)} {current} differs from the resumed run's {recorded}; resume with the original command"


def check_same_run(recorded, current):
    """Raises a UserError naming the first setting of `current` (a pinned_record) that differs from `recorded`."""
    for section, fields in current.items():
        saved = recorded.get(section, {})
        for key, value in fields.items():
            if key not in saved:
                raise UserError(f"the resumed run records no {_flag(key)} (it was started by an earlier version "
                                f"of the script): resume it with that version, or start a new run")
            if saved[key] != value:
                raise UserError(_difference(section, key, saved[key], value))


def find_resume_checkpoint(path, required=FORGET_RESUME_KEYS, script="forget.py"):
    """(path, checkpoint) to resume: a checkpoint file, or the newest checkpoints/NNNNNNN.pt of an experiment folder."""
    if os.path.isdir(path):
        folder, path = path, newest_checkpoint(path)
        if path is None:
            raise UserError(f"--resume {folder}: no checkpoints/NNNNNNN.pt in that folder")
    checkpoint = safe_torch_load(path, what="checkpoint")
    if not isinstance(checkpoint, dict) or not set(required) <= checkpoint.keys():
        raise UserError(f"--resume {path} is not a resumable {script} checkpoint (it lacks "
                        f"{', '.join(k for k in required if not isinstance(checkpoint, dict) or k not in checkpoint)})")
    return path, checkpoint


def checkpoint_identity(ckpt):
    """How a run records the checkpoint it started from: a local file by its absolute path, else its name."""
    return os.path.abspath(ckpt) if ckpt and os.path.isfile(ckpt) else ckpt


def newest_checkpoint(experiment_dir):
    """The newest checkpoints/NNNNNNN.pt of an experiment folder, or None."""
    found = sorted(glob(os.path.join(experiment_dir, "checkpoints", CHECKPOINT_PATTERN)))
    return found[-1] if found else None


def find_matching_run(results_dir, sections, upgrade=None):
    """
    The newest experiment folder under results_dir whose run.json records the same values for each of `sections`
    ({section: {field: value}}, as JSON reads them back), or None: what `--resume auto` continues. upgrade: turns
    a record into what it reads as now (a UserError: not a run these sections continue).
    """
    matches = []
    for path in sorted(glob(os.path.join(results_dir, "*", RUN_RECORD))):
        try:
            recorded = json.load(open(path))
            recorded = upgrade(recorded) if upgrade is not None else recorded
        except (OSError, ValueError, UserError):
            continue  # not a run of this script, or one these settings cannot continue
        if all(recorded.get(name) == as_read_back(value) for name, value in sections.items()):
            matches.append(os.path.dirname(path))
    return matches[-1] if matches else None


def remove_leftovers(experiment_dir, dist):
    """Rank 0 removes the temporary files a process killed mid-write left in the run's folders."""
    if dist.is_main:
        remove_stale_temporaries(experiment_dir)
        remove_stale_temporaries(os.path.join(experiment_dir, "checkpoints"))
    dist.barrier()


def locate_run(lookup, match, dist):
    """
    (experiment folder, checkpoint path, checkpoint) of a run: the run `lookup.resume` names; with --resume auto the
    newest run under the results folder whose run.json records `match` ({section: {field: value}}), continued from
    its newest checkpoint or from the start where it saved none (path and checkpoint None); else a new folder. The
    caller checks the checkpoint's record against its own and writes run.json for a run not continued.
    """
    if lookup.resume not in (None, "auto"):
        path, checkpoint = find_resume_checkpoint(lookup.resume, lookup.required, lookup.script)
        found = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        remove_leftovers(found, dist)
        return found, path, checkpoint
    found = find_matching_run(lookup.results_dir, match, lookup.upgrade) if lookup.resume == "auto" and dist.is_main else None
    found = dist.broadcast_object(found)
    if found is None:
        return start_experiment(dist, lookup.results_dir, lookup.new_name)[0], None, None
    remove_leftovers(found, dist)
    path = newest_checkpoint(found)
    if path is None:
        return found, None, None
    return (found, *find_resume_checkpoint(path, lookup.required, lookup.script))
