"""
Samples many images for evaluation, like the official sample_ddp.py, on one device or under torchrun / srun:
--samples-per-class N images of each of --class-labels (default: all classes), or --num-fid-samples images of
uniformly drawn classes. Writes a folder of PNGs and an .npz beside it (arr_0: uint8 NHWC images, arr_1: class
labels) that the ADM evaluator and evaluate.py read. Image i depends only on --global-seed and i, so the same
seed gives the same images whatever the number of processes.
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cli import add_model_args, add_sampling_args, model_request, run_main, sampler_config
from sfron.build import autocast_dtype, load_model_and_vae
from sfron.dist import distributed
from sfron.files import atomic_save_image, atomic_write
from sfron.rng import generator
from sfron.sampling import StepNoise, generate, per_sample_noise, to_uint8_nhwc
from sfron.utils import check_class_index


def sample_labels(args, num_classes):
    """The class of every image index, fixed by the arguments alone."""
    if args.samples_per_class:
        classes = args.class_labels or list(range(num_classes))
        for c in classes:
            check_class_index(c, num_classes, "--class-labels", "the model")
        return np.repeat(np.array(classes, dtype=np.int64), args.samples_per_class)
    g = generator(args.global_seed, "sample/labels")
    classes = torch.tensor(args.class_labels or list(range(num_classes)))
    return classes[torch.randint(0, len(classes), (args.num_fid_samples,), generator=g)].numpy()


def output_folder(args, spec):
    """The official folder name: <model>-<ckpt>-size-<S>-vae-<vae>-cfg-<scale>-seed-<seed>."""
    ckpt = os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else "pretrained"
    vae = os.path.basename(os.path.normpath(spec.vae))
    name = (f"{args.model.replace('/', '-')}-{ckpt}-size-{spec.image_size}-vae-{vae}-cfg-{args.cfg_scale}-"
            f"seed-{args.global_seed}")
    return os.path.join(args.sample_dir, name)


def save_npz(folder, labels):
    """Collects the PNGs of the folder into <folder>.npz (arr_0 images, arr_1 labels)."""
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB"))
                       for i in tqdm(range(len(labels)), desc="Building .npz")])
    path = f"{folder}.npz"
    atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    print(f"Saved .npz file to {path} [shape={images.shape}]")
    return path


def main(args):
    """Writes the PNGs and the .npz."""
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    with distributed() as dist:
        model, vae, spec, _ = load_model_and_vae(model_request(args), dist.device)
        model.eval()
        labels = sample_labels(args, spec.num_classes)
        folder = output_folder(args, spec)
        if dist.is_main:
            os.makedirs(folder, exist_ok=True)
            print(f"Saving {len(labels)} .png samples at {folder}")
        dist.barrier()
        config = sampler_config(args)
        shape = (model.in_channels, model.input_size, model.input_size)
        per_proc = args.per_proc_batch_size
        # chunks of per_proc images, chunk k on rank k % world_size: the same batches for any number of processes
        chunks = range(dist.rank, math.ceil(len(labels) / per_proc), dist.world_size)
        for k in tqdm(chunks, disable=not dist.is_main, desc="Sampling"):
            index = list(range(k * per_proc, min((k + 1) * per_proc, len(labels))))
            y = torch.from_numpy(labels[index]).to(dist.device)
            z = per_sample_noise(args.global_seed, index, shape, dist.device)
            images = generate(model, vae, y, z, config, noise_fn=StepNoise(args.global_seed, index),
                              autocast_dtype=autocast_dtype(args.precision))
            for i, image in zip(index, to_uint8_nhwc(images)):
                atomic_save_image(Image.fromarray(image), os.path.join(folder, f"{i:06d}.png"), durable=False)
        dist.barrier()
        if dist.is_main:
            save_npz(folder, labels)
        dist.barrier()


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--samples-per-class", type=int, default=None,
                        help="this many images of each of --class-labels instead of --num-fid-samples random classes")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None, help="classes to draw (default: all)")
    add_sampling_args(parser, cfg_scale=1.5)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere and newer GPUs (fast, slightly less exact)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
