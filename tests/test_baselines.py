"""The defining mechanics of each method of the comparison, checked by hand on a tiny DiT."""
import copy
import os

import pytest
import torch
from torch.func import functional_call, grad
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion import create_diffusion
from helpers import run_script
from helpers import tiny_train_dit as tiny_model
from helpers import toy_batch as batch
from sfron.data import NoiseImages
from sfron.dist import Dist
from sfron.fisher import forget_gradient
from sfron.mask import gradient_mask
from sfron.unlearn import FrozenReference, Unlearner, UnlearnSettings, ewc_penalty
from sfron.utils import UserError

DIST = Dist()
DIFFUSION = create_diffusion("")


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step_gradient(model, settings, fb, rb, alpha=1.0, reference=None):
    """The gradient the optimizer receives in one joint step (no clip, no mask)."""
    seen = {}
    opt = torch.optim.SGD(list(trainable(model).values()), lr=0.0)
    original = opt.step

    def record(*a, **k):
        seen.update({n: p.grad.clone() for n, p in trainable(model).items()})
        return original(*a, **k)
    opt.step = record
    Unlearner(model, DIFFUSION, settings, DIST, reference=reference, optimizer=opt).step(fb, rb, alpha)
    return seen


def autograd_of(model, loss_fn):
    """The gradient of loss_fn(params) by torch.func, for comparison with a step's gradient."""
    frozen = {"pos_embed": model.pos_embed}
    return grad(lambda th: loss_fn({**th, **frozen}))({n: p.detach() for n, p in trainable(model).items()})


def eps(model, params, b, labels, drop):
    x_t = DIFFUSION.q_sample(b.x, b.t, noise=b.noise)
    return functional_call(model, params, (x_t, b.t, labels), {"force_drop_ids": drop})[:, :3]


def diffusion_losses(model, params, b, labels, drop):
    fn = lambda x, t, **kw: functional_call(model, params, (x, t), kw)  # noqa: E731
    return DIFFUSION.training_losses(fn, b.x, b.t, dict(y=labels, force_drop_ids=drop), noise=b.noise)["loss"]


def settings(**kw):
    return UnlearnSettings.from_fields({"forget_class": 0, "method": "joint", "grad_clip": 0.0, "lr": 0.0, **kw})


def test_salun_mask_keeps_the_top_fraction_of_absolute_gradients():
    g = {"a": torch.tensor([0.1, -5.0, 0.3, 2.0]), "b": torch.tensor([[-0.2, 0.3], [4.0, 0.0]])}
    mask = gradient_mask(g, sparsity=0.5)  # 8 weights: keep the 4 largest |g|: -5, 4, 2 and one of the two 0.3
    assert mask["a"].tolist() == [False, True, True, True] and mask["b"].tolist() == [[False, False], [True, False]]
    assert sum(int(m.sum()) for m in gradient_mask(g, 0.75).values()) == 2
    with pytest.raises(UserError, match="--sparsity must be in"):
        gradient_mask(g, 1.0)


def test_salun_statistic_is_the_sum_of_clipped_batch_gradients():
    """generate_fisher.py --gradient-saliency: the eps-MSE gradient of each forget batch, clipped, then summed."""
    model = tiny_model().eval()
    batches = [batch(1, 0), batch(2, 0)]

    class Batches(list):
        config = type("C", (), {"global_batch": 2})
    got = forget_gradient(model, DIFFUSION, Batches(batches), DIST, clip=0.05)
    expected = {n: torch.zeros_like(p) for n, p in trainable(model).items()}
    for b in batches:
        mse = lambda th: DIFFUSION.training_losses(  # noqa: E731
            lambda x, t, **kw: functional_call(model, th, (x, t), kw), b.x, b.t, dict(y=b.y), noise=b.noise)["mse"].mean()
        g = autograd_of(model, mse)
        norm = torch.sqrt(sum(v.square().sum() for v in g.values()))
        assert norm > 0.05  # so that the clip acts
        for n in expected:
            expected[n] += g[n] * 0.05 / (norm + 1e-6)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)


