"""
Step 3 of SFR-on: unlearn one class from a DiT, with a named recipe of the update (--recipe) and any flag over it.

Each step of --method ron is a fast forget step (the forget term, masked by the saliency mask and clipped)
followed by a slow remain step at the updated weights; --method joint takes one step on both terms. The recipe
`official` is the official SFR-on DiT update (the README's table names every place where this script computes
something else than the official code for the same flags). Writes
results/NNN-<model>-forget-<cls>-<method>-<loss>-lr..-f..-r../ with log.txt, run.json (the resolved settings and
the recipe), losses.json, sample grids checkpoints/NNNNNNN_sample.png and checkpoints checkpoints/NNNNNNN.pt that
the official DiT loader reads as the unlearned model. Runs on one CPU or GPU, or under torchrun / srun (DDP).
"""
import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import (add_data_args, add_model_args, add_sampling_args, check_data, description, explicit_args,
                 latent_cache_options, model_request, run_main, sampler_config)
from diffusion import create_diffusion
from sfron.build import autocast_dtype, default_checkpoint, load_model_and_vae
from sfron.checkpoint import checkpoint_sha256
from sfron.data import (DiffusionBatches, LatentEncoder, NoiseImages, StreamConfig, TensorImages, class_folders,
                        dataset_fingerprint, forget_latent_cache, unlearn_datasets)
from sfron.dist import distributed
from sfron.files import atomic_json_dump, atomic_torch_save
from sfron.fisher import fisher_diagonal
from sfron.loss import check_finite_weights
from sfron.mask import (MaskChoice, Provenance, check_mask_frees_some, check_provenance, kept_share,
                        resolve_mask_file, saliency_mask_for)
from sfron.preemption import Preempted, StopSignals
from sfron.resume import RUN_RECORD, RunLookup, check_same_run, checkpoint_identity, locate_run, pinned_record
from sfron.recipes import RECIPES, flag, flag_text, get_recipe, official_differences, recipe_help
from sfron.sampling import SnapshotGrid, SnapshotOptions, generate_replay, per_sample_noise, snapshot_classes
from sfron.terms import FORGET_LOSSES, REMAIN_LOSSES, forget_term
from sfron.unlearn import (METHODS, NON_FINITE_HINT, FrozenReference, Unlearner, UnlearnSettings,
                           without_removed_fields)
from sfron.utils import UserError, check_class_index, create_logger


@dataclass(frozen=True)
class DataSource:
    """The data a run unlearns on: the root folder and a fingerprint of the forget and remain images."""
    data_path: str
    fingerprint: str


def unlearn_settings(args):
    """The UnlearnSettings of the (recipe-resolved) command line; the replay samples are drawn with the sampling
    flags."""
    values = {name: getattr(args, name) for name in UnlearnSettings.field_names() if name != "sampling"}
    return UnlearnSettings.from_fields({**values, "sampling": sampler_config(args) if args.replay_samples else None})


def settings_sections(settings):
    """{"step": ..., "forget": ..., "remain": ..., "replay": ...}: the parts a run record pins, one section each."""
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def experiment_name(settings, model):
    """The official folder suffix: <model>-forget-<cls>-<method>-<loss>-lr<lr>-f<alpha>-r<alpha>."""
    step, forget, remain = settings.step, settings.forget, settings.remain
    return (f"{model.replace('/', '-')}-forget-{forget.forget_class}-{step.method}-{forget.unlearn_loss}"
            f"-lr{step.lr}-f{forget.forget_alpha}-r{remain.remain_alpha}")


def checkpoint_state(unlearner):
    """
    The tensors of a checkpoint: {"model", "ema", "opt"} (and "forget_opt", the forget step's own optimizer, with
    --separate-forget-optimizer; "adversary", the adversarial label, with --adversarial-steps). The official loader
    prefers "ema": here it holds the very tensors of "model" (stored once), the unlearned weights. (The official
    script saves there an EMA of decay 0.9999, which after 600 steps is still about 94% the original model.)
    """
    state = unlearner.raw_model.state_dict()
    checkpoint = {"model": state, "ema": state, "opt": unlearner.opt.state_dict()}
    if unlearner.forget_opt is not unlearner.opt:
        checkpoint["forget_opt"] = unlearner.forget_opt.state_dict()
    if unlearner.adversary is not None:
        checkpoint["adversary"] = unlearner.adversary.state_dict()
    return checkpoint


