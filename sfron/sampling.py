"""
Class-conditional sampling with classifier-free guidance (DDPM or DDIM over a respaced diffusion), decoding
through the VAE, and image grids. Used by forget.py's snapshots, sample.py, sample_ddp.py and the demo.
"""
import functools
import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion import create_diffusion

from .files import atomic_save_image
from .rng import generator
from .vae import decode

# The classes of the official snapshot grid (golden retriever first) and of the official sample.py grid.
OFFICIAL_SNAPSHOT_CLASSES = [207, 360, 387, 972, 89, 979, 417, 279, 270, 980]
OFFICIAL_SAMPLE_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def snapshot_classes(forget_class, num_classes, count=10):
    """The forget class first, then the official snapshot classes that exist, then others, `count` in all."""
    picked = [forget_class]
    for c in OFFICIAL_SNAPSHOT_CLASSES + list(range(num_classes)):
        if len(picked) >= min(count, num_classes):
            break
        if c < num_classes and c not in picked:
            picked.append(c)
    return picked


@functools.lru_cache(maxsize=8)
def sampling_diffusion(sampler, num_steps):
    """The respaced diffusion for a sampler: 'ddpm' with N evenly spaced steps, or 'ddim' with DDIM's stride."""
    if sampler == "ddim":
        return create_diffusion(f"ddim{num_steps}")
    return create_diffusion(str(num_steps))


