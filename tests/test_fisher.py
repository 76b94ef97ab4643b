"""The per-sample Fisher hooks against one autograd backward per sample, on the CPU and the GPU code paths."""
import pytest
import torch

import sfron.fisher as fisher_module
from diffusion import create_diffusion
from helpers import naive_fisher_sum, tiny_dit
from sfron.data import Batch
from sfron.fisher import PerSampleSquaredGrads, _sum_sq_outer
from sfron.loss import diffusion_loss
from sfron.utils import UserError


def samples(n=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return Batch(x=x, y=torch.tensor([0, 1, 1, 4, 5][:n]), t=torch.randint(0, 1000, (n,), generator=g),
                 noise=torch.randn(n, 3, 8, 8, generator=g), drop=torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("batched", [False, True])
def test_hooks_equal_one_backward_per_sample(monkeypatch, batched):
    """
    Two blocks, 8x8 inputs, patch 2: every layer kind the hooks handle (patch conv, embedding, linear). Label 5
    is the null class, so the embedding table's last row is covered too.
    """
    if batched:  # the GPU path (chunked bmm), with chunks of 2 samples so that chunking itself is exercised
        monkeypatch.setattr(fisher_module, "_MAX_CHUNK_ELEMENTS", 2 * 32 * 4 * 32)
    original = fisher_module._sum_sq_outer
    monkeypatch.setattr(fisher_module, "_sum_sq_outer", lambda g, a: original(g, a, batched=batched))
    model, diffusion, b = tiny_dit(num_classes=5).eval(), create_diffusion(""), samples()
    expected = naive_fisher_sum(model, diffusion, b)
    model.zero_grad(set_to_none=True)
    with PerSampleSquaredGrads(model) as grads:
        grads.backward(diffusion_loss(model, diffusion, b).sum())
    assert grads.sums.keys() == expected.keys()
    assert all(p.grad is None for p in model.parameters())  # the batch gradient is never formed
    for n in expected:
        assert expected[n].abs().max() > 0, n
        torch.testing.assert_close(grads.sums[n], expected[n], rtol=1e-4, atol=1e-10, msg=n)


def test_batched_and_looped_accumulation_agree():
    g = torch.randn(7, 5, 6, generator=torch.Generator().manual_seed(0))
    a = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(1))
    expected = sum((g[i].t() @ a[i]) ** 2 for i in range(7))
    torch.testing.assert_close(_sum_sq_outer(g, a, batched=False), expected)
    torch.testing.assert_close(_sum_sq_outer(g, a, batched=True), expected)


def test_unsupported_layers_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(UserError, match="unsupported layer 1"):
        PerSampleSquaredGrads(model)
