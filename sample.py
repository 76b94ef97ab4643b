"""
Samples a grid of classes from one DiT, or from several side by side from identical noise: with the original
and the unlearned checkpoint this is the before/after figure of the paper (Figures 1 and 2) in one command.
"""
import argparse
from dataclasses import replace

import torch

from cli import add_model_args, add_sampling_args, description, model_request, run_main, sampler_config
from sfron.build import autocast_dtype, load_model_and_vae
from sfron.files import atomic_save_image
from sfron.sampling import (OFFICIAL_SAMPLE_CLASSES, StepNoise, generate, grid_image, per_sample_noise, side_by_side,
                            upscale)
from sfron.utils import UserError, check_class_index


def class_labels(requested, num_classes):
    """--class-labels, or the official grid (the first classes for models with fewer than 1000)."""
    labels = requested if requested else (OFFICIAL_SAMPLE_CLASSES if num_classes >= 1000 else
                                          list(range(min(8, num_classes))))
    for c in labels:
        check_class_index(c, num_classes, "--class-labels", "the model")
    return labels


def main(args):
    """Writes the grid(s) to --out."""
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = args.ckpt or [None]
    if args.titles and len(args.titles) != len(checkpoints):
        raise UserError(f"--titles needs one title per --ckpt ({len(checkpoints)}), got {len(args.titles)}")
    model, vae, spec, _ = load_model_and_vae(model_request(args, ckpt=checkpoints[0]), device)
    # every further checkpoint is read with the configuration of the first
    same_config = replace(model_request(args), image_size=spec.image_size, num_classes=spec.num_classes, vae=spec.vae)
    labels = class_labels(args.class_labels, spec.num_classes)
    shape = (model.in_channels, model.input_size, model.input_size)
    indices = range(len(labels))
    z = per_sample_noise(args.seed, indices, shape, device)  # the same noise for every checkpoint
    grids = []
    for i, ckpt in enumerate(checkpoints):
        if i > 0:
            model = load_model_and_vae(replace(same_config, ckpt=ckpt), device, with_vae=False).model
        images = generate(model, vae, torch.tensor(labels, device=device), z, sampler_config(args),
                          noise_fn=StepNoise(args.seed, indices), progress=True,
                          autocast_dtype=autocast_dtype(args.precision))
        grids.append(grid_image(images, nrow=args.nrow))
        print(f"Sampled classes {labels} from {ckpt or 'the released checkpoint'}")
    figure = side_by_side([upscale(g, args.min_side) for g in grids], titles=args.titles)
    atomic_save_image(figure, args.out)
    print(f"Saved {args.out}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_args(parser, several_ckpts=True)
    add_sampling_args(parser, cfg_scale=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="classes to draw (default: the official grid 207 360 387 974 88 979 417 279)")
    parser.add_argument("--nrow", type=int, default=4, help="images per row of each grid")
    parser.add_argument("--min-side", type=int, default=0,
                        help="enlarge small images (nearest neighbour) until the figure is at least this tall")
    parser.add_argument("--titles", type=str, nargs="+", default=None,
                        help="a title above each checkpoint's grid (e.g. original unlearned)")
    parser.add_argument("--out", type=str, default="sample.png")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
