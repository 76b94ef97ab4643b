"""
Times this repository's Fisher and forget steps against loops with the official semantics, on the same samples:
  reference Fisher: batch 1, the VAE encode in the loop, every squared gradient copied to the CPU each step;
  reference forget: float32, the VAE encode of both batches in the loop (as the official forget.py);
  ours: per-sample Fisher at --batch-size (hooks), --precision autocast (the DiT and the VAE encodes), forget
  latents cached once, fused AdamW, the VAE as load_vae gives it (channels-last on CPUs).
Prints samples/s, the speedups, peak memory and the model FLOP utilisation (MFU) against a measured matmul peak,
of the whole forget loop and of the forget step alone (latents ready) at each --mfu-batch-sizes;
the last line is JSON: {"fisher_speedup": ..., "forget_speedup": ..., "device": ..., "forget_step_mfu": ...}.
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

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402
from sfron.data import Batch  # noqa: E402
from sfron.dist import Dist  # noqa: E402
from sfron.fisher import PerSampleSquaredGrads, diffusion_loss  # noqa: E402
from sfron.unlearn import make_optimizer, unlearn_step  # noqa: E402
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


def draws(n, image_size, seed):
    """n (image, label, t, noise, vae eps) samples, identical for both loops."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, image_size, image_size), generator=g) * 2 - 1
    labels = torch.randint(0, 1000, (n,), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise, eps = (torch.randn((n, *latent_shape(image_size)), generator=g) for _ in range(2))
    return images, labels, t, noise, eps


def reference_fisher(model, vae, diffusion, images, labels, t, noise, eps):
    """The official loop: one sample per step, VAE encode inside, squared gradients accumulated on the CPU."""
    fisher = {n: 0 for n, p in model.named_parameters() if p.requires_grad}
    device = next(model.parameters()).device
    for i in range(len(images)):
        mean, std = encode_moments(vae, images[i:i + 1].to(device))
        x = sample_latents(mean, std, eps[i:i + 1].to(device))
        b = Batch(x=x, y=labels[i:i + 1].to(device), t=t[i:i + 1].to(device), noise=noise[i:i + 1].to(device),
                  drop=torch.zeros(1, dtype=torch.long, device=device))
        model.zero_grad()
        diffusion_loss(model, diffusion, b).mean().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach().cpu() ** 2 / len(images)
    return fisher


def our_fisher(model, vae, diffusion, images, labels, t, noise, eps, batch_size, amp_dtype):
    """Per-sample squared gradients of whole batches, summed on the device."""
    device = next(model.parameters()).device
    with PerSampleSquaredGrads(model) as grads:
        for s in range(0, len(images), batch_size):
            sl = slice(s, s + batch_size)
            mean, std = encode_moments(vae, images[sl].to(device), amp_dtype)
            b = Batch(x=sample_latents(mean, std, eps[sl].to(device)), y=labels[sl].to(device), t=t[sl].to(device),
                      noise=noise[sl].to(device), drop=torch.zeros(len(images[sl]), dtype=torch.long, device=device))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = diffusion_loss(model, diffusion, b)
            grads.backward(losses.float().sum())
    return {n: v.cpu() / len(images) for n, v in grads.sums.items()}


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


def ron_step(model, diffusion, opt, fb, rb, mask, amp_dtype):
    """One step of forget.py's default ron loop."""
    unlearn_step(model, model, diffusion, opt, fb, rb, method="ron", unlearn_loss="ga", alpha=1e-3, remain_alpha=1.0,
                 mask=mask, grad_clip=1.0, dist=Dist(device=next(model.parameters()).device), autocast_dtype=amp_dtype)


def run_forget(model, vae, diffusion, data, steps, batch_size, amp_dtype, mask, cached=None, official=False):
    """The ron loop on the benchmark data: the official AdamW (foreach) or ours (fused)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0) if official else make_optimizer(params, 1e-4)
    for fb, rb in forget_batches(vae, data, steps, batch_size, device, cached, amp_dtype):
        ron_step(model, diffusion, opt, fb, rb, mask, amp_dtype)


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


def forget_step_mfu(model, diffusion, batch_size, latent, mask, amp_dtype, peak, steps=5):
    """MFU (%) of the ron step alone, on latents already on the device (no VAE, no data loading)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)

    def latent_batch():
        x = torch.randn((batch_size, *latent), generator=g)
        return Batch(x=x.to(device), y=torch.randint(0, 1000, (batch_size,), generator=g).to(device),
                     t=torch.randint(0, 1000, (batch_size,), generator=g).to(device),
                     noise=torch.randn_like(x).to(device), drop=torch.zeros(batch_size, dtype=torch.long, device=device))
    fb, rb = latent_batch(), latent_batch()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4)
    for _ in range(2):  # warm-up: kernel selection, allocator, optimizer state
        ron_step(model, diffusion, opt, fb, rb, mask, amp_dtype)
    elapsed, _ = timed(lambda: [ron_step(model, diffusion, opt, fb, rb, mask, amp_dtype) for _ in range(steps)],
                       device)
    return 100 * step_flops(model, diffusion, batch_size, latent, device) * steps / elapsed / 1e12 / peak


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


