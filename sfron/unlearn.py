"""
The SFR-on update (Huang et al., NeurIPS 2024). Each step of `ron` is a fast, masked and clipped
forget step followed by a slow remain step taken at the weights just updated: the remain gradient there,
g_r(theta + d), carries the remain Hessian times the forget update, so the pair follows the remain-preserving
manifold without ever forming a Hessian. `joint` takes one step on the sum of both losses instead.
"""
import math
from dataclasses import dataclass

import torch

from .build import autocast_dtype
from .data import Batch
from .loss import check_finite, diffusion_loss
from .optim import make_optimizer
from .utils import UserError

FORGET_LOSSES = ("ga", "adaga", "rl")
METHODS = ("ron", "joint")
ADAGA_EPS = 1e-15
NON_FINITE_HINT = "lower --lr or --forget-alpha (the last good checkpoint is kept)"


@dataclass(frozen=True)
class UnlearnSettings:
    """Everything that defines an unlearning run's numbers: a resumed run must keep every field."""
    forget_class: int
    method: str = "ron"
    unlearn_loss: str = "ga"
    n_iters: int = 2000
    batch_size: int = 1
    lr: float = 1e-4
    forget_alpha: float = 1.0
    decay_forget_alpha: bool = False
    remain_alpha: float = 1.0
    grad_clip: float = 1.0
    lambd: float = 0.5
    forget_label_dropout: bool = True
    seed: int = 0
    precision: str = "fp32"
    ema_decay: float = 0.0

    def check(self):
        """One clear error for settings that cannot run."""
        if self.method not in METHODS or self.unlearn_loss not in FORGET_LOSSES:
            raise UserError(f"--method must be one of {METHODS} and --unlearn-loss one of {FORGET_LOSSES}")
        if self.n_iters < 1 or self.batch_size < 1:
            raise UserError("--n-iters and --batch-size must be positive")
        check_ema_decay(self.ema_decay, self.n_iters)

    def forget_alpha_at(self, step):
        """alpha_k of step k: the forget weight, or its cosine decay."""
        return forget_alpha_at(step, self.n_iters, self.forget_alpha, self.decay_forget_alpha)


def check_ema_decay(decay, n_iters):
    """An EMA that would still hold much of the original model must not be saved as the unlearned model."""
    if not 0 <= decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {decay}")
    left = decay ** n_iters
    if left > 0.01:
        raise UserError(f"--ema-decay {decay} over {n_iters} steps leaves {100 * left:.1f}% of the original "
                        f"weights in the EMA that checkpoints save as the unlearned model; use 0 (no EMA) or a decay "
                        f"below {0.01 ** (1 / n_iters):.4f}")


def forget_alpha_at(step, n_iters, forget_alpha, decay):
    """alpha_k: constant, or with decay the cosine schedule alpha * (1 + cos(pi k / K)) / 2."""
    if not decay:
        return forget_alpha
    return forget_alpha * (1 + math.cos(math.pi * step / n_iters)) / 2


def relabel_class(forget_class, num_classes):
    """
    The label `rl` trains forget images under: the official (cls + 100) % num_classes, except where that is the
    forget class itself (every class of a model with 100 classes or a divisor of 100), then (cls + 1) % num_classes.
    """
    target = (forget_class + 100) % num_classes
    return target if target != forget_class else (forget_class + 1) % num_classes


def forget_conditioning(batch, unlearn_loss, drop_labels=True, relabel=None):
    """
    (labels, label-drop ids) of the forget step: `rl` trains under the relabel class; drop_labels=False keeps
    every forget label (no null-label dropout on the forget step).
    """
    labels = torch.full_like(batch.y, relabel) if unlearn_loss == "rl" else batch.y
    drop = batch.drop if drop_labels else torch.zeros_like(batch.drop)
    return labels, drop


def forget_objective(losses, unlearn_loss, dist, lambd=0.5):
    """L_forget to minimise from the per-sample diffusion losses of the forget batch."""
    if unlearn_loss == "rl":
        return losses.mean()
    if unlearn_loss == "ga":
        return -losses.mean()
    if unlearn_loss == "adaga":
        # c_i = 1 / (l_i^lambda + eps): samples with a small loss (not yet forgotten) weigh more; w_i = n c_i / sum c
        coef = 1.0 / (losses.detach().float().pow(lambd) + ADAGA_EPS)
        count = torch.tensor(float(coef.numel()), device=coef.device)
        totals = dist.all_reduce_sum_(torch.stack([coef.sum(), count]))  # over the global batch
        weights = totals[1] * coef / totals[0]
        return -(weights * losses).mean()
    raise UserError(f"unknown --unlearn-loss {unlearn_loss}; choose from {', '.join(FORGET_LOSSES)}")


