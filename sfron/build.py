"""
Builds the DiT and its VAE from a ModelRequest and the checkpoint. The image size, class count and VAE default to
what the checkpoint's weights imply (3 input channels: a pixel-space model; the position embedding gives the input
size; the label table the class count), so the same commands run on DiT-XL/2 and on a small pixel-space DiT.
Values given explicitly always win, and a checkpoint that does not fit is a clear error.
"""
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from models import DiT_models

from .checkpoint import PRETRAINED_DIR, PRETRAINED_MODELS, find_checkpoint, load_model_weights
from .utils import UserError
from .vae import VAE_DOWNSAMPLE, is_pixel_space, latent_channels, load_vae


@dataclass(frozen=True)
class ModelRequest:
    """The model a command line asks for; None: as the checkpoint implies or records, else the official default."""
    model: str = "DiT-XL/2"
    ckpt: Optional[str] = None   # a released name or a local file (None: the released checkpoint of model and size)
    image_size: Optional[int] = None
    num_classes: Optional[int] = None
    vae: Optional[str] = None    # 'ema' | 'mse' | a local folder | 'none'
    random_flip: Optional[bool] = None


@dataclass(frozen=True)
class ModelSpec:
    """The resolved configuration of a DiT and its data."""
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


class LoadedModel(NamedTuple):
    model: torch.nn.Module   # the DiT with the checkpoint's weights
    vae: Optional[torch.nn.Module]
    spec: ModelSpec
    ckpt: str                # where the weights came from


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


def architecture_name(state_dict):
    """The registry name (DiT-S/2, ...) whose depth, width and patch a DiT state dict has, or a description."""
    proj = state_dict.get("x_embedder.proj.weight")
    if proj is None or proj.ndim != 4:
        return "no DiT"
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    hidden, patch = proj.shape[0], proj.shape[2]
    for name, factory in DiT_models.items():
        with torch.device("meta"):
            candidate = factory(input_size=8, num_classes=1)  # 8: every registry patch divides it
        if (len(candidate.blocks), candidate.x_embedder.proj.out_channels,
                candidate.x_embedder.patch_size[0]) == (depth, hidden, patch):
            return name
    return f"a DiT of depth {depth}, width {hidden}, patch {patch}"


def checkpoint_summary(state_dict, recorded):
    """What a checkpoint holds, for an error: the architecture of its weights and the settings it records."""
    implied = implied_by_weights(state_dict)
    found = {"input size": implied.get("input_size"), "input channels": implied.get("in_channels"),
             "classes": implied.get("num_classes"), **{k.replace("_", " "): v for k, v in recorded.items()}}
    return f"it holds {architecture_name(state_dict)}, " + ", ".join(f"{k} {v}" for k, v in found.items()
                                                                    if v is not None)


def default_checkpoint(model, image_size):
    """The released checkpoint to download when no checkpoint is given."""
    name = f"{model.replace('/', '-')}-{image_size}x{image_size}.pt"
    if name not in PRETRAINED_MODELS:
        raise UserError(f"--ckpt is required: no released checkpoint for {model} at {image_size}x{image_size} "
                        f"(released: {', '.join(sorted(PRETRAINED_MODELS))})")
    return name


def resolve_spec(request, state_dict, recorded=None):
    """
    The model settings: explicit values of the request first, then what the checkpoint records about itself,
    then what its weights imply, then the official defaults.
    """
    implied = implied_by_weights(state_dict) if state_dict is not None else {}
    recorded = recorded or {}

    def pick(field, default):
        value = getattr(request, field)
        return value if value is not None else recorded.get(field, default)

    vae = pick("vae", "none" if implied.get("in_channels") == 3 else "ema")
    pixel = is_pixel_space(vae)
    size = implied.get("input_size")
    image_size = pick("image_size", 256 if size is None else (size if pixel else size * VAE_DOWNSAMPLE))
    num_classes = pick("num_classes", implied.get("num_classes", 1000))
    spec = ModelSpec(model=request.model, image_size=image_size, num_classes=num_classes, vae=vae,
                     learn_sigma=implied.get("learn_sigma", True), random_flip=pick("random_flip", True))
    if not pixel and image_size % VAE_DOWNSAMPLE:
        raise UserError(f"--image-size {image_size} must be divisible by {VAE_DOWNSAMPLE} for the VAE")
    return spec


def requested_spec(request):
    """The ModelSpec of the model a request loads, without building it (a released checkpoint not yet downloaded:
    what the request and the official defaults say)."""
    ckpt = request.ckpt
    if ckpt is None or (ckpt in PRETRAINED_MODELS and not os.path.isfile(ckpt) and
                        not os.path.isfile(os.path.join(PRETRAINED_DIR, ckpt))):
        return resolve_spec(request, None)
    state_dict, recorded = find_checkpoint(ckpt)
    return resolve_spec(request, state_dict, recorded)


def build_dit(spec, in_channels):
    """A freshly initialised DiT for the spec (clear errors for sizes the patch size does not divide)."""
    if spec.model not in DiT_models:
        raise UserError(f"unknown --model {spec.model}; choose from {', '.join(DiT_models)}")
    try:
        return DiT_models[spec.model](input_size=spec.input_size, num_classes=spec.num_classes,
                                      in_channels=in_channels, learn_sigma=spec.learn_sigma)
    except ValueError as e:
        raise UserError(f"{spec.describe()}: {e}") from None


def load_model_and_vae(request, device, logger=None, with_vae=True):
    """
    LoadedModel(DiT with the checkpoint's weights on device, VAE or None, ModelSpec, checkpoint name) for a
    ModelRequest. with_vae=False skips loading the VAE (returned as None) when the caller already has it.
    """
    ckpt = request.ckpt
    state_dict, recorded = find_checkpoint(ckpt) if ckpt else (None, {})
    spec = resolve_spec(request, state_dict, recorded)
    if state_dict is None:
        ckpt = default_checkpoint(spec.model, spec.image_size)
        state_dict, _ = find_checkpoint(ckpt)
    vae = load_vae(spec.vae, device) if with_vae else None
    in_channels = 3 if spec.pixel_space else (latent_channels(vae) if vae is not None else 4)
    with torch.device("meta"):  # no random initialisation of weights that the checkpoint replaces
        model = build_dit(spec, in_channels=in_channels)
    load_model_weights(model, state_dict, ckpt, spec.describe(), assign=True,
                       holds=lambda: checkpoint_summary(state_dict, recorded))
    if logger is not None:
        logger.info(f"Model: {spec.describe()}, weights from {ckpt}")
    return LoadedModel(model.to(device), vae, spec, ckpt)


def autocast_dtype(precision):
    """The autocast dtype of --precision (None: float32, no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None
