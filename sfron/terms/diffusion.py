"""The paper's remain term: the DiT diffusion loss of the remain images."""
from ..loss import diffusion_loss
from .base import RemainLoss


class DiffusionRemain(RemainLoss):
    """mean_i L(x_i, y_i) over the remain batch, with its label dropout."""
    name = "diffusion"

    def conditioning(self, batch):
        return batch.y, batch.drop

    def losses(self, run, batch, target):
        return diffusion_loss(run.model, run.diffusion, batch, force_drop_ids=batch.drop)
