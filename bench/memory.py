"""
Memory and time per step of forget.py's update, by recipe: the persistent state by part (weights, gradients, the
AdamW moments, the frozen original, the adversarial label, the mask) and the peak of one run, beside the official
recipe's, measured in the same script. Each recipe runs in a process of its own, so that each peak is its own: on CUDA
torch.cuda.max_memory_allocated(), on a CPU the process's peak resident memory over its resident memory before
the model was built. Random weights, a random saliency mask of --mask-free-share, and latent-size inputs without
the VAE: this measures memory and time, not quality.

    python bench/memory.py --model DiT-XL/2 --recipe adversarial-esd-distill --batch-sizes 1 4

The last line reads `persistent state: default X GB, official Y GB, ratio R` (default: the --recipe measured);
--out writes every figure to a JSON file.
"""
import argparse
import copy
import io
import multiprocessing
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cli import description, run_main  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from forget import checkpoint_state  # noqa: E402
from models import DiT_models  # noqa: E402
from sfron.data import Batch  # noqa: E402
from sfron.dist import Dist  # noqa: E402
from sfron.files import atomic_json_dump  # noqa: E402
from sfron.recipes import DEFAULT_RECIPE, RECIPES, get_recipe  # noqa: E402
from sfron.unlearn import FrozenReference, Unlearner  # noqa: E402
from sfron.utils import UserError  # noqa: E402
from synthetic import random_dit  # noqa: E402

GB = 1e9  # decimal gigabytes, as the sizes of checkpoints are usually given
PARTS = ("weights", "gradients", "moments", "reference", "adversary", "mask")


class ByteCounter(io.RawIOBase):
    """A file that keeps nothing and counts the bytes written to it (a checkpoint's size without the disk)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def writable(self):
        return True

    def write(self, data):
        self.count += len(data)
        return len(data)


def resident_gb():
    """This process's resident memory now (Linux /proc), in GB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def peak_gb(device, baseline):
    """The peak since the run began: allocated CUDA memory, or the process's peak resident memory over baseline."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB - baseline  # ru_maxrss is in KiB


def tensor_gb(tensors):
    """Bytes of distinct tensors (shared storage counted once), in GB."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / GB


def random_mask(model, free_share, seed=0):
    """A boolean saliency mask that frees about free_share of every tensor's entries."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(p.shape, generator=g) < free_share).to(p.device)
            for k, p in model.named_parameters() if p.requires_grad}


def latent_batch(model, batch_size, device, g):
    """A batch of random latents of the model's input size, labels, timesteps and noise."""
    shape = (batch_size, model.in_channels, model.input_size, model.input_size)
    x = torch.randn(shape, generator=g)
    return Batch(x=x.to(device), y=torch.randint(0, model.num_classes, (batch_size,), generator=g).to(device),
                 t=torch.randint(0, 1000, (batch_size,), generator=g).to(device), noise=torch.randn_like(x).to(device),
                 drop=torch.zeros(batch_size, dtype=torch.long, device=device))


def persistent_state(unlearner):
    """{part: GB} of what a run keeps between steps."""
    optimizers = {id(o): o for o in (unlearner.opt, unlearner.forget_opt)}.values()
    moments = [t for o in optimizers for state in o.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0]
    adversary, reference = unlearner.adversary, unlearner.reference
    if unlearner.original is not None:  # the original's free entries, swapped in
        frozen = unlearner.original.values
    else:
        frozen = reference.model.state_dict().values() if reference is not None and reference.model is not None else []
    return {"weights": tensor_gb(unlearner.params),
            "gradients": tensor_gb(p.grad for p in unlearner.params),
            "moments": tensor_gb(moments),
            "reference": tensor_gb(frozen),
            "adversary": 0.0 if adversary is None else tensor_gb(
                [adversary.embedding, *(t for s in adversary.optimizer.state.values() for t in s.values())]),
            "mask": tensor_gb([*(unlearner.mask or {}).values(), *(unlearner.free or [])])}


def checkpoint_gb(unlearner):
    """The size of forget.py's checkpoint of this run (its tensors; the few kB of settings aside), in GB."""
    counter = ByteCounter()
    torch.save(checkpoint_state(unlearner), counter)
    return counter.count / GB


