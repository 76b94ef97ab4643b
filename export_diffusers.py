"""
Exports a DiT checkpoint (any form --ckpt takes) as a diffusers DiTPipeline folder: the transformer as
safetensors, a DDIM scheduler with the DiT betas, the VAE and the class names, so that
`DiTPipeline.from_pretrained(out)` samples from it. Note: diffusers' DiT embeds timesteps with slightly other
frequencies than the official DiT and guides all four latent channels (see the README).
"""
import argparse

import torch

from cli import add_model_args, description, model_request, run_main
from sfron.build import load_model_and_vae
from sfron.diffusers_io import export_pipeline, read_class_names


def main(args):
    """Writes the pipeline folder --out."""
    loaded = load_model_and_vae(model_request(args), torch.device("cpu"))
    names = read_class_names(args.class_names, args.data_path, loaded.spec.num_classes)
    export_pipeline(loaded, names, args.out)
    print(f"Exported {loaded.spec.describe()} from {loaded.ckpt} to {args.out}")
    print("diffusers' DiT uses the timestep frequencies 10000^(-i/127) (official: 10000^(-i/128)) and guides all "
          "latent channels (official: the first three); sfron.diffusers_io.use_official_timestep_frequencies "
          "restores the official timestep embedding")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_args(parser)
    parser.add_argument("--class-names", type=str, default=None,
                        help="class names: a JSON list or {index: name}, or one name per line (default: the class "
                             "folders of --data-path, else the ImageNet names for 1000 classes, else the indices)")
    parser.add_argument("--data-path", type=str, default=None,
                        help="ImageNet-style root whose class folders name the classes")
    parser.add_argument("--out", type=str, required=True, help="the pipeline folder to write (must not exist)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
