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
from dataclasses import asdict, dataclass, replace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import add_data_args, add_model_args, latent_cache_options, model_request, run_main
from diffusion import create_diffusion
from sfron.build import autocast_dtype, load_model_and_vae
from sfron.checkpoint import save_safetensors_weights
from sfron.data import (DiffusionBatches, LatentEncoder, NoiseImages, StreamConfig, TensorImages,
                        dataset_fingerprint, forget_latent_cache, unlearn_datasets)
from sfron.dist import distributed
from sfron.files import atomic_json_dump, atomic_torch_save, remove_stale_temporaries
from sfron.fisher import fisher_diagonal
from sfron.loss import check_finite_weights
from sfron.mask import MaskChoice, kept_share, saliency_mask_for
from sfron.optim import update_ema
from sfron.preemption import Preempted, StopSignals
from sfron.resume import (RUN_RECORD, check_same_run, checkpoint_identity, find_matching_run, find_resume_checkpoint,
                          newest_checkpoint, pinned_record)
from sfron.sampling import (SamplerConfig, SnapshotGrid, SnapshotOptions, generate_replay, per_sample_noise,
                            snapshot_classes)
from sfron.unlearn import FORGET_LOSSES, METHODS, NON_FINITE_HINT, FrozenReference, Unlearner, UnlearnSettings
from sfron.utils import create_logger, start_experiment


@dataclass(frozen=True)
class DataSource:
    """The data a run unlearns on: the root folder and a fingerprint of the forget and remain images."""
    data_path: str
    fingerprint: str


def unlearn_settings(args):
    """The UnlearnSettings of the command line."""
    return UnlearnSettings(
        forget_class=args.forget_class, method=args.method, unlearn_loss=args.unlearn_loss, n_iters=args.n_iters,
        batch_size=args.batch_size, lr=args.lr, forget_alpha=args.forget_alpha,
        decay_forget_alpha=args.decay_forget_alpha, remain_alpha=args.remain_alpha, grad_clip=args.grad_clip,
        lambd=args.lambd, forget_label_dropout=args.forget_label_dropout, seed=args.seed, precision=args.precision,
        ema_decay=args.ema_decay, esd_eta=args.esd_eta, ewc_lambda=args.ewc_lambda, remain_source=args.remain_source,
        replay_samples=args.replay_samples, replay_steps=args.replay_steps, replay_cfg_scale=args.replay_cfg_scale,
        forget_loss_ceiling=args.forget_loss_ceiling, null_label_stop=args.null_label_stop, remain_lr=args.remain_lr,
        separate_forget_optimizer=args.separate_forget_optimizer, mask_remain_step=args.mask_remain_step,
        remain_loss=args.remain_loss)


def experiment_name(settings, model):
    """The official folder suffix: <model>-forget-<cls>-<method>-<loss>-lr<lr>-f<alpha>-r<alpha>."""
    s = settings
    return (f"{model.replace('/', '-')}-forget-{s.forget_class}-{s.method}-{s.unlearn_loss}"
            f"-lr{s.lr}-f{s.forget_alpha}-r{s.remain_alpha}")


def save_checkpoint(path, unlearner, ema, run, history):
    """
    {"model", "ema", "opt", "args", "spec", "run", "train_steps", "losses"} (and "forget_opt", the forget step's
    own optimizer, with --separate-forget-optimizer). The official loader prefers "ema":
    without --ema-decay it holds the very tensors of "model" (stored once), the unlearned weights. (An EMA with
    decay 0.9999 over a few hundred steps, as the official script saves, would still be ~95% the original model.)
    "run" pins what a resumed run must keep; "args" and "spec" are what other scripts read back.
    """
    state = unlearner.raw_model.state_dict()
    checkpoint = {"model": state, "ema": ema.state_dict() if ema is not None else state,
                  "opt": unlearner.opt.state_dict(), "args": {**run["settings"], "model": run["model"]["model"]},
                  "spec": run["model"], "run": run, "train_steps": len(history), "losses": history}
    if unlearner.forget_opt is not unlearner.opt:  # --separate-forget-optimizer
        checkpoint["forget_opt"] = unlearner.forget_opt.state_dict()
    atomic_torch_save(checkpoint, path)


