"""
The SFR-on update (Huang et al., NeurIPS 2024) and the gradient-based baselines it generalises. Each step of
`ron` is a fast, masked and clipped forget step followed by a slow remain step taken at the weights just updated:
the remain gradient there, g_r(theta + d), carries the remain Hessian times the forget update, so the pair follows
the remain-preserving manifold without ever forming a Hessian. `joint` takes one masked, clipped step on the
weighted sum of the forget term, the remain term and the EWC penalty.

Earlier methods are settings of the same update (README: the comparison): GA is the ascent alone (remain weight
0), FT the remain term alone (forget weight 0), RL a relabelled forget term with the remain term, SalUn its
random-label forget term under a gradient-saliency mask, SA a surrogate forget set with generative replay and an
EWC penalty, ESD a negatively guided target from the frozen original model.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .build import autocast_dtype
from .data import Batch
from .loss import check_finite, diffusion_loss
from .optim import make_optimizer
from .utils import UserError

FORGET_LOSSES = ("ga", "adaga", "rl", "salun", "sa", "esd")
ASCENT_LOSSES = ("ga", "adaga")          # maximise the diffusion loss of the forget images
DESCENT_LOSSES = ("rl", "sa")            # minimise it under another label / on surrogate images
METHODS = ("ron", "joint")
REMAIN_SOURCES = ("data", "replay")
REMAIN_LOSSES = ("diffusion", "distill")  # the remain term: the noise, or the frozen original's prediction
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
    esd_eta: float = 1.0            # ESD's negative guidance scale
    ewc_lambda: float = 0.0         # weight of the EWC penalty sum_i F_i (theta_i - theta*_i)^2 (SA)
    remain_source: str = "data"     # the remain term's images: the remain data, or samples of the original (SA)
    replay_samples: int = 0         # how many remain-class samples the original model generates for replay
    replay_steps: int = 50          # DDIM steps of each replay sample
    replay_cfg_scale: float = 4.0   # guidance scale of the replay samples
    forget_loss_ceiling: Optional[float] = None  # ga/adaga: no ascent step while the forget loss is above it
    null_label_stop: Optional[float] = None  # ga/adaga: no ascent step while L(x, c) >= this times L(x, null)
    remain_lr: Optional[float] = None        # the slow (remain) step's learning rate; None: lr
    separate_forget_optimizer: bool = False  # ron: the forget step keeps its own AdamW moments
    mask_remain_step: bool = False           # ron: the remain step moves the weights of the saliency mask only
    remain_loss: str = "diffusion"           # the remain term's target: the noise, or the frozen original's output

    def check(self):
        """One clear error for settings that cannot run."""
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {self.method}")
        if self.unlearn_loss not in FORGET_LOSSES:
            raise UserError(f"--unlearn-loss must be one of {', '.join(FORGET_LOSSES)}, got {self.unlearn_loss}")
        if self.n_iters < 1 or self.batch_size < 1:
            raise UserError("--n-iters and --batch-size must be positive")
        if min(self.forget_alpha, self.remain_alpha, self.ewc_lambda) < 0:
            raise UserError("--forget-alpha, --remain-alpha and --ewc-lambda must not be negative")
        if self.forget_alpha == 0 and self.remain_alpha == 0 and self.ewc_lambda == 0:
            raise UserError("--forget-alpha, --remain-alpha and --ewc-lambda are all 0: nothing to optimise")
        if self.remain_loss not in REMAIN_LOSSES:
            raise UserError(f"--remain-loss must be one of {', '.join(REMAIN_LOSSES)}, got {self.remain_loss}")
        if self.remain_source not in REMAIN_SOURCES:
            raise UserError(f"--remain-source must be one of {', '.join(REMAIN_SOURCES)}")
        if (self.remain_source == "replay" or self.ewc_lambda > 0) and self.replay_samples < 1:
            raise UserError("--remain-source replay and --ewc-lambda need --replay-samples of at least 1 (the "
                            "original model's samples the replay and the EWC Fisher use)")
        if self.forget_loss_ceiling is not None:
            if self.unlearn_loss not in ASCENT_LOSSES:
                raise UserError("--forget-loss-ceiling applies to the ascent losses (ga, adaga) only")
            if not self.forget_loss_ceiling > 0:
                raise UserError(f"--forget-loss-ceiling must be positive, got {self.forget_loss_ceiling}")
        if self.null_label_stop is not None:
            if self.unlearn_loss not in ASCENT_LOSSES:
                raise UserError("--null-label-stop applies to the ascent losses (ga, adaga) only")
            if not self.null_label_stop > 0:
                raise UserError(f"--null-label-stop must be positive, got {self.null_label_stop}")
        if self.remain_lr is not None and not self.remain_lr > 0:
            raise UserError(f"--remain-lr must be positive, got {self.remain_lr}")
        if (self.remain_lr is not None or self.separate_forget_optimizer or self.mask_remain_step) and \
                self.method != "ron":
            raise UserError("--remain-lr, --separate-forget-optimizer and --mask-remain-step apply to --method ron "
                            "(two steps) only")
        check_ema_decay(self.ema_decay, self.n_iters)

    def forget_alpha_at(self, step):
        """alpha_k of step k: the forget weight, or its cosine decay."""
        return forget_alpha_at(step, self.n_iters, self.forget_alpha, self.decay_forget_alpha)

    @property
    def needs_frozen_model(self):
        """ESD's target, the distilled remain term and the EWC penalty need the original model, frozen."""
        return self.unlearn_loss == "esd" or self.remain_loss == "distill" or self.ewc_lambda > 0


