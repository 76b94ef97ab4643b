"""
Times this repository's Fisher and forget steps against loops with the official semantics, on the same samples:
  reference Fisher: batch 1, the VAE encode in the loop, every squared gradient copied to the CPU each step;
  reference forget: float32, the VAE encode of both batches in the loop (as the official forget.py);
  ours: per-sample Fisher at --batch-size (hooks), --precision autocast (the DiT and the VAE encodes), forget
  latents cached once, fused AdamW, the VAE as load_vae gives it (channels-last on CPUs).
Prints samples/s, the speedups, peak memory and the model FLOP utilisation (MFU) against a measured matmul peak,
of the whole forget loop and of the forget step alone (latents ready) at each --mfu-batch-sizes;
the last line is JSON: {"fisher_speedup", "forget_speedup", "device", "forget_step_mfu", and the raw "fisher" and
"forget" timings}.
Random weights (the VAE is the Stable Diffusion VAE architecture built from its config): this measures speed,
not quality.

    python bench/throughput.py --model DiT-S/2 --image-size 256
"""
import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402
from sfron.data import Batch  # noqa: E402
from sfron.dist import Dist  # noqa: E402
from sfron.fisher import PerSampleSquaredGrads  # noqa: E402
from sfron.loss import diffusion_loss  # noqa: E402
from sfron.unlearn import Unlearner, UnlearnSettings  # noqa: E402
from sfron.vae import encode_moments, sample_latents, with_fast_layout  # noqa: E402
from synthetic import random_dit, sd_vae  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (KiB -> GiB)


