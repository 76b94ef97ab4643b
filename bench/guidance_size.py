"""
The guidance size of each class of a DiT: the RMS of eps(x_t, c) - eps(x_t, null) of the model over the first
forget batch that `forget.py --seed S --batch-size B` takes for the class: how far the forget label's predictions
must move for the class to be gone. Compares how strongly two models use their labels before a rate chosen on one
is taken to the other (docs/mnist.md).

    python bench/guidance_size.py                     # the embedded digits DiT, every digit
    python bench/guidance_size.py --dataset mnist
    python bench/guidance_size.py --model DiT-XL/2 --data-path /data/imagenet --classes 207 --batch-size 32
"""
import argparse
import math
import os
import statistics
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402
import prepare_digits  # noqa: E402
from cli import description, run_main  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402
from sfron.build import ModelRequest, autocast_dtype, load_model_and_vae  # noqa: E402
from sfron.data import DiffusionBatches, LatentEncoder, StreamConfig, class_folders, unlearn_datasets  # noqa: E402
from sfron.dist import distributed  # noqa: E402
from sfron.terms.base import concat_batches, eps_prediction  # noqa: E402
from sfron.utils import check_class_index  # noqa: E402


def guidance_size(model, diffusion, batch, dist, amp):
    """
    The RMS over the batch (all processes) of the model's guidance direction for the batch's labels,
    eps(x_t, c) - eps(x_t, null): how far the forget label's predictions must move for the class to be gone (ESD's
    target lies (1 + eta) times this from them). amp: torch.autocast's arguments.
    """
    keep = torch.zeros_like(batch.drop)
    with torch.no_grad(), torch.autocast(**amp):
        eps = eps_prediction(model, diffusion, concat_batches(batch, batch), torch.cat([batch.y, batch.y]),
                             torch.cat([keep, torch.ones_like(keep)]))
    cond, null = eps.float().chunk(2)                                           # (b, C, H, W) each
    sums = torch.stack([(cond - null).pow(2).sum(), torch.tensor(float(cond.numel()), device=cond.device)])
    total, count = dist.all_reduce_sum_(sums).tolist()
    return math.sqrt(total / count)


def first_forget_batch(loaded, folders, forget_class, args, dist):
    """The first batch of forget.py's forget stream for the class (seed args.seed, batch args.batch_size)."""
    model, vae, spec = loaded.model, loaded.vae, loaded.spec
    forget_set, _ = unlearn_datasets(folders, forget_class, spec.image_size)
    config = StreamConfig(stream="forget", seed=args.seed, global_batch=args.batch_size,
                          num_timesteps=create_diffusion(timestep_respacing="").num_timesteps,
                          dropout_prob=model.y_embedder.dropout_prob, random_flip=spec.random_flip)
    encoder = LatentEncoder(vae, autocast_dtype(args.precision)) if vae is not None else None
    return next(iter(DiffusionBatches(forget_set, config, dist, range(1), encoder)))


def class_guidance_size(loaded, folders, forget_class, args, dist):
    """The guidance size of forget_class on the first batch of forget.py's forget stream (seed args.seed)."""
    first = first_forget_batch(loaded, folders, forget_class, args, dist)
    amp = dict(device_type=dist.device.type, dtype=autocast_dtype(args.precision), enabled=args.precision == "bf16")
    return guidance_size(loaded.model, create_diffusion(timestep_respacing=""), first, dist, amp)


def main(args):
    """Prints the guidance size of each class asked for, and their median."""
    with distributed() as dist:
        loaded = load_model_and_vae(ModelRequest(model=args.model, ckpt=args.ckpt), dist.device)
        loaded.model.eval()
        folders = class_folders(args.data_path, loaded.spec.num_classes)
        classes = args.classes if args.classes is not None else list(folders.indices)
        sizes = []
        for forget_class in classes:
            check_class_index(forget_class, loaded.spec.num_classes, "--classes", "the model")
            sizes.append(class_guidance_size(loaded, folders, forget_class, args, dist))
            if dist.is_main:
                print(f"class {forget_class}: guidance size {sizes[-1]:.4f}", flush=True)
        if dist.is_main and len(sizes) > 1:
            print(f"median {statistics.median(sizes):.4f}, range {min(sizes):.4f}-{max(sizes):.4f} "
                  f"({len(sizes)} classes, seed {args.seed}, batch {args.batch_size})")


def parse_args(argv=None, doc=__doc__):
    """The command line (of this script, or of another whose docstring is doc and that takes the same flags);
    --dataset fills in the embedded case's model, checkpoint and images."""
    parser = argparse.ArgumentParser(description=description(doc))
    parser.add_argument("--dataset", type=str, choices=list(demo.CASES), default="digits",
                        help="the embedded case whose DiT and images are the defaults")
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default=None,
                        help="the DiT (default: the case's)")
    parser.add_argument("--ckpt", type=str, default=None, help="its checkpoint (default: the case's DiT)")
    parser.add_argument("--data-path", type=str, default=None, help="the training images (default: the case's)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="the classes (default: every one)")
    parser.add_argument("--seed", type=int, default=0, help="forget.py --seed")
    parser.add_argument("--batch-size", type=int, default=128, help="forget.py --batch-size")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    case = demo.CASES[args.dataset]
    args.model = args.model or case.model
    args.ckpt = args.ckpt or (case.dit if args.model == case.model else None)
    args.data_path = args.data_path or prepare_digits.data_folder(args.dataset)
    return args


if __name__ == "__main__":
    run_main(main, parse_args())
