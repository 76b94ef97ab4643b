"""
Step 1 of SFR-on: the Fisher diagonals of the forget class and of the remaining classes,
<mask-path>/<class>/forget_fisher.pt and remain_fisher.pt ({parameter name: float32 tensor}).
Each is the mean over --n-iters x --batch-size samples of the squared per-sample gradient of the DiT loss.
Runs on one CPU or GPU, or under torchrun / srun on many (the samples are split across processes).
"""
import argparse
import os

import torch

from cli import add_data_args, add_model_args, latent_cache_options, model_request, run_main
from diffusion import create_diffusion
from sfron.build import autocast_dtype, load_model_and_vae
from sfron.data import DiffusionBatches, LatentEncoder, StreamConfig, forget_latent_cache, unlearn_datasets
from sfron.dist import distributed
from sfron.files import atomic_torch_save
from sfron.fisher import fisher_diagonal, forget_gradient
from sfron.mask import class_dir
from sfron.utils import UserError, start_experiment


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
        model, vae, spec, _ = load_model_and_vae(model_request(args), dist.device, logger)
        forget_set, remain_set, _ = unlearn_datasets(args.data_path, args.forget_class, spec.image_size,
                                                     spec.num_classes)
        logger.info(f"Forget set: {len(forget_set):,} images, remain set: {len(remain_set):,} images "
                    f"({args.data_path}); {args.n_iters} x {args.batch_size} samples each, "
                    f"{dist.world_size} process(es)")
        diffusion = create_diffusion(timestep_respacing="")  # 1000 steps, linear schedule
        out_dir = class_dir(args.mask_path, args.forget_class)
        amp = autocast_dtype(args.precision)  # the DiT and the per-batch VAE encodes
        caches = {"forget": forget_latent_cache(latent_cache_options(args), args.forget_class, spec, forget_set, vae,
                                                dist, logger), "remain": None}
        for name, dataset in (("forget", forget_set), ("remain", remain_set)):
            config = StreamConfig(stream=f"{name}-fisher", seed=args.seed, global_batch=args.batch_size,
                                  num_timesteps=diffusion.num_timesteps, random_flip=spec.random_flip)
            encoder = LatentEncoder(vae, amp, caches[name]) if vae is not None else None
            batches = DiffusionBatches(dataset, config, dist, range(args.n_iters), encoder, args.num_workers)
            fisher = fisher_diagonal(model, diffusion, batches, dist, desc=f"Generate {name} fisher",
                                     autocast_dtype=amp, log_every=args.log_every, logger=logger)
            if dist.is_main:
                path = os.path.join(out_dir, f"{name}_fisher.pt")
                atomic_torch_save(fisher, path)
                logger.info(f"Saved {name} Fisher ({len(fisher)} tensors) to {path}")
        if args.gradient_saliency:  # SalUn's statistic, for generate_mask.py --criterion gradient
            config = StreamConfig(stream="forget-gradient", seed=args.seed, global_batch=args.batch_size,
                                  num_timesteps=diffusion.num_timesteps, random_flip=spec.random_flip)
            encoder = LatentEncoder(vae, amp, caches["forget"]) if vae is not None else None
            batches = DiffusionBatches(forget_set, config, dist, range(args.n_iters), encoder, args.num_workers)
            gradient = forget_gradient(model, diffusion, batches, dist, clip=1.0)
            if dist.is_main:
                path = os.path.join(out_dir, "forget_gradient.pt")
                atomic_torch_save(gradient, path)
                logger.info(f"Saved the summed forget gradient (SalUn's saliency) to {path}")
        logger.info("Done!")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser)
    add_data_args(parser, n_iters_help="iterations: --n-iters x --batch-size samples of each set (any batch size "
                                       "estimates the same quantity)")
    parser.add_argument("--mask-path", type=str, default="mask", help="folder for <class>/*_fisher.pt")
    parser.add_argument("--gradient-saliency", action="store_true",
                        help="also write <class>/forget_gradient.pt: the summed, per-batch clipped gradient of the "
                             "forget loss, for SalUn's mask (generate_mask.py --criterion gradient)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
