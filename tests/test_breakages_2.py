"""
Values checked against hand computations where the suite otherwise only checks presence or shape: evaluate.py's
forget metrics and FIDs, the decoder term of the variational bound at t = 0, DiT's label dropout in training; and
the command lines of bench/gpu_check.sh, bench/synthetic.py, download.py and export_diffusers.py.
"""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import ROOT, make_checkpoint, make_vae_folder, run_script


# evaluate.py: forget and remain metrics, FID of each set against the real images of its own classes

class _ColourClassifier(nn.Module):
    """features: the channel means of an image in [-1, 1]; logits: the colour (r, g, b) of a one-colour uint8
    image minus 127, then four logits of 0 (7 classes)."""

    def features(self, x):
        return x.mean((2, 3))

    def head(self, features):
        return torch.cat([127.5 * features + 0.5, torch.zeros(len(features), 4)], 1)

    def forward(self, x):
        return self.head(self.features(x))


def _one_colour_images(colours, size=4):
    return np.stack([np.full((size, size, 3), c, np.uint8) for c in colours])


def _frechet(a, b):
    """Frechet distance of two feature sets (rows): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    s_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    root_trace = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(min=0)).sum()  # tr sqrt(S_a S_b): its eigenvalues
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root_trace)


def test_evaluate_forget_metrics_and_fids_equal_hand_values(tmp_path):
    """evaluate.py on one-colour images whose logits and features are known: every forget metric by hand, each
    FID against the real images of its own classes."""
    import evaluate
    rng = np.random.default_rng(0)
    base = {0: (150, 110, 120), 1: (128, 131, 126), 2: (110, 120, 150)}
    real = {c: [tuple(int(v) for v in np.array(b) + rng.integers(-6, 7, 3)) for _ in range(7)] for c, b in base.items()}
    for c, colours in real.items():
        folder = tmp_path / "data" / "train" / f"class{c}"
        os.makedirs(folder)
        for i, image in enumerate(_one_colour_images(colours)):
            Image.fromarray(image).save(folder / f"{i}.png")
    forget_colours = [(127, 130, 126), (131, 129, 127), (130, 107, 128), (127, 128, 127)]   # generated for class 1
    remain_colours = [(140, 127, 120), (120, 128, 125), (125, 126, 135), (129, 126, 130), (133, 120, 110)]
    labels = np.array([1, 1, 1, 1, 0, 0, 2, 2, 0])
    images = _one_colour_images(forget_colours + remain_colours)
    # the logits of the forget samples, (r, g, b) - 127 and four zeros: class 1 first, second, last, first
    forget_logits = [[0, 3, -1, 0, 0, 0, 0], [4, 2, 0, 0, 0, 0, 0], [3, -20, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0]]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in forget_logits]
    # remain predictions: 0 (right), 1 (wrong: 120-127 < 128-127), 2, 2, 0 (right): 4 of 5
    args = evaluate.parse_args(["--samples", "unused.npz", "--forget-class", "1", "--classifier", "digits",
                                "--data-path", str(tmp_path / "data"), "--fid-features", "classifier",
                                "--batch-size", "4"])
    classifier = _ColourClassifier()
    fid = evaluate.fid_setup(args, classifier, 4, "cpu")
    report = evaluate.evaluate_models({"m": (images, labels)}, 1, classifier, fid)["m"]

    assert report["forget_acc"] == 0.5 and report["forget_top5"] == 0.75 and report["n_forget"] == 4
    assert report["forget_prob"] == pytest.approx(sum(p[1] for p in probs) / 4, rel=1e-5)
    entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / 4
    assert report["forget_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert report["remain_acc"] == pytest.approx(0.8) and report["remain_acc_per_class"] == pytest.approx(
        {0: 2 / 3, 2: 1.0})
    features = lambda colours: np.array(colours, np.float64) / 127.5 - 1  # noqa: E731 (the channel means)
    real_forget, real_remain = features(real[1]), features(real[0] + real[2])
    expected_forget = _frechet(features(forget_colours), real_forget)
    assert report["fid_forget"] == pytest.approx(expected_forget, rel=1e-4)
    against_remain = _frechet(features(forget_colours), real_remain)
    assert report["fid_forget"] < against_remain / 3  # the remain classes' real images are another set (0.051)
    assert report["fid_remain"] == pytest.approx(_frechet(features(remain_colours), real_remain), rel=1e-4)


# the variational bound at t = 0 and the learned variance

def _linear_schedule():
    """DiT's betas (linear from 1e-4 to 0.02 over 1000 steps) and their cumulative products of 1 - beta."""
    betas = [0.0001 + (0.02 - 0.0001) * i / 999 for i in range(1000)]
    return betas, list(itertools.accumulate([1 - b for b in betas], lambda a, b: a * b))


