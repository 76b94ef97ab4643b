"""
Trains a class-conditional DiT on an ImageNet-style folder, in the manner of the official train.py (AdamW, by
default at a constant learning rate; an EMA of the weights; label dropout for guidance). --exclude-class leaves one
class out: the model retrained without the forget class, the gold standard of unlearning. Used for the embedded
digits and MNIST models; runs on one CPU or GPU, or under torchrun / srun (DDP). SIGTERM or SIGUSR1 saves the run
after the step in progress (exit status 75), and --resume auto continues it bit-identically.
"""
import argparse
import math
import os
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import description, run_main
from diffusion import create_diffusion
from models import DiT_models
from sfron.build import ModelSpec, autocast_dtype, build_dit
from sfron.checkpoint import save_safetensors_weights
from sfron.data import (DiffusionBatches, ImageSet, LatentEncoder, StreamConfig, dataset_fingerprint,
                        find_class_folders, list_images)
from sfron.dist import distributed
from sfron.files import atomic_json_dump, atomic_torch_save
from sfron.loss import check_finite, diffusion_loss
from sfron.optim import update_ema
from sfron.preemption import Preempted, StopSignals
from sfron.resume import RUN_RECORD, RunLookup, check_same_run, locate_run, pinned_record
from sfron.utils import UserError, check_class_index, create_logger
from sfron.vae import latent_channels, load_vae


RESUME_KEYS = ("model", "ema", "opt", "scheduler", "run", "train_steps")  # what a checkpoint needs to be continued


def training_set(data_path, image_size, num_classes, exclude_class=None):
    """The images of every class folder but exclude_class, labelled by sorted folder position."""
    root, classes = find_class_folders(data_path)
    if len(classes) > num_classes:
        raise UserError(f"{root} has {len(classes)} class folders but --num-classes is {num_classes}")
    if exclude_class is not None:
        check_class_index(exclude_class, len(classes), "--exclude-class", root)
    keep = [i for i in range(len(classes)) if i != exclude_class]
    return ImageSet(list_images(root, classes, keep), image_size, classes, root)


