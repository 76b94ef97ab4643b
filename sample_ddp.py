"""
Samples many images for evaluation, like the official sample_ddp.py, on one device or under torchrun / srun:
--samples-per-class N images of each of --class-labels (default: all classes), or --num-fid-samples images of
uniformly drawn classes. Writes a folder of PNGs and an .npz beside it (arr_0: uint8 NHWC images, arr_1: class
labels) that the ADM evaluator and evaluate.py read. Image i depends only on --global-seed and i, so the same
seed gives the same images whatever the number of processes. A run stopped by SIGTERM/SIGUSR1 or killed is
continued by the same command: the images already written are kept, the rest drawn, the .npz completed.
"""
import argparse
import hashlib
import json
import math
import os
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cli import add_model_args, add_sampling_args, description, model_request, run_main, sampler_config
from sfron.build import autocast_dtype, load_model_and_vae
from sfron.dist import distributed
from sfron.files import as_read_back, atomic_json_dump, atomic_save_image, atomic_write, remove_stale_temporaries
from sfron.preemption import Preempted, StopSignals
from sfron.rng import generator
from sfron.sampling import StepNoise, generate, per_sample_noise, to_uint8_nhwc
from sfron.utils import UserError, check_class_index

RECORD = "sampling.json"  # the settings the folder's images were drawn with


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


def npz_path(folder):
    """The .npz beside the PNG folder, as the official sample_ddp.py names it."""
    return f"{folder}.npz"


def save_npz(folder, labels):
    """Collects the PNGs of the folder into <folder>.npz (arr_0 images, arr_1 labels)."""
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB"))
                       for i in tqdm(range(len(labels)), desc="Building .npz")])
    path = npz_path(folder)
    atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    print(f"Saved .npz file to {path} [shape={images.shape}]")
    return path


def sampling_record(args, spec, labels):
    """What the images of a folder depend on; a folder drawn with anything else is not continued."""
    ckpt = args.ckpt
    if ckpt and os.path.isfile(ckpt):
        stat = os.stat(ckpt)
        ckpt = {"path": os.path.abspath(ckpt), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return as_read_back({
        "model": asdict(spec), "ckpt": ckpt, "sampler": asdict(sampler_config(args)), "global_seed": args.global_seed,
        "per_proc_batch_size": args.per_proc_batch_size, "precision": args.precision, "tf32": args.tf32,
        "labels_sha256": hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()})


def check_folder(folder, record, dist):
    """Rank 0 records the settings in <folder>/sampling.json, or checks them against those of the images already
    there (an interrupted run, continued), and removes what a killed writer left; every rank then goes on, or
    stops with the same error."""
    error = None
    if dist.is_main:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, RECORD)
        recorded = json.load(open(path)) if os.path.isfile(path) else None
        if recorded is None:
            atomic_json_dump(record, path)
        elif recorded != record:
            changed = sorted(k for k in record if recorded.get(k) != record[k])
            error = (f"{folder} holds samples drawn with other settings ({', '.join(changed)} differ): use another "
                     f"--sample-dir or remove that folder")
        remove_stale_temporaries(folder)
        # the .npz lies beside the folder, among other runs' files: only its own temporaries are removed
        remove_stale_temporaries(os.path.dirname(folder) or ".", of=os.path.basename(npz_path(folder)))
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)


def main(args):
    """Writes the PNGs and the .npz; returns the .npz path."""
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    with distributed() as dist, StopSignals() as stop:
        model, vae, spec, _ = load_model_and_vae(model_request(args), dist.device)
        model.eval()
        labels = sample_labels(args, spec.num_classes)
        folder = output_folder(args, spec)
        check_folder(folder, sampling_record(args, spec, labels), dist)
        config = sampler_config(args)
        shape = (model.in_channels, model.input_size, model.input_size)
        per_proc = args.per_proc_batch_size
        # chunk k (per_proc images) is drawn by rank k % world_size: the same batches for any number of processes
        n_chunks = math.ceil(len(labels) / per_proc)
        rounds = math.ceil(n_chunks / dist.world_size)
        paths = [os.path.join(folder, f"{i:06d}.png") for i in range(len(labels))]
        if dist.is_main:
            done = sum(os.path.isfile(p) for p in paths)
            print(f"Saving {len(labels)} .png samples at {folder}" + (f" ({done} already there)" if done else ""))
        for r in tqdm(range(rounds), disable=not dist.is_main, desc="Sampling"):
            k = r * dist.world_size + dist.rank
            index = list(range(k * per_proc, min((k + 1) * per_proc, len(labels))))
            if index and not all(os.path.isfile(paths[i]) for i in index):
                y = torch.from_numpy(labels[index]).to(dist.device)
                z = per_sample_noise(args.global_seed, index, shape, dist.device)
                images = generate(model, vae, y, z, config, noise_fn=StepNoise(args.global_seed, index),
                                  autocast_dtype=autocast_dtype(args.precision))
                for i, image in zip(index, to_uint8_nhwc(images)):
                    atomic_save_image(Image.fromarray(image), paths[i], durable=False)
            where = f"after {min(len(labels), (r + 1) * dist.world_size * per_proc)} of {len(labels)} images"
            if stop.agreed(dist, where) and r + 1 < rounds:  # every process, every round: all stop together
                raise Preempted(stop.name(), f"{where}; they are saved")
        dist.barrier()
        if dist.is_main:
            save_npz(folder, labels)
        dist.barrier()
    return npz_path(folder)


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
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