def test_salun_forget_term_matches_the_next_class_prediction_without_gradient():
    model, fb, rb = tiny_model(), batch(1, 0), batch(2, 1)
    got = step_gradient(model, settings(unlearn_loss="salun", remain_alpha=0.0), fb, rb)
    keep = torch.zeros(2, dtype=torch.long)
    target = eps(model, {**dict(model.named_parameters())}, fb, torch.full((2,), 1), keep).detach()
    expected = autograd_of(model, lambda th: (eps(model, th, fb, fb.y, keep) - target).square().flatten(1).mean(1).mean())
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


def test_esd_target_is_negatively_guided_by_the_frozen_model():
    model, frozen, fb = tiny_model(), tiny_model(seed=1).eval(), batch(1, 0)
    s = settings(unlearn_loss="esd", remain_alpha=0.0, esd_eta=0.7)
    unlearner = Unlearner(model, DIFFUSION, s, DIST, reference=FrozenReference(model=frozen))
    params, fparams = dict(model.named_parameters()), dict(frozen.named_parameters())
    keep, null = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        e_c, e_0 = eps(frozen, fparams, fb, fb.y, keep), eps(frozen, fparams, fb, fb.y, null)
        expected = (eps(model, params, fb, fb.y, keep) - (e_0 - 0.7 * (e_c - e_0))).square().flatten(1).mean(1)
    torch.testing.assert_close(unlearner.forget_losses(fb).detach(), expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(UserError, match="need the frozen original model"):
        Unlearner(model, DIFFUSION, s, DIST)


def test_sa_penalty_is_the_ewc_sum_and_its_surrogate_is_uniform_noise():
    model, anchor = tiny_model(), tiny_model(seed=1).eval()
    fisher = {n: torch.rand_like(p) for n, p in trainable(model).items()}
    reference = FrozenReference(model=anchor, fisher=fisher)
    by_hand = sum((fisher[n] * (p - dict(anchor.named_parameters())[n]).square()).sum()
                  for n, p in trainable(model).items())
    torch.testing.assert_close(ewc_penalty(list(trainable(model).items()), reference), by_hand)
    # the step's gradient: the surrogate images' diffusion loss under the forget label + lambda * EWC
    fb, rb = batch(1, 0), batch(2, 1)
    got = step_gradient(model, settings(unlearn_loss="sa", remain_alpha=0.0, ewc_lambda=3.0, replay_samples=1),
                        fb, rb, reference=reference)
    keep = torch.zeros(2, dtype=torch.long)
    anchor_params = dict(anchor.named_parameters())
    expected = autograd_of(model, lambda th: diffusion_losses(model, th, fb, fb.y, keep).mean() + 3.0 * sum(
        (fisher[n] * (th[n] - anchor_params[n].detach()).square()).sum() for n in fisher))
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)
    noise = NoiseImages(5, 8, label=2, seed=0)
    x, y = noise[3]
    assert y == 2 and x.shape == (3, 8, 8) and -1 <= x.min() < -0.9 and 0.9 < x.max() <= 1
    assert torch.equal(noise[3][0], x) and not torch.equal(noise[2][0], x)


