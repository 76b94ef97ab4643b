"""
Builds the DiT and its VAE from the command line and the checkpoint. --image-size, --num-classes and --vae
default to what the checkpoint's weights imply (3 input channels: a pixel-space model; the position embedding
gives the input size; the label table the class count), so the same commands run on DiT-XL/2 and on a small
pixel-space DiT. Flags given explicitly always win, and a checkpoint that does not fit is a clear error.
"""
import argparse
from dataclasses import dataclass

import torch

from download import find_checkpoint, load_model_weights, pretrained_models
from models import DiT_models

from .utils import UserError
from .vae import VAE_DOWNSAMPLE, is_pixel_space, latent_channels, load_vae


@dataclass
class ModelSpec:
    model: str
    image_size: int
    num_classes: int
    vae: str              # 'ema' | 'mse' | a folder | 'none'
    learn_sigma: bool = True
    random_flip: bool = True  # horizontal flips of the training data (off for data like digits)

    @property
    def pixel_space(self):
        return is_pixel_space(self.vae)

    @property
    def input_size(self):
        """The side of what the DiT sees: the image itself, or its VAE latent."""
        return self.image_size if self.pixel_space else self.image_size // VAE_DOWNSAMPLE

    def describe(self):
        space = "pixel space" if self.pixel_space else f"latent space (VAE {self.vae})"
        flips = "" if self.random_flip else ", no random flips"
        return f"{self.model}, {self.image_size}x{self.image_size}, {self.num_classes} classes, {space}{flips}"


def implied_by_weights(state_dict):
    """What a DiT state dict says about its configuration (None where it says nothing)."""
    found = {}
    proj = state_dict.get("x_embedder.proj.weight")
    pos = state_dict.get("pos_embed")
    if proj is not None and proj.ndim == 4:
        found["in_channels"], patch = proj.shape[1], proj.shape[2]
        if pos is not None and pos.ndim == 3:
            found["input_size"] = round(pos.shape[1] ** 0.5) * patch
        final = state_dict.get("final_layer.linear.weight")
        if final is not None:
            found["learn_sigma"] = final.shape[0] == patch * patch * 2 * found["in_channels"]
    table = state_dict.get("y_embedder.embedding_table.weight")
    if table is not None:
        found["num_classes"] = table.shape[0] - 1  # the last row is the null label of guidance
    return found


def default_checkpoint(model, image_size):
    """The released checkpoint to download when --ckpt is not given."""
    name = f"{model.replace('/', '-')}-{image_size}x{image_size}.pt"
    if name not in pretrained_models:
        raise UserError(f"--ckpt is required: no released checkpoint for {model} at {image_size}x{image_size} "
                        f"(released: {', '.join(sorted(pretrained_models))})")
    return name


def resolve_spec(args, state_dict, recorded=None):
    """
    The model settings: explicit flags first, then what the checkpoint records about itself, then what its
    weights imply, then the official defaults.
    """
    implied = implied_by_weights(state_dict) if state_dict is not None else {}
    recorded = recorded or {}

    def pick(flag, default):
        value = getattr(args, flag, None)
        return value if value is not None else recorded.get(flag, default)

    vae = pick("vae", "none" if implied.get("in_channels") == 3 else "ema")
    pixel = is_pixel_space(vae)
    size = implied.get("input_size")
    image_size = pick("image_size", 256 if size is None else (size if pixel else size * VAE_DOWNSAMPLE))
    num_classes = pick("num_classes", implied.get("num_classes", 1000))
    spec = ModelSpec(model=args.model, image_size=image_size, num_classes=num_classes, vae=vae,
                     learn_sigma=implied.get("learn_sigma", True), random_flip=pick("random_flip", True))
    if not pixel and image_size % VAE_DOWNSAMPLE:
        raise UserError(f"--image-size {image_size} must be divisible by {VAE_DOWNSAMPLE} for the VAE")
    return spec


def build_dit(spec, in_channels):
    """A freshly initialised DiT for the spec (clear errors for sizes the patch size does not divide)."""
    if spec.model not in DiT_models:
        raise UserError(f"unknown --model {spec.model}; choose from {', '.join(DiT_models)}")
    try:
        return DiT_models[spec.model](input_size=spec.input_size, num_classes=spec.num_classes,
                                      in_channels=in_channels, learn_sigma=spec.learn_sigma)
    except ValueError as e:
        raise UserError(f"{spec.describe()}: {e}") from None


def load_model_and_vae(args, device, logger=None, with_vae=True):
    """
    (DiT with the checkpoint's weights on device, VAE or None, ModelSpec, checkpoint name) for a script.
    with_vae=False skips loading the VAE (returned as None) when the caller already has it.
    """
    ckpt = args.ckpt
    state_dict, recorded = find_checkpoint(ckpt) if ckpt else (None, {})
    spec = resolve_spec(args, state_dict, recorded)
    if state_dict is None:
        ckpt = default_checkpoint(spec.model, spec.image_size)
        state_dict, _ = find_checkpoint(ckpt)
    vae = load_vae(spec.vae, device) if with_vae else None
    in_channels = 3 if spec.pixel_space else (latent_channels(vae) if vae is not None else 4)
    with torch.device("meta"):  # no random initialisation of weights that the checkpoint replaces
        model = build_dit(spec, in_channels=in_channels)
    load_model_weights(model, state_dict, ckpt, spec.describe(), assign=True)
    if logger is not None:
        logger.info(f"Model: {spec.describe()}, weights from {ckpt}")
    return model.to(device), vae, spec, ckpt


def add_model_args(parser, default_model="DiT-XL/2", several_ckpts=False):
    """
    The official model flags. --image-size, --num-classes and --vae default to what the checkpoint implies.
    several_ckpts: --ckpt takes one or more checkpoints (drawn side by side by sample.py).
    """
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default=default_model)
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (default: implied by the checkpoint, else 256)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the model (default: implied by the checkpoint, else 1000)")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema | mse (stabilityai/sd-vae-ft-*), a local diffusers VAE folder, or none for a "
                             "pixel-space model (default: none for 3-channel checkpoints, else ema)")
    parser.add_argument("--ckpt", type=str, default=None, nargs="+" if several_ckpts else None,
                        help="a DiT checkpoint: a released name (DiT-XL-2-256x256.pt, downloaded when online) or a "
                             "local file (default: the released checkpoint of --model at --image-size)"
                             + ("; several are drawn side by side from the same noise" if several_ckpts else ""))
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flips of the data (default: as the checkpoint was trained, else on)")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16"], default="fp32",
                        help="bf16 runs the DiT and the per-batch VAE encodes under autocast (weights, optimizer "
                             "and latent caches stay float32)")


def autocast_dtype(precision):
    return torch.bfloat16 if precision == "bf16" else None
