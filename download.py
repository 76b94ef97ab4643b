"""
The official find_model: a DiT state dict from a released name (downloaded into pretrained_models/ on first use)
or a local checkpoint in any form DiT users have. `python download.py` downloads every released checkpoint.
"""
import argparse

from sfron.checkpoint import PRETRAINED_MODELS as pretrained_models
from sfron.checkpoint import download_model, find_checkpoint, load_model_weights  # noqa: F401 (official names)


def find_model(model_name):
    """
    A DiT state dict from a released name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) or a local file: a raw
    state dict, a DiT train.py checkpoint {"model", "ema", "opt", "args"} (its "ema" preferred, as officially),
    a checkpoint of this repository, a .safetensors state dict, or a diffusers DiT folder (mapped to the
    official keys). 'module.' key prefixes are removed.
    """
    return find_checkpoint(model_name)[0]


def main(args):
    """Downloads every released DiT checkpoint into pretrained_models/ (offline: one error line, nothing left)."""
    for name in sorted(pretrained_models):
        download_model(name)
    print("Done.")


def parse_args(argv=None):
    """The command line (no flags but --help)."""
    from cli import description
    return argparse.ArgumentParser(description=description(__doc__)).parse_args(argv)


if __name__ == "__main__":
    from cli import run_main
    run_main(main, parse_args())
