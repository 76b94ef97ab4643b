"""
Synthetic stand-ins for timing runs where no data or weights can be downloaded: an ImageNet-style folder of
random images, a random-weight DiT checkpoint, and a random-weight VAE with the Stable Diffusion VAE
architecture saved as a diffusers folder.

    python bench/synthetic.py --out /tmp/synth --model DiT-XL/2 --image-size 256
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import DiT_models  # noqa: E402
from sfron.data import imagenet_synsets  # noqa: E402


def sd_vae(device="cpu"):
    """The Stable Diffusion VAE architecture (sd-vae-ft-*: 4 latent channels, 8x down) with random weights."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)
    return vae.to(device).eval().requires_grad_(False)


def random_dit(name, image_size, device="cpu"):
    """A registry DiT for 1000 classes at image_size with N(0, 0.02^2) weights: non-zero everywhere, so that every
    gradient is exercised."""
    torch.manual_seed(0)
    model = DiT_models[name](input_size=image_size // 8, num_classes=1000)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return model.to(device)


def main(args):
    """Writes <out>/data/train/<synset>/*.jpg (ImageNet classes 0, 1, ...), <out>/dit.pt and <out>/vae/."""
    rng = np.random.default_rng(0)
    index = imagenet_synsets()
    synsets = sorted(index, key=index.get)
    for c in range(args.classes):
        folder = os.path.join(args.out, "data", "train", synsets[c])
        os.makedirs(folder, exist_ok=True)
        for i in range(args.images_per_class):
            pixels = rng.integers(0, 256, (args.image_size + 32, args.image_size + 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    torch.save(random_dit(args.model, args.image_size).state_dict(), os.path.join(args.out, "dit.pt"))
    sd_vae().save_pretrained(os.path.join(args.out, "vae"))
    print(f"Wrote {args.classes} x {args.images_per_class} images, dit.pt ({args.model}) and vae/ to {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=str, default="/tmp/synth")
    parser.add_argument("--model", type=str, default="DiT-XL/2", choices=list(DiT_models))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images-per-class", type=int, default=16)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
