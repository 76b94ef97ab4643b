"""
One code path for one CPU, one GPU, or many processes. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK) or srun
(SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT exported by the batch script)
a process group is started: NCCL on GPUs, gloo on the CPU. Otherwise everything is a single process.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def shard(self, global_batch_size, what="--batch-size"):
        """This rank's [start, end) slice of a global batch; the batch must split evenly across processes."""
        from .utils import UserError
        if global_batch_size % self.world_size:
            raise UserError(f"{what} {global_batch_size} must be divisible by the {self.world_size} processes")
        per_rank = global_batch_size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce_sum_(self, tensor):
        """Sums a tensor over all processes, in place (a no-op for one process)."""
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def all_gather_padded(self, tensor, rows):
        """Concatenates every rank's tensor (at most `rows` rows each, same trailing shape) in rank order."""
        if not self.enabled:
            return tensor
        shape = tensor.shape[1:]
        padded = tensor.new_zeros((rows, *shape))
        padded[:len(tensor)] = tensor
        counts = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(self.world_size)]
        torch_dist.all_gather(counts, torch.tensor(len(tensor), device=tensor.device))
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(gathered, padded)
        return torch.cat([g[:int(n)] for g, n in zip(gathered, counts)])

    def barrier(self):
        if self.enabled:
            torch_dist.barrier()

    def broadcast_object(self, obj):
        """rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]


def _env_int(*names):
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed(device=None):
    """Reads the launcher's environment, starts the process group if there are several processes, picks the device."""
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: only a task started by srun belongs to a multi-process step
    world_size = _env_int("WORLD_SIZE", "SLURM_STEP_NUM_TASKS") or 1
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if "RANK" not in os.environ and world_size > 1:
        # launched by srun without torchrun: hand torch.distributed the SLURM layout
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


@contextmanager
def distributed(device=None):
    """
    The Dist of init_distributed() for the body of a script. On success every process waits for the others
    (rank 0 may still be writing files) before the process group is destroyed: tearing gloo down while a peer
    is still busy aborts the process.
    """
    dist = init_distributed(device)
    try:
        yield dist
        dist.barrier()
    finally:
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
