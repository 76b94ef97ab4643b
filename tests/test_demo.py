"""The embedded digits case: the shipped files and a shortened demo.py."""
import json
import os

import torch

from helpers import ROOT, run_script
from sfron.classifier import load_classifier
from sfron.data import ImageSet, find_class_folders, list_images

ASSETS = os.path.join(ROOT, "assets")


def test_shipped_files_are_small_and_load(tmp_path):
    sizes = [os.path.getsize(os.path.join(ASSETS, f)) for f in os.listdir(ASSETS)]
    assert len(sizes) == 3 and sum(sizes) < 10 * 2 ** 20
    for name, excluded in (("digits_dit.pt", None), ("digits_dit_without_0.pt", 0)):
        ckpt = torch.load(os.path.join(ASSETS, name), weights_only=True)
        assert ckpt["spec"] == {"model": "DiT-T/2", "image_size": 8, "num_classes": 10, "vae": "none",
                                "learn_sigma": True, "random_flip": False}
        assert ckpt["args"]["exclude_class"] == excluded


def test_classifier_held_out_accuracy(tmp_path):
    run_script("prepare_digits.py", "--out", tmp_path / "digits", cwd=tmp_path)
    root, classes = find_class_folders(str(tmp_path / "digits"), "val")
    val = ImageSet(list_images(root, classes, range(10)), 8, classes)
    x, y = zip(*(val[i] for i in range(len(val))))
    classifier = load_classifier("digits", os.path.join(ASSETS, "digits_classifier.pt"), 10)
    with torch.no_grad():
        accuracy = (classifier(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item()
    assert len(val) == 355 and accuracy >= 0.97


def test_shortened_demo(tmp_path):
    proc = run_script("demo.py", "--out", tmp_path / "out", "--data-path", tmp_path / "digits", "--fisher-iters", 2,
                      "--batch-size", 16, "--forget-iters", 10, "--samples-per-class", 4, "--sampling-steps", 5,
                      cwd=tmp_path)
    for command in ("generate_fisher.py", "generate_mask.py", "forget.py", "--method ron", "sample_ddp.py",
                    "evaluate.py", "sample.py"):
        assert command in proc.stdout
    report = json.load(open(tmp_path / "out" / "report.json"))
    for model in ("original", "unlearned", "retrained"):
        for key in ("forget_acc", "remain_acc"):
            assert 0.0 <= report[model][key] <= 1.0
        assert report[model]["fid_remain"] > 0
    assert "digits classifier" in report["about"]["fid_features"]
    assert report["original"]["forget_acc"] >= 0.75 and report["retrained"]["forget_acc"] <= 0.25
    for name in ("samples.png", "losses.png", "report.md"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