def matmul_peak_tflops(device, dtype):
    """Best of a few large matmuls: the device's practical peak."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(5))
    return 2 * n ** 3 / best / 1e12


def latent_shape(image_size):
    """(C, h, w) of the SD-VAE latents of image_size images."""
    return 4, image_size // 8, image_size // 8


def all_ones_mask(model):
    """A saliency mask that updates every weight, as load_mask gives it (booleans)."""
    return {k: torch.ones_like(p, dtype=torch.bool) for k, p in model.named_parameters() if p.requires_grad}


class Draws(NamedTuple):
    """n (image, label, t, noise, vae eps) samples, identical for both loops."""
    images: torch.Tensor
    labels: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    eps: torch.Tensor

    def head(self, k):
        """The first k samples."""
        return Draws(*(v[:k] for v in self))

    def batch(self, vae, sl, device, amp_dtype=None):
        """The Batch of samples sl, VAE-encoded (under amp_dtype) on device."""
        mean, std = encode_moments(vae, self.images[sl].to(device), amp_dtype)
        n = len(self.images[sl])
        return Batch(x=sample_latents(mean, std, self.eps[sl].to(device)), y=self.labels[sl].to(device),
                     t=self.t[sl].to(device), noise=self.noise[sl].to(device),
                     drop=torch.zeros(n, dtype=torch.long, device=device))


def draws(n, image_size, seed):
    """n samples of random images with their labels, timesteps, noise and VAE noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, image_size, image_size), generator=g) * 2 - 1
    labels = torch.randint(0, 1000, (n,), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise, eps = (torch.randn((n, *latent_shape(image_size)), generator=g) for _ in range(2))
    return Draws(images, labels, t, noise, eps)


@dataclass
class Setup:
    """What both loops run on: the DiT, the diffusion, the VAE of each loop, our autocast dtype and the mask."""
    model: torch.nn.Module
    diffusion: object
    official_vae: torch.nn.Module    # the official layout
    our_vae: torch.nn.Module         # as load_vae gives it (channels-last on CPUs)
    amp_dtype: Optional[torch.dtype]
    mask: Optional[dict] = None

    @property
    def device(self):
        return next(self.model.parameters()).device


def reference_fisher(setup, d):
    """The official loop: one sample per step, VAE encode inside, squared gradients accumulated on the CPU."""
    model, n = setup.model, len(d.images)
    fisher = {name: 0 for name, p in model.named_parameters() if p.requires_grad}
    for i in range(n):
        b = d.batch(setup.official_vae, slice(i, i + 1), setup.device)
        model.zero_grad()
        diffusion_loss(model, setup.diffusion, b).mean().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                fisher[name] += p.grad.detach().cpu() ** 2 / n
    return fisher


def our_fisher(setup, d, batch_size):
    """Per-sample squared gradients of whole batches, summed on the device."""
    device, amp_dtype = setup.device, setup.amp_dtype
    with PerSampleSquaredGrads(setup.model) as grads:
        for s in range(0, len(d.images), batch_size):
            b = d.batch(setup.our_vae, slice(s, s + batch_size), device, amp_dtype)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = diffusion_loss(setup.model, setup.diffusion, b)
            grads.backward(losses.float().sum())
    return {name: v.cpu() / len(d.images) for name, v in grads.sums.items()}


def forget_data(steps, batch_size, pool, image_size, latent, seed=1):
    """A forget pool of `pool` images drawn cyclically, fresh remain images, and the draws of every sample."""
    g = torch.Generator().manual_seed(seed)
    n = steps * batch_size
    return dict(forget=torch.rand((pool, 3, image_size, image_size), generator=g) * 2 - 1,
                remain=torch.rand((n, 3, image_size, image_size), generator=g) * 2 - 1,
                labels=torch.randint(0, 1000, (2, n), generator=g), t=torch.randint(0, 1000, (2, n), generator=g),
                noise=torch.randn((2, n, *latent), generator=g), eps=torch.randn((2, n, *latent), generator=g))


def forget_batches(vae, data, steps, batch_size, device, cached=None, amp_dtype=None):
    """The (forget, remain) Batch pairs of each step; `cached` holds the pool's pre-encoded moments."""
    pool = len(data["forget"])
    for step in range(steps):
        draws = slice(step * batch_size, (step + 1) * batch_size)
        index = [(step * batch_size + j) % pool for j in range(batch_size)]
        if cached is not None:
            forget = (cached[0][index], cached[1][index])
        else:  # the official loop encodes every draw
            forget = encode_moments(vae, data["forget"][index].to(device))
        remain = encode_moments(vae, data["remain"][draws].to(device), amp_dtype)
        yield [Batch(x=sample_latents(mean, std, data["eps"][k, draws].to(device)),
                     y=data["labels"][k, draws].to(device), t=data["t"][k, draws].to(device),
                     noise=data["noise"][k, draws].to(device),
                     drop=torch.zeros(batch_size, dtype=torch.long, device=device))
               for k, (mean, std) in enumerate((forget, remain))]


def ron_unlearner(setup, official=False):
    """forget.py's default ron step (ga, lr 1e-4, clip 1.0) with the official AdamW (foreach) or ours (fused)."""
    bf16 = setup.amp_dtype is not None and not official
    settings = UnlearnSettings.from_fields({"forget_class": 0, "lr": 1e-4, "precision": "bf16" if bf16 else "fp32"})
    params = [p for p in setup.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.step.lr, weight_decay=0) if official else None
    return Unlearner(setup.model, setup.diffusion, settings, Dist(device=setup.device), setup.mask, optimizer=opt)


def run_forget(setup, data, steps, batch_size, cached=None, official=False):
    """The ron loop on the benchmark data: the official semantics (float32, VAE in the loop, foreach AdamW) or ours."""
    unlearner = ron_unlearner(setup, official)
    vae, amp_dtype = (setup.official_vae, None) if official else (setup.our_vae, setup.amp_dtype)
    for fb, rb in forget_batches(vae, data, steps, batch_size, setup.device, cached, amp_dtype):
        unlearner.step(fb, rb, alpha=1e-3)


def step_flops(model, diffusion, batch_size, shape, device):
    """
    Model FLOPs of one forget step (forward + backward on a forget and a remain batch), counted by torch on one
    sample (every operation is per sample) and scaled to the batch.
    """
    x = torch.randn(1, *shape, device=device)
    b = Batch(x=x, y=torch.zeros(1, dtype=torch.long, device=device), t=torch.full((1,), 500, device=device),
              noise=torch.randn_like(x), drop=torch.zeros(1, dtype=torch.long, device=device))
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model, diffusion, b).mean().backward()
    model.zero_grad(set_to_none=True)
    return 2 * counter.get_total_flops() * batch_size