def test_uno_step_is_its_objective_with_the_squared_cosine_differentiated_through():
    """UNO: the exchange images under the forget label and under their own, plus w cos^2(grad of the forget images'
    loss, grad of those two terms), its gradient taken through both gradients (torch.func, nested)."""
    model, fb, rb = tiny_model(), batch(1, 0), batch(2, 1)  # forget class 0; the exchange class 1
    keep, w = torch.zeros(2, dtype=torch.long), 50.0
    step_loss = lambda th: (0.5 * diffusion_losses(model, th, rb, torch.zeros(2, dtype=torch.long), keep).mean()  # noqa
                            + 2.0 * diffusion_losses(model, th, rb, rb.y, keep).mean())
    forget_loss = lambda th: diffusion_losses(model, th, fb, fb.y, keep).mean()  # noqa: E731

    def cosine2(th):  # over the trainable weights (pos_embed is a fixed buffer-like parameter)
        free = {n: v for n, v in th.items() if n != "pos_embed"}
        a, b = (grad(lambda f: fn({**f, "pos_embed": th["pos_embed"]}))(free) for fn in (forget_loss, step_loss))
        dot = sum((a[n] * b[n]).sum() for n in a)
        return dot ** 2 / (sum(v.square().sum() for v in a.values()) * sum(v.square().sum() for v in b.values()))
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no second derivative
        expected = autograd_of(model, lambda th: step_loss(th) + w * cosine2(th))
    without = autograd_of(model, step_loss)
    s = settings(unlearn_loss="uno", uno_weight=w, forget_alpha=0.5, remain_alpha=2.0)
    got = step_gradient(model, s, fb, rb, alpha=0.5)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)
    assert max(float((expected[n] - without[n]).abs().max()) for n in expected) > 1e-3  # the cosine term acts
    unlearner = Unlearner(model, DIFFUSION, s, DIST)
    assert unlearner.forget_term.other_class == 1
    with pytest.raises(UserError, match="use --method joint"):
        UnlearnSettings.from_fields({"forget_class": 0, "unlearn_loss": "uno"}).check()


def test_forget_py_runs_uno_on_the_exchange_class_images(tmp_path):
    """forget.py --unlearn-loss uno: its remain stream holds the exchange class's images alone (UNO's retain set),
    and the run ends with a checkpoint."""
    import forget
    from helpers import experiment_dirs, make_tiny_run_folder, run_in_process
    make_tiny_run_folder(tmp_path)
    argv = ["--model", "DiT-T/2", "--data-path", tmp_path / "data", "--ckpt", tmp_path / "tiny.pt", "--forget-class", 1,
            "--method", "joint", "--unlearn-loss", "uno", "--grad-clip", 0, "--lr", 1e-3, "--batch-size", 2,
            "--n-iters", 2, "--snapshot-every", 0, "--num-workers", 0, "--results-dir", tmp_path / "results"]
    args = forget.parse_args([str(a) for a in argv])
    settings = forget.unlearn_settings(args)
    from sfron.data import class_folders, unlearn_datasets
    forget_set, remain_set = unlearn_datasets(class_folders(tmp_path / "data", 3), 1, 8)
    _, uno_remain = forget.unlearning_data(settings, type("Spec", (), {"num_classes": 3, "image_size": 8}),
                                           (forget_set, remain_set), None)
    assert set(remain_set.targets) == {0, 2} and uno_remain.targets == [2] * 6
    proc = run_in_process("forget.py", *argv, cwd=tmp_path, check=True)
    assert "uno: the exchange class is 2" in proc.stdout + proc.stderr
    (run,) = experiment_dirs(tmp_path / "results")
    assert os.path.isfile(os.path.join(run, "checkpoints", "0000002.pt"))


