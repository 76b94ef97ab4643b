"""The diffusion beyond the fixture: respacing, closed forms of the forward process, samplers."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion, space_timesteps


def test_space_timesteps():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(300, [10, 15, 20]) == space_timesteps(300, "10,15,20")
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45 and steps[0] == 0 and steps[9] == 99 and steps[10] == 100 and steps[-1] == 299
    assert len(space_timesteps(1000, "250")) == 250
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")  # no integer stride gives exactly 999 steps of 1000
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_schedule_keeps_the_cumulative_alphas():
    base, spaced = create_diffusion(""), create_diffusion("ddim25")
    assert spaced.num_timesteps == 25
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)


def test_q_sample_and_posterior_closed_form():
    d = create_diffusion("")
    x0, noise, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.tensor([0, 10, 500, 999])
    ab = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    xt = d.q_sample(x0, t, noise)
    # the posterior mean given the true x0 is what the model mean becomes when it predicts the true noise
    out = d.p_mean_variance(lambda x, ts, **kw: torch.cat([noise, torch.zeros_like(noise)], 1), xt, t,
                            clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(x0, xt, t)[0], rtol=1e-4, atol=1e-3)


def test_perfect_noise_prediction_has_zero_mse_and_learned_variance_range():
    d = create_diffusion("")
    x0, noise, t = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4), torch.tensor([0, 3, 800])
    perfect = lambda x, ts, **kw: torch.cat([noise, torch.zeros_like(noise)], 1)  # noqa: E731
    terms = d.training_losses(perfect, x0, t, noise=noise)
    assert terms["mse"].abs().max() < 1e-10
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"][1:] >= 0).all()  # KL terms are non-negative
    # the learned range, by hand from the linear betas: v = -1 gives the clipped posterior log-variance (at t = 0
    # that of t = 1), v = +1 log(beta_t), v = 0 halfway between them
    betas = [0.0001 + (0.02 - 0.0001) * i / 999 for i in range(1000)]
    alpha_bar = np.cumprod([1 - b for b in betas])
    posterior = lambda i: betas[i] * (1 - alpha_bar[i - 1]) / (1 - alpha_bar[i])  # noqa: E731 (i >= 1)
    min_log = torch.tensor([np.log(posterior(max(i, 1))) for i in t.tolist()]).view(3, 1, 1, 1)
    max_log = torch.tensor([np.log(betas[i]) for i in t.tolist()]).view(3, 1, 1, 1)
    for v, expected in ((-1.0, min_log), (1.0, max_log), (0.0, (min_log + max_log) / 2)):
        model = lambda x, ts, **kw: torch.cat([noise, torch.full_like(noise, v)], 1)  # noqa: E731
        log_variance = d.p_mean_variance(model, x0, t, clip_denoised=False)["log_variance"]
        torch.testing.assert_close(log_variance, expected.float().expand_as(log_variance), rtol=1e-5, atol=0)


def test_ddim_is_deterministic_and_ddpm_uses_noise_fn():
    torch.manual_seed(0)
    d = create_diffusion("ddim10")
    model = lambda x, t, **kw: torch.cat([0.1 * x, torch.zeros_like(x)], 1)  # noqa: E731
    z = torch.randn(2, 3, 4, 4)
    a = d.ddim_sample_loop(model, z.shape, noise=z, device="cpu")
    b = d.ddim_sample_loop(model, z.shape, noise=z, device="cpu")
    torch.testing.assert_close(a, b)
    p = create_diffusion("10")
    fixed = lambda x: torch.ones_like(x)  # noqa: E731
    c = p.p_sample_loop(model, z.shape, noise=z, device="cpu", noise_fn=fixed)
    e = p.p_sample_loop(model, z.shape, noise=z, device="cpu", noise_fn=fixed)
    f = p.p_sample_loop(model, z.shape, noise=z, device="cpu")
    torch.testing.assert_close(c, e)
    assert (c - f).abs().max() > 1e-3


def test_fixed_variance_and_kl_losses():
    """A fixed-variance model's loss is the noise MSE, mean over each sample (by hand); with use_kl it is the
    variational bound instead: non-negative, and another number than the MSE."""
    x0, t, noise = torch.randn(2, 3, 4, 4), torch.tensor([5, 600]), torch.randn(2, 3, 4, 4)
    model = lambda x, ts, **kw: 0.5 * x  # noqa: E731
    d = create_diffusion("", learn_sigma=False)
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"}
    a = torch.tensor(d.alphas_cumprod, dtype=torch.float32)[t].view(2, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(terms["loss"], (0.5 * x_t - noise).square().mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
    d_kl = create_diffusion("", learn_sigma=False, use_kl=True)
    loss = d_kl.training_losses(model, x0, t, noise=noise)["loss"]
    assert loss.shape == (2,) and (loss >= 0).all() and not torch.allclose(loss, terms["loss"])
