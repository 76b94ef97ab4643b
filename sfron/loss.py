"""
The DiT training loss of one batch (per sample: epsilon MSE plus the variational-bound term of the learned
variance, as the official train.py) and the checks that stop a run on non-finite numbers. The Fisher, the
unlearning steps and train.py all use them.
"""
import math

import torch

from .utils import UserError


def diffusion_loss(model, diffusion, batch, labels=None, force_drop_ids=None):
    """Per-sample DiT training losses (b,) of a Batch (the labels may be replaced, e.g. for relabelling)."""
    kwargs = dict(y=batch.y if labels is None else labels)
    if force_drop_ids is not None:
        kwargs["force_drop_ids"] = force_drop_ids
    return diffusion.training_losses(model, batch.x, batch.t, kwargs, noise=batch.noise)["loss"]


def check_finite(loss, what, step, hint="lower --lr"):
    """Stops the run with a clear error on a NaN or infinite loss (a number, or a tensor of losses)."""
    finite = bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else math.isfinite(loss)
    if not finite:
        raise UserError(f"non-finite {what} at step {step}: {hint}")


def check_finite_weights(model, step, hint="lower --lr"):
    """Refuses to go on from overflowed weights (a finite loss can still give an infinite gradient)."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise UserError(f"non-finite weights after step {step}: {hint}")
