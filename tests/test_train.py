"""train.py and train_classifier.py: a few steps, then their files load where the README says they do."""
import os

import numpy as np
import torch
from PIL import Image

from download import find_model
from helpers import make_image_folder, run_in_process
from sfron.classifier import load_classifier
from train import lr_factor


def test_train_exports_a_model_that_loads_and_samples(tmp_path):
    make_image_folder(tmp_path / "data", num_classes=3, per_class=4, size=(8, 8))
    run_in_process("train.py", "--data-path", tmp_path / "data", "--model", "DiT-T/2", "--image-size", 8,
                   "--num-classes", 3, "--vae", "none", "--no-random-flip", "--global-batch-size", 4, "--max-steps", 3,
                   "--lr", "1e-3", "--ema-decay", 0.5, "--num-workers", 0, "--exclude-class", 1, "--export",
                   tmp_path / "dit.pt", "--export-precision", "fp16", "--save-safetensors", "--lr-schedule", "cosine",
                   "--warmup-steps", 1, cwd=tmp_path, check=True)
    exported = torch.load(tmp_path / "dit.pt", weights_only=True)
    assert exported["spec"]["num_classes"] == 3 and exported["args"]["exclude_class"] == 1
    assert all(v.dtype == torch.float16 for v in exported["ema"].values() if v.is_floating_point())
    weights = find_model(str(tmp_path / "dit.pt"))
    (run,) = os.listdir(tmp_path / "results")
    raw = torch.load(tmp_path / "results" / run / "checkpoints" / "0000003.pt", weights_only=True)
    table, raw_table = weights["y_embedder.embedding_table.weight"].float(), raw["model"]["y_embedder.embedding_table.weight"]
    # class 1 was left out: its label embedding never moved, the others did
    torch.testing.assert_close(table[1], raw_table[1].half().float())
    assert (raw["ema"]["y_embedder.embedding_table.weight"][0] != raw_table[0]).any()
    # one warmup step at 1e-3, then a cosine decay that reaches zero after the last step
    assert raw["opt"]["param_groups"][0]["lr"] == 0.0
    # the final EMA weights as safetensors, with the settings that let a script load them without flags
    final = tmp_path / "results" / run / "checkpoints" / "0000003.safetensors"
    assert all(torch.equal(find_model(str(final))[k], v) for k, v in raw["ema"].items())
    run_in_process("sample.py", "--model", "DiT-T/2", "--ckpt", final, "--num-sampling-steps", 5,
                   "--class-labels", 0, 2, "--out", tmp_path / "grid.png", cwd=tmp_path, check=True)
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (12, 22, 3)


def test_learning_rate_schedules():
    """--lr-schedule and --warmup-steps as multiples of --lr per step; a warmup as long as the run is refused."""
    assert [lr_factor(i, 6, "constant", 2) for i in range(6)] == [0.5, 1, 1, 1, 1, 1]
    cosine = [lr_factor(i, 6, "cosine", 2) for i in range(7)]
    np.testing.assert_allclose(cosine, [0.5, 1, 1, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2, 0], atol=1e-12)
    assert lr_factor(0, 4, "cosine", 0) == 1


def test_a_warmup_longer_than_the_run_is_one_clear_error(tmp_path):
    """--warmup-steps as long as the run: one error line, and no results folder made."""
    make_image_folder(tmp_path / "data", num_classes=2, per_class=2, size=(8, 8))
    proc = run_in_process("train.py", "--data-path", tmp_path / "data", "--model", "DiT-T/2", "--image-size", 8,
                          "--num-classes", 2, "--vae", "none", "--global-batch-size", 2, "--max-steps", 3,
                          "--warmup-steps", 3, "--num-workers", 0, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --warmup-steps 3 leaves nothing of the 3 training steps"]
    assert not (tmp_path / "results").exists()


def test_a_missing_data_folder_stops_before_any_folder_is_made(tmp_path):
    proc = run_in_process("train.py", "--data-path", tmp_path / "nowhere", "--model", "DiT-T/2", "--image-size", 8,
                          "--num-classes", 2, "--vae", "none", "--max-steps", 3, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --data-path ")
    assert not (tmp_path / "results").exists()


def test_train_classifier_learns_the_digits(tmp_path):
    run_in_process("prepare_digits.py", "--out", tmp_path / "digits", cwd=tmp_path, check=True)
    proc = run_in_process("train_classifier.py", "--data-path", tmp_path / "digits", "--out", tmp_path / "clf.pt",
                          "--epochs", 2, cwd=tmp_path, check=True)
    saved = torch.load(tmp_path / "clf.pt", weights_only=True)
    assert saved["val_accuracy"] > 0.6  # ten classes: chance is 0.1
    assert f"held-out acc {saved['val_accuracy']:.4f}" in proc.stdout
    classifier = load_classifier("digits", str(tmp_path / "clf.pt"), 10)
    image = np.asarray(Image.open(tmp_path / "digits" / "val" / "0" / "0004.png").convert("RGB"), dtype=np.float32)
    logits = classifier(torch.from_numpy(image).permute(2, 0, 1)[None] / 127.5 - 1)
    assert logits.shape == (1, 10)
