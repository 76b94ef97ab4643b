"""
The whole SFR-on run for one forget class, timed stage by stage on synthetic data (random images, a random-weight
DiT, the Stable Diffusion VAE architecture with random weights): generate_fisher.py (forget and remain Fisher),
generate_mask.py and forget.py, each run as a user runs it, so process start, model, VAE and data loading and
checkpoint writing are all included. Optionally the loops with the official semantics (bench/throughput.py) run
on part of the same work, and their time is projected to all of it. The last line is JSON.

    python bench/full_run.py --model DiT-XL/2 --image-size 256      # 2000 + 2000 Fisher samples, 600 steps
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402
import throughput  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402


def stage(name, script, *flags):
    """Runs one repository script, stops on failure, returns its wall-clock seconds."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"error: the {name} stage failed with exit status {proc.returncode}: {' '.join(cmd)}")
    print(f"{name:<8} {seconds:8.1f} s")
    return seconds


def run_ours(args, work):
    """The three scripts of the README on the synthetic data; {stage: seconds}."""
    common = ["--model", args.model, "--data-path", f"{work}/data", "--ckpt", f"{work}/dit.pt", "--vae",
              f"{work}/vae", "--forget-class", 0, "--precision", args.precision,
              "--num-workers", args.num_workers, "--cache-latents", f"{work}/latents"]
    times = {}
    times["fisher"] = stage("fisher", "generate_fisher.py", *common, "--batch-size", args.fisher_batch_size,
                            "--n-iters", args.fisher_samples // args.fisher_batch_size, "--mask-path", f"{work}/mask",
                            "--results-dir", f"{work}/results")
    times["mask"] = stage("mask", "generate_mask.py", "--mask-path", f"{work}/mask", "--forget-class", 0,
                          "--thresholds", args.threshold)
    times["forget"] = stage("forget", "forget.py", *common, "--batch-size", args.batch_size, "--n-iters",
                            args.forget_steps, "--recipe", "official", "--lr", 1e-4, "--forget-alpha", 1e-3,
                            "--mask-path", f"{work}/mask", "--threshold", args.threshold, "--snapshot-every", 0,
                            "--ckpt-every", args.forget_steps, "--results-dir", f"{work}/results",
                            "--log-every", max(1, args.forget_steps // 4))
    return times


def run_reference(args, device):
    """Seconds of the official-semantics loops on part of the work, and their projection to all of it."""
    model = synthetic.random_dit(args.model, args.image_size, device)
    vae = synthetic.sd_vae(device)
    setup = throughput.Setup(model, create_diffusion(""), vae, vae, None, throughput.all_ones_mask(model))
    n, steps = args.reference_fisher_samples, args.reference_forget_steps
    draws = throughput.draws(n, args.image_size, 0)
    model.eval()
    fisher_s, _ = throughput.timed(lambda: throughput.reference_fisher(setup, draws), device)
    model.train()
    data = throughput.forget_data(steps, args.batch_size, args.batch_size, args.image_size,
                                  throughput.latent_shape(args.image_size))
    forget_s, _ = throughput.timed(lambda: throughput.run_forget(setup, data, steps, args.batch_size, official=True),
                                   device)
    # two Fisher passes (forget and remain) of --fisher-samples each
    projected = 2 * args.fisher_samples * fisher_s / n + args.forget_steps * forget_s / steps
    print(f"official semantics: {n / fisher_s:.2f} Fisher samples/s, {steps / forget_s:.3f} forget steps/s "
          f"(measured on {n} samples and {steps} steps) -> the whole run projected at {projected:.0f} s "
          f"(model loading and masks not counted)")
    return {"official_projected_s": projected, "official_fisher_s": fisher_s, "official_forget_s": forget_s}


def main(args):
    """Makes the synthetic data, runs and times the pipeline, prints the summary."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.fisher_samples % args.fisher_batch_size:
        sys.exit("error: --fisher-samples must be a multiple of --fisher-batch-size")
    work = args.work or tempfile.mkdtemp(prefix="sfron-full-run-")
    try:
        synthetic.main(argparse.Namespace(out=work, model=args.model, image_size=args.image_size, classes=2,
                                          images_per_class=args.images_per_class))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"{args.model} at {args.image_size}x{args.image_size} on {name}, {args.precision}: "
              f"{args.fisher_samples} + {args.fisher_samples} Fisher samples (batch {args.fisher_batch_size}), "
              f"mask at threshold {args.threshold}, {args.forget_steps} forget steps (batch {args.batch_size})")
        times = run_ours(args, work)
        total = sum(times.values())
        print(f"total    {total:8.1f} s")
        summary = {"total_s": round(total, 1), **{f"{k}_s": round(v, 1) for k, v in times.items()}, "device": name,
                   "precision": args.precision}
        if args.reference_fisher_samples > 0 and args.reference_forget_steps > 0:
            summary.update({k: round(v, 3) for k, v in run_reference(args, device).items()})
        print(json.dumps(summary))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", type=str, default="DiT-XL/2", choices=list(DiT_models))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images-per-class", type=int, default=1300, help="an ImageNet class has about 1,300")
    parser.add_argument("--fisher-samples", type=int, default=2000, help="samples of each Fisher")
    parser.add_argument("--fisher-batch-size", type=int, default=32)
    parser.add_argument("--forget-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8, help="forget and remain samples per forget step")
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default=None,
                        help="default: bf16 on GPUs, fp32 on the CPU")
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--reference-fisher-samples", type=int, default=0,
                        help="time the official batch-1 Fisher on this many samples and project (0: skip)")
    parser.add_argument("--reference-forget-steps", type=int, default=0,
                        help="time the official forget loop on this many steps and project (0: skip)")
    parser.add_argument("--work", type=str, default=None, help="keep the data and outputs here (default: a "
                                                               "temporary folder, removed at the end)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
