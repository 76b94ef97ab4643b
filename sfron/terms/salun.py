"""SalUn's forget term (Fan et al., ICLR 2024): the forget label's prediction towards the model's own for another
class."""
import torch

from .base import TargetForgetLoss, eps_prediction, exchange_class, kept_labels


class SalUn(TargetForgetLoss):
    """||eps(x_t, c_f) - sg(eps(x_t, c'))||^2 with c' = (c_f + 1) mod K, the same model's prediction without
    gradient."""
    name = "salun"

    @property
    def other_class(self):
        return exchange_class(self.forget_class, self.num_classes)

    def losses(self, run, batch, target):
        with torch.no_grad():
            target = eps_prediction(run.model, run.diffusion, batch, torch.full_like(batch.y, self.other_class),
                                    kept_labels(batch))
        return super().losses(run, batch, target)