@pytest.mark.parametrize("name", ["ga", "ft", "rl"])
def test_ga_ft_rl_touch_only_their_terms(name):
    """GA: the ascent alone (the remain batch is never read); FT: the remain term alone; RL: both, relabelled."""
    model, fb, rb = tiny_model(), batch(1, 0), batch(2, 1)
    poisoned = copy.copy(fb if name == "ft" else rb)
    if name != "rl":  # a term that is skipped may hold anything
        poisoned.x = torch.full_like(poisoned.x, float("nan"))
    s = {"ga": settings(unlearn_loss="ga", remain_alpha=0.0), "ft": settings(forget_alpha=0.0),
         "rl": settings(unlearn_loss="rl", remain_alpha=2.0)}[name]
    got = step_gradient(model, s, poisoned if name == "ft" else fb, rb if name == "ft" else poisoned,
                        alpha=s.forget.forget_alpha)
    keep = torch.zeros(2, dtype=torch.long)
    forget_term = {"ga": lambda th: -diffusion_losses(model, th, fb, fb.y, keep).mean(),
                   "ft": lambda th: 0.0,
                   "rl": lambda th: diffusion_losses(model, th, fb, torch.full((2,), 1), keep).mean()}[name]
    remain_weight = {"ga": 0.0, "ft": 1.0, "rl": 2.0}[name]
    expected = autograd_of(model, lambda th: forget_term(th) + remain_weight * diffusion_losses(
        model, th, rb, rb.y, keep).mean())
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


