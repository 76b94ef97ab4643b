"""AdaGA: adaptive gradient ascent, weighting the forget samples not yet forgotten more (SFR-on's paper)."""
import torch

from .base import DiffusionForgetLoss

LAMBDA = 0.5  # the paper's lambda of the weights 1 / loss^lambda
EPS = 1e-15


class AdaptiveGradientAscent(DiffusionForgetLoss):
    """L_forget = -mean_i w_i l_i with c_i = 1 / (l_i^lambda + eps) (no gradient) and w_i = n c_i / sum_j c_j over
    the global batch."""
    name = "adaga"
    adversarial = True
    lambd = LAMBDA

    def objective(self, losses, dist):
        coef = 1.0 / (losses.detach().float().pow(self.lambd) + EPS)  # a small loss (not yet forgotten) weighs more
        count = torch.tensor(float(coef.numel()), device=coef.device)
        totals = dist.all_reduce_sum_(torch.stack([coef.sum(), count]))  # over the global batch
        weights = totals[1] * coef / totals[0]
        return -(weights * losses).mean()