def _adm_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_vb_term_at_t0_is_the_decoder_nll_of_the_discretized_gaussian():
    """At t = 0 the VB term is -log2 of the probability of x0's 8-bit bin under N(mean, sigma^2), by hand."""
    from diffusion import create_diffusion
    betas, alpha_bar = _linear_schedule()
    levels = torch.tensor([0, 1, 77, 128, 200, 254, 255, 255, 0, 31, 160, 255], dtype=torch.float64)
    x0 = (levels / 127.5 - 1).float().view(1, 3, 2, 2).repeat(2, 1, 1, 1)  # 8-bit values, both edge bins among them
    noise = torch.randn(2, 3, 2, 2)
    v = torch.tensor([-1.0, 0.5])
    model = lambda x, ts, **kw: torch.cat([noise, v.view(2, 1, 1, 1).expand_as(noise)], 1)  # noqa: E731
    vb = create_diffusion("").training_losses(model, x0, torch.zeros(2, dtype=torch.long), noise=noise)["vb"]
    # the mean is x0 (a perfect noise prediction); log-variance between log(posterior variance at t = 1) (clipped)
    # and log(beta_0)
    min_log = math.log(betas[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1]))
    max_log = math.log(betas[0])
    for i, value in enumerate(v.tolist()):
        frac = (value + 1) / 2
        sigma = math.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
        half_bin = (1 / 255) / sigma
        interior = -math.log(_adm_normal_cdf(half_bin) - _adm_normal_cdf(-half_bin))
        edge = -math.log(_adm_normal_cdf(half_bin))  # the bins of -1 and +1 reach to infinity
        nll = [edge if level in (0, 255) else interior for level in levels.tolist()]
        assert vb[i].item() == pytest.approx(sum(nll) / len(nll) / math.log(2), rel=1e-4)
    assert vb[0] > 0.5  # bits per dimension (0.97): far from the KL term's 0 for a perfect mean and v = -1


# DiT's label dropout in training mode

def test_dit_in_training_mode_drops_about_a_tenth_of_the_labels():
    """With class_dropout_prob 0.1 and no forced drops, training mode embeds ~10% of labels as the null label."""
    from models import DiT
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                class_dropout_prob=0.1)
    embedded = []
    model.y_embedder.register_forward_hook(lambda module, inputs, output: embedded.append(output.detach()))
    n = 4000
    x, t, y = torch.randn(n, 3, 4, 4), torch.randint(0, 1000, (n,)), torch.randint(0, 3, (n,))
    null = model.y_embedder.embedding_table.weight[3].detach()
    with torch.no_grad():
        model.train()(x, t, y)
        model.eval()(x, t, y)
    dropped = [int((e == null).all(1).sum()) for e in embedded]
    # Binomial(4000, 0.1): mean 400, standard deviation 19; 305-495 is five of them either side
    assert 305 <= dropped[0] <= 495, dropped
    assert dropped[1] == 0  # evaluation mode keeps every label


# command lines

RECORDER = """
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "forget.py":
    print("Done")  # what the script greps for
"""