@dataclass
class FrozenReference:
    """The original model, frozen: ESD's targets come from it, and the EWC penalty pulls towards its weights with
    the Fisher diagonal `fisher` (of remain-class samples it generated) as weights."""
    model: Optional[torch.nn.Module] = None
    fisher: Optional[dict] = None


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
    """L_forget to minimise from the per-sample losses of the forget batch."""
    if unlearn_loss in DESCENT_LOSSES or unlearn_loss in ("salun", "esd"):
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


def eps_prediction(model, diffusion, batch, labels, drop):
    """The model's noise prediction (b, C, H, W) at x_t = q_sample(batch.x, batch.t, batch.noise)."""
    x_t = diffusion.q_sample(batch.x, batch.t, noise=batch.noise)
    return model(x_t, batch.t, labels, force_drop_ids=drop)[:, :batch.x.shape[1]]


def mean_flat_square(x):
    """Per-sample mean of squares (b,)."""
    return x.float().square().flatten(1).mean(1)


def ewc_penalty(named_params, reference):
    """sum_i F_i (theta_i - theta*_i)^2 over the trainable weights (the EWC term of Selective Amnesia)."""
    anchor = dict(reference.model.named_parameters())
    return sum((reference.fisher[n] * (p - anchor[n]).square()).sum() for n, p in named_params)


def concat_batches(a, b):
    """One batch holding the samples of a, then those of b (one forward pass for both)."""
    return Batch(x=torch.cat([a.x, b.x]), y=torch.cat([a.y, b.y]), t=torch.cat([a.t, b.t]),
                 noise=torch.cat([a.noise, b.noise]), drop=torch.cat([a.drop, b.drop]), step=a.step)


def apply_mask_(named_params, mask):
    """Multiplies each gradient elementwise by its saliency mask. Weights outside the mask then get no gradient;
    an AdamW step still moves them by the momentum its moments hold from unmasked steps."""
    pairs = [(p.grad, mask[name]) for name, p in named_params if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])  # one launch per group, not per tensor


