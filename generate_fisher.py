"""
Step 1 of SFR-on: the Fisher diagonals of the forget class and of the remaining classes,
<mask-path>/<class>/forget_fisher.pt and remain_fisher.pt ({parameter name: float32 tensor}).
Each is the mean over --n-iters x --batch-size samples of the squared per-sample gradient of the DiT loss.
Runs on one CPU or GPU, or under torchrun / srun on many (the samples are split across processes).
"""
import argparse
import os

import torch

from diffusion import create_diffusion
from sfron.build import add_model_args, autocast_dtype, load_model_and_vae
from sfron.data import DiffusionBatches, forget_latent_cache, unlearn_datasets
from sfron.dist import distributed
from sfron.fisher import fisher_diagonal
from sfron.mask import class_dir
from sfron.utils import UserError, atomic_torch_save, run_main, start_experiment


def main(args):
    """Computes and saves the forget and remain Fisher diagonals."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.n_iters < 1 or args.batch_size < 1:
        raise UserError("--n-iters and --batch-size must be positive")
    with distributed() as dist:
        torch.manual_seed(args.seed)
        experiment_dir, logger = start_experiment(dist, args.results_dir, f"{args.model.replace('/', '-')}-fisher")
        logger.info(f"Experiment directory created at {experiment_dir}")
        model, vae, spec, _ = load_model_and_vae(args, dist.device, logger)
        forget_set, remain_set, _ = unlearn_datasets(args.data_path, args.forget_class, spec.image_size,
                                                     spec.num_classes)
        logger.info(f"Forget set: {len(forget_set):,} images, remain set: {len(remain_set):,} images "
                    f"({args.data_path}); {args.n_iters} x {args.batch_size} samples each, "
                    f"{dist.world_size} process(es)")
        diffusion = create_diffusion(timestep_respacing="")  # 1000 steps, linear schedule
        out_dir = class_dir(args.mask_path, args.forget_class)
        caches = {"forget": forget_latent_cache(args, spec, forget_set, vae, dist, logger), "remain": None}
        amp = autocast_dtype(args.precision)  # the DiT and the per-batch VAE encodes
        for name, dataset in (("forget", forget_set), ("remain", remain_set)):
            batches = DiffusionBatches(dataset, f"{name}-fisher", args.batch_size, dist, args.seed,
                                       diffusion.num_timesteps, vae=vae, latent_cache=caches[name],
                                       num_workers=args.num_workers, start=0, stop=args.n_iters,
                                       random_flip=spec.random_flip, autocast_dtype=amp)
            fisher = fisher_diagonal(model, diffusion, batches, dist, desc=f"Generate {name} fisher",
                                     autocast_dtype=amp, log_every=args.log_every,
                                     logger=logger)
            if dist.is_main:
                path = os.path.join(out_dir, f"{name}_fisher.pt")
                atomic_torch_save(fisher, path)
                logger.info(f"Saved {name} Fisher ({len(fisher)} tensors) to {path}")
        logger.info("Done!")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data-path", type=str, required=True)
    parser.add_argument("--results-dir", type=str, default="results")
    add_model_args(parser)
    parser.add_argument("--n-iters", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="samples per iteration over all processes; any size gives the same estimator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--cache-latents", action="store_true",
                        help="encode the forget images (both flips) with the VAE once instead of at every draw")
    parser.add_argument("--latent-cache-dir", type=str, default=None,
                        help="keep the --cache-latents moments in this folder for the next script")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--forget-class", type=int, required=True, help="class to forget")
    parser.add_argument("--mask-path", type=str, default="mask", help="folder for <class>/*_fisher.pt")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