def save_checkpoint(path, unlearner, run, history):
    """checkpoint_state() with "args", "spec", "run", "train_steps" and "losses": "run" pins what a resumed run must
    keep; "args" and "spec" are what other scripts read back."""
    flat = {k: v for part in settings_sections(unlearner.settings) for k, v in run[part].items()}
    checkpoint = {**checkpoint_state(unlearner), "args": {**flat, "model": run["model"]["model"]},
                  "spec": run["model"], "run": run, "train_steps": len(history), "losses": history}
    atomic_torch_save(checkpoint, path)


def save_state(args, state, experiment_dir, dist, logger):
    """Checks the weights on every process, then rank 0 writes checkpoints/NNNNNNN.pt and losses.json; returns the
    checkpoint's path. state: (unlearner, run record, history)."""
    unlearner, record, history = state
    train_steps = len(history)
    raw_model = unlearner.raw_model
    check_finite_weights(raw_model, train_steps, NON_FINITE_HINT)  # every process: all stop together
    path = os.path.join(experiment_dir, "checkpoints", f"{train_steps:07d}.pt")
    if dist.is_main:
        save_checkpoint(path, unlearner, record, history)
        atomic_json_dump({"columns": ["step", "forget_loss", "remain_loss"], "losses": history},
                         os.path.join(experiment_dir, "losses.json"))
        logger.info(f"Saved checkpoint to {path}")
    dist.barrier()
    return path


def restore(resumed, unlearner):
    """Loads a resumed run's weights and optimizers; returns its loss history."""
    unlearner.raw_model.load_state_dict(resumed["model"])
    unlearner.opt.load_state_dict(resumed["opt"])
    if unlearner.forget_opt is not unlearner.opt:
        unlearner.forget_opt.load_state_dict(resumed["forget_opt"])
    if unlearner.adversary is not None:
        unlearner.adversary.load_state_dict(resumed["adversary"])
    return list(resumed.get("losses", []))