def forget_step_mfu(setup, batch_size, latent, peak, steps=5):
    """MFU (%) of the ron step alone, on latents already on the device (no VAE, no data loading)."""
    device = setup.device
    g = torch.Generator().manual_seed(2)

    def latent_batch():
        x = torch.randn((batch_size, *latent), generator=g)
        return Batch(x=x.to(device), y=torch.randint(0, 1000, (batch_size,), generator=g).to(device),
                     t=torch.randint(0, 1000, (batch_size,), generator=g).to(device),
                     noise=torch.randn_like(x).to(device), drop=torch.zeros(batch_size, dtype=torch.long, device=device))
    fb, rb = latent_batch(), latent_batch()
    unlearner = ron_unlearner(setup)
    for _ in range(2):  # warm-up: kernel selection, allocator, optimizer state
        unlearner.step(fb, rb, alpha=1e-3)
    elapsed, _ = timed(lambda: [unlearner.step(fb, rb, alpha=1e-3) for _ in range(steps)], device)
    flops = step_flops(setup.model, setup.diffusion, batch_size, latent, device)
    return 100 * flops * steps / elapsed / 1e12 / peak


def race(reference, ours, full, warmup, device, repeats, before=lambda: None):
    """
    Both loops on `full` units (samples or steps): one untimed warm-up of each on `warmup` units (kernel
    selection, allocator, caches), then `repeats` alternating timed runs, the fastest of each kept (`before`
    runs ahead of every run). Returns (reference s, ours s, reference output, our output, our peak memory).
    """
    for fn in (reference, ours):
        before()
        fn(warmup)
    ref_s, our_s, our_mem = [], [], 0.0
    for _ in range(repeats):
        before()
        seconds, ref_out = timed(lambda: reference(full), device)
        ref_s.append(seconds)
        before()
        reset_peak(device)
        seconds, our_out = timed(lambda: ours(full), device)
        our_s.append(seconds)
        our_mem = max(our_mem, peak_memory_gb(device))
    return min(ref_s), min(our_s), ref_out, our_out, our_mem


def compare_fisher(setup, args, repeats):
    """Times both Fisher loops on the same samples; returns the speedup."""
    n = args.fisher_samples
    d = draws(n, args.image_size, 0)
    setup.model.eval()
    ref_t, our_t, ref_f, our_f, mem = race(lambda k: reference_fisher(setup, d.head(k)),
                                           lambda k: our_fisher(setup, d.head(k), args.batch_size),
                                           n, min(n, args.batch_size), setup.device, repeats)
    num = sum(float((our_f[k] - ref_f[k]).abs().sum()) for k in ref_f)
    den = sum(float(ref_f[k].abs().sum()) for k in ref_f)
    print(f"Fisher:  reference {n / ref_t:8.2f} samples/s | ours {n / our_t:8.2f} samples/s | speedup "
          f"{ref_t / our_t:5.2f}x | relative L1 difference of the Fisher {num / den:.2e} | peak memory {mem:.2f} GB")
    return dict(reference_s=ref_t, ours_s=our_t, samples=n, relative_l1_difference=num / den)


