"""attack.py and sfron/attack.py on a tiny pixel-space DiT: what each attack may touch, and what its report holds."""
import hashlib
import json
import os

import numpy as np
import torch

from diffusion import create_diffusion
from helpers import make_checkpoint, make_image_folder, make_vae_folder, run_in_process, tiny_dit
from sfron.attack import AttackImages, AttackSettings, ExtraLabel, label_inversion
from sfron.build import ModelRequest, load_model_and_vae
from sfron.classifier import DigitsClassifier, load_classifier
from sfron.metrics import classify
from sfron.sampling import SamplerConfig, generate, per_sample_noise, to_uint8_nhwc


def test_extra_label_is_the_given_embedding_and_leaves_the_table_alone():
    model = tiny_dit(num_classes=4).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    row = model.y_embedder.embedding_table.weight[2].detach().clone()
    with ExtraLabel(model, row) as label, torch.no_grad():
        assert label == 5  # past the null label 4
        mixed = model(x, t, torch.tensor([label, 1]))
    with torch.no_grad():
        assert torch.equal(mixed, model(x, t, torch.tensor([2, 1])))  # the new label acts as the row it holds
    assert not model.y_embedder._forward_hooks and not model.y_embedder._forward_pre_hooks


def test_inversion_moves_only_the_new_embedding():
    model = tiny_dit(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = AttackImages(torch.rand(4, 3, 8, 8) * 2 - 1, None)
    seen = {}

    def rate(net, label, step):  # what the new label makes of a fixed input, at each budget
        with torch.no_grad():
            seen[step] = net(torch.ones(1, 3, 8, 8), torch.tensor([500]), torch.tensor([label]))
        return step

    settings = AttackSettings(forget_class=1, inversion_steps=(0, 3), inversion_lr=0.05, batch_size=2)
    assert label_inversion(model, create_diffusion(""), images, settings, rate) == {0: 0, 3: 3}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every DiT weight bit-identical
    assert all(p.requires_grad for p in model.parameters() if p is not model.pos_embed)
    assert not torch.equal(seen[0], seen[3])  # the embedding did move


def files_outside(root, skip):
    """{path: sha256} of every file under root except those under skip."""
    out = {}
    for folder, _, files in os.walk(root):
        if not os.path.abspath(folder).startswith(os.path.abspath(skip)):
            for f in files:
                out[os.path.join(folder, f)] = hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
    return out


def test_attack_script_reports_its_samples_and_touches_only_its_output(tmp_path):
    make_image_folder(tmp_path / "data", num_classes=3, per_class=5, size=(8, 8))
    ckpt = make_checkpoint(tmp_path / "dit.pt", num_classes=3, scale=0.1)
    torch.manual_seed(0)
    torch.save(DigitsClassifier(num_classes=3).state_dict(), tmp_path / "clf.pt")
    argv = ["--model", "DiT-T/2", "--ckpt", ckpt, "--names", "tiny", "--data-path", tmp_path / "data",
            "--forget-class", 1, "--images", 3, "--inversion-steps", 0, 2, "--relearn-steps", 0, 2, "--samples", 6,
            "--num-sampling-steps", 3, "--classifier", "digits", "--classifier-weights", tmp_path / "clf.pt",
            "--out", tmp_path / "out"]
    before = files_outside(tmp_path, tmp_path / "out")
    run_in_process("attack.py", *argv, cwd=tmp_path, check=True)
    assert files_outside(tmp_path, tmp_path / "out") == before  # nothing but the output folder was written
    report = json.load(open(tmp_path / "out" / "report.json"))
    classifier = load_classifier("digits", str(tmp_path / "clf.pt"), 3)
    for attack in ("inversion", "relearning"):
        for step, entry in report["tiny"][attack].items():
            with np.load(entry["samples"]) as saved:
                predicted = classify(classifier, saved["arr_0"], 8, "cpu").argmax(1)
            assert entry["n"] == 6 and entry["n_forget"] == int((predicted == 1).sum())
            assert entry["forget_acc"] == entry["n_forget"] / 6
    # relearning starts from the checkpoint: before any step it draws what the checkpoint itself draws
    model = load_model_and_vae(ModelRequest(model="DiT-T/2", ckpt=str(ckpt)), torch.device("cpu")).model
    z = per_sample_noise(0, range(6), (3, 8, 8), "cpu", "attack/noise")
    with torch.no_grad():
        expected = to_uint8_nhwc(generate(model, None, torch.full((6,), 1), z, SamplerConfig("ddim", 3, 4.0)))
    with np.load(report["tiny"]["relearning"]["0"]["samples"]) as saved:
        assert np.array_equal(saved["arr_0"], expected)
    assert os.path.getsize(tmp_path / "out" / "attack.png") > 0
    assert "| tiny |" in open(tmp_path / "out" / "report.md").read()


def test_attack_on_a_latent_dit_runs_through_its_vae(tmp_path):
    """The DiT-XL/2 path on a tiny latent DiT: images encoded by the VAE for the attack, samples decoded to judge."""
    make_image_folder(tmp_path / "data", num_classes=3, per_class=3, size=(64, 64))
    ckpt = make_checkpoint(tmp_path / "latent.pt", input_size=8, in_channels=4, num_classes=3, scale=0.1)
    torch.save(DigitsClassifier(num_classes=3).state_dict(), tmp_path / "clf.pt")
    run_in_process("attack.py", "--model", "DiT-T/2", "--ckpt", ckpt, "--vae", make_vae_folder(tmp_path / "vae"),
                   "--names", "latent", "--data-path", tmp_path / "data", "--forget-class", 2, "--images", 2,
                   "--inversion-steps", 1, "--relearn-steps", 1, "--samples", 2, "--num-sampling-steps", 2,
                   "--classifier", "digits", "--classifier-weights", tmp_path / "clf.pt", "--out", tmp_path / "out",
                   cwd=tmp_path, check=True)
    report = json.load(open(tmp_path / "out" / "report.json"))["latent"]
    with np.load(report["inversion"]["1"]["samples"]) as saved:
        assert saved["arr_0"].shape == (2, 64, 64, 3)  # decoded images, not latents
    assert report["relearning"]["1"]["n"] == 2


def test_bad_attack_input_is_one_line(tmp_path):
    make_image_folder(tmp_path / "data", num_classes=3, per_class=2, size=(8, 8))
    ckpt = make_checkpoint(tmp_path / "dit.pt", num_classes=3)
    common = ["--model", "DiT-T/2", "--ckpt", ckpt, "--data-path", tmp_path / "data", "--classifier", "digits",
              "--classifier-weights", tmp_path / "none.pt", "--out", tmp_path / "out"]
    vae = make_vae_folder(tmp_path / "vae")
    for extra, message in ((["--forget-class", 1, "--vae", vae], "does not fit"),
                           (["--forget-class", 1, "--images", 0], "--images must be at least 1"),
                           (["--forget-class", 3], "--forget-class 3 is outside the 3 classes")):
        proc = run_in_process("attack.py", *common, *extra, cwd=tmp_path)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "out")