def test_bad_combinations_are_one_line_errors(tmp_path):
    proc = run_script("generate_mask.py", "--mask-path", tmp_path, "--forget-class", 0, "--criterion", "gradient",
                      "--sparsity", "1.2", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --sparsity must be in (0, 1), got 1.2"
    with pytest.raises(UserError, match="needs --replay-samples"):
        settings(unlearn_loss="sa", ewc_lambda=1.0, lr=1e-3).check()
    with pytest.raises(UserError, match="nothing to optimise"):
        settings(forget_alpha=0.0, remain_alpha=0.0, lr=1e-3).check()
    with pytest.raises(UserError, match="--method ron"):
        settings(method="joint", remain_lr=1e-5, lr=1e-3).check()
    with pytest.raises(UserError, match="--lr must be positive"):
        settings(lr=0.0).check()


def half_mask(model, seed=0):
    """A saliency mask that frees a random half of every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) < 0.5).float() for n, p in trainable(model).items()}


def forget_step_moves(**kw):
    """How far the forget step of a second ron step moves the weights outside and inside the mask (the first ron
    step leaves AdamW momentum from its remain step)."""
    fb, rb = batch(1, 0), batch(2, 1)
    model = tiny_model()
    mask = half_mask(model)
    s = settings(method="ron", lr=1e-2, **kw)
    unlearner = Unlearner(model, DIFFUSION, s, DIST, mask=mask)
    unlearner.step(fb, rb, 1.0)
    moved = {}
    plain_step = unlearner._optimizer_step

    def record(loss, masked, lr=None):
        before = {n: p.detach().clone() for n, p in trainable(model).items()}
        plain_step(loss, masked, lr)
        if masked:
            for n, p in trainable(model).items():
                change = (p.detach() - before[n]).abs()
                moved["outside"] = max(moved.get("outside", 0.0), float((change * (1 - mask[n])).max()))
                moved["inside"] = max(moved.get("inside", 0.0), float((change * mask[n]).max()))
    unlearner._optimizer_step = record
    unlearner.step(fb, rb, 1.0)
    return moved


def test_separate_forget_optimizer_keeps_the_forget_step_inside_its_mask():
    """With one AdamW for both steps (the official), the remain step's momentum moves weights the mask freezes at
    the forget step; with its own moments the forget step moves the mask's weights only."""
    shared, separate = forget_step_moves(), forget_step_moves(separate_forget_optimizer=True)
    assert shared["outside"] > 1e-3 and shared["inside"] > 1e-3
    assert separate["outside"] == 0.0 and separate["inside"] > 1e-3


def test_mask_remain_step_freezes_every_weight_outside_the_mask():
    fb, rb = batch(1, 0), batch(2, 1)
    for kw, frozen in (({}, False), ({"mask_remain_step": True}, True),
                       ({"mask_remain_step": True, "separate_forget_optimizer": True}, True)):
        model = tiny_model()
        mask, start = half_mask(model), {n: p.detach().clone() for n, p in trainable(model).items()}
        s = settings(method="ron", lr=1e-2, **kw)
        unlearner = Unlearner(model, DIFFUSION, s, DIST, mask=mask)
        for _ in range(3):
            unlearner.step(fb, rb, 1.0)
        outside = max(float(((p.detach() - start[n]) * (1 - mask[n])).abs().max()) for n, p in trainable(model).items())
        assert (outside == 0.0) == frozen, kw


def test_remain_lr_sets_the_size_of_the_remain_step():
    """AdamW's first step moves each weight by about its learning rate: the remain step's is --remain-lr."""
    fb, rb = batch(1, 0), batch(2, 1)
    for remain_lr in (None, 1e-5):
        model = tiny_model()
        start = {n: p.detach().clone() for n, p in trainable(model).items()}
        s = settings(method="ron", lr=1e-2, forget_alpha=0.0, remain_lr=remain_lr)
        Unlearner(model, DIFFUSION, s, DIST).step(fb, rb, 0.0)
        largest = max(float((p.detach() - start[n]).abs().max()) for n, p in trainable(model).items())
        assert largest == pytest.approx(remain_lr or 1e-2, rel=1e-2)  # fp32 differences


def test_distilled_remain_term_is_zero_at_the_original_and_pulls_back_to_it():
    """--remain-loss distill: the remain term is the distance of the noise prediction (with the batch's label
    dropout) to the frozen original's, 0 at the original weights; its step brings a moved model back towards it."""
    original, rb = tiny_model(), batch(2, 1)
    s = settings(method="ron", lr=1e-3, forget_alpha=0.0, remain_loss="distill")
    same = Unlearner(copy.deepcopy(original), DIFFUSION, s, DIST, reference=FrozenReference(model=original))
    assert float(same.remain_losses(rb).abs().max()) == 0.0
    moved = copy.deepcopy(original)
    with torch.no_grad():
        for p in trainable(moved).values():
            p.add_(0.01 * torch.randn_like(p))
    unlearner = Unlearner(moved, DIFFUSION, s, DIST, reference=FrozenReference(model=original))
    params, fparams = dict(moved.named_parameters()), dict(original.named_parameters())
    with torch.no_grad():
        expected = (eps(moved, params, rb, rb.y, rb.drop) - eps(original, fparams, rb, rb.y, rb.drop)).square()
    before = unlearner.remain_losses(rb).detach()
    torch.testing.assert_close(before, expected.flatten(1).mean(1), rtol=1e-5, atol=1e-9)
    for _ in range(5):
        unlearner.step(batch(1, 0), rb, 0.0)
    assert float(unlearner.remain_losses(rb).mean()) < 0.5 * float(before.mean())
    with pytest.raises(UserError, match="need the frozen original model"):
        Unlearner(moved, DIFFUSION, s, DIST)


def test_the_adversarial_label_learns_the_forget_images_and_the_forget_term_acts_under_it():
    """--adversarial-steps: the adversary's Adam steps (attack.py's rate) lower the diffusion loss of the forget images
    under its embedding and leave every weight as it was; the esd term is then the label's distance plus the same
    distance under the adversarial embedding."""
    from sfron.adversary import ADVERSARY_LR, AdversarialLabel
    from sfron.attack import ExtraLabel
    model, frozen, fb = tiny_model(), tiny_model(seed=1).eval(), batch(1, 0, n=4)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    adversary = AdversarialLabel(model, steps_per_update=20, dist=DIST)
    null_row = model.y_embedder.embedding_table.weight[model.num_classes].detach()
    assert torch.equal(adversary.embedding.detach(), null_row) and ADVERSARY_LR == 5e-3

    def loss_under(embedding):
        with torch.no_grad(), ExtraLabel(model, embedding) as label:
            return float(DIFFUSION.training_losses(model, fb.x, fb.t, dict(y=torch.full_like(fb.y, label),
                         force_drop_ids=torch.zeros_like(fb.drop)), noise=fb.noise)["loss"].mean())
    start = loss_under(adversary.embedding.detach())
    adversary.update(model, DIFFUSION, fb)
    assert loss_under(adversary.embedding.detach()) < 0.95 * start  # 2.75 -> 2.52 on this random model
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in trainable(model).items())

    s = settings(unlearn_loss="esd", remain_alpha=0.0, adversarial_steps=1)
    unlearner = Unlearner(model, DIFFUSION, s, DIST, reference=FrozenReference(model=frozen))
    params, fparams = dict(model.named_parameters()), dict(frozen.named_parameters())
    keep, null = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    got = unlearner.forget_losses(fb).detach()  # updates the adversary once, then computes the term
    with torch.no_grad():
        e_c, e_0 = eps(frozen, fparams, fb, fb.y, keep), eps(frozen, fparams, fb, fb.y, null)
        target = e_0 - (e_c - e_0)
        label_term = (eps(model, params, fb, fb.y, keep) - target).square().flatten(1).mean(1)
        with ExtraLabel(model, unlearner.adversary.embedding.detach()) as label:
            adv_term = (eps(model, params, fb, torch.full_like(fb.y, label), keep) - target).square().flatten(1).mean(1)
    assert float(adv_term.min()) > 0 and not torch.allclose(label_term, adv_term)
    torch.testing.assert_close(got, label_term + adv_term, rtol=1e-5, atol=1e-8)
    with pytest.raises(UserError, match="--adversarial-steps applies to"):
        settings(unlearn_loss="rl", adversarial_steps=1, lr=1e-3).check()


