"""
Three steps of every recipe and every baseline of the comparison on a tiny DiT, as the golden record that
tests/test_terms.py compares against: the weights after the steps and each step's (forget, remain) losses.
`tests/fixtures/first_steps.safetensors` was written by `python tests/first_steps.py` from the code before the
forget terms moved into sfron/terms/ (its metadata names the commit); a change of the code that moves any of these
numbers fails the test.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from helpers import ROOT, tiny_train_dit, toy_batch  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from sfron.dist import Dist  # noqa: E402
from sfron.recipes import RECIPES  # noqa: E402
from sfron.unlearn import FrozenReference, Unlearner, UnlearnSettings  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "first_steps.safetensors")
STEPS = 3
JOINT = {"method": "joint"}
# The comparison's baselines (bench/protocol.py) as settings fields, and the two other ascent terms
BASELINES = {
    "ga": {**JOINT, "unlearn_loss": "ga", "remain_alpha": 0.0},
    "ft": {**JOINT, "forget_alpha": 0.0},
    "rl": {**JOINT, "unlearn_loss": "rl"},
    "salun": {**JOINT, "unlearn_loss": "salun"},
    "sa": {**JOINT, "unlearn_loss": "sa", "replay_samples": 4, "ewc_lambda": 10.0},
    "esd": {**JOINT, "unlearn_loss": "esd", "remain_alpha": 0.0},
    "uno": {**JOINT, "unlearn_loss": "uno", "grad_clip": 0.0},
    "adaga": {"unlearn_loss": "adaga"},
    "ga+diffusion-joint": {**JOINT, "unlearn_loss": "ga"},
    "salun+distill": {**JOINT, "unlearn_loss": "salun", "remain_loss": "distill"},
    "rl+distill": {**JOINT, "unlearn_loss": "rl", "remain_loss": "distill"},
    "sa+distill": {**JOINT, "unlearn_loss": "sa", "replay_samples": 4, "ewc_lambda": 10.0, "remain_loss": "distill"},
}
MASKED = {"official", "masked-esd-distill", "adversarial-esd-distill", "salun-distill", "salun", "salun+distill"}
# Recipes added after the fixture was written, recorded under the baseline whose settings they are (at this file's rate)
RECORDED_AS = {"salun-distill": "salun+distill"}


def cases():
    """{name: settings fields}: every recipe at its own values, then the baselines."""
    recipes = {name: {k: v for k, v in r.values.items() if k in UnlearnSettings.field_names()}
               for name, r in RECIPES.items()}
    return {**recipes, **BASELINES}


def run_case(name):
    """{"w.<param>": weights after STEPS steps, "losses": (STEPS, 2)} of one case, from fixed seeds, on one thread
    (the fixture was recorded so: bit-identity holds for one reduction order, and the thread count changes it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_case(name)
    finally:
        torch.set_num_threads(threads)


def _run_case(name):
    """run_case() on the threads set."""
    fields = {**cases()[name], "forget_class": 0, "lr": 1e-2, "remain_lr": None, "batch_size": 2}
    if name in RECIPES and RECIPES[name].values["remain_lr"] is not None:
        fields["remain_lr"] = 5e-3
    settings = UnlearnSettings.from_fields(fields)
    settings.check()
    model, original = tiny_train_dit(seed=0), tiny_train_dit(seed=0)
    original.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mask = {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in named} if name in MASKED else None
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in named}
    reference = FrozenReference(model=original, fisher=fisher)
    unlearner = Unlearner(model, create_diffusion(""), settings, Dist(), mask, reference)
    losses = []
    for k in range(STEPS):
        drop = torch.tensor([0, 1])
        forget_batch = toy_batch(10 + k, 0, drop=drop)
        remain_batch = toy_batch(20 + k, 1 + k % 2, drop=drop)
        losses.append(unlearner.step(forget_batch, remain_batch, settings.forget_alpha_at(k)))
    out = {f"w.{n}": p.detach().clone() for n, p in named}
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    return out


def record(commit):
    """Writes the fixture from the code as it is."""
    from safetensors.torch import save_file
    tensors = {f"{name}/{key}": value for name in cases() if name not in RECORDED_AS
               for key, value in run_case(name).items()}
    save_file(tensors, FIXTURE, metadata={"commit": commit, "steps": str(STEPS)})
    print(f"wrote {len(cases())} cases to {FIXTURE}")


if __name__ == "__main__":
    record(sys.argv[1])
