"""
The first-order cost of SalUn's forget step to the other classes. Along the steepest-descent direction of SalUn's
forget term for one class (all weights, unit norm; the term pulls eps(x_t, c_f) towards the model's eps(x_t, c_f + 1)),
each class's guidance direction eps(x_t, c) - eps(x_t, null) moves at some rate; over the class's guidance size, that
rate says how fast the class's own label use changes. Printed per forget class: the forget class's rate and the other
classes' rates over it (1: a step moves every other class's label use as much as the forgotten one's). Each class is
read on the first batch of forget.py's forget stream for it. Compares two models before a recipe is taken from one to
the other (docs/mnist.md).

    python bench/collateral.py                      # the embedded digits DiT, every digit
    python bench/collateral.py --dataset mnist
"""
import os
import statistics
import sys
import warnings

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import guidance_size  # noqa: E402
from cli import run_main  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from sfron.build import ModelRequest, load_model_and_vae  # noqa: E402
from sfron.data import class_folders  # noqa: E402
from sfron.dist import distributed  # noqa: E402
from sfron.terms.base import eps_prediction, exchange_class, kept_labels, mean_flat_square  # noqa: E402
from sfron.utils import UserError, check_class_index  # noqa: E402


# torch's forward-mode autodiff scripts its decompositions on first use with torch.jit.script, which warns
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


def forget_direction(model, diffusion, batch, other_class):
    """{name: tensor}: the unit steepest-descent direction of SalUn's forget term on the batch,
    mean ||eps(x_t, c_f) - sg(eps(x_t, c'))||^2 (zero for the weights that do not train)."""
    keep = kept_labels(batch)
    with torch.no_grad():
        target = eps_prediction(model, diffusion, batch, torch.full_like(batch.y, other_class), keep)
    model.zero_grad(set_to_none=True)
    mean_flat_square(eps_prediction(model, diffusion, batch, batch.y, keep) - target).mean().backward()
    step = {n: -p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(v.square().sum() for v in step.values()))
    return {n: v / norm for n, v in step.items()}


def guidance_rate(model, diffusion, batch, direction):
    """(guidance size, RMS rate of change of eps(x_t, c) - eps(x_t, null) along direction) on the batch, the rate
    exact to first order (forward-mode autodiff)."""
    x_t = diffusion.q_sample(batch.x, batch.t, noise=batch.noise)
    keep = kept_labels(batch)
    weights = {n: p.detach() for n, p in model.named_parameters()}

    def guidance(w):
        cond = functional_call(model, w, (x_t, batch.t, batch.y), {"force_drop_ids": keep})
        null = functional_call(model, w, (x_t, batch.t, batch.y), {"force_drop_ids": torch.ones_like(keep)})
        return (cond - null)[:, :batch.x.shape[1]]                          # (b, C, H, W)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no forward-mode derivative
        value, rate = jvp(guidance, (weights,), (direction,))
    return float(value.square().mean().sqrt()), float(rate.square().mean().sqrt())


def main(args):
    """Prints, per forget class, its own rate (over its guidance size) and the other classes' rates over it."""
    if args.precision != "fp32":
        raise UserError("bench/collateral.py reads first-order rates in fp32: drop --precision")
    with distributed() as dist:
        loaded = load_model_and_vae(ModelRequest(model=args.model, ckpt=args.ckpt), dist.device)
        model, diffusion = loaded.model.eval(), create_diffusion(timestep_respacing="")
        folders = class_folders(args.data_path, loaded.spec.num_classes)
        classes = args.classes if args.classes is not None else list(folders.indices)
        for c in classes:
            check_class_index(c, loaded.spec.num_classes, "--classes", "the model")
        batches = {c: guidance_size.first_forget_batch(loaded, folders, c, args, dist) for c in folders.indices}
        ratios = []
        for f in classes:
            direction = forget_direction(model, diffusion, batches[f], exchange_class(f, loaded.spec.num_classes))
            rate = {}
            for c, batch in batches.items():
                size, moved = guidance_rate(model, diffusion, batch, direction)
                rate[c] = moved / size
            others = {c: rate[c] / rate[f] for c in batches if c != f}
            worst = max(others, key=others.get)
            ratios.append(statistics.mean(others.values()))
            print(f"class {f}: rate {rate[f]:.2f}, the others' over it: mean {ratios[-1]:.3f}, "
                  f"max {others[worst]:.3f} (class {worst})", flush=True)
        if len(ratios) > 1:
            print(f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f} "
                  f"({len(ratios)} classes, seed {args.seed}, batch {args.batch_size})")


if __name__ == "__main__":
    run_main(main, guidance_size.parse_args(doc=__doc__))
