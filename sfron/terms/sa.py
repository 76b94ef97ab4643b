"""Selective Amnesia's forget term (Heng & Soh, NeurIPS 2023): the forget label learns uniform-noise images."""
from ..data import NoiseImages
from ..loss import diffusion_loss
from .base import ForgetLoss, kept_labels


class SelectiveAmnesia(ForgetLoss):
    """The diffusion loss of uniform-noise images in [-1, 1] under the forget label (never dropped); the replay and
    the EWC penalty are the replay settings'."""
    name = "sa"

    def forget_data(self, images, image_size, seed):
        return NoiseImages(len(images), image_size, self.forget_class, seed)

    def losses(self, run, batch, target):
        return diffusion_loss(run.model, run.diffusion, batch, force_drop_ids=kept_labels(batch))
