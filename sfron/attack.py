"""
Is the class really gone? Two attacks that try to bring a forgotten class back, each measured by how often a
classifier sees the forget class in what the attacked model then draws, with the retrained model as the yardstick.

- Label inversion: the DiT frozen, one new label embedding (a row of the label table's format) is optimised on a
  few forget-class images with the ordinary diffusion loss (as textual inversion recovers erased concepts in
  text-to-image models, Pham et al., ICLR 2024); then the model samples with that label.
- Relearning: a copy of the model is fine-tuned on the same few images with their own label and the ordinary
  loss; the forget label is sampled after each budget of steps.
"""
from copy import deepcopy
from dataclasses import dataclass
from typing import Tuple

import torch

from .data import Batch
from .loss import diffusion_loss
from .rng import generator
from .vae import encode_moments, sample_latents

ATTACKS = ("inversion", "relearning")


@dataclass(frozen=True)
class AttackSettings:
    """The attacker's budget: how many images, which step counts are measured, learning rates, the seed."""
    forget_class: int
    inversion_steps: Tuple[int, ...] = (0, 50, 100, 200)
    inversion_lr: float = 5e-3
    relearn_steps: Tuple[int, ...] = (0, 10, 25, 50)
    relearn_lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0


class AttackImages:
    """The attacker's forget-class images (N, 3, H, W) in [-1, 1], as the DiT sees them (VAE posterior moments)."""

    def __init__(self, images, vae):
        if vae is None:
            self.mean, self.std = images, torch.zeros_like(images)
        else:
            self.mean, self.std = encode_moments(vae, images)

    def __len__(self):
        return len(self.mean)

    def batch(self, settings, step, label, num_timesteps):
        """The Batch of attack step `step`: which images, the timesteps and noise, all from (seed, step)."""
        g = generator(settings.seed, "attack/draws", step)
        chosen = torch.randperm(len(self), generator=g)[:settings.batch_size]
        mean, std = self.mean[chosen], self.std[chosen]
        x = sample_latents(mean.cpu(), std.cpu(), torch.randn(mean.shape, generator=g)).to(mean.device)
        n = len(chosen)
        return Batch(x=x, y=torch.full((n,), label, device=x.device),
                     t=torch.randint(0, num_timesteps, (n,), generator=g).to(x.device),
                     noise=torch.randn(x.shape, generator=g).to(x.device),
                     drop=torch.zeros(n, dtype=torch.long, device=x.device), step=step)


class ExtraLabel:
    """
    Within `with ExtraLabel(model, embedding) as label:` the DiT takes one more label, num_classes + 1, whose
    embedding is `embedding` (D,); the label table itself is untouched (hooks swap the row in).
    """

    def __init__(self, model, embedding):
        self.embedder, self.embedding = model.y_embedder, embedding
        self.label = model.num_classes + 1
        self._hooks, self._mask = [], None

    def _before(self, module, inputs):
        """The new label becomes label 0 for the table lookup (its row is replaced afterwards)."""
        labels = inputs[0]
        self._mask = labels == self.label
        return (torch.where(self._mask, torch.zeros_like(labels), labels), *inputs[1:])

    def _after(self, module, inputs, output):
        """The embedding in the rows of the new label."""
        return torch.where(self._mask[:, None], self.embedding.to(output.dtype), output)

    def __enter__(self):
        self._hooks = [self.embedder.register_forward_pre_hook(self._before),
                       self.embedder.register_forward_hook(self._after)]
        return self.label

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


def measured_steps(budgets):
    """The sorted distinct step counts, and the last."""
    budgets = sorted(set(budgets))
    return budgets, budgets[-1]


def label_inversion(model, diffusion, images, settings, forget_rate):
    """
    {steps: forget_rate(model, label, steps)} for each inversion budget: a new label's embedding, started from the null
    label's, optimised with Adam on the diffusion loss of the images; no weight of the model changes.
    """
    budgets, last = measured_steps(settings.inversion_steps)
    table = model.y_embedder.embedding_table.weight
    embedding = table[model.num_classes].detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=settings.inversion_lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval().requires_grad_(False)  # gradients reach the embedding only
    results = {}
    try:
        with ExtraLabel(model, embedding) as label:
            for step in range(last + 1):
                if step in budgets:
                    results[step] = forget_rate(model, label, step)
                if step == last:
                    break
                batch = images.batch(settings, step, label, diffusion.num_timesteps)
                loss = diffusion_loss(model, diffusion, batch).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return results


def relearning(model, diffusion, images, settings, forget_rate):
    """
    {steps: forget_rate(copy, forget class, steps)} for each relearning budget: a copy of the model fine-tuned
    with AdamW on the images under their own label (no label dropout); the model itself is left as it was.
    """
    budgets, last = measured_steps(settings.relearn_steps)
    copy = deepcopy(model).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(copy.parameters(), lr=settings.relearn_lr, weight_decay=0)
    results = {}
    for step in range(last + 1):
        if step in budgets:
            results[step] = forget_rate(copy, settings.forget_class, step)
        if step == last:
            break
        batch = images.batch(settings, step, settings.forget_class, diffusion.num_timesteps)
        loss = diffusion_loss(copy, diffusion, batch, force_drop_ids=batch.drop).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return results
