"""GA: gradient ascent on the forget images' diffusion loss (SFR-on's forget term)."""
from .base import DiffusionForgetLoss


class GradientAscent(DiffusionForgetLoss):
    """L_forget = -mean_i L(x_i, y_i), with DiT's label dropout as training mode gives it."""
    name = "ga"
    adversarial = True

    def objective(self, losses, dist):
        return -losses.mean()
