"""
Step 1 of SFR-on: the Fisher diagonals of the forget class and of the remaining classes,
<mask-path>/<class>/forget_fisher.pt and remain_fisher.pt ({parameter name: float32 tensor}).
Each is the mean over --n-iters x --batch-size samples of the squared per-sample gradient of the DiT loss.
Runs on one CPU or GPU, or under torchrun / srun on many (the samples are split across processes). The running
sums are saved in <mask-path>/<class>/fisher_progress/ every --ckpt-every batches and at SIGTERM/SIGUSR1; running
the same command again continues them, and the result is bit-identical to an uninterrupted run's.
"""
import argparse
import os
from dataclasses import dataclass
from typing import Optional

import torch

from cli import add_data_args, add_model_args, check_data, description, latent_cache_options, model_request, run_main
from diffusion import create_diffusion
from sfron.build import autocast_dtype, load_model_and_vae
from sfron.checkpoint import checkpoint_sha256
from sfron.data import (DiffusionBatches, LatentEncoder, StreamConfig, class_folders, dataset_fingerprint,
                        forget_latent_cache, unlearn_datasets)
from sfron.dist import distributed
from sfron.files import atomic_torch_save, remove_stale_temporaries
from sfron.fisher import fisher_diagonal, forget_gradient
from sfron.mask import Provenance, class_dir, write_provenance
from sfron.preemption import StopSignals
from sfron.progress import LoopProgress, ProgressFolder
from sfron.resume import checkpoint_identity, pinned_record
from sfron.utils import UserError, check_class_index, create_logger, start_experiment

PROGRESS_FOLDER = "fisher_progress"  # <mask-path>/<class>/fisher_progress: the running sums of an unfinished run


@dataclass(frozen=True)
class FisherSettings:
    """What defines the Fisher run's numbers: a continued run must keep every field."""
    forget_class: int
    n_iters: int
    batch_size: int
    seed: int
    precision: str
    gradient_saliency: bool
    ckpt: Optional[str]
    data_path: str
    data_fingerprint: str
    processes: int  # each process's running sums are saved: a run continues on as many


def fisher_settings(args, data_sets, dist):
    """The FisherSettings of the command line and the data."""
    return FisherSettings(args.forget_class, args.n_iters, args.batch_size, args.seed, args.precision,
                          args.gradient_saliency, checkpoint_identity(args.ckpt), os.path.abspath(args.data_path),
                          dataset_fingerprint(*data_sets), dist.world_size)