def concat_batches(a, b):
    """One batch holding the samples of a, then those of b (one forward pass for both)."""
    return Batch(x=torch.cat([a.x, b.x]), y=torch.cat([a.y, b.y]), t=torch.cat([a.t, b.t]),
                 noise=torch.cat([a.noise, b.noise]), drop=torch.cat([a.drop, b.drop]), step=a.step)


def apply_mask_(named_params, mask):
    """Multiplies each gradient elementwise by its saliency mask (weights outside the mask stay frozen)."""
    pairs = [(p.grad, mask[name]) for name, p in named_params if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])  # one launch per group, not per tensor


class Unlearner:
    """
    The model, optimizer, saliency mask and settings of one unlearning run; step() takes one step of
    settings.method on a forget and a remain batch. model may be DDP-wrapped: the mask and the optimizer use the
    module inside, whose parameter names are the official ones.
    """

    def __init__(self, model, diffusion, settings, dist, mask=None, optimizer=None):
        self.model, self.diffusion, self.settings, self.dist, self.mask = model, diffusion, settings, dist, mask
        self.raw_model = getattr(model, "module", model)
        self.named = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.opt = optimizer if optimizer is not None else make_optimizer(self.params, settings.lr)
        self.relabel = relabel_class(settings.forget_class, self.raw_model.num_classes) \
            if settings.unlearn_loss == "rl" else None
        self.amp = dict(device_type=dist.device.type, dtype=autocast_dtype(settings.precision),
                        enabled=settings.precision == "bf16")

    def _optimizer_step(self, loss, masked):
        """zero_grad, backward, then (masked=True) the saliency mask and the global-norm clip, and the step."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if masked and self.mask is not None:
            apply_mask_(self.named, self.mask)
        if masked and self.settings.grad_clip is not None and self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.opt.step()

    def _forget_losses(self, batch, extra=None):
        """Per-sample diffusion losses of the forget samples (followed by `extra` samples, e.g. a remain batch)."""
        s = self.settings
        labels, drop = forget_conditioning(batch, s.unlearn_loss, s.forget_label_dropout, self.relabel)
        if extra is not None:
            batch = concat_batches(batch, extra)
            labels, drop = torch.cat([labels, extra.y]), torch.cat([drop, extra.drop])
        return diffusion_loss(self.model, self.diffusion, batch, labels=labels, force_drop_ids=drop)

    def step(self, forget_batch, remain_batch, alpha):
        """
        One step with forget weight alpha; returns the mean forget and remain diffusion losses of the global batch.
        The losses are checked once, at the end, from their global means: one host sync per step, and every
        process stops together (a non-finite loss on one process makes the all-reduced gradient and means
        non-finite on all; nothing has been saved from the bad weights).
        """
        s = self.settings
        if s.method == "ron":
            with torch.autocast(**self.amp):
                f_losses = self._forget_losses(forget_batch)
                f_loss = forget_objective(f_losses, s.unlearn_loss, self.dist, s.lambd)
            self._optimizer_step(alpha * f_loss, masked=True)                        # fast: forget
            with torch.autocast(**self.amp):                                          # at the updated weights
                r_losses = diffusion_loss(self.model, self.diffusion, remain_batch, force_drop_ids=remain_batch.drop)
            self._optimizer_step(s.remain_alpha * r_losses.mean(), masked=False)      # slow: remain
        elif s.method == "joint":  # both losses from one forward pass, one masked and clipped step
            n_forget = forget_batch.y.shape[0]
            with torch.autocast(**self.amp):
                losses = self._forget_losses(forget_batch, extra=remain_batch)
                f_losses, r_losses = losses[:n_forget], losses[n_forget:]
                loss = s.remain_alpha * r_losses.mean() + alpha * forget_objective(f_losses, s.unlearn_loss,
                                                                                   self.dist, s.lambd)
            self._optimizer_step(loss, masked=True)
        else:
            raise UserError(f"unknown --method {s.method}; choose from {', '.join(METHODS)}")
        means = torch.stack([f_losses.detach().float().mean(), r_losses.detach().float().mean()])
        f_mean, r_mean = (self.dist.all_reduce_sum_(means) / self.dist.world_size).tolist()  # over the global batch
        check_finite(f_mean, "forget loss", forget_batch.step, NON_FINITE_HINT)
        check_finite(r_mean, "remain loss", remain_batch.step, NON_FINITE_HINT)
        return f_mean, r_mean