def compare_fisher(model, vaes, diffusion, args, amp_dtype, device):
    """Times both Fisher loops on the same samples (vaes: the official VAE, ours as load_vae gives it)."""
    n = args.fisher_samples
    images, labels, t, noise, eps = draws(n, args.image_size, 0)
    model.eval()
    ref_t, our_t, ref_f, our_f, mem = race(
        lambda k: reference_fisher(model, vaes[0], diffusion, images[:k], labels[:k], t[:k], noise[:k], eps[:k]),
        lambda k: our_fisher(model, vaes[1], diffusion, images[:k], labels[:k], t[:k], noise[:k], eps[:k],
                             args.batch_size, amp_dtype),
        n, min(n, args.batch_size), device, args.repeats)
    num = sum(float((our_f[k] - ref_f[k]).abs().sum()) for k in ref_f)
    den = sum(float(ref_f[k].abs().sum()) for k in ref_f)
    print(f"Fisher:  reference {n / ref_t:8.2f} samples/s | ours {n / our_t:8.2f} samples/s | speedup "
          f"{ref_t / our_t:5.2f}x | relative L1 difference of the Fisher {num / den:.2e} | peak memory {mem:.2f} GB")
    return ref_t / our_t


def compare_forget(model, vaes, diffusion, args, amp_dtype, device, mask, peak):
    """
    Times both forget loops on the same draws (the reference encodes both batches every step in float32; ours
    encodes the forget pool once); returns the speedup.
    """
    steps, latent = args.forget_steps, latent_shape(args.image_size)
    data = forget_data(steps, args.batch_size, args.forget_pool or args.batch_size, args.image_size, latent)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    def ours(k):
        cached = encode_moments(vaes[1], data["forget"].to(device))  # once (--cache-latents: both flips)
        run_forget(model, vaes[1], diffusion, data, k, args.batch_size, amp_dtype, mask, cached)
    ref_t, our_t, _, _, mem = race(
        lambda k: run_forget(model, vaes[0], diffusion, data, k, args.batch_size, None, mask, official=True), ours,
        steps, 1, device, args.repeats, before=lambda: model.load_state_dict(state))
    flops = step_flops(model, diffusion, args.batch_size, latent, device) * steps
    print(f"Forget:  reference {steps / ref_t:8.3f} steps/s | ours {steps / our_t:8.3f} steps/s | speedup "
          f"{ref_t / our_t:5.2f}x | peak memory {mem:.2f} GB")
    print(f"Model FLOP utilisation of our forget loop (VAE time included, its FLOPs not counted): "
          f"{flops / our_t / 1e12:.2f} TFLOP/s of a measured {peak:.2f} TFLOP/s matmul peak = "
          f"{100 * flops / our_t / 1e12 / peak:.1f}% (reference loop: {100 * flops / ref_t / 1e12 / peak:.1f}%)")
    return ref_t / our_t


def main(args):
    """Runs both loops and prints the comparison."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision or ("bf16" if device.type == "cuda" else "fp32")]
    args.repeats = args.repeats or (1 if device.type == "cuda" else 2)
    model, diffusion = random_dit(args.model, args.image_size, device), create_diffusion("")
    vaes = sd_vae(device), with_fast_layout(sd_vae(device))  # the official layout; ours as load_vae gives it
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} at {args.image_size}x{args.image_size} on {device_name}, ours in "
          f"{'bf16' if amp_dtype else 'fp32'}, batch {args.batch_size}, best of {args.repeats} after a warm-up")
    fisher_speedup = compare_fisher(model, vaes, diffusion, args, amp_dtype, device)
    mask = all_ones_mask(model)
    peak = matmul_peak_tflops(device, amp_dtype or torch.float32)
    forget_speedup = compare_forget(model, vaes, diffusion, args, amp_dtype, device, mask, peak)
    latent = latent_shape(args.image_size)
    step_mfu = {}
    for batch_size in args.mfu_batch_sizes or [args.batch_size]:
        try:
            step_mfu[batch_size] = round(forget_step_mfu(model, diffusion, batch_size, latent, mask, amp_dtype, peak), 1)
            print(f"MFU of the forget step alone (latents ready) at batch {batch_size}: {step_mfu[batch_size]:.1f}%")
        except torch.OutOfMemoryError:
            print(f"MFU of the forget step alone at batch {batch_size}: out of memory")
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"fisher_speedup": round(fisher_speedup, 3), "forget_speedup": round(forget_speedup, 3),
                      "device": device_name, "forget_step_mfu": step_mfu}))


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
