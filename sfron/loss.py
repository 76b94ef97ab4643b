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


class NonFinite(UserError):
    """A run stopped on a NaN or infinite loss or weight: it diverged in step `diverged_at` (counted from 1, as
    --n-iters counts; the weights after the steps before it were finite). A benchmark records that as a result."""

    def __init__(self, message, diverged_at):
        super().__init__(message)
        self.diverged_at = diverged_at


def check_finite(loss, what, step, hint="lower --lr"):
    """Stops the run with a clear error on a NaN or infinite loss (a number, or a tensor of losses)."""
    finite = bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else math.isfinite(loss)
    if not finite:
        raise NonFinite(f"non-finite {what} at step {step}: {hint}", step + 1)  # step: the batch's, from 0


def check_finite_weights(model, step, hint="lower --lr"):
    """Refuses to go on from overflowed weights (a finite loss can still give an infinite gradient)."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise NonFinite(f"non-finite weights after step {step}: {hint}", step)  # step: the count of steps taken