class Unlearner:
    """
    The model, optimizer, saliency mask and settings of one unlearning run; step() takes one step of
    settings.method on a forget and a remain batch. model may be DDP-wrapped: the mask and the optimizer use the
    module inside, whose parameter names are the official ones. `reference` holds the frozen original model where
    the settings need it (ESD, EWC).
    """

    def __init__(self, model, diffusion, settings, dist, mask=None, reference=None, optimizer=None):
        if settings.needs_frozen_model and (reference is None or reference.model is None or
                                            (settings.ewc_lambda > 0 and reference.fisher is None)):
            raise UserError(f"--unlearn-loss {settings.unlearn_loss}, --remain-loss {settings.remain_loss} and "
                            f"--ewc-lambda {settings.ewc_lambda} need the frozen original model"
                            f"{' and its replay Fisher' if settings.ewc_lambda else ''}")
        self.model, self.diffusion, self.settings, self.dist, self.mask = model, diffusion, settings, dist, mask
        self.reference = reference
        self.raw_model = getattr(model, "module", model)
        self.named = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.opt = optimizer if optimizer is not None else make_optimizer(self.params, settings.lr)
        # Own moments keep the forget step inside its mask: AdamW moves a weight whose masked gradient is 0 by the
        # momentum the shared moments carry from the remain steps, so a shared optimizer frees every weight.
        self.forget_opt = make_optimizer(self.params, settings.lr) if settings.separate_forget_optimizer else self.opt
        num_classes = self.raw_model.num_classes
        self.relabel = {"rl": relabel_class(settings.forget_class, num_classes),
                        "salun": (settings.forget_class + 1) % num_classes}.get(settings.unlearn_loss)
        self.amp = dict(device_type=dist.device.type, dtype=autocast_dtype(settings.precision),
                        enabled=settings.precision == "bf16")

    def ascent_paused(self, batch, f_losses):
        """Whether this step's ascent is skipped: above --forget-loss-ceiling, or past --null-label-stop."""
        return self.above_ceiling(f_losses) or self.label_no_longer_helps(batch, f_losses)

    def label_no_longer_helps(self, batch, f_losses):
        """
        --null-label-stop R: whether the forget batch's loss under its label is at least R times its loss under
        the null label (the same x_t, t and noise; no gradient). Past that point classifier-free guidance towards
        the forget label steers away from the forget images, and further ascent only costs the remain classes.
        """
        ratio = self.settings.null_label_stop
        if ratio is None:
            return False
        with torch.no_grad(), torch.autocast(**self.amp):
            null = diffusion_loss(self.model, self.diffusion, batch, force_drop_ids=torch.ones_like(batch.drop))
        total = self.dist.all_reduce_sum_(torch.stack([f_losses.detach().float().sum(), null.float().sum()]))
        return bool(total[0] >= ratio * total[1])

    def above_ceiling(self, f_losses):
        """
        Whether the ascent pauses this step: the forget batch's global mean loss is above --forget-loss-ceiling.
        Once the class is gone its loss keeps climbing under ascent, and every further ascent step only damages
        weights the remain classes share; the remain step still runs and may bring the loss back under.
        """
        ceiling = self.settings.forget_loss_ceiling
        if ceiling is None:
            return False
        total = torch.stack([f_losses.detach().float().sum(), torch.tensor(float(f_losses.numel()),
                                                                           device=f_losses.device)])
        total = self.dist.all_reduce_sum_(total)  # every process decides alike
        return bool(total[0] / total[1] > ceiling)

    def _optimizer_step(self, loss, masked, lr=None):
        """zero_grad, backward, then (masked=True: the forget step) the saliency mask, the global-norm clip and
        the forget optimizer's step; otherwise the optimizer's step, masked with --mask-remain-step. lr: this
        step's learning rate (None: the optimizer's own)."""
        opt = self.forget_opt if masked else self.opt
        own_rates = [group["lr"] for group in opt.param_groups]
        if lr is not None:  # for this step only: a shared optimizer's next forget step keeps its rate
            for group in opt.param_groups:
                group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if (masked or self.settings.mask_remain_step) and self.mask is not None:
            apply_mask_(self.named, self.mask)
        if masked and self.settings.grad_clip is not None and self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        opt.step()
        for group, rate in zip(opt.param_groups, own_rates):
            group["lr"] = rate

    def forget_losses(self, batch):
        """Per-sample losses of the forget term (b,): diffusion losses (ga, adaga, rl, sa) or the distance of the
        noise prediction to SalUn's or ESD's target."""
        s = self.settings
        if s.unlearn_loss in ("ga", "adaga", "rl"):
            labels, drop = forget_conditioning(batch, s.unlearn_loss, s.forget_label_dropout, self.relabel)
            return diffusion_loss(self.model, self.diffusion, batch, labels=labels, force_drop_ids=drop)
        keep = torch.zeros_like(batch.drop)  # the forget label itself, never dropped
        if s.unlearn_loss == "sa":  # the batch holds surrogate images under the forget label
            return diffusion_loss(self.model, self.diffusion, batch, force_drop_ids=keep)
        eps = eps_prediction(self.model, self.diffusion, batch, batch.y, keep)
        with torch.no_grad():
            if s.unlearn_loss == "salun":  # the same model's prediction under another class, without gradient
                target = eps_prediction(self.model, self.diffusion, batch, torch.full_like(batch.y, self.relabel), keep)
            else:  # esd: eps*(x, null) - eta (eps*(x, c) - eps*(x, null)) of the frozen original
                frozen = self.reference.model
                cond = eps_prediction(frozen, self.diffusion, batch, batch.y, keep)
                null = eps_prediction(frozen, self.diffusion, batch, batch.y, torch.ones_like(batch.drop))
                target = null - s.esd_eta * (cond - null)
        return mean_flat_square(eps - target.detach())

    def remain_losses(self, batch):
        """Per-sample losses of the remain batch (b,), with its label dropout: the diffusion loss, or (distill) the
        distance of the noise prediction to the frozen original's at the same x_t, t and label."""
        if self.settings.remain_loss == "diffusion":
            return diffusion_loss(self.model, self.diffusion, batch, force_drop_ids=batch.drop)
        eps = eps_prediction(self.model, self.diffusion, batch, batch.y, batch.drop)
        with torch.no_grad():
            target = eps_prediction(self.reference.model, self.diffusion, batch, batch.y, batch.drop)
        # 0 at the original weights: it pulls back only what the forget steps moved, without the noise of fitting
        # the data again (the original already fits it)
        return mean_flat_square(eps - target)

    def _remain_objective(self, r_losses):
        """remain_alpha * L_remain (+ the EWC penalty)."""
        loss = self.settings.remain_alpha * r_losses.mean() if r_losses is not None else 0.0
        if self.settings.ewc_lambda > 0:
            loss = loss + self.settings.ewc_lambda * ewc_penalty(self.named, self.reference)
        return loss

    def step(self, forget_batch, remain_batch, alpha):
        """
        One step with forget weight alpha; returns the mean forget and remain losses of the global batch (0 for a
        term with weight 0, which is skipped). The losses are checked once, at the end, from their global means:
        one host sync per step, and every process stops together (a non-finite loss on one process makes the
        all-reduced gradient and means non-finite on all; nothing has been saved from the bad weights).
        """
        s = self.settings
        use_forget, use_remain = alpha != 0, s.remain_alpha != 0
        f_losses = r_losses = None
        if s.method == "ron":
            if use_forget:
                with torch.autocast(**self.amp):
                    f_losses = self.forget_losses(forget_batch)
                    f_loss = forget_objective(f_losses, s.unlearn_loss, self.dist, s.lambd)
                if not self.ascent_paused(forget_batch, f_losses):
                    self._optimizer_step(alpha * f_loss, masked=True)             # fast: forget
            if use_remain or s.ewc_lambda > 0:
                with torch.autocast(**self.amp):                                   # at the updated weights
                    r_losses = self.remain_losses(remain_batch) if use_remain else None
                    r_loss = self._remain_objective(r_losses)
                self._optimizer_step(r_loss, masked=False, lr=s.remain_lr)         # slow: remain
        elif s.method == "joint":  # one masked and clipped step on every term
            with torch.autocast(**self.amp):
                loss, f_losses, r_losses = self._joint_loss(forget_batch, remain_batch, alpha)
            if torch.is_tensor(loss):  # not when the forget term alone is paused at its ceiling
                self._optimizer_step(loss, masked=True)
        else:
            raise UserError(f"unknown --method {s.method}; choose from {', '.join(METHODS)}")
        return self._global_means(f_losses, r_losses, forget_batch.step)

    def _joint_loss(self, forget_batch, remain_batch, alpha):
        """(alpha L_forget + remain_alpha L_remain + EWC, forget losses, remain losses) for the joint step."""
        s = self.settings
        f_losses = r_losses = None
        loss = 0.0
        if alpha != 0 and s.remain_alpha != 0 and s.unlearn_loss in ("ga", "adaga", "rl") and \
                s.remain_loss == "diffusion":
            # both diffusion losses from one forward pass
            labels, drop = forget_conditioning(forget_batch, s.unlearn_loss, s.forget_label_dropout, self.relabel)
            both = concat_batches(forget_batch, remain_batch)
            losses = diffusion_loss(self.model, self.diffusion, both, labels=torch.cat([labels, remain_batch.y]),
                                    force_drop_ids=torch.cat([drop, remain_batch.drop]))
            n = forget_batch.y.shape[0]
            f_losses, r_losses = losses[:n], losses[n:]
        else:
            if alpha != 0:
                f_losses = self.forget_losses(forget_batch)
            if s.remain_alpha != 0:
                r_losses = self.remain_losses(remain_batch)
        if f_losses is not None and not self.ascent_paused(forget_batch, f_losses):
            loss = alpha * forget_objective(f_losses, s.unlearn_loss, self.dist, s.lambd)
        return loss + self._remain_objective(r_losses), f_losses, r_losses

    def _global_means(self, f_losses, r_losses, step):
        """The mean forget and remain losses over the global batch (0 for a skipped term), checked for finiteness."""
        zero = torch.zeros((), device=self.dist.device)
        means = torch.stack([f_losses.detach().float().mean() if f_losses is not None else zero,
                             r_losses.detach().float().mean() if r_losses is not None else zero])
        f_mean, r_mean = (self.dist.all_reduce_sum_(means) / self.dist.world_size).tolist()
        check_finite(f_mean, "forget loss", step, NON_FINITE_HINT)
        check_finite(r_mean, "remain loss", step, NON_FINITE_HINT)
        return f_mean, r_mean
