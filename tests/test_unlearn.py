"""The SFR-on step on cases small enough to check by hand."""
import math

import pytest
import torch
from torch.func import functional_call, grad

from diffusion import create_diffusion
from helpers import tiny_train_dit as tiny_model
from helpers import toy_batch
from sfron.dist import Dist
from sfron.mask import load_mask
from sfron.optim import make_optimizer
from sfron.terms import forget_term
from sfron.terms.rl import relabel_class
from sfron.unlearn import ForgetTerm, Unlearner, UnlearnSettings, forget_alpha_at
from sfron.utils import UserError

DIST = Dist()
LR, EPS, BETAS = 1e-2, 1e-8, (0.9, 0.999)


def batch(seed, label, n=2):
    """A toy batch whose every other label is dropped to the null class."""
    return toy_batch(seed, label, n, drop=torch.tensor([0, 1] * (n // 2)))


def per_sample_loss(model, params, b, labels=None, drop=None):
    diffusion = create_diffusion("")
    fn = lambda x, t, **kw: functional_call(model, params, (x, t), kw)  # noqa: E731
    return diffusion.training_losses(fn, b.x, b.t, dict(y=b.y if labels is None else labels,
                                                        force_drop_ids=b.drop if drop is None else drop),
                                     noise=b.noise)["loss"]


def adam_first_two_steps(theta, g1, g2_fn):
    """AdamW (no weight decay) by hand: step 1 with gradient g1, step 2 with g2_fn(theta after step 1)."""
    b1, b2 = BETAS
    m = {k: (1 - b1) * g1[k] for k in theta}
    v = {k: (1 - b2) * g1[k] ** 2 for k in theta}
    theta1 = {k: theta[k] - LR * (m[k] / (1 - b1)) / ((v[k] / (1 - b2)).sqrt() + EPS) for k in theta}
    g2 = g2_fn(theta1)
    m = {k: b1 * m[k] + (1 - b1) * g2[k] for k in theta}
    v = {k: b2 * v[k] + (1 - b2) * g2[k] ** 2 for k in theta}
    return {k: theta1[k] - LR * (m[k] / (1 - b1 ** 2)) / ((v[k] / (1 - b2 ** 2)).sqrt() + EPS) for k in theta}


def run_step(model, fb, rb, alpha=0.5, mask=None, **settings):
    """One Unlearner step (ron, ga, forget alpha 0.5, remain alpha 2, no clip unless given) on a fresh AdamW."""
    settings = UnlearnSettings.from_fields({"forget_class": 0, "lr": LR, "remain_alpha": 2.0, "grad_clip": 0.0, **settings})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=0)
    Unlearner(model, create_diffusion(""), settings, DIST, mask, optimizer=opt).step(fb, rb, alpha)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ron_takes_the_remain_gradient_after_the_forget_update():
    model, fb, rb = tiny_model(), batch(1, 0), batch(2, 1)
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {"pos_embed": model.pos_embed}
    mask = {n: (torch.rand_like(p) > 0.3).float() for n, p in theta.items()}

    def forget_grad(th):
        return grad(lambda th: 0.5 * -per_sample_loss(model, {**th, **frozen}, fb).mean())(th)

    def remain_grad(th):
        return grad(lambda th: 2.0 * per_sample_loss(model, {**th, **frozen}, rb).mean())(th)

    g_f = {k: v * mask[k] for k, v in forget_grad(theta).items()}
    expected = adam_first_two_steps(theta, g_f, remain_grad)               # remain gradient at theta_1
    wrong_order = adam_first_two_steps(theta, g_f, lambda _: remain_grad(theta))  # at theta_0
    got = run_step(model, fb, rb, mask=mask)
    # the key bias cannot change attention (softmax is shift-invariant): its gradient is rounding noise,
    # which Adam magnifies to +-lr steps of arbitrary sign, so it is left out of the comparison
    for part in (got, expected, wrong_order):
        part["blocks.0.attn.qkv.bias"] = part["blocks.0.attn.qkv.bias"][torch.arange(48) // 16 != 1]
    for k in theta:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6)
    assert max((expected[k] - wrong_order[k]).abs().max() for k in theta) > 1e-4


def capture_gradients(monkeypatch):
    """Records the gradients handed to each optimizer step."""
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        seen.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None})
        return original(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_alphas_mask_and_clip_act_on_the_step_gradients(monkeypatch):
    seen = capture_gradients(monkeypatch)
    fb, rb = batch(1, 0), batch(2, 1)
    run_step(tiny_model(), fb, rb, alpha=1.0, remain_alpha=1.0)
    run_step(tiny_model(), fb, rb, alpha=0.25, remain_alpha=3.0)
    f1, f2 = seen[0], seen[2]  # the forget steps of the two runs (same weights, same batch)
    for a, b in zip(f1.values(), f2.values()):
        torch.testing.assert_close(b, 0.25 * a)                 # the forget step's gradient scales with alpha
    model = tiny_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mask = {n: torch.zeros_like(p) for n, p in named}
    mask["final_layer.linear.weight"] = torch.ones_like(mask["final_layer.linear.weight"])
    seen.clear()
    run_step(model, fb, rb, alpha=1.0, mask=mask, grad_clip=1e-3)
    forget_grads = seen[0]
    masked = [forget_grads[id(p)] for n, p in named if n != "final_layer.linear.weight"]
    assert all(g.abs().max() == 0 for g in masked)              # outside the mask: no forget update
    total = math.sqrt(sum(float(g.square().sum()) for g in forget_grads.values()))
    assert total == pytest.approx(1e-3, rel=1e-3)               # clipped to --grad-clip
    assert any(g.abs().max() > 0 for g in seen[1].values())    # the remain step is not masked


def test_remain_alpha_scales_the_remain_gradient(monkeypatch):
    seen = capture_gradients(monkeypatch)
    fb, rb = batch(1, 0), batch(2, 1)
    run_step(tiny_model(), fb, rb, method="joint", alpha=0.0, remain_alpha=1.0)
    run_step(tiny_model(), fb, rb, method="joint", alpha=0.0, remain_alpha=3.0)
    for a, b in zip(seen[0].values(), seen[1].values()):
        torch.testing.assert_close(b, 3.0 * a)


def test_cosine_decay_of_the_forget_alpha():
    assert forget_alpha_at(0, 600, 1e-3, decay=False) == forget_alpha_at(300, 600, 1e-3, decay=False) == 1e-3
    assert forget_alpha_at(0, 600, 1e-3, decay=True) == pytest.approx(1e-3)
    assert forget_alpha_at(300, 600, 1e-3, decay=True) == pytest.approx(5e-4)
    assert forget_alpha_at(150, 600, 1e-3, decay=True) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert forget_alpha_at(599, 600, 1e-3, decay=True) < 1e-7


def test_adaga_weights_samples_not_yet_forgotten_more():
    adaga = forget_term(ForgetTerm(forget_class=0, unlearn_loss="adaga"), num_classes=3)
    assert adaga.lambd == 0.5  # the paper's
    losses = torch.tensor([0.25, 1.0, 4.0], requires_grad=True)
    adaga.objective(losses, DIST).backward()
    c = torch.tensor([1 / 0.5, 1 / 1.0, 1 / 2.0])              # 1 / l^0.5
    w = 3 * c / c.sum()
    torch.testing.assert_close(losses.grad, -w / 3)           # d(-mean(w l))/dl = -w / n
    assert losses.grad[0] < losses.grad[1] < losses.grad[2] < 0
    ga = torch.tensor([0.25, 1.0, 4.0], requires_grad=True)
    adaga.lambd = 0.0
    adaga.objective(ga, DIST).backward()  # lambda = 0: plain gradient ascent
    torch.testing.assert_close(ga.grad, torch.full((3,), -1 / 3))


def test_forget_conditioning_and_relabel():
    b = batch(3, 2, n=4)
    labels, drop = forget_term(ForgetTerm(forget_class=2, unlearn_loss="ga"), 10).conditioning(b)
    assert labels.tolist() == [2, 2, 2, 2] and drop.tolist() == [0, 1, 0, 1]
    labels, drop = forget_term(ForgetTerm(forget_class=207, unlearn_loss="rl"), 1000).conditioning(b)
    assert labels.tolist() == [307, 307, 307, 307] and drop.tolist() == [0, 1, 0, 1]
    assert relabel_class(207, 1000) == 307 and relabel_class(3, 10) == 4 and relabel_class(5, 7) == 0


def test_the_forget_step_drops_the_labels_the_batch_drops(monkeypatch):
    """As training mode does in the official script, the forget step's gradient is that of the batch's label drops
    (here the second sample under the null label), not of every sample under its own label."""
    seen = capture_gradients(monkeypatch)
    fb, rb = batch(1, 0), batch(2, 1)
    assert fb.drop.tolist() == [0, 1]
    reference = tiny_model()
    theta = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    frozen = {"pos_embed": reference.pos_embed}
    expected = {}
    for dropped, drop in ((True, fb.drop), (False, torch.zeros_like(fb.drop))):
        expected[dropped] = grad(lambda th: 0.5 * -per_sample_loss(reference, {**th, **frozen}, fb, drop=drop).mean())(
            theta)
    model = tiny_model()
    run_step(model, fb, rb)
    got = {n: seen[0][id(p)] for n, p in model.named_parameters() if p.requires_grad}  # the forget step's
    for n in theta:
        torch.testing.assert_close(got[n], expected[True][n], rtol=1e-4, atol=1e-7)
    assert max(float((expected[True][n] - expected[False][n]).abs().max()) for n in theta) > 1e-3


def test_fused_optimizer_follows_the_official_adamw():
    official, ours = tiny_model(), tiny_model()
    params = [[p for p in m.parameters() if p.requires_grad] for m in (official, ours)]
    opts = torch.optim.AdamW(params[0], lr=LR, weight_decay=0), make_optimizer(params[1], LR)
    assert opts[1].defaults["fused"] and opts[1].defaults["weight_decay"] == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params[0]]
        for group, opt in zip(params, opts):
            for p, gr in zip(group, grads):
                p.grad = gr.clone()
            opt.step()
    start = [p for p in tiny_model().parameters() if p.requires_grad]
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(params[0], start))
    assert moved > 1e-3
    for a, b in zip(*params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_bool_and_float_masks_give_the_same_step():
    fb, rb = batch(1, 0), batch(2, 1)
    names = [n for n, p in tiny_model().named_parameters() if p.requires_grad]
    bool_mask = {n: torch.rand_like(p) > 0.5 for n, p in tiny_model().named_parameters() if p.requires_grad}
    a = run_step(tiny_model(), fb, rb, mask=bool_mask)
    b = run_step(tiny_model(), fb, rb, mask={n: bool_mask[n].float() for n in names})
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_masks_load_as_bool_and_soft_masks_are_refused(tmp_path):
    model = tiny_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.save({n: (torch.rand_like(p) > 0.5).float() for n, p in params.items()}, tmp_path / "float.pt")
    mask = load_mask(tmp_path / "float.pt", model, "cpu")
    assert all(m.dtype == torch.bool for m in mask.values()) and mask.keys() == params.keys()
    torch.save({n: torch.full_like(p, 0.5) for n, p in params.items()}, tmp_path / "soft.pt")
    with pytest.raises(UserError, match="values other than 0 and 1"):
        load_mask(tmp_path / "soft.pt", model, "cpu")


def test_a_non_finite_loss_stops_the_step_with_its_name():
    model, fb, rb = tiny_model(), batch(1, 0), batch(2, 1)
    fb.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite forget loss at step 0"):
        run_step(model, fb, rb)


def test_bf16_steps_run_under_autocast_and_keep_float32_weights():
    """--precision bf16: the losses come from bf16 matmuls (close to, not equal to, float32's), the weights and the
    AdamW state stay float32, and the update moves the weights as float32's does."""
    fb, rb = batch(1, 0), batch(2, 1)
    start = {n: p.detach().clone() for n, p in tiny_model().named_parameters() if p.requires_grad}
    steps, losses = {}, {}
    for precision in ("fp32", "bf16"):
        model = tiny_model()
        settings = UnlearnSettings.from_fields({"forget_class": 0, "lr": LR, "grad_clip": 0.0, "precision": precision})
        unlearner = Unlearner(model, create_diffusion(""), settings, DIST)
        losses[precision] = unlearner.step(fb, rb, 1.0)
        steps[precision] = {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in unlearner.opt.state.values() for v in s.values() if v.ndim)
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    agree = sum(float((torch.sign(steps["bf16"][n]) == torch.sign(steps["fp32"][n])).sum()) for n in start)
    assert agree / sum(v.numel() for v in start.values()) > 0.9  # the same direction for nearly every weight


def test_remain_projection_removes_only_the_conflicting_component():
    """--remain-projection: a remain gradient pointing against the forget gradient loses its component along it
    (after which the two are orthogonal); one that agrees with it, or a step without a forget gradient, keeps it."""
    from sfron.unlearn import project_off_
    forget = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]       # |f|^2 = 5
    grads = [torch.tensor([-1.0, 3.0]), torch.tensor([1.0, -2.0, 4.0])]     # g.f = -5
    project_off_(grads, forget)
    assert grads[0].tolist() == [0.0, 3.0] and grads[1].tolist() == [1.0, 0.0, 4.0]
    assert sum(float((g * f).sum()) for g, f in zip(grads, forget)) == 0.0
    grads = [torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])]       # g.f = 5 > 0
    project_off_(grads, forget)
    project_off_(grads, None)
    assert grads[0].tolist() == [1.0, 3.0] and grads[1].tolist() == [1.0, 2.0, 4.0]