def main(args):
    """Computes and saves the forget and remain Fisher diagonals."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.n_iters < 1 or args.batch_size < 1:
        raise UserError("--n-iters and --batch-size must be positive")
    check_data(args, model_request(args))  # before any folder is made or model loaded
    with distributed() as dist, StopSignals() as stop:
        torch.manual_seed(args.seed)
        model, vae, spec, ckpt = load_model_and_vae(model_request(args), dist.device)
        check_class_index(args.forget_class, spec.num_classes, "--forget-class", "the model")
        folders = class_folders(args.data_path, spec.num_classes, args.class_index_file)
        data_sets = unlearn_datasets(folders, args.forget_class, spec.image_size)
        out_dir = class_dir(args.mask_path, args.forget_class)
        if dist.is_main:  # a run killed while writing its outputs left temporaries beside them
            remove_stale_temporaries(out_dir)
        record = pinned_record({"fisher": fisher_settings(args, data_sets, dist), "model": spec})
        progress = ProgressFolder(os.path.join(out_dir, PROGRESS_FOLDER), record, dist)
        if progress.experiment_dir is None:
            experiment_dir = start_experiment(dist, args.results_dir, f"{args.model.replace('/', '-')}-fisher")[0]
            progress.set_experiment_dir(experiment_dir)
        logger = create_logger(progress.experiment_dir, dist.rank)
        logger.info(f"{'Continuing' if progress.manifest['positions'] else 'Experiment'} in "
                    f"{progress.experiment_dir} (progress saved in {progress.folder}); DiT from {ckpt}")
        logger.info(f"Forget set: {len(data_sets[0]):,} images, remain set: {len(data_sets[1]):,} images "
                    f"({args.data_path}, classes by {folders.rule}); {args.n_iters} x {args.batch_size} samples "
                    f"each, {dist.world_size} process(es)")
        provenance = Provenance(args.forget_class, ckpt, checkpoint_sha256(ckpt) if dist.is_main else None, spec.model,
                                spec.image_size, spec.num_classes, args.n_iters * args.batch_size)
        phases = FisherPhases(args, (model, vae, spec), dist, progress, (logger, stop), provenance)
        phases.run_all(data_sets, out_dir)
        progress.finish()
        logger.info("Done!")


class FisherPhases:
    """The phases of the run (the forget and remain Fisher, SalUn's gradient), each resumable from its progress."""

    def __init__(self, args, model_parts, dist, progress, log_and_stop, provenance):
        self.args, self.dist, self.progress, self.provenance = args, dist, progress, provenance
        self.model, self.vae, self.spec = model_parts
        self.logger, self.stop = log_and_stop
        self.diffusion = create_diffusion(timestep_respacing="")  # 1000 steps, linear schedule
        self.amp = autocast_dtype(args.precision)  # the DiT and the per-batch VAE encodes

    def batches(self, stream, dataset, cache, start):
        """The phase's batches from position `start` on."""
        config = StreamConfig(stream=stream, seed=self.args.seed, global_batch=self.args.batch_size,
                              num_timesteps=self.diffusion.num_timesteps, random_flip=self.spec.random_flip)
        encoder = LatentEncoder(self.vae, self.amp, cache) if self.vae is not None else None
        return DiffusionBatches(dataset, config, self.dist, range(start, self.args.n_iters), encoder,
                                self.args.num_workers)

    def loop_progress(self, phase):
        """The LoopProgress of a phase: its saved position and sums, saved every --ckpt-every batches."""
        position, state = self.progress.load(phase)
        if position:
            self.logger.info(f"{phase}: continuing from batch {position} of {self.args.n_iters}")
        save = lambda at, sums: self.progress.save(phase, at, sums)  # noqa: E731
        return LoopProgress(position, state, save, self.args.ckpt_every, self.stop, self.args.log_every, self.logger)

    def save_result(self, phase, result, path, what):
        """Rank 0 writes the phase's result and its provenance beside it; then the phase is done."""
        if self.dist.is_main:
            atomic_torch_save(result, path)
            write_provenance(path, self.provenance)
            self.logger.info(f"Saved {what} to {path}")
        self.progress.mark_done(phase)

    def run_all(self, data_sets, out_dir):
        """Runs the phases not yet done."""
        args, forget_set = self.args, data_sets[0]
        cache = forget_latent_cache(latent_cache_options(args), args.forget_class, self.spec, forget_set, self.vae,
                                    self.dist, self.logger)
        for name, dataset in zip(("forget", "remain"), data_sets):
            path = os.path.join(out_dir, f"{name}_fisher.pt")
            if self.progress.is_done(name) and os.path.isfile(path):
                continue
            progress = self.loop_progress(name)
            batches = self.batches(f"{name}-fisher", dataset, cache if name == "forget" else None, progress.position)
            fisher = fisher_diagonal(self.model, self.diffusion, batches, self.dist, f"Generate {name} fisher",
                                     self.amp, progress)
            self.save_result(name, fisher, path, f"{name} Fisher ({len(fisher)} tensors)")
        path = os.path.join(out_dir, "forget_gradient.pt")
        if args.gradient_saliency and not (self.progress.is_done("gradient") and os.path.isfile(path)):
            # SalUn's statistic, for generate_mask.py --criterion gradient
            progress = self.loop_progress("gradient")
            batches = self.batches("forget-gradient", forget_set, cache, progress.position)
            gradient = forget_gradient(self.model, self.diffusion, batches, self.dist, clip=1.0, progress=progress)
            self.save_result("gradient", gradient, path, "the summed forget gradient (SalUn's saliency)")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_args(parser)
    add_data_args(parser, n_iters_help="iterations: --n-iters x --batch-size samples of each set (any batch size "
                                       "estimates the same quantity)")
    parser.add_argument("--mask-path", type=str, default="mask", help="folder for <class>/*_fisher.pt")
    parser.add_argument("--ckpt-every", type=int, default=500,
                        help="save the running sums every this many batches (and at SIGTERM/SIGUSR1): the same "
                             "command continues an interrupted run (0: only at a signal)")
    parser.add_argument("--gradient-saliency", action="store_true",
                        help="also write <class>/forget_gradient.pt: the summed, per-batch clipped gradient of the "
                             "forget loss, for SalUn's mask (generate_mask.py --criterion gradient)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