def save_state(args, state, experiment_dir, dist, logger):
    """Checks the weights on every process, then rank 0 writes checkpoints/NNNNNNN.pt (and the final
    .safetensors) and losses.json; returns the checkpoint's path. state: (unlearner, ema, run record, history)."""
    unlearner, ema, record, history = state
    train_steps, n_iters = len(history), record["settings"]["n_iters"]
    raw_model = unlearner.raw_model
    check_finite_weights(raw_model, train_steps, NON_FINITE_HINT)  # every process: all stop together
    path = os.path.join(experiment_dir, "checkpoints", f"{train_steps:07d}.pt")
    if dist.is_main:
        save_checkpoint(path, unlearner, ema, record, history)
        if args.save_safetensors and train_steps == n_iters:
            weights = (ema if ema is not None else raw_model).state_dict()
            save_safetensors_weights(weights, path[:-len(".pt")] + ".safetensors", record["model"])
            logger.info(f"Saved the final weights to {path[:-len('.pt')]}.safetensors")
        atomic_json_dump({"columns": ["step", "forget_loss", "remain_loss"], "losses": history},
                         os.path.join(experiment_dir, "losses.json"))
        logger.info(f"Saved checkpoint to {path}")
    dist.barrier()
    return path


def restore(resumed, unlearner, ema):
    """Loads a resumed run's weights, EMA and optimizer; returns its loss history."""
    unlearner.raw_model.load_state_dict(resumed["model"])  # the loader read "ema"; training continues from "model"
    if ema is not None:
        ema.load_state_dict(resumed["ema"])
    unlearner.opt.load_state_dict(resumed["opt"])
    if unlearner.forget_opt is not unlearner.opt:
        unlearner.forget_opt.load_state_dict(resumed["forget_opt"])
    return list(resumed.get("losses", []))


def main(args):
    """Unlearns --forget-class from the DiT."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    settings = unlearn_settings(args)
    settings.check()
    original = model_request(args)  # the model the run starts from (and the frozen reference of ESD and SA)
    with distributed() as dist, StopSignals() as stop:
        torch.manual_seed(settings.seed)
        experiment_dir, resumed_path, resumed = experiment_of(args, settings, dist)
        logger = create_logger(experiment_dir, dist.rank)
        if resumed is None:
            logger.info(f"Experiment directory created at {experiment_dir}")
        else:
            logger.info(f"Resuming {experiment_dir} from {resumed_path} (step {resumed['train_steps']})")
        # a resumed run reads its weights from the checkpoint, whose recorded spec fills in what no flag gives
        request = original if resumed is None else replace(original, ckpt=resumed_path)
        run(args, settings, (original, request), dist, logger, stop, experiment_dir, resumed)


def experiment_of(args, settings, dist):
    """
    (experiment folder, checkpoint path, checkpoint) of the run: a new folder; the run --resume names; or with
    --resume auto the newest run under --results-dir with the same settings and starting checkpoint (continued
    from its last checkpoint, or from the start where it saved none), else a new folder.
    """
    if args.resume not in (None, "auto"):
        path, checkpoint = find_resume_checkpoint(args.resume)
        found = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        remove_leftovers(found, dist)
        return found, path, checkpoint
    found = None
    if args.resume == "auto" and dist.is_main:
        found = find_matching_run(args.results_dir, {"settings": asdict(settings),
                                                     "init": {"ckpt": checkpoint_identity(args.ckpt)}})
    found = dist.broadcast_object(found)
    if found is None:
        return start_experiment(dist, args.results_dir, experiment_name(settings, args.model))[0], None, None
    remove_leftovers(found, dist)
    path = newest_checkpoint(found)
    return (found, None, None) if path is None else (found, *find_resume_checkpoint(path))


def remove_leftovers(experiment_dir, dist):
    """Rank 0 removes the temporary files a process killed mid-write left in the run's folders."""
    if dist.is_main:
        remove_stale_temporaries(experiment_dir)
        remove_stale_temporaries(os.path.join(experiment_dir, "checkpoints"))
    dist.barrier()