def measure(options, recipe, batch_size, queue):
    """One recipe's forget run in this process: puts {parts, persistent, peak, step_s, checkpoint} on queue."""
    torch.set_num_threads(options["threads"] or torch.get_num_threads())
    device = torch.device(options["device"])
    baseline = resident_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = random_dit(options["model"], options["image_size"], device)
    settings = get_recipe(recipe).settings({"forget_class": 0, "batch_size": batch_size,
                                            "precision": options["precision"]})
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if settings.needs_frozen_model else None
    unlearner = Unlearner(model, create_diffusion(timestep_respacing=""), settings, Dist(device=device),
                          random_mask(model, options["mask_free_share"]), reference=FrozenReference(model=frozen))
    del frozen  # what the run keeps of it, the Unlearner holds
    g = torch.Generator().manual_seed(1)
    forget, remain = latent_batch(model, batch_size, device, g), latent_batch(model, batch_size, device, g)
    unlearner.step(forget, remain, alpha=1.0)  # warm-up: the optimizer state is made at the first step
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(options["steps"]):
        unlearner.step(forget, remain, alpha=1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / options["steps"]
    parts = persistent_state(unlearner)
    peak = peak_gb(device, baseline)  # before the checkpoint's serialisation, which is not a step's
    queue.put({"parts": parts, "persistent": sum(parts.values()), "peak": peak, "step_s": step_s,
               "checkpoint": checkpoint_gb(unlearner),
               "free_entries": sum(int(m.sum()) for m in unlearner.mask.values())})


def run_isolated(options, recipe, batch_size):
    """measure() in a fresh process (its own peak memory), returning its result."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(options, recipe, batch_size, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise UserError(f"the {recipe} run at batch {batch_size} failed (exit status {proc.exitcode}; out of memory?)")
    return queue.get()


def main(args):
    options = {"model": args.model, "image_size": args.image_size, "steps": args.steps, "threads": args.threads,
               "mask_free_share": args.mask_free_share, "precision": args.precision,
               "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    recipes = list(dict.fromkeys([args.recipe, "official"]))
    print(f"{args.model} at {args.image_size}x{args.image_size} on {options['device']}, {args.precision}, random "
          f"weights, {args.mask_free_share:.1%} of the weights free in the mask, {args.steps} timed steps (GB)")
    print("| recipe | batch | " + " | ".join(PARTS) + " | persistent | peak | checkpoint | s/step |")
    print("| --- " * (len(PARTS) + 6) + "|")
    results = {}
    for batch_size in args.batch_sizes:
        for recipe in recipes:
            r = results[recipe, batch_size] = run_isolated(options, recipe, batch_size)
            print(f"| {recipe} | {batch_size} | " + " | ".join(f"{r['parts'][p]:.3f}" for p in PARTS) +
                  f" | {r['persistent']:.3f} | {r['peak']:.3f} | {r['checkpoint']:.3f} | {r['step_s']:.3f} |",
                  flush=True)
    first = args.batch_sizes[0]
    default, official = results[args.recipe, first]["persistent"], results["official", first]["persistent"]
    if args.out:
        atomic_json_dump({"options": options, "recipe": args.recipe,
                          "runs": [{"recipe": r, "batch_size": b, **v} for (r, b), v in results.items()]}, args.out)
    print(f"persistent state: default {default:.3f} GB, official {official:.3f} GB, ratio {default / official:.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2",
                        help="a registry DiT (1000 classes)")
    parser.add_argument("--image-size", type=int, default=256, help="image side; the inputs are latents of 1/8")
    parser.add_argument("--recipe", type=str, choices=list(RECIPES), default=DEFAULT_RECIPE,
                        help="the recipe measured beside the official one")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4],
                        help="forget (and remain) samples per step; the ratio is read at the first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--mask-free-share", type=float, default=0.02,
                        help="share of the weights the random mask frees (gamma 5 freed 0.7-2%% on the digits)")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default="fp32",
                        help="forget.py --precision: bf16 runs the passes under bf16 autocast")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=str, default=None, help="also write every figure, unrounded, to this JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
