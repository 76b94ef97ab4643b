"""
Step 3 of SFR-on: unlearn one class from a DiT. Each step of --method ron is a fast forget step (the forget
loss, masked by the saliency mask and clipped) followed by a slow remain step at the updated weights; --method
joint takes one step on both losses. Writes results/NNN-<model>-forget-<cls>-<method>-<loss>-lr..-f..-r../ with
log.txt, losses.json, sample grids checkpoints/NNNNNNN_sample.png and checkpoints checkpoints/NNNNNNN.pt that
the official DiT loader reads as the unlearned model. Runs on one CPU or GPU, or under torchrun / srun (DDP).
"""
import argparse
import os
import time
from copy import deepcopy
from dataclasses import asdict
from glob import glob

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from diffusion import create_diffusion
from sfron.build import add_model_args, autocast_dtype, load_model_and_vae
from sfron.data import DiffusionBatches, forget_latent_cache, unlearn_datasets
from sfron.dist import distributed
from sfron.mask import load_mask, resolve_mask_file
from sfron.sampling import generate, grid_image, per_sample_noise, sampling_diffusion, snapshot_classes
from sfron.unlearn import (FORGET_LOSSES, METHODS, check_finite_weights, forget_alpha_at, make_optimizer, relabel_class,
                           unlearn_step)
from sfron.utils import (UserError, atomic_json_dump, atomic_save_image, atomic_torch_save, create_logger,
                         run_main, safe_torch_load, start_experiment, update_ema)

# Settings that define a run: a resumed run must not change them.
RUN_KEYS = ("model", "forget_class", "method", "unlearn_loss", "lr", "batch_size", "n_iters", "forget_alpha",
            "decay_forget_alpha", "remain_alpha", "grad_clip", "lambd", "seed", "forget_label_dropout", "precision",
            "ema_decay")


def experiment_name(args):
    """The official folder suffix: <model>-forget-<cls>-<method>-<loss>-lr<lr>-f<alpha>-r<alpha>."""
    return (f"{args.model.replace('/', '-')}-forget-{args.forget_class}-{args.method}-{args.unlearn_loss}"
            f"-lr{args.lr}-f{args.forget_alpha}-r{args.remain_alpha}")


def find_resume_checkpoint(path):
    """The checkpoint to resume: a file, or the newest checkpoints/NNNNNNN.pt of an experiment folder."""
    if os.path.isdir(path):
        found = sorted(glob(os.path.join(path, "checkpoints", "[0-9]" * 7 + ".pt")))
        if not found:
            raise UserError(f"--resume {path}: no checkpoints/NNNNNNN.pt in that folder")
        path = found[-1]
    checkpoint = safe_torch_load(path, what="checkpoint")
    if not isinstance(checkpoint, dict) or not {"model", "opt", "args", "train_steps"} <= checkpoint.keys():
        raise UserError(f"--resume {path} is not a forget.py checkpoint (it lacks optimizer state or step)")
    return path, checkpoint


def merge_resumed_args(args, saved):
    """The resumed run's settings; any run-defining flag given differently on the command line is an error."""
    for key in RUN_KEYS:
        if key in saved and getattr(args, key) != saved[key]:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} differs from the resumed run's "
                            f"{saved[key]}; resume with the original command")
    return args


def save_checkpoint(path, raw_model, ema, opt, args, spec, step, history):
    """
    {"model", "ema", "opt", "args", "spec", "train_steps", "losses"}. The official loader prefers "ema": without
    --ema-decay it holds the very tensors of "model" (stored once), the unlearned weights. (An EMA with decay
    0.9999 over a few hundred steps, as the official script saves, would still be ~95% the original model.)
    """
    state = raw_model.state_dict()
    atomic_torch_save({"model": state, "ema": ema.state_dict() if ema is not None else state,
                       "opt": opt.state_dict(), "args": vars(args), "spec": asdict(spec), "train_steps": step,
                       "losses": history}, path)