def frozen_reference(settings, original, spec, dist, logger):
    """The frozen original model (ESD) with the replay samples it generates and their Fisher (SA), as needed:
    (FrozenReference or None, replay dataset or None)."""
    needs_replay = settings.remain_source == "replay" or settings.ewc_lambda > 0
    if not settings.needs_frozen_model and not needs_replay:
        return None, None
    frozen, vae, _, ckpt = load_model_and_vae(replace(original, image_size=spec.image_size,
                                                      num_classes=spec.num_classes, vae=spec.vae), dist.device)
    frozen.eval()
    logger.info(f"Frozen original model from {ckpt}")
    reference, replay = FrozenReference(model=frozen), None
    if needs_replay:
        remain_classes = [c for c in range(spec.num_classes) if c != settings.forget_class]
        labels = [remain_classes[i % len(remain_classes)] for i in range(settings.replay_samples)]
        config = SamplerConfig("ddim", settings.replay_steps, settings.replay_cfg_scale)
        images = generate_replay(frozen, vae, labels, config, settings.seed, dist)
        replay = TensorImages(images, labels, name=f"replay-{settings.seed}")
        logger.info(f"Generated {len(replay):,} replay samples of the remain classes with the original model")
    if settings.ewc_lambda > 0:
        config = StreamConfig(stream="replay-fisher", seed=settings.seed, global_batch=settings.batch_size,
                              random_flip=False)
        steps = range(max(1, settings.replay_samples // settings.batch_size))
        encoder = LatentEncoder(vae) if vae is not None else None
        batches = DiffusionBatches(replay, config, dist, steps, encoder)
        fisher = fisher_diagonal(frozen, create_diffusion(""), batches, dist, desc="EWC Fisher of the replay samples")
        reference.fisher = {n: f.to(dist.device) for n, f in fisher.items()}
    frozen.requires_grad_(False)
    return reference, replay


def unlearning_data(settings, spec, data_sets, replay):
    """The datasets the forget and the remain terms draw from: the forget images, or SA's uniform-noise surrogate;
    the remain images, or the replay samples."""
    forget_set, remain_set = data_sets
    if settings.unlearn_loss == "sa":
        forget_set = NoiseImages(len(forget_set), spec.image_size, settings.forget_class, settings.seed)
    return forget_set, replay if settings.remain_source == "replay" else remain_set


def run(args, settings, requests, dist, logger, stop, experiment_dir, resumed):
    """The unlearning loop of main(); requests: (the original model's ModelRequest, the one to load weights from);
    stop: the StopSignals that end the run after the step in progress."""
    original, request = requests
    raw_model, vae, spec, _ = load_model_and_vae(request, dist.device, logger)
    raw_model.grad_checkpointing = args.grad_checkpointing
    forget_set, remain_set, _ = unlearn_datasets(args.data_path, settings.forget_class, spec.image_size,
                                                 spec.num_classes)
    logger.info(f"Forget set: {len(forget_set):,} images, remain set: {len(remain_set):,} images ({args.data_path})")
    mask, mask_record = saliency_mask_for(MaskChoice(args.mask_path, args.threshold, args.sparsity),
                                          settings.forget_class, raw_model, dist.device)
    data = DataSource(os.path.abspath(args.data_path), dataset_fingerprint(forget_set, remain_set))
    record = pinned_record({"settings": settings, "model": spec, "mask": mask_record, "data": data,
                            "init": {"ckpt": checkpoint_identity(original.ckpt)}})
    if resumed is not None:
        check_same_run(resumed["run"], record)
    elif dist.is_main:
        atomic_json_dump(record, os.path.join(experiment_dir, RUN_RECORD))
    logger.info(f"Saliency mask {mask_record.file}: {100 * kept_share(mask):.2f}% of weights updated by the forget "
                f"step" if mask is not None else "No --mask-path: the forget step updates every weight")
    reference, replay = frozen_reference(settings, original, spec, dist, logger)

    ema = deepcopy(raw_model).requires_grad_(False).eval() if settings.ema_decay > 0 else None
    model = DDP(raw_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) \
        if dist.enabled else raw_model
    diffusion = create_diffusion(timestep_respacing="")
    unlearner = Unlearner(model, diffusion, settings, dist, mask, reference)
    if unlearner.relabel is not None:
        logger.info(f"{settings.unlearn_loss}: the forget images' other class is {unlearner.relabel}")
    history = restore(resumed, unlearner, ema) if resumed is not None else []
    raw_model.train()  # label dropout on, as in the official script

    start, amp = len(history), autocast_dtype(settings.precision)
    streams = {}
    for name, dataset in zip(("forget", "remain"), unlearning_data(settings, spec, (forget_set, remain_set), replay)):
        config = StreamConfig(stream=name, seed=settings.seed, global_batch=settings.batch_size,
                              num_timesteps=diffusion.num_timesteps, dropout_prob=raw_model.y_embedder.dropout_prob,
                              random_flip=spec.random_flip)
        cache = forget_latent_cache(latent_cache_options(args), settings.forget_class, spec, dataset, vae, dist,
                                    logger) if dataset is forget_set else None
        encoder = LatentEncoder(vae, amp, cache) if vae is not None else None
        streams[name] = DiffusionBatches(dataset, config, dist, range(start, settings.n_iters), encoder,
                                         args.num_workers)

    classes = snapshot_classes(settings.forget_class, spec.num_classes)
    noise = per_sample_noise(settings.seed, range(len(classes)), (raw_model.in_channels, raw_model.input_size,
                                                                  raw_model.input_size), dist.device, "snapshot/noise")
    snapshots = SnapshotGrid(SnapshotOptions(args.snapshot_every, args.snapshot_sampler, args.snapshot_steps,
                                             args.cfg_scale), classes, noise, vae, amp)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    if dist.is_main and snapshots.due(start) and start == 0:
        snapshots.save(raw_model, checkpoint_dir, 0, logger)

    s = settings
    logger.info(f"Unlearning for {s.n_iters} steps (from step {start}) with {s.method}/{s.unlearn_loss}, "
                f"lr {s.lr}, forget alpha {s.forget_alpha}{' (cosine decay)' if s.decay_forget_alpha else ''}, "
                f"remain alpha {s.remain_alpha}, batch {s.batch_size} on {dist.world_size} process(es)")
    running, log_steps, start_time = [0.0, 0.0], 0, time.time()
    for forget_batch, remain_batch in zip(streams["forget"], streams["remain"]):
        alpha = s.forget_alpha_at(len(history))
        f_loss, r_loss = unlearner.step(forget_batch, remain_batch, alpha)
        if ema is not None:
            update_ema(ema, raw_model, s.ema_decay)
        history.append([len(history) + 1, f_loss, r_loss])
        train_steps = len(history)
        running[0] += f_loss
        running[1] += r_loss
        log_steps += 1
        if train_steps % args.log_every == 0 or train_steps == s.n_iters:
            elapsed = time.time() - start_time
            logger.info(f"(step={train_steps:07d}) Forget Loss: {running[0] / log_steps:.4f}, Remain Loss: "
                        f"{running[1] / log_steps:.4f}, alpha: {alpha:.3g}, Train Steps/Sec: {log_steps / elapsed:.2f}")
            running, log_steps, start_time = [0.0, 0.0], 0, time.time()
        if dist.is_main and snapshots.due(train_steps):
            snapshots.save(ema if ema is not None else raw_model, checkpoint_dir, train_steps, logger)
        due = train_steps % args.ckpt_every == 0 or train_steps == s.n_iters or train_steps in args.ckpt_steps
        stopping = stop.agreed(dist, f"after step {train_steps}")  # every process, every step: all stop together
        if due or stopping:
            path = save_state(args, (unlearner, ema, record, history), experiment_dir, dist, logger)
        if stopping and train_steps < s.n_iters:
            raise Preempted(stop.name(), f"after step {train_steps}; saved {path}")
    if dist.device.type == "cuda":
        logger.info(f"Peak GPU memory: {torch.cuda.max_memory_allocated(dist.device) / 2 ** 30:.2f} GiB")
    logger.info("Done!")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser)
    add_data_args(parser, n_iters_help="unlearning steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval (and at the last step)")
    parser.add_argument("--ckpt-steps", type=int, nargs="*", default=[],
                        help="also save checkpoints after these steps (e.g. 10 25 50 for a comparison)")
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
    parser.add_argument("--save-safetensors", action="store_true",
                        help="also write the final weights (the EMA's with --ema-decay) as one .safetensors file "
                             "beside the last checkpoint")
    parser.add_argument("--resume", type=str, default=None,
                        help="an experiment folder or checkpoint of an interrupted run to continue (its settings, "
                             "data and mask must be those it started with); auto: continue the newest run under "
                             "--results-dir with these settings, or start one (the same command line every time, "
                             "as a requeued job needs)")
    # unlearning
    parser.add_argument("--method", type=str, choices=METHODS, default="ron",
                        help="ron: fast forget step then slow remain step (SFR-on); joint: one step on both losses")
    parser.add_argument("--unlearn-loss", type=str, choices=FORGET_LOSSES, default="ga",
                        help="ga: gradient ascent; adaga: adaptive gradient ascent; rl: relabelling to (cls+100) "
                             "mod K, or (cls+1) mod K where that is cls itself; the baselines: salun (SalUn's "
                             "random-label target), sa (Selective Amnesia's uniform-noise surrogate), esd "
                             "(negative guidance from the frozen original)")
    parser.add_argument("--esd-eta", type=float, default=1.0, help="esd: the negative guidance scale eta")
    parser.add_argument("--ewc-lambda", type=float, default=0.0,
                        help="weight of the EWC penalty sum F (theta - theta*)^2, F the original model's Fisher on "
                             "its replay samples (Selective Amnesia; needs --replay-samples)")
    parser.add_argument("--remain-source", type=str, choices=["data", "replay"], default="data",
                        help="the remain term's images: the remain data, or samples the original model generates "
                             "(generative replay, Selective Amnesia)")
    parser.add_argument("--remain-loss", type=str, choices=["diffusion", "distill"], default="diffusion",
                        help="the remain term: the diffusion loss on the remain images (the paper's), or distill: "
                             "the distance of the noise prediction to the frozen original's, which is 0 until the "
                             "forget steps move the remain classes")
    parser.add_argument("--replay-samples", type=int, default=0, help="how many replay samples to generate")
    parser.add_argument("--replay-steps", type=int, default=50, help="DDIM steps of each replay sample")
    parser.add_argument("--replay-cfg-scale", type=float, default=4.0, help="guidance scale of the replay samples")
    parser.add_argument("--lambd", type=float, default=0.5, help="lambda of adaga (weights 1 / loss^lambda)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip of the forget gradient")
    parser.add_argument("--forget-alpha", type=float, default=1.0, help="weight alpha of the forget loss")
    parser.add_argument("--decay-forget-alpha", action=argparse.BooleanOptionalAction, default=False,
                        help="cosine decay of the forget weight: alpha (1 + cos(pi k / K)) / 2 (default: constant)")
    parser.add_argument("--remain-alpha", type=float, default=1.0, help="weight of the remain loss")
    parser.add_argument("--forget-loss-ceiling", type=float, default=None,
                        help="ga/adaga: skip the forget step while the forget batch's mean diffusion loss is above "
                             "this value (the remain step still runs); default: never (the paper's update)")
    parser.add_argument("--null-label-stop", type=float, default=None,
                        help="ga/adaga: skip the forget step while the forget batch's loss under its label is at "
                             "least this many times its loss under the null label; default: never")
    parser.add_argument("--remain-lr", type=float, default=None,
                        help="learning rate of the slow (remain) step of --method ron; default: --lr")
    parser.add_argument("--separate-forget-optimizer", action=argparse.BooleanOptionalAction, default=False,
                        help="ron: the forget step keeps its own AdamW moments, so that it moves only the weights "
                             "of the mask (the official script shares one optimizer, whose momentum from the remain "
                             "steps moves every weight at the forget step too)")
    parser.add_argument("--mask-remain-step", action=argparse.BooleanOptionalAction, default=False,
                        help="ron: the remain step too moves only the weights of the saliency mask (the official "
                             "remain step moves every weight)")
    parser.add_argument("--forget-label-dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="drop forget labels to the null class as training mode does in the official script "
                             "(default); --no-forget-label-dropout drops labels on the remain step only "
                             "(see bench/label_dropout.py)")
    parser.add_argument("--mask-path", type=str, default=None,
                        help="a mask file, or the mask folder of generate_mask.py (then --threshold picks "
                             "<folder>/<cls>/fisher_<threshold>.pt); none: no mask")
    parser.add_argument("--threshold", type=float, default=1.0, help="the mask threshold gamma to use from a folder")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="use SalUn's gradient mask <folder>/<cls>/gradient_<sparsity>.pt instead")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
