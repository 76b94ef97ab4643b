"""
The interface of a forget term (what the forget step minimises) and of a remain term (what the remain step
minimises), and the pieces several terms share. A term says what it needs (the frozen original, another class, its
own data), computes the frozen original's targets it uses and its per-sample losses on a batch, and checks its own
settings; the step (sfron/unlearn.py) names no term.
"""
import torch

from ..data import Batch
from ..loss import diffusion_loss


def concat_batches(a, b):
    """One batch holding the samples of a, then those of b (one forward pass for both)."""
    return Batch(x=torch.cat([a.x, b.x]), y=torch.cat([a.y, b.y]), t=torch.cat([a.t, b.t]),
                 noise=torch.cat([a.noise, b.noise]), drop=torch.cat([a.drop, b.drop]), step=a.step)


def eps_prediction(model, diffusion, batch, labels, drop):
    """The model's noise prediction (b, C, H, W) at x_t = q_sample(batch.x, batch.t, batch.noise)."""
    x_t = diffusion.q_sample(batch.x, batch.t, noise=batch.noise)
    return model(x_t, batch.t, labels, force_drop_ids=drop)[:, :batch.x.shape[1]]


def mean_flat_square(x):
    """Per-sample mean of squares (b,)."""
    return x.float().square().flatten(1).mean(1)


def exchange_class(forget_class, num_classes):
    """The other class SalUn's target and UNO's forget label take: the next one, (cls + 1) mod num_classes (UNO's
    ImageNet run exchanges 207 for 208)."""
    return (forget_class + 1) % num_classes


def kept_labels(batch):
    """Label-drop ids that keep every label of the batch (b,)."""
    return torch.zeros_like(batch.drop)


class Term:
    """What a forget and a remain term have in common: the frozen original's targets, the per-sample losses."""
    name = ""
    needs_original = False  # the frozen original model (its targets)

    def conditioning(self, batch):
        """(labels, label-drop ids) under which the term is the diffusion loss of the batch, or None for a term
        that is not (a forget and a remain term that both are share one forward pass in a joint step)."""
        return None

    def frozen_parts(self, batch):
        """[(batch, labels, label-drop ids)] the frozen original must predict for this term's target."""
        return []

    def target(self, predictions):
        """The target of the term from the frozen original's predictions of frozen_parts(), in order."""
        return None

    def losses(self, run, batch, target):
        """Per-sample losses of the batch (b,); run: the Unlearner (model, diffusion, adversary, settings)."""
        raise NotImplementedError


class ForgetLoss(Term):
    """
    One forget term. `settings` is the run's ForgetTerm settings (sfron/unlearn.py). Subclasses set what they need
    (needs_original: the frozen original model; adversarial: the term may also act under the adversarial label of
    --adversarial-steps) and override what differs.
    """
    adversarial = False

    def __init__(self, settings, num_classes):
        self.settings, self.num_classes = settings, num_classes
        self.forget_class = settings.forget_class

    @property
    def other_class(self):
        """The class the term trains the forget label (or images) towards, or None."""
        return None

    def describe(self):
        """The log line naming what the term does beyond its name, or None."""
        if self.other_class is None:
            return None
        return f"{self.name}: the forget images' other class is {self.other_class}"

    def check(self, step):
        """One clear error for settings this term cannot run with (step: the StepSettings)."""

    def forget_data(self, images, image_size, seed):
        """The images the forget batches are drawn from (the forget class's, by default)."""
        return images

    def remain_data(self, images):
        """The images the remain batches are drawn from (every other class's, by default)."""
        return images

    def objective(self, losses, dist):
        """L_forget to minimise from the per-sample losses: their mean, by default."""
        return losses.mean()

    def joint_loss(self, run, forget_batch, remain_batch, alpha):
        """(loss, forget losses, remain losses) of a term that is the whole joint objective, or None."""
        return None


class DiffusionForgetLoss(ForgetLoss):
    """A forget term that is the DiT diffusion loss of the forget images under conditioning() (with the
    adversarial label, the same loss under it is added)."""

    def conditioning(self, batch):
        return batch.y, batch.drop

    def losses(self, run, batch, target):
        labels, drop = self.conditioning(batch)
        if run.adversary is None:
            return diffusion_loss(run.model, run.diffusion, batch, labels=labels, force_drop_ids=drop)
        with run.adversary.label(run.raw_model) as adversarial:  # both labels in one forward pass
            both = diffusion_loss(run.model, run.diffusion, concat_batches(batch, batch),
                                  labels=torch.cat([labels, torch.full_like(labels, adversarial)]),
                                  force_drop_ids=torch.cat([drop, torch.zeros_like(drop)]))
        return sum(both.chunk(2))


class TargetForgetLoss(ForgetLoss):
    """A forget term that is the distance of the forget label's noise prediction (never dropped) to a target (with
    the adversarial label, the distance under it is added)."""

    def losses(self, run, batch, target):
        keep = kept_labels(batch)
        if run.adversary is None:
            return mean_flat_square(eps_prediction(run.model, run.diffusion, batch, batch.y, keep) - target)
        with run.adversary.label(run.raw_model) as adversarial:  # the same target under the adversarial label
            both = eps_prediction(run.model, run.diffusion, concat_batches(batch, batch),
                                  torch.cat([batch.y, torch.full_like(batch.y, adversarial)]), torch.cat([keep, keep]))
        return sum(mean_flat_square(eps - target) for eps in both.chunk(2))


class RemainLoss(Term):
    """One remain term, weighted by remain_alpha; its losses are those of the remain batch, with its label dropout."""
