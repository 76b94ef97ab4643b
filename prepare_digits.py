"""
Writes scikit-learn's handwritten digits (load_digits: 1,797 8x8 images, 10 classes) as an ImageNet-style
folder: <out>/train/<class>/NNNN.png and a held-out <out>/val/<class>/NNNN.png (every fifth image of a class).
Deterministic: the same files every time.
"""
import argparse
import os

import numpy as np
from PIL import Image

from cli import run_main
from sfron.files import atomic_save_image


def main(args):
    """Writes the digit PNGs."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16 -> 0..255
    seen = {}
    for image, label in zip(images, digits.target):
        k = seen.get(label, 0)
        seen[label] = k + 1
        split = "val" if k % args.val_every == args.val_every - 1 else "train"
        path = os.path.join(args.out, split, f"{label}", f"{k:04d}.png")
        if not os.path.isfile(path):
            atomic_save_image(Image.fromarray(image, mode="L").convert("RGB"), path)
    n_val = sum(len(os.listdir(os.path.join(args.out, "val", str(c)))) for c in range(10))
    print(f"Wrote {len(images) - n_val} training and {n_val} held-out digits to {args.out}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=str, default="data/digits")
    parser.add_argument("--val-every", type=int, default=5, help="every N-th image of a class is held out")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
