"""The distilled remain term: the remain images' noise prediction pulled back to the frozen original's."""
from .base import RemainLoss, eps_prediction, mean_flat_square


class DistilledRemain(RemainLoss):
    """||eps(x_t, y) - eps*(x_t, y)||^2 at the same x_t, t and label (dropout included), eps* the frozen original:
    0 at the original weights, so it pulls back only what the forget steps moved, without the noise of fitting the
    data again (the original already fits it)."""
    name = "distill"
    needs_original = True

    def frozen_parts(self, batch):
        return [(batch, batch.y, batch.drop)]

    def target(self, predictions):
        return predictions[0]

    def losses(self, run, batch, target):
        return mean_flat_square(eps_prediction(run.model, run.diffusion, batch, batch.y, batch.drop) - target)