def main(args):
    """Unlearns --forget-class from the DiT."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    settings = unlearn_settings(args)
    settings.check()
    original = model_request(args)  # the model the run starts from (and the frozen reference of ESD and SA)
    spec = check_data(args, original)  # before any folder is made or model loaded
    check_mask_choice(args, settings, original, spec)
    with distributed() as dist, StopSignals() as stop:
        torch.manual_seed(settings.step.seed)
        lookup = RunLookup(args.results_dir, args.resume, experiment_name(settings, args.model),
                           upgrade=without_removed_fields)
        match = {**asdict(settings), "init": {"ckpt": checkpoint_identity(args.ckpt)}}  # what --resume auto continues
        experiment_dir, resumed_path, resumed = locate_run(lookup, match, dist)
        logger = create_logger(experiment_dir, dist.rank)
        if resumed is None:
            logger.info(f"Experiment directory created at {experiment_dir}")
        else:
            logger.info(f"Resuming {experiment_dir} from {resumed_path} (step {resumed['train_steps']})")
        log_recipe(args, settings, logger)
        # a resumed run reads its weights from the checkpoint, whose recorded spec fills in what no flag gives
        request = original if resumed is None else replace(original, ckpt=resumed_path)
        run(args, settings, (original, request), dist, logger, stop, experiment_dir, resumed)


def check_mask_choice(args, settings, original, spec):
    """Mask settings that cannot work, one error line each before any work: a threshold of 0 or below, a
    mask-only flag without a mask, a mask made for another class, model or checkpoint, a mask that frees no weight
    (or every weight, where the update expects a sparse one)."""
    if not args.threshold > 0:
        raise UserError(f"--threshold must be positive, got {args.threshold}")
    # (the forget step's own moments need no mask: without one, a run is the mask of gamma = 0, every weight free)
    mask_only = flag("mask_remain_step") if settings.step.mask_remain_step else ""
    if args.mask_path is None:
        if mask_only:
            raise UserError(f"{mask_only} needs a saliency mask to act on (recipe {args.recipe}): give --mask-path")
        return
    path = resolve_mask_file(MaskChoice(args.mask_path, args.threshold, args.sparsity), args.forget_class)

    def expected():
        ckpt = original.ckpt or default_checkpoint(spec.model, spec.image_size)
        return Provenance(args.forget_class, ckpt, checkpoint_sha256(ckpt), spec.model, spec.image_size,
                          spec.num_classes, samples=0)
    check_provenance(path, expected, lambda line: print(line, file=sys.stderr))
    check_mask_frees_some(path, mask_only)


def recipe_record(args):
    """The recipe a run was started with and the flags given over it: {"name", "overridden": {flag: {"recipe",
    "given"}}} (run.json keeps it beside the resolved settings)."""
    return {"name": args.recipe, "overridden": {flag(name): {"recipe": recipe_value, "given": given}
                                                for name, (recipe_value, given) in args.recipe_overrides.items()}}


def log_recipe(args, settings, logger):
    """The recipe, the flags given over it, the resolved settings, and what differs from the official code."""
    logger.info(f"Recipe {args.recipe}: {RECIPES[args.recipe].summary}")
    if args.recipe_overrides:
        logger.info("Given over the recipe: " + ", ".join(
            f"{flag_text(name, given)} (recipe: {flag_text(name, recipe_value)})"
            for name, (recipe_value, given) in args.recipe_overrides.items()))
    for name, part in settings_sections(settings).items():
        logger.info(f"Settings, {name}: " + ", ".join(f"{k}={v}" for k, v in asdict(part).items()))
    note = official_differences(settings, masked=args.mask_path is not None)
    if note:
        logger.info(note)


def frozen_reference(settings, original, spec, dist, logger):
    """The frozen original model (ESD, the distilled remain term, SA) with the replay samples it generates and their
    Fisher (SA), as needed: (FrozenReference or None, replay dataset or None)."""
    replay_settings = settings.replay
    if not settings.needs_frozen_model:
        return None, None
    frozen, vae, _, ckpt = load_model_and_vae(replace(original, image_size=spec.image_size,
                                                      num_classes=spec.num_classes, vae=spec.vae), dist.device)
    frozen.eval()
    logger.info(f"Frozen original model from {ckpt}")
    reference, replay = FrozenReference(model=frozen), None
    seed = settings.step.seed
    if replay_settings.replay_samples > 0:
        remain_classes = [c for c in range(spec.num_classes) if c != settings.forget.forget_class]
        labels = [remain_classes[i % len(remain_classes)] for i in range(replay_settings.replay_samples)]
        images = generate_replay(frozen, vae, labels, replay_settings.sampling, seed, dist)
        replay = TensorImages(images, labels, name=f"replay-{seed}")
        logger.info(f"Generated {len(replay):,} replay samples of the remain classes with the original model")
    if replay_settings.ewc_lambda > 0:
        batch_size = settings.step.batch_size
        config = StreamConfig(stream="replay-fisher", seed=seed, global_batch=batch_size, random_flip=False)
        steps = range(max(1, replay_settings.replay_samples // batch_size))
        encoder = LatentEncoder(vae) if vae is not None else None
        batches = DiffusionBatches(replay, config, dist, steps, encoder)
        fisher = fisher_diagonal(frozen, create_diffusion(""), batches, dist, desc="EWC Fisher of the replay samples")
        reference.fisher = {n: f.to(dist.device) for n, f in fisher.items()}
    frozen.requires_grad_(False)
    return reference, replay


def unlearning_data(settings, spec, data_sets, replay):
    """The datasets the forget and the remain terms draw from: the forget term's (the forget images, or SA's
    uniform-noise surrogate), and the replay samples or the remain term's (the remain images, or UNO's exchange
    class alone)."""
    forget_set, remain_set = data_sets
    term = forget_term(settings.forget, spec.num_classes)
    forget_set = term.forget_data(forget_set, spec.image_size, settings.step.seed)
    return forget_set, replay if replay is not None else term.remain_data(remain_set)


def prepare_run(args, settings, requests, dist, logger, experiment_dir, resumed):
    """Model, data, mask and run record of a run: (unlearner, vae, spec, datasets, record, history). A new run
    writes its record to run.json; a resumed one must match the record it saved."""
    original, request = requests
    raw_model, vae, spec, _ = load_model_and_vae(request, dist.device, logger)
    raw_model.grad_checkpointing = args.grad_checkpointing
    forget_class = settings.forget.forget_class
    check_class_index(forget_class, spec.num_classes, "--forget-class", "the model")
    folders = class_folders(args.data_path, spec.num_classes, args.class_index_file)
    forget_set, remain_set = unlearn_datasets(folders, forget_class, spec.image_size)
    logger.info(f"Forget set: {len(forget_set):,} images, remain set: {len(remain_set):,} images ({args.data_path}, "
                f"classes by {folders.rule})")
    mask, mask_record = saliency_mask_for(MaskChoice(args.mask_path, args.threshold, args.sparsity),
                                          forget_class, raw_model, dist.device)
    data = DataSource(os.path.abspath(args.data_path), dataset_fingerprint(forget_set, remain_set))
    record = pinned_record({**settings_sections(settings), "model": spec, "mask": mask_record, "data": data,
                            "init": {"ckpt": checkpoint_identity(original.ckpt)}})
    if resumed is not None:
        check_same_run(without_removed_fields(resumed["run"]), record)
    record = {**record, "recipe": recipe_record(args)}  # how the settings were given: not pinned
    if resumed is None and dist.is_main:
        atomic_json_dump(record, os.path.join(experiment_dir, RUN_RECORD))
    logger.info(f"Saliency mask {mask_record.file}: {100 * kept_share(mask):.2f}% of weights updated by the forget "
                f"step" if mask is not None else "No --mask-path: the forget step updates every weight")
    reference, replay = frozen_reference(settings, original, spec, dist, logger)
    model = DDP(raw_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) \
        if dist.enabled else raw_model
    unlearner = Unlearner(model, create_diffusion(timestep_respacing=""), settings, dist, mask, reference)
    if unlearner.forget_term.describe() is not None:
        logger.info(unlearner.forget_term.describe())
    history = restore(resumed, unlearner) if resumed is not None else []
    raw_model.train()  # label dropout on, as in the official script
    datasets = unlearning_data(settings, spec, (forget_set, remain_set), replay)
    return unlearner, vae, spec, datasets, record, history


def batch_streams(args, unlearner, vae, spec, datasets, start, logger):
    """{"forget", "remain"}: the deterministic batch streams of the steps from `start` on."""
    settings, dist, raw_model = unlearner.settings, unlearner.dist, unlearner.raw_model
    amp = autocast_dtype(settings.step.precision)
    streams = {}
    for name, dataset in zip(("forget", "remain"), datasets):
        config = StreamConfig(stream=name, seed=settings.step.seed, global_batch=settings.step.batch_size,
                              num_timesteps=unlearner.diffusion.num_timesteps,
                              dropout_prob=raw_model.y_embedder.dropout_prob, random_flip=spec.random_flip)
        real_forget_images = name == "forget" and not isinstance(dataset, NoiseImages)  # SA's noise: no cache
        cache = forget_latent_cache(latent_cache_options(args), settings.forget.forget_class, spec, dataset, vae,
                                    dist, logger) if real_forget_images else None
        encoder = LatentEncoder(vae, amp, cache) if vae is not None else None
        streams[name] = DiffusionBatches(dataset, config, dist, range(start, settings.step.n_iters), encoder,
                                         args.num_workers)
    return streams


def run(args, settings, requests, dist, logger, stop, experiment_dir, resumed):
    """The unlearning loop of main(); requests: (the original model's ModelRequest, the one to load weights from);
    stop: the StopSignals that end the run after the step in progress."""
    unlearner, vae, spec, datasets, record, history = prepare_run(args, settings, requests, dist, logger,
                                                                  experiment_dir, resumed)
    raw_model, start = unlearner.raw_model, len(history)
    streams = batch_streams(args, unlearner, vae, spec, datasets, start, logger)
    step, forget = settings.step, settings.forget
    classes = snapshot_classes(forget.forget_class, spec.num_classes)
    noise = per_sample_noise(step.seed, range(len(classes)), (raw_model.in_channels, raw_model.input_size,
                                                              raw_model.input_size), dist.device, "snapshot/noise")
    snapshots = SnapshotGrid(SnapshotOptions(args.snapshot_every, sampler_config(args)), classes, noise, vae,
                             autocast_dtype(step.precision))
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    if dist.is_main and snapshots.due(start) and start == 0:
        snapshots.save(raw_model, checkpoint_dir, 0, logger)

    logger.info(f"Unlearning for {step.n_iters} steps (from step {start}) with {step.method}/{forget.unlearn_loss}, "
                f"lr {step.lr}, forget alpha {forget.forget_alpha}"
                f"{' (cosine decay)' if forget.decay_forget_alpha else ''}, remain alpha "
                f"{settings.remain.remain_alpha}, batch {step.batch_size} on {dist.world_size} process(es)")
    running, log_steps, start_time = [0.0, 0.0], 0, time.time()
    for forget_batch, remain_batch in zip(streams["forget"], streams["remain"]):
        alpha = settings.forget_alpha_at(len(history))
        f_loss, r_loss = unlearner.step(forget_batch, remain_batch, alpha)
        history.append([len(history) + 1, f_loss, r_loss])
        train_steps = len(history)
        running[0] += f_loss
        running[1] += r_loss
        log_steps += 1
        if train_steps % args.log_every == 0 or train_steps == step.n_iters:
            elapsed = time.time() - start_time
            logger.info(f"(step={train_steps:07d}) Forget Loss: {running[0] / log_steps:.4f}, Remain Loss: "
                        f"{running[1] / log_steps:.4f}, alpha: {alpha:.3g}, Train Steps/Sec: {log_steps / elapsed:.2f}")
            running, log_steps, start_time = [0.0, 0.0], 0, time.time()
        if dist.is_main and snapshots.due(train_steps):
            snapshots.save(raw_model, checkpoint_dir, train_steps, logger)
        due = train_steps % args.ckpt_every == 0 or train_steps == step.n_iters or train_steps in args.ckpt_steps
        stopping = stop.agreed(dist, f"after step {train_steps}")  # every process, every step: all stop together
        if due or stopping:
            path = save_state(args, (unlearner, record, history), experiment_dir, dist, logger)
        if stopping and train_steps < step.n_iters:
            raise Preempted(stop.name(), f"after step {train_steps}; saved {path}")
    if dist.device.type == "cuda":
        logger.info(f"Peak GPU memory: {torch.cuda.max_memory_allocated(dist.device) / 2 ** 30:.2f} GiB")
    logger.info("Done!")


def build_parser():
    """forget.py's flags, in groups: the model and data (shared with generate_fisher.py), the update (which a
    --recipe sets), the baselines' terms, and checkpoints, snapshots and resuming."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_args(parser, size_flags=False)  # the weights it starts from imply the image size and the classes
    add_data_args(parser, n_iters_help="unlearning steps")
    update = parser.add_argument_group(
        "the update", "--recipe sets every flag of this group but --mask-path; a flag given on the command line "
        "overrides the recipe's value (the log and run.json show the resolved settings)")
    update.add_argument("--recipe", type=str, choices=list(RECIPES), default="official",
                        help=f"the update's flags by name (default: official). {recipe_help()}")
    update.add_argument("--lr", type=float, default=None, help="learning rate of AdamW (default: the recipe's)")
    update.add_argument("--method", type=str, choices=METHODS, default="ron",
                        help="ron: fast forget step then slow remain step (SFR-on); joint: one step on both losses")
    update.add_argument("--unlearn-loss", type=str, choices=FORGET_LOSSES, default="ga",
                        help="the forget term (sfron/terms/). ga: gradient ascent; adaga: adaptive gradient ascent "
                             "(the paper's lambda 0.5); rl: "
                             "relabelling to (cls+100) mod K, or (cls+1) mod K where that is cls itself; esd: "
                             "negative guidance from the frozen original (--esd-eta); salun, sa: the baselines'")
    update.add_argument("--forget-alpha", type=float, default=1.0, help="weight alpha of the forget loss")
    update.add_argument("--decay-forget-alpha", action=argparse.BooleanOptionalAction, default=False,
                        help="cosine decay of the forget weight, alpha (1 + cos(pi k / K)) / 2, as in the authors' "
                             "DDPM code (the official DiT script parses this flag and ignores it)")
    update.add_argument("--esd-eta", type=float, default=1.0, help="esd: the negative guidance scale eta")
    update.add_argument("--adversarial-steps", type=int, default=0,
                        help="ga, adaga, esd: the forget term also acts under an adversarial label embedding that "
                             "takes this many of attack.py's label-inversion steps per step (0: none)")
    update.add_argument("--uno-weight", type=float, default=0.02,
                        help="uno: weight of the squared cosine between the forget images' gradient and the step's "
                             "(UNO's DiT run: 0.02; its MNIST VAE runs: 1000)")
    update.add_argument("--remain-loss", type=str, choices=REMAIN_LOSSES, default="diffusion",
                        help="the remain term: the diffusion loss on the remain images (the paper's), or distill: "
                             "the distance of the noise prediction to the frozen original's, 0 until the forget steps "
                             "move the remain classes")
    update.add_argument("--remain-alpha", type=float, default=1.0,
                        help="weight of the remain term (the official DiT script parses this flag and weights by 1)")
    update.add_argument("--remain-lr", type=float, default=None,
                        help="ron: learning rate of the slow (remain) step (default: --lr)")
    update.add_argument("--grad-clip", type=float, default=1.0,
                        help="global-norm clip of the masked step's gradient (0: none)")
    update.add_argument("--separate-forget-optimizer", action=argparse.BooleanOptionalAction, default=False,
                        help="ron: the forget step keeps its own AdamW moments, so that it moves only the weights "
                             "of the mask (the official script shares one optimizer, whose momentum from the remain "
                             "steps moves every weight at the forget step too)")
    update.add_argument("--mask-remain-step", action=argparse.BooleanOptionalAction, default=False,
                        help="ron: the remain step too moves only the weights of the saliency mask (the official "
                             "remain step moves every weight)")
    update.add_argument("--remain-projection", action=argparse.BooleanOptionalAction, default=False,
                        help="ron: the remain step's gradient loses its component along the forget step's where they "
                             "conflict (PCGrad), so that the remain step does not undo what the forget step did")
    update.add_argument("--mask-path", type=str, default=None,
                        help="a mask file, or the mask folder of generate_mask.py (then --threshold picks "
                             "<folder>/<cls>/fisher_<threshold>.pt); none: no mask")
    update.add_argument("--threshold", type=float, default=None,
                        help="the mask threshold gamma to use from a folder (default: the recipe's)")
    update.add_argument("--sparsity", type=float, default=None,
                        help="use SalUn's gradient mask <folder>/<cls>/gradient_<sparsity>.pt instead of the Fisher "
                             "mask (default: the recipe's; salun-distill: 0.5)")
    baselines = parser.add_argument_group("the baselines' terms (README: the baselines)")
    baselines.add_argument("--replay-samples", type=int, default=0,
                           help="SA: the remain term draws from this many remain-class samples that the original "
                                "model generates (generative replay; drawn with the sampling flags); 0: the data")
    baselines.add_argument("--ewc-lambda", type=float, default=0.0,
                           help="SA: weight of the EWC penalty sum F (theta - theta*)^2, F the original model's "
                                "Fisher on its replay samples (needs --replay-samples)")
    run_group = parser.add_argument_group(
        "checkpoints, snapshots and resuming", "the official script samples its snapshot grids with 1000 DDPM steps "
        "(--sampler ddpm --num-sampling-steps 1000)")
    run_group.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval (and at the last step)")
    run_group.add_argument("--ckpt-steps", type=int, nargs="*", default=[],
                           help="also save checkpoints after these steps (e.g. 10 25 50 for a comparison)")
    run_group.add_argument("--snapshot-every", type=int, default=50, help="sample-grid interval (0: none)")
    add_sampling_args(run_group, cfg_scale=4.0, num_steps=50, sampler="ddim",
                      what="the snapshot grids and SA's replay samples", all_channels=False)
    run_group.add_argument("--grad-checkpointing", action="store_true",
                           help="recompute activations to save memory")
    run_group.add_argument("--resume", type=str, default=None,
                           help="an experiment folder or checkpoint of an interrupted run to continue (its settings, "
                                "data and mask must be those it started with); auto: continue the newest run under "
                                "--results-dir with these settings, or start one (the same command line every time, "
                                "as a requeued job needs)")
    return parser


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv), with the recipe's values for the flags it
    sets and the command line does not; args.recipe_overrides maps each flag given over the recipe to (the recipe's
    value, the given one)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    values, overridden = get_recipe(args.recipe).resolve(vars(args), explicit_args(build_parser, argv))
    return argparse.Namespace(**values, recipe_overrides=overridden)


if __name__ == "__main__":
    run_main(main, parse_args())
