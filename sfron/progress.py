"""
Running sums that survive kills and preemption. A long accumulating loop (the Fisher of 4,000 backward passes of
DiT-XL/2) saves each process's own sums every few batches and when a stop signal arrives: every rank writes its
file, then rank 0 names the position in manifest.json. A kill at any moment leaves either the old or the new
position complete; resuming loads each rank's own sums, so the result is bit-identical to an uninterrupted run
at any number of processes (the same processes: the sums of a rank are not those of another).
"""
import json
import os
import shutil
from dataclasses import dataclass
from glob import glob
from typing import Any, Callable, Optional

from .files import as_read_back, atomic_json_dump, atomic_torch_save, remove_stale_temporaries, safe_torch_load
from .preemption import Preempted
from .resume import check_same_run
from .utils import UserError

MANIFEST = "manifest.json"


class ProgressFolder:
    """The saved positions of one run's phases (for example "forget", "remain") under `folder`; `record` pins
    the settings: a folder holding another run's progress is refused with one error line."""

    def __init__(self, folder, record, dist):
        self.folder, self.dist = folder, dist
        self.record = as_read_back(record)
        self.manifest = self._read()
        if self.manifest is not None:
            try:
                check_same_run(self.manifest["record"], self.record)
            except UserError as e:
                raise UserError(f"{folder} holds the progress of another run: {e} (or remove that folder)") from None
            if dist.is_main:
                remove_stale_temporaries(folder)
        else:  # the folder is made at the first save: a run that fails before it leaves nothing
            self.manifest = {"record": self.record, "positions": {}, "done": [], "experiment_dir": None}
        dist.barrier()

    def _read(self):
        path = os.path.join(self.folder, MANIFEST)
        return json.load(open(path)) if os.path.isfile(path) else None

    def _file(self, phase, position, rank):
        return os.path.join(self.folder, f"{phase}-{position:07d}-rank{rank}.pt")

    @property
    def experiment_dir(self):
        """The results folder the run started in (None before it was named)."""
        return self.manifest.get("experiment_dir")

    def set_experiment_dir(self, path):
        """Records the results folder of the run (on disk at the first save)."""
        self.manifest["experiment_dir"] = path

    def _write(self):
        """Rank 0 writes the manifest; every rank waits for it."""
        if self.dist.is_main:
            atomic_json_dump(self.manifest, os.path.join(self.folder, MANIFEST))
        self.dist.barrier()

    def is_done(self, phase):
        return phase in self.manifest["done"]

    def load(self, phase):
        """(position, this rank's saved state or None) of a phase; other positions' files of this rank go."""
        position = self.manifest["positions"].get(phase, 0)
        self._remove_other_positions(phase, position)
        if position == 0:
            return 0, None
        return position, safe_torch_load(self._file(phase, position, self.dist.rank), what="saved progress")

    def save(self, phase, position, state):
        """Every rank writes its state at `position`; then rank 0 makes it the phase's position."""
        atomic_torch_save(state, self._file(phase, position, self.dist.rank))
        self.dist.barrier()
        self.manifest["positions"] = {**self.manifest["positions"], phase: position}
        self._write()
        self._remove_other_positions(phase, position)

    def mark_done(self, phase):
        """The phase's result is saved: a resumed run skips it."""
        self.manifest["done"] = self.manifest["done"] + [phase]
        self._write()
        self._remove_other_positions(phase, -1)

    def finish(self):
        """Every phase is done: the folder goes."""
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _remove_other_positions(self, phase, keep):
        """This rank's files of the phase other than position `keep` (all of them for keep <= 0)."""
        kept = self._file(phase, keep, self.dist.rank) if keep > 0 else None
        for path in glob(os.path.join(self.folder, f"{phase}-*-rank{self.dist.rank}.pt")):
            if path != kept:
                os.remove(path)


@dataclass
class LoopProgress:
    """Where a resumable loop starts (position, state) and what it does after each batch: save every `every`
    batches through save(position, state), stop after the batch when `stop` (a StopSignals) says so, and log."""
    position: int = 0
    state: Optional[dict] = None
    save: Optional[Callable] = None
    every: int = 0
    stop: Any = None
    log_every: int = 0
    logger: Any = None

    def restore_into(self, key, tensors):
        """Copies the saved tensors of state[key] into `tensors` ({name: tensor}), where there is a saved state."""
        if self.state is not None:
            for name, saved in self.state[key].items():
                tensors[name].copy_(saved)

    def after_batch(self, done, total, state_fn, dist, desc="batches"):
        """Called by every process after batch `done` (1-based) of `total` of the loop named `desc`; state_fn() gives
        the state to save."""
        if self.logger is not None and self.log_every and done % self.log_every == 0:
            self.logger.info(f"{desc}: {done}/{total} batches")
        stopping = self.stop is not None and self.stop.agreed(dist, f"after batch {done} of {total}")
        if self.save is None or done >= total:
            return
        if stopping or (self.every and done % self.every == 0):
            self.save(done, state_fn())
        if stopping:
            raise Preempted(self.stop.name(), f"after batch {done} of {total}; its sums are saved")
