"""
The registry of forget and remain terms: --unlearn-loss and --remain-loss name one of each. A new term is one file
in this folder and one line here.
"""
from ..utils import UserError
from .adaga import AdaptiveGradientAscent
from .base import ForgetLoss, RemainLoss
from .diffusion import DiffusionRemain
from .distill import DistilledRemain
from .esd import ESD
from .ga import GradientAscent
from .rl import Relabel
from .sa import SelectiveAmnesia
from .salun import SalUn
from .uno import UNO

FORGET_TERMS = {t.name: t for t in (GradientAscent, AdaptiveGradientAscent, Relabel, SalUn, SelectiveAmnesia, ESD,
                                    UNO)}
REMAIN_TERMS = {t.name: t for t in (DiffusionRemain, DistilledRemain)}
FORGET_LOSSES, REMAIN_LOSSES = tuple(FORGET_TERMS), tuple(REMAIN_TERMS)
ADVERSARIAL_LOSSES = tuple(name for name, t in FORGET_TERMS.items() if t.adversarial)


def forget_term(settings, num_classes):
    """The ForgetLoss of a run's ForgetTerm settings on a model of num_classes classes."""
    if settings.unlearn_loss not in FORGET_TERMS:
        raise UserError(f"--unlearn-loss must be one of {', '.join(FORGET_LOSSES)}, got {settings.unlearn_loss}")
    return FORGET_TERMS[settings.unlearn_loss](settings, num_classes)


def remain_term(settings):
    """The RemainLoss of a run's RemainTerm settings."""
    if settings.remain_loss not in REMAIN_TERMS:
        raise UserError(f"--remain-loss must be one of {', '.join(REMAIN_LOSSES)}, got {settings.remain_loss}")
    return REMAIN_TERMS[settings.remain_loss]()


__all__ = ["FORGET_TERMS", "REMAIN_TERMS", "FORGET_LOSSES", "REMAIN_LOSSES", "ADVERSARIAL_LOSSES", "ForgetLoss",
           "RemainLoss", "forget_term", "remain_term"]