def compare_forget(setup, args, repeats, peak):
    """
    Times both forget loops on the same draws (the reference encodes both batches every step in float32; ours
    encodes the forget pool once); returns the speedup.
    """
    steps, latent, device = args.forget_steps, latent_shape(args.image_size), setup.device
    data = forget_data(steps, args.batch_size, args.forget_pool or args.batch_size, args.image_size, latent)
    state = {k: v.clone() for k, v in setup.model.state_dict().items()}
    setup.model.train()

    def ours(k):
        cached = encode_moments(setup.our_vae, data["forget"].to(device))  # once (--cache-latents: both flips)
        run_forget(setup, data, k, args.batch_size, cached)
    ref_t, our_t, _, _, mem = race(lambda k: run_forget(setup, data, k, args.batch_size, official=True), ours,
                                   steps, 1, device, repeats, before=lambda: setup.model.load_state_dict(state))
    flops = step_flops(setup.model, setup.diffusion, args.batch_size, latent, device) * steps
    print(f"Forget:  reference {steps / ref_t:8.3f} steps/s | ours {steps / our_t:8.3f} steps/s | speedup "
          f"{ref_t / our_t:5.2f}x | peak memory {mem:.2f} GB")
    mfu = 100 * flops / our_t / 1e12 / peak
    print(f"Model FLOP utilisation of our forget loop (VAE time included, its FLOPs not counted): "
          f"{flops / our_t / 1e12:.2f} TFLOP/s of a measured {peak:.2f} TFLOP/s matmul peak = "
          f"{mfu:.1f}% (reference loop: {100 * flops / ref_t / 1e12 / peak:.1f}%)")
    return dict(reference_s=ref_t, ours_s=our_t, steps=steps, mfu=mfu)


def main(args):
    """Runs both loops and prints the comparison."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision or ("bf16" if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (1 if device.type == "cuda" else 2)
    setup = Setup(random_dit(args.model, args.image_size, device), create_diffusion(""), sd_vae(device),
                  with_fast_layout(sd_vae(device)), amp_dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} at {args.image_size}x{args.image_size} on {device_name}, ours in "
          f"{'bf16' if amp_dtype else 'fp32'}, batch {args.batch_size}, best of {repeats} after a warm-up")
    fisher = compare_fisher(setup, args, repeats)
    setup.mask = all_ones_mask(setup.model)
    peak = matmul_peak_tflops(device, amp_dtype or torch.float32)
    forget = compare_forget(setup, args, repeats, peak)
    step_mfu = {}
    for batch_size in args.mfu_batch_sizes or [args.batch_size]:
        try:
            step_mfu[batch_size] = round(forget_step_mfu(setup, batch_size, latent_shape(args.image_size), peak), 1)
            print(f"MFU of the forget step alone (latents ready) at batch {batch_size}: {step_mfu[batch_size]:.1f}%")
        except torch.OutOfMemoryError:
            print(f"MFU of the forget step alone at batch {batch_size}: out of memory")
        setup.model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"fisher_speedup": fisher["reference_s"] / fisher["ours_s"],
                      "forget_speedup": forget["reference_s"] / forget["ours_s"], "device": device_name,
                      "forget_step_mfu": step_mfu, "fisher": fisher, "forget": forget}))


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", type=str, default="DiT-S/2", choices=list(DiT_models))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--fisher-samples", type=int, default=8)
    parser.add_argument("--forget-steps", type=int, default=3)
    parser.add_argument("--forget-pool", type=int, default=None,
                        help="forget images the steps cycle through (default: one batch, so each is drawn every "
                             "step; the official 600-step DiT-XL/2 run at batch 8 draws each of 1,300 about 4 times)")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default=None,
                        help="ours: bf16 on GPUs, fp32 on the CPU by default (the reference is always fp32)")
    parser.add_argument("--mfu-batch-sizes", type=int, nargs="*", default=None,
                        help="batch sizes at which to time the forget step alone (default: --batch-size)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each loop after the warm-up, the fastest kept (default: 2 on the CPU, "
                             "whose timings are noisier, 1 on GPUs)")
    parser.add_argument("--device", type=str, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
