"""
The label-inversion attack rehearsed inside the unlearning loop. A forget term that acts on the forget label alone
can hide the class behind the label: a new label embedding learned on a few forget images (attack.py) then draws it
as before. Here an adversarial embedding, started from the null label's as the attack's is, takes a few of the
attack's own Adam steps on each forget batch (the model frozen), and the forget term is also applied under it, so
that the class is unlearned wherever an embedding can reach it, not only under its label (adversarial unlearning,
as AdvUnlearn does for text-to-image models; the attack after Pham et al., ICLR 2024).
"""
import torch

from .attack import AttackSettings, ExtraLabel
from .loss import diffusion_loss

# The attack's optimizer and rate (attack.py's label inversion), so that the loop rehearses the attack it resists.
ADVERSARY_LR = AttackSettings.inversion_lr


class AdversarialLabel:
    """A label embedding (D,) that keeps learning to draw the forget images from the current model."""

    def __init__(self, model, steps_per_update, dist):
        table = model.y_embedder.embedding_table.weight
        self.embedding = table[model.num_classes].detach().clone().float().requires_grad_(True)  # the null label's
        self.optimizer = torch.optim.Adam([self.embedding], lr=ADVERSARY_LR)
        self.steps, self.dist = steps_per_update, dist

    def update(self, model, diffusion, batch):
        """`steps` Adam steps of the embedding on the diffusion loss of the batch's images under it; the weights of
        model get no gradient. The gradient is averaged over the processes, so every process keeps the same
        embedding."""
        raw_model = getattr(model, "module", model)
        with ExtraLabel(raw_model, self.embedding) as label:
            for _ in range(self.steps):
                labels = torch.full_like(batch.y, label)
                loss = diffusion_loss(raw_model, diffusion, batch, labels=labels,
                                      force_drop_ids=torch.zeros_like(batch.drop)).mean()
                (grad,) = torch.autograd.grad(loss, [self.embedding])
                self.embedding.grad = self.dist.all_reduce_sum_(grad.detach().clone()) / self.dist.world_size
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def label(self, model):
        """`with adversary.label(model) as label:` the model takes label `label` with the adversarial embedding
        (a constant: the forget term's gradient reaches the weights only)."""
        return ExtraLabel(getattr(model, "module", model), self.embedding.detach())

    def state_dict(self):
        return {"embedding": self.embedding.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.embedding.copy_(state["embedding"])
        self.optimizer.load_state_dict(state["optimizer"])