def lr_factor(step, total_steps, schedule, warmup_steps):
    """The multiple of --lr at 0-based `step`: a linear warmup over warmup_steps, then constant (the official
    schedule) or a cosine decay to zero at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def training_steps(args, num_images):
    """The run's optimizer steps (--max-steps, else --epochs over num_images), with --warmup-steps checked against
    them."""
    steps = args.max_steps or args.epochs * (num_images // args.global_batch_size)
    if args.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be at least 0, got {args.warmup_steps}")
    if args.warmup_steps and args.warmup_steps >= steps:
        raise UserError(f"--warmup-steps {args.warmup_steps} leaves nothing of the {steps} training steps")
    return steps


@dataclass(frozen=True)
class TrainingSettings:
    """What a training run optimizes: a resumed run must keep every field (with the model spec and the images)."""
    steps: int
    global_batch_size: int
    global_seed: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    ema_decay: float
    precision: str
    exclude_class: Optional[int]


def training_settings(args, steps):
    """TrainingSettings of the command line, for `steps` optimizer steps."""
    return TrainingSettings(steps, args.global_batch_size, args.global_seed, args.lr, args.lr_schedule,
                            args.warmup_steps, args.ema_decay, args.precision, args.exclude_class)


def save_checkpoint(path, state, args, record, train_steps):
    """Rank 0 writes checkpoints/NNNNNNN.pt: the weights, the EMA, the optimizer and schedule, and the run record.
    state: (model, ema, opt, scheduler)."""
    model, ema, opt, scheduler = state
    atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                       "scheduler": scheduler.state_dict(), "args": vars(args), "spec": record["model"],
                       "run": record, "train_steps": train_steps}, path)


def export_ema(ema, args, spec):
    """Writes the final EMA weights (in --export-precision) and the settings, without optimizer state, to --export."""
    dtype = torch.float16 if args.export_precision == "fp16" else torch.float32
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    if args.export.endswith(".safetensors"):
        save_safetensors_weights(weights, args.export, asdict(spec))
    else:
        atomic_torch_save({"ema": weights, "spec": asdict(spec), "args": vars(args)}, args.export)


def main(args):
    """Trains the DiT and writes results/NNN-<model>/checkpoints/NNNNNNN.pt."""
    torch.backends.cuda.matmul.allow_tf32 = True
    with distributed() as dist, StopSignals() as stop:
        torch.manual_seed(args.global_seed)
        suffix = args.model.replace("/", "-") + (f"-without-{args.exclude_class}" if args.exclude_class is not None else "")
        # the images and the step count first: a bad folder or warmup is one error line before any folder is made
        dataset = training_set(args.data_path, args.image_size, args.num_classes, args.exclude_class)
        steps = training_steps(args, len(dataset))
        spec = ModelSpec(model=args.model, image_size=args.image_size, num_classes=args.num_classes, vae=args.vae,
                         random_flip=args.random_flip)
        record = pinned_record({"model": spec, "training": training_settings(args, steps),
                                "data": {"fingerprint": dataset_fingerprint(dataset)}})
        lookup = RunLookup(args.results_dir, args.resume, suffix, "train.py", RESUME_KEYS)
        experiment_dir, resumed_path, resumed = locate_run(lookup, record, dist)
        if resumed is not None:
            check_same_run(resumed["run"], record)
        elif dist.is_main:
            atomic_json_dump(record, os.path.join(experiment_dir, RUN_RECORD))
        logger = create_logger(experiment_dir, dist.rank)
        start = 0 if resumed is None else resumed["train_steps"]
        logger.info(f"Experiment directory created at {experiment_dir}" if resumed is None else
                    f"Resuming {experiment_dir} from {resumed_path} (step {start})")
        checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
        os.makedirs(checkpoint_dir, exist_ok=True)
        vae = load_vae(spec.vae, dist.device)
        model = build_dit(spec, in_channels=3 if vae is None else latent_channels(vae)).to(dist.device)
        ema = deepcopy(model).requires_grad_(False).eval()
        logger.info(f"{spec.describe()}: {sum(p.numel() for p in model.parameters()):,} parameters")
        logger.info(f"Training on {len(dataset):,} images of {args.data_path}"
                    + (f" without class {args.exclude_class}" if args.exclude_class is not None else ""))

        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: lr_factor(i, steps, args.lr_schedule, args.warmup_steps))
        if resumed is not None:  # before DDP, which starts every process from rank 0's weights
            model.load_state_dict(resumed["model"])
            ema.load_state_dict(resumed["ema"])
            opt.load_state_dict(resumed["opt"])
            scheduler.load_state_dict(resumed["scheduler"])
        ddp = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) if dist.enabled else model
        model.train()
        diffusion = create_diffusion(timestep_respacing="")
        config = StreamConfig(stream="train", seed=args.global_seed, global_batch=args.global_batch_size,
                              num_timesteps=diffusion.num_timesteps, dropout_prob=model.y_embedder.dropout_prob,
                              random_flip=args.random_flip)
        encoder = LatentEncoder(vae) if vae is not None else None
        # each sample's image, noise and timestep are keyed by its position in the stream: a resumed run sees
        # exactly the batches the uninterrupted one would have
        batches = DiffusionBatches(dataset, config, dist, range(start, steps), encoder, args.num_workers)
        logger.info(f"Training for {steps} steps of {args.global_batch_size} images (from step {start})")
        running, log_steps, start_time = 0.0, 0, time.time()
        for batch in batches:
            with torch.autocast(dist.device.type, dtype=autocast_dtype(args.precision),
                                enabled=args.precision == "bf16"):
                losses = diffusion_loss(ddp, diffusion, batch, force_drop_ids=batch.drop)
            check_finite(losses, "training loss", batch.step)
            opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            opt.step()
            scheduler.step()
            update_ema(ema, model, args.ema_decay)
            running += losses.detach().mean().item()
            log_steps += 1
            train_steps = batch.step + 1
            if train_steps % args.log_every == 0:
                logger.info(f"(step={train_steps:07d}) Train Loss: {running / log_steps:.4f}, "
                            f"Train Steps/Sec: {log_steps / (time.time() - start_time):.2f}")
                running, log_steps, start_time = 0.0, 0, time.time()
            stopping = stop.agreed(dist, f"after step {train_steps}")  # every process, every step: all stop together
            if train_steps % args.ckpt_every == 0 or train_steps == steps or stopping:
                path = os.path.join(checkpoint_dir, f"{train_steps:07d}.pt")
                if dist.is_main:
                    save_checkpoint(path, (model, ema, opt, scheduler), args, record, train_steps)
                    logger.info(f"Saved checkpoint to {path}")
                    if args.save_safetensors and train_steps == steps:
                        save_safetensors_weights(ema.state_dict(), path[:-len(".pt")] + ".safetensors", asdict(spec))
                        logger.info(f"Saved the final EMA weights to {path[:-len('.pt')]}.safetensors")
                dist.barrier()
            if stopping and train_steps < steps:
                raise Preempted(stop.name(), f"after step {train_steps}; saved {path}")
        if args.export and dist.is_main:
            export_ema(ema, args, spec)
            logger.info(f"Exported the EMA weights ({args.export_precision}) to {args.export}")
        logger.info("Done!")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--data-path", type=str, required=True)
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", type=str, choices=["constant", "cosine"], default="constant",
                        help="constant (the official schedule) or a cosine decay to zero at the last step")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup over these steps")
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--vae", type=str, default="ema", help="ema | mse | a local VAE folder | none (pixel space)")
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=50_000)
    parser.add_argument("--export-precision", type=str, choices=["fp32", "fp16"], default="fp32",
                        help="dtype of the exported weights (fp16 halves the file; they load as float32)")
    parser.add_argument("--export", type=str, default=None,
                        help="also write the final EMA weights and settings, without optimizer state, to this file "
                             "(a .safetensors name writes safetensors)")
    parser.add_argument("--save-safetensors", action="store_true",
                        help="also write the final EMA weights as one .safetensors file beside the last checkpoint")
    parser.add_argument("--exclude-class", type=int, default=None,
                        help="leave this class out of training (a retrained-without-the-class reference)")
    parser.add_argument("--resume", type=str, default=None,
                        help="continue a run: its checkpoint file or experiment folder (newest checkpoint), or auto "
                             "(the newest run under --results-dir with the same settings and images; else a new run)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
