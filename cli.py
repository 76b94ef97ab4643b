"""
The flags several scripts share, declared once, and their conversion into the frozen settings that `sfron/`
takes (sfron never sees an argparse namespace). Each script declares its own flags beside these.
"""
import argparse
import os
import sys

from models import DiT_models
from sfron.build import ModelRequest, requested_spec
from sfron.data import LatentCacheOptions, class_folders, find_class_folders
from sfron.preemption import EXIT_PREEMPTED, Preempted, end_worker_processes
from sfron.sampling import SamplerConfig
from sfron.utils import UserError, check_class_index


def description(doc):
    """A script's --help description: the first paragraph of its docstring (argparse re-wraps the lines)."""
    return doc.strip().split("\n\n")[0]


def run_main(main, args):
    """Runs main(args); a UserError becomes one 'error: ...' line on stderr and exit status 1; a run stopped by
    SIGTERM/SIGUSR1 after saving its state says so in one line and exits with status 75 (EXIT_PREEMPTED)."""
    try:
        main(args)
    except Preempted as e:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
        print(f"{f'[rank {rank}] ' if rank else ''}{e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the worker's own line
            message = message.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        end_worker_processes()


def add_model_args(parser, default_model="DiT-XL/2", several_ckpts=False, size_flags=True):
    """
    The official model flags. --image-size, --num-classes and --vae default to what the checkpoint implies.
    several_ckpts: --ckpt takes one or more checkpoints (drawn side by side by sample.py); size_flags=False: no
    --image-size and --num-classes, for a script that always starts from weights, which imply both.
    """
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default=default_model)
    if size_flags:
        parser.add_argument("--image-size", type=int, default=None,
                            help="image side in pixels (default: implied by the checkpoint, else 256)")
        parser.add_argument("--num-classes", type=int, default=None,
                            help="classes of the model (default: implied by the checkpoint, else 1000)")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema | mse (stabilityai/sd-vae-ft-*), a local diffusers VAE folder, or none for a "
                             "pixel-space model (default: none for 3-channel checkpoints, else ema)")
    parser.add_argument("--ckpt", type=str, default=None, nargs="+" if several_ckpts else None,
                        help="a DiT checkpoint: a released name (DiT-XL-2-256x256.pt, downloaded when online), a "
                             "local .pt or .safetensors file, or a diffusers DiT folder (default: the released "
                             f"checkpoint of --model at {'--image-size' if size_flags else '256x256'})"
                             + ("; several are drawn side by side from the same noise" if several_ckpts else ""))
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flips of the data (default: as the checkpoint was trained, else on)")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default="fp32",
                        help="bf16 runs the DiT and the per-batch VAE encodes under autocast (weights, optimizer "
                             "and latent caches stay float32)")


def check_data(args, request):
    """--data-path and the folder of --forget-class for the model of `request`, checked before a script makes any
    folder or loads any model: one error line, nothing left behind. Returns the model's ModelSpec."""
    find_class_folders(args.data_path)
    spec = requested_spec(request)
    check_class_index(args.forget_class, spec.num_classes, "--forget-class", "the model")
    class_folders(args.data_path, spec.num_classes, args.class_index_file).position(args.forget_class)
    return spec


def explicit_args(build_parser, argv):
    """The argument names that argv sets itself (not left at their defaults): argv parsed once more by a parser
    of build_parser() whose every default is 'absent'."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def model_request(args, ckpt=None):
    """The ModelRequest of the model flags (ckpt: this checkpoint instead of --ckpt)."""
    return ModelRequest(model=args.model, ckpt=ckpt if ckpt is not None else args.ckpt,
                        image_size=getattr(args, "image_size", None), num_classes=getattr(args, "num_classes", None),
                        vae=args.vae, random_flip=args.random_flip)


def add_data_args(parser, n_iters_help):
    """The data, stream and latent-cache flags of generate_fisher.py and forget.py."""
    parser.add_argument("--data-path", type=str, required=True,
                        help="ImageNet-style root: images in <data-path>/train/<class folder>/")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--forget-class", type=int, required=True,
                        help="class to forget: the model's class index (README: which folder holds which class)")
    add_class_index_arg(parser)
    parser.add_argument("--n-iters", type=int, default=2000, help=n_iters_help)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="forget (and remain) samples per iteration over all processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=4, help="data loading processes")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--cache-latents", type=str, nargs="?", const="", default=None, metavar="DIR",
                        help="encode the forget images (both flips) with the VAE once instead of at every draw; "
                             "with DIR, keep them in that folder for the next script")


def add_class_index_arg(parser):
    """--class-index-file: the model's class index of each folder of --data-path."""
    parser.add_argument("--class-index-file", type=str, default=None,
                        help="a file of 'folder index' lines: the model's class of each folder of --data-path "
                             "(needed where the folders are fewer than the model's classes and not ImageNet synsets)")


def latent_cache_options(args):
    """The LatentCacheOptions of --cache-latents [DIR] and --num-workers."""
    return LatentCacheOptions(enabled=args.cache_latents is not None, cache_dir=args.cache_latents or None,
                              num_workers=args.num_workers)


def add_sampling_args(parser, cfg_scale, num_steps=250, sampler="ddpm", what=None, all_channels=True):
    """The official sampling flags (--cfg-scale with the script's official default) and the sampler choice;
    what: the samples they draw, for the help (default: the script's); all_channels: offer --cfg-all-channels
    (without it, guidance acts on the first three channels, as the official code's)."""
    of = f" of {what}" if what else ""
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale,
                        help=f"classifier-free guidance scale{of} (1: none)")
    if all_channels:
        parser.add_argument("--cfg-all-channels", action="store_true",
                            help="guide every noise channel (the official code guides the first three)")
    parser.add_argument("--num-sampling-steps", type=int, default=num_steps, help=f"sampling steps{of}")
    parser.add_argument("--sampler", type=str, choices=["ddpm", "ddim"], default=sampler, help=f"the sampler{of}")


def sampler_config(args):
    """The SamplerConfig of the sampling flags."""
    return SamplerConfig(sampler=args.sampler, num_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                         cfg_all_channels=getattr(args, "cfg_all_channels", False))