def check_ema_decay(decay, n_iters):
    """An EMA that would still hold much of the original model must not be saved as the unlearned model."""
    if not 0 <= decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {decay}")
    left = decay ** n_iters
    if left > 0.01:
        raise UserError(f"--ema-decay {decay} over {n_iters} steps leaves {100 * left:.1f}% of the original "
                        f"weights in the EMA that checkpoints save as the unlearned model; use 0 (no EMA) or a decay "
                        f"below {0.01 ** (1 / n_iters):.4f}")


def save_snapshot(model, vae, spec, args, classes, z, step, checkpoint_dir, logger):
    """A grid of the forget class and other classes, from the same noise at every snapshot."""
    diffusion = sampling_diffusion(args.snapshot_sampler, args.snapshot_steps)
    labels = torch.tensor(classes, device=z.device)
    images = generate(model, diffusion, vae, labels, z, args.cfg_scale, sampler=args.snapshot_sampler,
                      autocast_dtype=autocast_dtype(args.precision))
    path = os.path.join(checkpoint_dir, f"{step:07d}_sample.png")
    atomic_save_image(grid_image(images, nrow=5), path)
    logger.info(f"Saved sample grid (classes {classes}) to {path}")


def main(args):
    """Unlearns --forget-class from the DiT."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    resume_path = checkpoint = None
    if args.resume:
        resume_path, checkpoint = find_resume_checkpoint(args.resume)
        args = merge_resumed_args(args, checkpoint["args"])
    if args.method not in METHODS or args.unlearn_loss not in FORGET_LOSSES:
        raise UserError(f"--method must be one of {METHODS} and --unlearn-loss one of {FORGET_LOSSES}")
    if args.n_iters < 1 or args.batch_size < 1:
        raise UserError("--n-iters and --batch-size must be positive")
    check_ema_decay(args.ema_decay, args.n_iters)
    with distributed() as dist:
        torch.manual_seed(args.seed)
        if checkpoint is None:
            experiment_dir, logger = start_experiment(dist, args.results_dir, experiment_name(args))
            logger.info(f"Experiment directory created at {experiment_dir}")
        else:
            experiment_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
            logger = create_logger(experiment_dir, dist.rank)
            logger.info(f"Resuming {experiment_dir} from {resume_path} (step {checkpoint['train_steps']})")
            args.ckpt = resume_path  # its recorded spec gives image size, classes, VAE and flips
        checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
        os.makedirs(checkpoint_dir, exist_ok=True)
        run(args, dist, logger, experiment_dir, checkpoint_dir, checkpoint)


def saliency_mask_for(args, model, dist, logger):
    """The mask of --mask-path (a file, or the folder's fisher_<--threshold>.pt), or None."""
    if not args.mask_path:
        logger.info("No --mask-path: the forget step updates every weight")
        return None
    mask_file = resolve_mask_file(args.mask_path, args.forget_class, args.threshold)
    mask = load_mask(mask_file, model, dist.device)
    kept = sum(float(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    logger.info(f"Saliency mask {mask_file}: {100 * kept:.2f}% of weights updated by the forget step")
    return mask


def restore(resumed, raw_model, ema, opt):
    """Loads a resumed run's weights, EMA and optimizer; returns (its step, its loss history)."""
    raw_model.load_state_dict(resumed["model"])  # the loader read "ema"; training continues from "model"
    if ema is not None:
        ema.load_state_dict(resumed["ema"])
    opt.load_state_dict(resumed["opt"])
    return resumed["train_steps"], list(resumed.get("losses", []))


def run(args, dist, logger, experiment_dir, checkpoint_dir, resumed):
    """The unlearning loop of main()."""
    raw_model, vae, spec, _ = load_model_and_vae(args, dist.device, logger)
    raw_model.grad_checkpointing = args.grad_checkpointing
    forget_set, remain_set, _ = unlearn_datasets(args.data_path, args.forget_class, spec.image_size, spec.num_classes)
    logger.info(f"Forget set: {len(forget_set):,} images, remain set: {len(remain_set):,} images ({args.data_path})")

    mask = saliency_mask_for(args, raw_model, dist, logger)
    relabel = relabel_class(args.forget_class, spec.num_classes) if args.unlearn_loss == "rl" else None
    if relabel is not None:
        logger.info(f"Relabelling forget images as class {relabel}")

    opt = make_optimizer([p for p in raw_model.parameters() if p.requires_grad], args.lr)
    ema = deepcopy(raw_model).requires_grad_(False).eval() if args.ema_decay > 0 else None
    start, history = restore(resumed, raw_model, ema, opt) if resumed is not None else (0, [])
    model = DDP(raw_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) \
        if dist.enabled else raw_model
    raw_model.train()  # label dropout on, as in the official script

    diffusion = create_diffusion(timestep_respacing="")
    common = dict(global_batch=args.batch_size, dist=dist, seed=args.seed, num_timesteps=diffusion.num_timesteps,
                  dropout_prob=raw_model.y_embedder.dropout_prob, vae=vae, num_workers=args.num_workers,
                  start=start, stop=args.n_iters, random_flip=spec.random_flip,
                  autocast_dtype=autocast_dtype(args.precision))
    forget_batches = DiffusionBatches(forget_set, "forget",
                                      latent_cache=forget_latent_cache(args, spec, forget_set, vae, dist, logger),
                                      **common)
    remain_batches = DiffusionBatches(remain_set, "remain", **common)

    classes = snapshot_classes(args.forget_class, spec.num_classes)
    shape = (raw_model.in_channels, raw_model.input_size, raw_model.input_size)
    z = per_sample_noise([(args.seed, 7, i) for i in range(len(classes))], shape, dist.device)
    if dist.is_main and args.snapshot_every > 0 and start == 0:
        save_snapshot(raw_model, vae, spec, args, classes, z, 0, checkpoint_dir, logger)

    logger.info(f"Unlearning for {args.n_iters} steps (from step {start}) with {args.method}/{args.unlearn_loss}, "
                f"lr {args.lr}, forget alpha {args.forget_alpha}{' (cosine decay)' if args.decay_forget_alpha else ''}, "
                f"remain alpha {args.remain_alpha}, batch {args.batch_size} on {dist.world_size} process(es)")
    step_kwargs = dict(method=args.method, unlearn_loss=args.unlearn_loss, remain_alpha=args.remain_alpha, mask=mask,
                       grad_clip=args.grad_clip, dist=dist, forget_drop_labels=args.forget_label_dropout,
                       lambd=args.lambd, relabel=relabel, autocast_dtype=autocast_dtype(args.precision))
    running, log_steps, start_time = [0.0, 0.0], 0, time.time()
    train_steps = start
    for forget_batch, remain_batch in zip(forget_batches, remain_batches):
        alpha = forget_alpha_at(train_steps, args.n_iters, args.forget_alpha, args.decay_forget_alpha)
        f_loss, r_loss = unlearn_step(model, raw_model, diffusion, opt, forget_batch, remain_batch, alpha=alpha,
                                      **step_kwargs)
        if ema is not None:
            update_ema(ema, raw_model, args.ema_decay)
        train_steps += 1
        history.append([train_steps, f_loss, r_loss])
        running[0] += f_loss
        running[1] += r_loss
        log_steps += 1
        if train_steps % args.log_every == 0 or train_steps == args.n_iters:
            elapsed = time.time() - start_time
            logger.info(f"(step={train_steps:07d}) Forget Loss: {running[0] / log_steps:.4f}, Remain Loss: "
                        f"{running[1] / log_steps:.4f}, alpha: {alpha:.3g}, Train Steps/Sec: {log_steps / elapsed:.2f}")
            running, log_steps, start_time = [0.0, 0.0], 0, time.time()
        if dist.is_main and args.snapshot_every > 0 and train_steps % args.snapshot_every == 0:
            save_snapshot(ema if ema is not None else raw_model, vae, spec, args, classes, z, train_steps, checkpoint_dir, logger)
        if train_steps % args.ckpt_every == 0 or train_steps == args.n_iters:
            check_finite_weights(raw_model, train_steps)  # on every process: identical weights, all stop together
            if dist.is_main:
                path = os.path.join(checkpoint_dir, f"{train_steps:07d}.pt")
                save_checkpoint(path, raw_model, ema, opt, args, spec, train_steps, history)
                atomic_json_dump({"columns": ["step", "forget_loss", "remain_loss"], "losses": history},
                                 os.path.join(experiment_dir, "losses.json"))
                logger.info(f"Saved checkpoint to {path}")
            dist.barrier()
    if dist.device.type == "cuda":
        logger.info(f"Peak GPU memory: {torch.cuda.max_memory_allocated(dist.device) / 2 ** 30:.2f} GiB")
    logger.info("Done!")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data-path", type=str, required=True)
    parser.add_argument("--results-dir", type=str, default="results")
    add_model_args(parser)
    parser.add_argument("--n-iters", type=int, default=2000, help="unlearning steps")
    parser.add_argument("--batch-size", type=int, default=1, help="forget and remain samples per step, all processes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--cache-latents", action="store_true",
                        help="encode the forget images (both flips) with the VAE once instead of at every draw")
    parser.add_argument("--latent-cache-dir", type=str, default=None,
                        help="keep the --cache-latents moments in this folder for the next script")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval (and at the last step)")
    parser.add_argument("--snapshot-every", type=int, default=50, help="sample-grid interval (0: none)")
    parser.add_argument("--snapshot-sampler", type=str, choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--snapshot-steps", type=int, default=50,
                        help="sampling steps of each snapshot (the official script used 1000 DDPM steps)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the snapshots")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="keep an EMA of the unlearned weights (saved as 'ema', sampled by the snapshots); "
                             "0: none, 'ema' is the final weights. A decay that would leave over 1%% of the original "
                             "model in the EMA is refused")
    parser.add_argument("--resume", type=str, default=None,
                        help="an experiment folder or checkpoint of an interrupted run to continue")
    # unlearning
    parser.add_argument("--forget-class", type=int, required=True, help="class to forget")
    parser.add_argument("--method", type=str, choices=METHODS, default="ron",
                        help="ron: fast forget step then slow remain step (SFR-on); joint: one step on both losses")
    parser.add_argument("--unlearn-loss", type=str, choices=FORGET_LOSSES, default="ga",
                        help="ga: gradient ascent; adaga: adaptive gradient ascent; rl: relabelling")
    parser.add_argument("--lambd", type=float, default=0.5, help="lambda of adaga (weights 1 / loss^lambda)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip of the forget gradient")
    parser.add_argument("--forget-alpha", type=float, default=1.0, help="weight alpha of the forget loss")
    parser.add_argument("--decay-forget-alpha", action="store_true",
                        help="cosine decay of the forget weight: alpha (1 + cos(pi k / K)) / 2")
    parser.add_argument("--remain-alpha", type=float, default=1.0, help="weight of the remain loss")
    parser.add_argument("--forget-label-dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="drop forget labels to the null class as training mode does in the official script "
                             "(default); --no-forget-label-dropout drops labels on the remain step only "
                             "(see bench/label_dropout.py)")
    parser.add_argument("--mask-path", type=str, default=None,
                        help="a mask file, or the mask folder of generate_mask.py (then --threshold picks "
                             "<folder>/<cls>/fisher_<threshold>.pt); none: no mask")
    parser.add_argument("--threshold", type=float, default=1.0, help="the mask threshold gamma to use from a folder")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
