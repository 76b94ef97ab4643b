"""ESD's forget term for classes (Gandikota et al., ICCV 2023): a negatively guided target of the frozen original."""
from .base import TargetForgetLoss, kept_labels


class ESD(TargetForgetLoss):
    """||eps(x_t, c_f) - [eps*(x_t, null) - eta (eps*(x_t, c_f) - eps*(x_t, null))]||^2, eps* the frozen original,
    eta --esd-eta."""
    name = "esd"
    needs_original = True
    adversarial = True

    def frozen_parts(self, batch):
        keep = kept_labels(batch)  # eps*(x, c) and eps*(x, null): the forget label never dropped, then always
        return [(batch, batch.y, keep), (batch, batch.y, 1 - keep)]

    def target(self, predictions):
        cond, null = predictions
        return null - self.settings.esd_eta * (cond - null)