@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn: DDPM or DDIM over num_steps respaced steps, classifier-free guidance at cfg_scale
    (> 1: guided) on the first three channels as officially, or on all channels."""
    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 4.0
    cfg_all_channels: bool = False

    @property
    def diffusion(self):
        return sampling_diffusion(self.sampler, self.num_steps)


def per_sample_noise(seed, indices, shape, device, stream="sample/noise"):
    """Gaussian noise (N, *shape) whose row for image i depends only on (seed, stream, i): the same image whatever
    the batching and the number of processes."""
    return torch.stack([torch.randn(shape, generator=generator(seed, stream, i)) for i in indices]).to(device)


class StepNoise:
    """noise_fn for the DDPM sampler: a generator per image, keyed (seed, "sample/step-noise", i), so the noise of
    every step too is independent of batching."""

    def __init__(self, seed, indices):
        self.generators = [generator(seed, "sample/step-noise", i) for i in indices]

    def __call__(self, like):
        noise = [torch.randn(like.shape[1:], generator=g) for g in self.generators]
        if like.shape[0] == 2 * len(noise):  # the guided batch [z, z]: both halves share the noise
            noise = noise + noise
        return torch.stack(noise).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def generate(model, vae, labels, z, config, noise_fn=None, progress=False, autocast_dtype=None):
    """Images (N, 3, H, W) in about [-1, 1] for class labels (N,) from initial noise z (N, C, h, w), drawn as the
    SamplerConfig says; noise_fn gives the DDPM steps' noise (default: the global generator)."""
    was_training = model.training
    model.eval()
    use_cfg = config.cfg_scale > 1.0
    if use_cfg:
        null = torch.full_like(labels, model.num_classes)
        z, labels = torch.cat([z, z]), torch.cat([labels, null])
        model_fn = partial(model.forward_with_cfg, cfg_scale=config.cfg_scale, all_channels=config.cfg_all_channels)
    else:
        model_fn = model.forward
    diffusion = config.diffusion
    loop = diffusion.ddim_sample_loop if config.sampler == "ddim" else diffusion.p_sample_loop
    with torch.autocast(z.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        samples = loop(model_fn, z.shape, z, clip_denoised=False, model_kwargs=dict(y=labels), progress=progress,
                       device=z.device, noise_fn=noise_fn)
    if use_cfg:
        samples, _ = samples.chunk(2, dim=0)  # drop the null-class half
    model.train(was_training)
    return decode(vae, samples.float())


def generate_replay(model, vae, labels, config, seed, dist, batch_size=64):
    """
    Images (N, 3, H, W) in [-1, 1] on the CPU that model draws for labels (N,): generative replay of the remain
    classes. Image i starts from the noise of key (seed, "replay/noise", i); the processes split the images and
    every process gets all of them.
    """
    shape = (model.in_channels, model.input_size, model.input_size)
    per_rank = -(-len(labels) // dist.world_size)
    mine = range(dist.rank * per_rank, min(len(labels), (dist.rank + 1) * per_rank))
    parts = [torch.empty((0, 3, *decode_shape(vae, shape)), device=dist.device)]
    for start in range(mine.start, mine.stop, batch_size):
        index = range(start, min(start + batch_size, mine.stop))
        z = per_sample_noise(seed, index, shape, dist.device, stream="replay/noise")
        y = torch.as_tensor([labels[i] for i in index], device=dist.device)
        parts.append(generate(model, vae, y, z, config).float().clamp(-1, 1))
    return dist.all_gather_padded(torch.cat(parts), per_rank)[:len(labels)].cpu()


def decode_shape(vae, latent_shape):
    """(H, W) of the images decoded from latents of shape (C, h, w) (the latents themselves in pixel space)."""
    scale = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    return latent_shape[1] * scale, latent_shape[2] * scale


def to_uint8(images):
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, 3, H, W), rounded as torchvision's save_image does."""
    x = ((images.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def to_uint8_nhwc(images):
    """Images in [-1, 1] (N, C, H, W) -> a uint8 array (N, H, W, 3) on the CPU, as image files hold them."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images, nrow, padding=2):
    """A PIL grid of images in [-1, 1], nrow per row, with black padding (the layout of torchvision's make_grid)."""
    x = to_uint8(images).cpu()                               # (N, 3, H, W)
    n, c, h, w = x.shape
    cols, rows = min(nrow, n), math.ceil(n / min(nrow, n))
    grid = torch.zeros((c, rows * (h + padding) + padding, cols * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = x[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def side_by_side(images, gap=6, titles=None):
    """One PIL image holding the given ones side by side, with white gaps, and a title above each if given."""
    band = 14 if titles else 0
    size = (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images) + band)
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, im in enumerate(images):
        canvas.paste(im, (x, band))
        if titles:
            draw.text((x + 2, 1), titles[i], fill=(0, 0, 0))
        x += im.width + gap
    return canvas


def stacked(images, gap=6, titles=None):
    """One PIL image holding the given ones one under the other, with white gaps, and a title above each if given."""
    band = 14 if titles else 0
    size = (max(im.width for im in images), sum(im.height + band for im in images) + gap * (len(images) - 1))
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for i, im in enumerate(images):
        if titles:
            draw.text((2, y + 1), titles[i], fill=(0, 0, 0))
        canvas.paste(im.convert("RGB"), (0, y + band))
        y += band + im.height + gap
    return canvas


def upscale(image, min_side=256):
    """Nearest-neighbour enlargement of a small grid so that it can be looked at."""
    factor = max(1, int(np.ceil(min_side / min(image.size))))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


@dataclass(frozen=True)
class SnapshotOptions:
    """forget.py's sample grids: every `every` steps (0: none), drawn by `sampler`."""
    every: int = 50
    sampler: SamplerConfig = SamplerConfig("ddim", 50, 4.0)


class SnapshotGrid:
    """The grid forget.py saves every few steps: the same classes from the same noise each time."""

    def __init__(self, options, classes, noise, vae, autocast_dtype=None):
        self.options, self.classes, self.noise, self.vae = options, classes, noise, vae
        self.autocast_dtype = autocast_dtype

    def due(self, step):
        """Whether a grid is saved after `step` steps."""
        return self.options.every > 0 and step % self.options.every == 0

    def save(self, model, folder, step, logger):
        """Samples the grid from model and writes <folder>/NNNNNNN_sample.png."""
        labels = torch.tensor(self.classes, device=self.noise.device)
        images = generate(model, self.vae, labels, self.noise, self.options.sampler,
                          autocast_dtype=self.autocast_dtype)
        path = os.path.join(folder, f"{step:07d}_sample.png")
        atomic_save_image(grid_image(images, nrow=5), path)
        logger.info(f"Saved sample grid (classes {self.classes}) to {path}")