def test_sa_replays_the_original_models_samples_of_the_remain_classes_and_their_fisher(tmp_path):
    """forget.py's SA pieces: --replay-samples images that the frozen original draws for the remain classes in turn
    (in [-1, 1], the same for the same seed), and the EWC Fisher: the per-sample Fisher of the original on them."""
    import logging

    import forget
    from cli import model_request
    from helpers import make_tiny_run_folder
    from sfron.build import load_model_and_vae
    from sfron.data import DiffusionBatches, StreamConfig
    from sfron.fisher import fisher_diagonal
    from sfron.sampling import generate_replay
    make_tiny_run_folder(tmp_path)
    argv = ["--model", "DiT-T/2", "--data-path", tmp_path / "data", "--ckpt", tmp_path / "tiny.pt", "--forget-class", 1,
            "--method", "joint", "--unlearn-loss", "sa", "--replay-samples", 6, "--ewc-lambda", 10, "--batch-size", 3,
            "--num-sampling-steps", 2, "--seed", 4]
    args = forget.parse_args(argv)
    settings, request = forget.unlearn_settings(args), model_request(args)
    original = load_model_and_vae(request, "cpu")
    reference, replay = forget.frozen_reference(settings, request, original.spec, DIST, logging.getLogger("test"))
    assert replay.labels == [0, 2, 0, 2, 0, 2] and replay.images.shape == (6, 3, 8, 8)
    assert -1 <= float(replay.images.min()) and float(replay.images.max()) <= 1 and replay.images.std() > 0.1
    again = generate_replay(reference.model, None, replay.labels, settings.replay.sampling, 4, DIST)
    other_seed = generate_replay(reference.model, None, replay.labels, settings.replay.sampling, 5, DIST)
    assert torch.equal(again, replay.images) and not torch.equal(other_seed, replay.images)
    config = StreamConfig(stream="replay-fisher", seed=4, global_batch=3, random_flip=False)
    expected = fisher_diagonal(original.model, DIFFUSION, DiffusionBatches(replay, config, DIST, range(2)), DIST)
    assert reference.fisher.keys() == expected.keys() == trainable(original.model).keys()
    for n in expected:
        torch.testing.assert_close(reference.fisher[n], expected[n], rtol=1e-5, atol=1e-12)
    assert sum(float(f.sum()) for f in expected.values()) > 0
