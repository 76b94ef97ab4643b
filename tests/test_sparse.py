"""A run confined to the mask keeps the free entries' state only (sfron/sparse.py) and computes the dense run's
numbers."""
import copy

import pytest
import torch

from diffusion import create_diffusion
from helpers import tiny_train_dit, toy_batch
from sfron.dist import Dist
from sfron.recipes import get_recipe
from sfron.sparse import MaskedAdamW
from sfron.unlearn import FrozenReference, Unlearner


LR = 1e-2


class DenseUnlearner(Unlearner):
    """Today's Unlearner with whole-tensor optimizer moments and a second, frozen model."""
    sparse_state = False


def recipe(name, **over):
    """The UnlearnSettings of a recipe (class 0, batch 4), with overrides."""
    return get_recipe(name).settings({"forget_class": 0, "batch_size": 4, "lr": LR, **over})


def half_mask(model):
    """A mask that frees a random third of every tensor."""
    g = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=g) < 1 / 3 for n, p in model.named_parameters() if p.requires_grad}


def make(cls, settings, mask):
    """An unlearner of class cls on the tiny DiT, with the frozen original where the settings need it."""
    model = tiny_train_dit()
    reference = FrozenReference(model=copy.deepcopy(model).eval().requires_grad_(False)) \
        if settings.needs_frozen_model else None
    return cls(model, create_diffusion(""), settings, Dist(), mask, reference)


def run(unlearner, steps, start=0):
    """steps ron steps on fixed toy batches; the losses."""
    return [unlearner.step(toy_batch(10 + k, 0, 4), toy_batch(50 + k, 1 + k % 2, 4), alpha=1.0)
            for k in range(start, start + steps)]


def weights(unlearner):
    return {n: p.detach().clone() for n, p in unlearner.named}


def assert_same_updates(a, b, start):
    """The two runs moved the weights alike, to float rounding: no entry 1e-3 of the rate apart (Adam divides each
    gradient by its own size, so an entry with a tiny gradient carries its rounding further). The attention's key
    bias is left out: softmax ignores it, so its gradient is rounding noise, which Adam scales up to steps of the
    rate in either direction."""
    wa, wb = weights(a), weights(b)
    assert sum(float((wb[n] - start[n]).abs().sum()) for n in start) > 0
    for n in start:
        keep = torch.ones_like(start[n], dtype=torch.bool)
        if n.endswith("attn.qkv.bias"):
            keep[start[n].shape[0] // 3:2 * start[n].shape[0] // 3] = False   # (q | k | v): the k rows
        torch.testing.assert_close(wa[n][keep], wb[n][keep], rtol=0, atol=1e-3 * LR, msg=n)


@pytest.mark.parametrize("settings", [recipe("adversarial-esd-distill"), recipe("masked-esd-distill"),
                                      recipe("official", mask_remain_step=True)],
                         ids=["adversarial-esd-distill", "masked-esd-distill", "official-masked-remain"])
def test_sparse_state_takes_the_dense_steps(settings):
    mask = half_mask(tiny_train_dit())
    sparse, dense = make(Unlearner, settings, mask), make(DenseUnlearner, settings, mask)
    start = weights(dense)
    torch.testing.assert_close(torch.tensor(run(sparse, 5)), torch.tensor(run(dense, 5)), rtol=1e-5, atol=1e-7)
    assert_same_updates(sparse, dense, start)
    for name, p in dense.named:
        moved = p.detach() != start[name]
        assert not (moved & ~mask[name]).any()                         # only free entries move ...
    assert sum(int((p.detach() != start[n]).sum()) for n, p in dense.named) > 0.5 * sum(
        int(m.sum()) for m in mask.values())                           # ... and most of them do
    n_free = sum(int(m.sum()) for m in mask.values())
    moments = [t for state in sparse.opt.state.values() for k, t in state.items() if k != "step"]
    assert isinstance(sparse.opt, MaskedAdamW) and sum(t.numel() for t in moments) == 2 * n_free
    assert all(p.grad is None for p in sparse.params)                   # no gradient kept between steps
    if settings.needs_frozen_model:
        assert sparse.reference.model is None and dense.reference.model is not None


def test_dense_optimizer_state_loads_into_the_sparse_run():
    """A checkpoint of the dense optimizer (a run of an earlier version) continues in the sparse one."""
    settings, mask = recipe("masked-esd-distill"), half_mask(tiny_train_dit())
    dense, sparse = make(DenseUnlearner, settings, mask), make(Unlearner, settings, mask)
    start = weights(dense)
    run(dense, 3)
    sparse.raw_model.load_state_dict(dense.raw_model.state_dict())
    sparse.opt.load_state_dict(dense.opt.state_dict())
    sparse.forget_opt.load_state_dict(dense.forget_opt.state_dict())
    torch.testing.assert_close(torch.tensor(run(sparse, 2, start=3)), torch.tensor(run(dense, 2, start=3)),
                               rtol=1e-5, atol=1e-7)
    assert_same_updates(sparse, dense, start)


def test_other_runs_keep_the_dense_state():
    """Where an update may leave the mask (no --mask-remain-step, or joint), nothing changes."""
    mask = half_mask(tiny_train_dit())
    for settings in (recipe("official"), recipe("masked-esd-distill", mask_remain_step=False),
                     recipe("official", method="joint", mask_remain_step=True)):
        unlearner = make(Unlearner, settings, mask)
        assert unlearner.free is None and isinstance(unlearner.opt, torch.optim.AdamW)


def test_the_frozen_original_runs_once_per_step_under_the_runs_precision():
    """The frozen original's targets (ESD's conditional and null predictions, the distilled remain term's) come from
    one forward pass of the stacked batches per step: with the dense reference one call of the second model on
    2 x 4 forget + 4 remain samples, with the sparse state one swap of the original entries. Under --precision bf16
    that pass runs under bf16 autocast, as the others do."""
    settings = recipe("adversarial-esd-distill")
    dense = make(DenseUnlearner, settings, half_mask(tiny_train_dit()))
    seen = []
    dense.reference.model.register_forward_hook(lambda module, inputs, out: seen.append((inputs[0].shape[0],
                                                                                          out.dtype)))
    run(dense, 2)
    assert seen == [(12, torch.float32)] * 2

    sparse = make(Unlearner, recipe("adversarial-esd-distill", precision="bf16"), half_mask(tiny_train_dit()))
    swaps, entered = [], sparse.original.swapped_in

    def counted():
        swaps.append(1)
        return entered()
    sparse.original.swapped_in = counted
    dtypes = []
    sparse.raw_model.final_layer.linear.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    run(sparse, 2)
    assert len(swaps) == 2 and set(dtypes) == {torch.bfloat16}
