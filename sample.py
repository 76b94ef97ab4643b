"""
Samples a grid of classes from one DiT, or from several side by side from identical noise: with the original
and the unlearned checkpoint this is the before/after figure of the paper (Figures 1 and 2) in one command.
"""
import argparse
import copy

import torch

from sfron.build import add_model_args, autocast_dtype, load_model_and_vae
from sfron.sampling import (OFFICIAL_SAMPLE_CLASSES, StepNoise, add_sampling_args, generate, grid_image,
                            per_sample_noise, sampling_diffusion, side_by_side, upscale)
from sfron.utils import UserError, atomic_save_image, run_main


def class_labels(requested, num_classes):
    """--class-labels, or the official grid (the first classes for models with fewer than 1000)."""
    labels = requested if requested else (OFFICIAL_SAMPLE_CLASSES if num_classes >= 1000 else
                                          list(range(min(8, num_classes))))
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"class label {bad[0]} is outside the model's {num_classes} classes")
    return labels


def main(args):
    """Writes the grid(s) to --out."""
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = args.ckpt or [None]
    first = copy.copy(args)
    first.ckpt = checkpoints[0]
    model, vae, spec, _ = load_model_and_vae(first, device)
    labels = class_labels(args.class_labels, spec.num_classes)
    shape = (model.in_channels, model.input_size, model.input_size)
    seeds = [(args.seed, i) for i in range(len(labels))]
    z = per_sample_noise(seeds, shape, device)  # the same noise for every checkpoint
    diffusion = sampling_diffusion(args.sampler, args.num_sampling_steps)
    grids = []
    for i, ckpt in enumerate(checkpoints):
        if i > 0:  # the same configuration as the first checkpoint
            other = copy.copy(args)
            other.ckpt, other.image_size, other.num_classes, other.vae = ckpt, spec.image_size, spec.num_classes, spec.vae
            model = load_model_and_vae(other, device, with_vae=False)[0]
        images = generate(model, diffusion, vae, torch.tensor(labels, device=device), z, args.cfg_scale,
                          sampler=args.sampler, noise_fn=StepNoise(seeds), all_channels=args.cfg_all_channels,
                          progress=True, autocast_dtype=autocast_dtype(args.precision))
        grids.append(grid_image(images, nrow=args.nrow))
        print(f"Sampled classes {labels} from {ckpt or 'the released checkpoint'}")
    figure = upscale(side_by_side(grids), args.min_side)
    atomic_save_image(figure, args.out)
    print(f"Saved {args.out}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser, several_ckpts=True)
    add_sampling_args(parser, cfg_scale=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="classes to draw (default: the official grid 207 360 387 974 88 979 417 279)")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of each grid")
    parser.add_argument("--min-side", type=int, default=0,
                        help="enlarge small images (nearest neighbour) until the figure is at least this tall")
    parser.add_argument("--out", type=str, default="sample.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
