"""
UNO (Unlearning via Orthogonalization, arXiv 2506.04712): the forget label learns an exchange class's images while
the gradient of the real forget images is kept orthogonal to the step's.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..loss import diffusion_loss
from ..utils import UserError
from .base import ForgetLoss, concat_batches, exchange_class, kept_labels


def squared_cosine(a, b):
    """(a . b)^2 / (|a|^2 |b|^2), in float32, of two gradients given as a tensor (or None) per parameter."""
    pairs = [(x.float(), y.float()) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:  # neither term reaches a weight
        return 0.0
    dot = sum((x * y).sum() for x, y in pairs)
    norms = sum(x.square().sum() for x, _ in pairs) * sum(y.square().sum() for _, y in pairs)
    return dot.square() / (norms + 1e-12)


class UNO(ForgetLoss):
    """
    One joint step on: the exchange class's images (the remain set) under the forget label, weighted by alpha, plus
    the same images under their own label, weighted by remain_alpha, plus --uno-weight times the squared cosine
    between the gradient of the forget images' diffusion loss and the gradient of those two terms, differentiated
    through (a double backward pass), as in UNO's code; no label is dropped. Both labels share one x_t and t.
    """
    name = "uno"

    @property
    def other_class(self):
        return exchange_class(self.forget_class, self.num_classes)

    def describe(self):
        return (f"uno: the exchange class is {self.other_class}: its images are the remain set, learnt under their "
                f"own label and under the forget label")

    def check(self, step):
        if step.method != "joint":
            raise UserError("--unlearn-loss uno is one step on UNO's whole objective: use --method joint")
        if self.settings.uno_weight < 0:
            raise UserError(f"--uno-weight must not be negative, got {self.settings.uno_weight}")

    def remain_data(self, images):
        return images.only_class(self.other_class)

    def joint_loss(self, run, forget_batch, remain_batch, alpha):
        if run.dist.world_size > 1:
            raise UserError("--unlearn-loss uno differentiates its gradients (a double backward pass), which DDP "
                            "does not support: run it on one process")
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
            return self._terms(run, forget_batch, remain_batch, alpha)

    def _terms(self, run, forget_batch, remain_batch, alpha):
        """joint_loss()'s value, under an attention that can be differentiated twice."""
        keep, remain_alpha = kept_labels(remain_batch), run.settings.remain.remain_alpha
        forget_label = torch.full_like(remain_batch.y, self.forget_class)
        both = diffusion_loss(run.model, run.diffusion, concat_batches(remain_batch, remain_batch),
                              labels=torch.cat([forget_label, remain_batch.y]), force_drop_ids=torch.cat([keep, keep]))
        f_losses, r_losses = both.chunk(2)
        step_loss = alpha * f_losses.mean() + remain_alpha * r_losses.mean()
        if self.settings.uno_weight == 0:
            return step_loss, f_losses, r_losses
        forget_loss = diffusion_loss(run.model, run.diffusion, forget_batch,
                                     force_drop_ids=kept_labels(forget_batch)).mean()
        forget_grads = torch.autograd.grad(forget_loss, run.params, create_graph=True, allow_unused=True)
        step_grads = torch.autograd.grad(step_loss, run.params, create_graph=True, allow_unused=True)
        return step_loss + self.settings.uno_weight * squared_cosine(forget_grads, step_grads), f_losses, r_losses
