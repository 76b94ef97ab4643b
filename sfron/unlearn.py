"""
The SFR-on update (SPEC section 3). Each step of `ron` is a fast, masked and clipped forget step followed by a
slow remain step taken at the weights just updated: the remain gradient there, g_r(theta + d), carries the
remain Hessian times the forget update, so the pair follows the remain-preserving manifold without ever
forming a Hessian. `joint` takes one step on the sum of both losses instead.
"""
import math

import torch

from .data import Batch
from .fisher import diffusion_loss
from .utils import UserError

FORGET_LOSSES = ("ga", "adaga", "rl")
METHODS = ("ron", "joint")
ADAGA_EPS = 1e-15


def forget_alpha_at(step, n_iters, forget_alpha, decay):
    """alpha_k: constant, or with decay the cosine schedule alpha * (1 + cos(pi k / K)) / 2."""
    if not decay:
        return forget_alpha
    return forget_alpha * (1 + math.cos(math.pi * step / n_iters)) / 2


def relabel_class(forget_class, num_classes):
    """The label `rl` trains forget images under: the official (cls + 100) % num_classes, never cls itself."""
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


def make_optimizer(params, lr):
    """
    AdamW without weight decay, as the official script. The fused kernel makes one pass over each tensor where
    the default makes several: the two optimizer steps of each ron step are memory-bound on large models.
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0, fused=fused)


def apply_mask_(named_params, mask):
    """Multiplies each gradient elementwise by its saliency mask (weights outside the mask stay frozen)."""
    pairs = [(p.grad, mask[name]) for name, p in named_params if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])  # one launch per group, not per tensor


def optimizer_step(loss, params, named_params, opt, mask=None, grad_clip=None):
    """zero_grad, backward, optional mask and global-norm clip, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if mask is not None:
        apply_mask_(named_params, mask)
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def check_finite(loss, what, step):
    """Stops the run with a clear error on a NaN or infinite loss."""
    if not math.isfinite(loss):
        raise UserError(f"non-finite {what} loss at step {step}: lower --lr or --forget-alpha "
                        f"(the last good checkpoint is kept)")


def check_finite_weights(model, step):
    """Refuses to go on from overflowed weights (a finite loss can still give an infinite gradient)."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise UserError(f"non-finite weights after step {step}: lower --lr or --forget-alpha "
                        f"(the last good checkpoint is kept)")


def unlearn_step(model, raw_model, diffusion, opt, forget_batch, remain_batch, *, method, unlearn_loss, alpha,
                 remain_alpha, mask, grad_clip, dist, forget_drop_labels=True, lambd=0.5, relabel=None,
                 autocast_dtype=None):
    """
    One SFR-on step on a forget and a remain batch; returns the mean forget and remain diffusion losses of the
    global batch.
    model may be DDP-wrapped (raw_model is the module inside, whose parameter names the mask uses).
    The losses are checked once, at the end, from their global means: one host sync per step, and every
    process stops together (a non-finite loss on one process makes the all-reduced gradient and means
    non-finite on all; nothing has been saved from the bad weights).
    """
    if method not in METHODS:
        raise UserError(f"unknown --method {method}; choose from {', '.join(METHODS)}")
    params = [p for p in raw_model.parameters() if p.requires_grad]
    named = [(n, p) for n, p in raw_model.named_parameters() if p.requires_grad]
    amp = dict(device_type=dist.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    f_labels, f_drop = forget_conditioning(forget_batch, unlearn_loss, forget_drop_labels, relabel)
    n_forget = forget_batch.y.shape[0]

    if method == "ron":
        with torch.autocast(**amp):
            f_losses = diffusion_loss(model, diffusion, forget_batch, labels=f_labels, force_drop_ids=f_drop)
            f_loss = forget_objective(f_losses, unlearn_loss, dist, lambd)
        optimizer_step(alpha * f_loss, params, named, opt, mask, grad_clip)        # fast: forget
        with torch.autocast(**amp):                                                 # at the updated weights
            r_losses = diffusion_loss(model, diffusion, remain_batch, force_drop_ids=remain_batch.drop)
        optimizer_step(remain_alpha * r_losses.mean(), params, named, opt)          # slow: remain
    else:  # joint: both losses from one forward pass, one masked and clipped step
        both = concat_batches(forget_batch, remain_batch)
        labels, drop = torch.cat([f_labels, remain_batch.y]), torch.cat([f_drop, remain_batch.drop])
        with torch.autocast(**amp):
            losses = diffusion_loss(model, diffusion, both, labels=labels, force_drop_ids=drop)
            f_losses, r_losses = losses[:n_forget], losses[n_forget:]
            loss = remain_alpha * r_losses.mean() + alpha * forget_objective(f_losses, unlearn_loss, dist, lambd)
        optimizer_step(loss, params, named, opt, mask, grad_clip)
    means = torch.stack([f_losses.detach().float().mean(), r_losses.detach().float().mean()])
    f_mean, r_mean = (dist.all_reduce_sum_(means) / dist.world_size).tolist()  # over the global batch
    check_finite(f_mean, "forget", forget_batch.step)
    check_finite(r_mean, "remain", remain_batch.step)
    return f_mean, r_mean
