"""RL: the forget images trained under another class's label."""
import torch

from .base import DiffusionForgetLoss


def relabel_class(forget_class, num_classes):
    """
    The label `rl` trains forget images under: the official (cls + 100) % num_classes, except where that is the
    forget class itself (every class of a model with 100 classes or a divisor of 100), then (cls + 1) % num_classes.
    """
    target = (forget_class + 100) % num_classes
    return target if target != forget_class else (forget_class + 1) % num_classes


class Relabel(DiffusionForgetLoss):
    """L_forget = +mean_i L(x_i, y'), y' = relabel_class()."""
    name = "rl"

    @property
    def other_class(self):
        return relabel_class(self.forget_class, self.num_classes)

    def conditioning(self, batch):
        return torch.full_like(batch.y, self.other_class), batch.drop
