"""The embedded digits case: the shipped files and a shortened demo.py."""
import json
import os

import pytest
import torch

from helpers import ROOT, run_in_process, run_script
from sfron.classifier import load_classifier
from sfron.data import ImageSet, find_class_folders, list_images

ASSETS = os.path.join(ROOT, "assets")


def test_shipped_files_are_small_and_load(tmp_path):
    references = [f"digits_dit_without_{k}.pt" for k in range(10)]
    assert sorted(os.listdir(ASSETS)) == sorted(["digits_classifier.pt", "digits_dit.pt", *references])
    sizes = [os.path.getsize(os.path.join(ASSETS, f)) for f in os.listdir(ASSETS)]
    assert sum(sizes) < 30 * 2 ** 20 and max(os.path.getsize(os.path.join(ASSETS, f)) for f in references[1:]) < 2.5e6
    for name, excluded in (("digits_dit.pt", None), *((f, int(f[-4])) for f in references)):
        ckpt = torch.load(os.path.join(ASSETS, name), weights_only=True)
        assert ckpt["spec"] == {"model": "DiT-T/2", "image_size": 8, "num_classes": 10, "vae": "none",
                                "learn_sigma": True, "random_flip": False}
        assert ckpt["args"]["exclude_class"] == excluded
        assert ckpt["args"]["data_path"] == "data/digits" and ckpt["args"]["export"] == f"assets/{name}"


def test_classifier_held_out_accuracy(tmp_path):
    run_in_process("prepare_digits.py", "--out", tmp_path / "digits", cwd=tmp_path, check=True)
    root, classes = find_class_folders(str(tmp_path / "digits"), "val")
    val = ImageSet(list_images(root, classes, range(10)), 8, classes)
    x, y = zip(*(val[i] for i in range(len(val))))
    classifier = load_classifier("digits", os.path.join(ASSETS, "digits_classifier.pt"), 10)
    with torch.no_grad():
        accuracy = (classifier(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item()
    assert len(val) == 355 and accuracy >= 0.97


def test_shortened_demo_meets_the_three_targets_on_digit_3_and_reports_the_attacks(tmp_path):
    """demo.py's default recipe on digit 3, shortened (batch 32, 20 samples per digit, DDIM 10): the README's three
    targets hold (forget accuracy at most 3 points above the retrained model's, remain accuracy at most 1 point
    below the original's, remain distance at most 1.2x the original's); --attacks reports the forget accuracy after
    label inversion and relearning (budgets shortened) for every model."""
    from sfron.recipes import DEFAULT_RECIPE
    proc = run_script("demo.py", "--out", tmp_path / "out", "--data-path", tmp_path / "digits", "--forget-class", 3,
                      "--fisher-iters", 2, "--batch-size", 32, "--samples-per-class", 20, "--sampling-steps", 10,
                      "--attacks", "--inversion-steps", 5, "--relearn-steps", 2, cwd=tmp_path)
    for command in ("generate_fisher.py", "generate_mask.py", "forget.py", f"--recipe {DEFAULT_RECIPE}",
                    "method=ron", "unlearn_loss=esd", "adversarial_steps=1", "remain_projection=True",
                    "remain_loss=distill", "sample_ddp.py", "evaluate.py", "sample.py", "attack.py"):
        assert command in proc.stdout, command
    report = json.load(open(tmp_path / "out" / "report.json"))
    for model in ("original", "unlearned", "retrained"):
        assert report[model]["n_forget"] == 20 and report[model]["n_remain"] == 180
        for attack in ("inversion_fa", "relearn_fa"):  # shares of 20 samples
            assert report[model][attack] * 20 == pytest.approx(round(report[model][attack] * 20))
    assert "digits classifier" in report["about"]["fid_features"]
    assert report["about"]["retrained"].endswith("digits_dit_without_3.pt")
    assert report["about"]["attacks"]["inversion_steps"] == 5
    assert "5 label-inversion steps" in proc.stdout and "2 relearning steps" in proc.stdout
    original, unlearned, retrained = (report[m] for m in ("original", "unlearned", "retrained"))
    assert original["forget_acc"] >= 0.9 and retrained["forget_acc"] <= 0.1
    assert unlearned["forget_acc"] <= retrained["forget_acc"] + 0.03 + 1e-6          # F
    assert unlearned["remain_acc"] >= original["remain_acc"] - 0.01 - 1e-6           # R
    assert unlearned["fid_remain"] <= 1.2 * original["fid_remain"]                   # D
    for name in ("samples.png", "losses.png", "report.md"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