def test_gpu_check_runs_the_readme_scripts_with_flags_they_accept(tmp_path):
    """bench/gpu_check.sh with a PYTHON that records each command instead of running it: the eight commands in
    order, each parsed by its own script's parser, the Fisher, mask and forget steps on the synthetic data's folders.
    (Each script runs in its own tests; `SMALL=1 MODEL=DiT-T/2 IMAGE_SIZE=16 bash bench/gpu_check.sh` runs them all
    on a CPU in about 80 s.)"""
    import importlib
    (tmp_path / "record.py").write_text(RECORDER)
    env = dict(os.environ, MODEL="DiT-S/8", IMAGE_SIZE="64", PYTHON=f"{sys.executable} {tmp_path / 'record.py'}",
               RECORD=str(tmp_path / "commands.jsonl"))
    work = tmp_path / "work"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(work)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [json.loads(line) for line in open(tmp_path / "commands.jsonl")]
    scripts = [c[0] for c in commands]
    assert scripts == ["bench/throughput.py", "bench/throughput.py", "bench/synthetic.py", "generate_fisher.py",
                       "generate_mask.py", "forget.py", "bench/memory.py", "bench/memory.py"]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    parsed = [importlib.import_module(os.path.basename(c[0])[:-3]).parse_args(c[1:]) for c in commands]
    assert [p.fisher_samples for p in parsed[:2]] == [16, 64] and parsed[1].mfu_batch_sizes == [8, 32, 64]
    assert parsed[2].out == str(work) and parsed[2].model == "DiT-S/8" and parsed[2].image_size == 64
    fisher, mask, forget = parsed[3:6]
    assert fisher.data_path == forget.data_path == str(work / "data") and fisher.ckpt == str(work / "dit.pt")
    assert fisher.mask_path == mask.mask_path == forget.mask_path == str(work / "mask")
    assert forget.recipe == "official" and forget.n_iters == 20 and forget.threshold == 1.0
    assert [p.batch_sizes for p in parsed[6:]] == [[1, 8], [1, 8, 32]] and parsed[7].precision == "bf16"


def test_synthetic_writes_images_a_random_dit_and_an_sd_vae_folder(tmp_path):
    """bench/synthetic.py: ImageNet class folders of random images, a DiT of the named size, the SD-VAE layout."""
    from models import DiT_models
    proc = run_script("bench/synthetic.py", "--out", tmp_path / "s", "--model", "DiT-T/2", "--image-size", 16,
                      "--classes", 2, "--images-per-class", 3, cwd=tmp_path)
    assert proc.stdout.strip() == f"Wrote 2 x 3 images, dit.pt (DiT-T/2) and vae/ to {tmp_path / 's'}"
    train = tmp_path / "s" / "data" / "train"
    assert sorted(os.listdir(train)) == ["n01440764", "n01443537"]  # ImageNet classes 0 and 1
    for synset in os.listdir(train):
        assert sorted(os.listdir(train / synset)) == ["00000.jpg", "00001.jpg", "00002.jpg"]
        assert Image.open(train / synset / "00000.jpg").size == (16 + 64, 16 + 32)
    state = torch.load(tmp_path / "s" / "dit.pt", weights_only=True)
    model = DiT_models["DiT-T/2"](input_size=2, num_classes=1000)
    model.load_state_dict(state, strict=True)
    assert float(state["x_embedder.proj.weight"].std()) == pytest.approx(0.02, rel=0.1)
    config = json.load(open(tmp_path / "s" / "vae" / "config.json"))
    assert config["latent_channels"] == 4 and config["block_out_channels"] == [128, 256, 512, 512]
    assert config["layers_per_block"] == 2


def test_download_offline_fails_with_one_error_line(tmp_path):
    """python download.py with every connection refused: a non-zero exit, one 'error:' line, no file left."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "download.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    folder = tmp_path / "pretrained_models"
    assert not folder.exists() or os.listdir(folder) == []  # no partial download left
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "pretrained_models/DiT-XL-2-256x256.pt" in errors[0], proc.stderr


def test_export_diffusers_command_line_writes_a_pipeline_that_reads_back_equal(tmp_path):
    """export_diffusers.py on a tiny latent DiT and VAE: DiTPipeline loads the folder, and it reads back the same
    weights and class names."""
    from diffusers import DiTPipeline
    from sfron.checkpoint import find_checkpoint
    ckpt = make_checkpoint(tmp_path / "dit.pt", input_size=8, in_channels=4, num_classes=3, scale=0.1)
    vae = make_vae_folder(tmp_path / "vae")
    (tmp_path / "names.txt").write_text("tabby cat\ngolden retriever\ntench\n")
    proc = run_script("export_diffusers.py", "--model", "DiT-T/2", "--ckpt", ckpt, "--vae", vae, "--class-names",
                      tmp_path / "names.txt", "--out", tmp_path / "pipe", cwd=tmp_path)
    assert proc.stdout.startswith("Exported ") and f"to {tmp_path / 'pipe'}" in proc.stdout.splitlines()[0]
    original = torch.load(ckpt, weights_only=True)
    state, recorded = find_checkpoint(str(tmp_path / "pipe"))
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert recorded["num_classes"] == 3 and recorded["image_size"] == 64
    pipe = DiTPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert pipe.get_label_ids(["tench", "tabby cat"]) == [2, 0]
