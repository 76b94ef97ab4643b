"""Small data, models and a script runner for the tests."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from models import DiT_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, num_classes=3, per_class=6, size=(10, 12), seed=0, synsets=None):
    """<root>/train/class<k>/<i>.png: RGB images whose brightness depends on the class; synsets: name the folders
    by the ImageNet synsets of these class indices instead (a subset of ImageNet for a 1000-class model)."""
    rng = np.random.default_rng(seed)
    if synsets is not None:
        from sfron.data import imagenet_synsets
        by_index = {i: name for name, i in imagenet_synsets().items()}
    for c in range(num_classes if synsets is None else len(synsets)):
        folder = os.path.join(root, "train", f"class{c}" if synsets is None else by_index[synsets[c]])
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((*size, 3)) * 60 + c * 255 / max(num_classes, 2)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


def make_checkpoint(path, model="DiT-T/2", input_size=8, in_channels=3, num_classes=3, seed=0, scale=0.05):
    """A random-weight DiT state dict (every trainable weight N(0, scale^2), so gradients are not all zero)."""
    torch.manual_seed(seed)
    net = DiT_models[model](input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, scale)
    torch.save(net.state_dict(), path)
    return path


def make_tiny_run_folder(root):
    """root/data (3 classes of 6 small images) and root/tiny.pt (a random DiT-T/2 for 8x8 pixels, 3 classes)."""
    make_image_folder(root / "data", num_classes=3, per_class=6)
    make_checkpoint(root / "tiny.pt", num_classes=3)
    return root


def tiny_dit(input_size=8, hidden_size=32, depth=2, num_classes=4, scale=0.1, seed=0):
    """A DiT small enough to check by hand (patch 2, 3 channels, 2 heads), every trainable weight N(0, scale^2)."""
    from models import DiT
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, patch_size=2, in_channels=3, hidden_size=hidden_size, depth=depth,
                num_heads=2, num_classes=num_classes)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, scale)
    return model


def tiny_train_dit(seed=0):
    """The 1-block DiT on 4x4 pixels with 3 classes, in training mode, that the unlearning step tests take."""
    return tiny_dit(input_size=4, hidden_size=16, depth=1, num_classes=3, scale=0.2, seed=seed).train()


def toy_batch(seed, label, n=2, drop=None):
    """A Batch of n random 4x4 images of one label, with timesteps and noise from `seed`; drop: label-drop ids."""
    from sfron.data import Batch
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(n, 3, 4, 4, generator=g), y=torch.full((n,), label),
                 t=torch.randint(0, 1000, (n,), generator=g), noise=torch.randn(n, 3, 4, 4, generator=g),
                 drop=torch.zeros(n, dtype=torch.long) if drop is None else drop, step=0)


def make_vae_folder(folder):
    """A tiny diffusers AutoencoderKL with the SD-VAE layout (4 latent channels, 8x downsampling)."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(folder)
    return folder


def script_command(script, *args, nproc=None):
    """(command line, environment) of a top-level script, under torchrun with nproc processes if given."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, script)]
    else:
        cmd = [sys.executable, os.path.join(ROOT, script)]
    return cmd + [str(a) for a in args], env


def run_script(script, *args, cwd, nproc=None, timeout=600, check=True):
    """Runs a top-level script (under torchrun with nproc processes if given); returns the CompletedProcess."""
    cmd, env = script_command(script, *args, nproc=nproc)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in_process(script, *args, cwd, check=False):
    """
    A script's command line run in this process (no interpreter start-up: seconds saved per call), through the
    same run_main a subprocess would use; returns a CompletedProcess with the exit status and the output
    (check=True: a non-zero status fails).
    """
    import contextlib
    import importlib
    import io

    from cli import run_main
    module = importlib.import_module(script[:-len(".py")])
    out, err, status, previous = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(module.main, module.parse_args([str(a) for a in args]))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(previous)
    if check and status != 0:
        raise AssertionError(f"{script} failed ({status}):\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}")
    return subprocess.CompletedProcess([script, *args], status, out.getvalue(), err.getvalue())


def experiment_dirs(results):
    return sorted(os.path.join(results, d) for d in os.listdir(results))


def assert_fisher_close(actual, expected):
    """
    Two Fisher estimates over the same samples agree: as a whole to 1e-5 (relative L1) and element by element to
    1e-3. A different batching changes the float rounding of the forward pass, which a squared gradient near
    zero can magnify on a few elements.
    """
    assert actual.keys() == expected.keys()
    num = sum(float((actual[k] - expected[k]).abs().sum()) for k in expected)
    den = sum(float(expected[k].abs().sum()) for k in expected)
    assert num / den < 1e-5, f"relative L1 difference {num / den:.2e}"
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-3, atol=1e-12)


def naive_fisher_sum(model, diffusion, b):
    """Sum over samples of the squared gradient, one backward per sample (what the official batch-1 loop does)."""
    from sfron.data import Batch
    from sfron.loss import diffusion_loss
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(b.x.shape[0]):
        one = Batch(x=b.x[i:i + 1], y=b.y[i:i + 1], t=b.t[i:i + 1], noise=b.noise[i:i + 1], drop=b.drop[i:i + 1])
        model.zero_grad()
        diffusion_loss(model, diffusion, one).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                total[n] += p.grad ** 2
    return total
