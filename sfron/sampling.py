"""
Class-conditional sampling with classifier-free guidance (DDPM or DDIM over a respaced diffusion), decoding
through the VAE, and image grids. Used by forget.py's snapshots, sample.py, sample_ddp.py and the demo.
"""
from functools import partial

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from diffusion import create_diffusion

from .utils import seeded_generator
from .vae import decode

# The classes of the official snapshot grid (golden retriever first) and of the official sample.py grid.
OFFICIAL_SNAPSHOT_CLASSES = [207, 360, 387, 972, 89, 979, 417, 279, 270, 980]
OFFICIAL_SAMPLE_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def add_sampling_args(parser, cfg_scale):
    """The official sampling flags (--cfg-scale with the script's official default) and the sampler choice."""
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale)
    parser.add_argument("--cfg-all-channels", action="store_true",
                        help="guide every noise channel (the official code guides the first three)")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--sampler", type=str, choices=["ddpm", "ddim"], default="ddpm")


def snapshot_classes(forget_class, num_classes, count=10):
    """The forget class first, then the official snapshot classes that exist, then others, `count` in all."""
    picked = [forget_class]
    for c in OFFICIAL_SNAPSHOT_CLASSES + list(range(num_classes)):
        if len(picked) >= min(count, num_classes):
            break
        if c < num_classes and c not in picked:
            picked.append(c)
    return picked


def sampling_diffusion(sampler, num_steps):
    """The respaced diffusion for a sampler: 'ddpm' with N evenly spaced steps, or 'ddim' with DDIM's stride."""
    if sampler == "ddim":
        return create_diffusion(f"ddim{num_steps}")
    return create_diffusion(str(num_steps))


def per_sample_noise(seeds, shape, device):
    """Gaussian noise (N, *shape) where row i depends only on seeds[i]: the same image whatever the batching."""
    return torch.stack([torch.randn(shape, generator=seeded_generator(*s)) for s in seeds]).to(device)


class StepNoise:
    """noise_fn for the samplers: a per-sample generator each, so DDPM noise too is independent of batching."""

    def __init__(self, seeds):
        self.generators = [seeded_generator(*s, 1) for s in seeds]

    def __call__(self, like):
        noise = [torch.randn(like.shape[1:], generator=g) for g in self.generators]
        if like.shape[0] == 2 * len(noise):  # the guided batch [z, z]: both halves share the noise
            noise = noise + noise
        return torch.stack(noise).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def generate(model, diffusion, vae, labels, z, cfg_scale, sampler="ddim", noise_fn=None, all_channels=False,
             progress=False, autocast_dtype=None):
    """Images (N, 3, H, W) in about [-1, 1] for class labels (N,) from initial noise z (N, C, h, w)."""
    was_training = model.training
    model.eval()
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        null = torch.full_like(labels, model.num_classes)
        z, labels = torch.cat([z, z]), torch.cat([labels, null])
        model_fn = partial(model.forward_with_cfg, cfg_scale=cfg_scale, all_channels=all_channels)
    else:
        model_fn = model.forward
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    with torch.autocast(z.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        samples = loop(model_fn, z.shape, z, clip_denoised=False, model_kwargs=dict(y=labels), progress=progress,
                       device=z.device, noise_fn=noise_fn)
    if use_cfg:
        samples, _ = samples.chunk(2, dim=0)  # drop the null-class half
    model.train(was_training)
    return decode(vae, samples.float())


def to_uint8(images):
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3), rounded as torchvision's save_image does."""
    x = ((images.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images, nrow, padding=2):
    """A PIL grid of images in [-1, 1], nrow per row."""
    grid = make_grid(((images.clamp(-1, 1) + 1) / 2).float().cpu(), nrow=nrow, padding=padding)
    return Image.fromarray((grid.mul(255).add_(0.5).clamp_(0, 255)).permute(1, 2, 0).to(torch.uint8).numpy())


def side_by_side(images, gap=6):
    """One PIL image holding the given ones side by side, with white gaps."""
    size = (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images))
    canvas = Image.new("RGB", size, (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def upscale(image, min_side=256):
    """Nearest-neighbour enlargement of a small grid so that it can be looked at."""
    factor = max(1, int(np.ceil(min_side / min(image.size))))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image
