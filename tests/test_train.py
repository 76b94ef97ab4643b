"""train.py and train_classifier.py: a few steps, then their files load where the README says they do."""
import os
import signal

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


def train_tiny(data, results, *flags, cwd):
    """A 4-step DiT-T/2 training of 8x8 images under `results`, with a checkpoint every 2 steps."""
    return run_in_process("train.py", "--data-path", data, "--results-dir", results, "--model", "DiT-T/2",
                          "--image-size", 8, "--num-classes", 3, "--vae", "none", "--global-batch-size", 4,
                          "--max-steps", 4, "--ckpt-every", 2, "--lr", "1e-3", "--lr-schedule", "cosine",
                          "--ema-decay", 0.5, "--num-workers", 0, *flags, cwd=cwd)


def test_a_stopped_training_resumed_ends_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    """SIGUSR1 after step 1: the run saves its state and exits 75; --resume auto finds the run of the same settings
    and continues it: the weights, EMA, optimizer and learning rate at the end equal those of a run never stopped."""
    import train
    make_image_folder(tmp_path / "data", num_classes=3, per_class=4, size=(8, 8))
    train_tiny(tmp_path / "data", tmp_path / "whole", cwd=tmp_path).check_returncode()
    update_ema, calls = train.update_ema, []

    def update_then_signal(*args):
        update_ema(*args)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # a preemption notice during step 1
    monkeypatch.setattr(train, "update_ema", update_then_signal)
    stopped = train_tiny(tmp_path / "data", tmp_path / "stopped", cwd=tmp_path)
    assert stopped.returncode == 75 and "run the same command again to continue" in stopped.stderr
    (run,) = os.listdir(tmp_path / "stopped")
    assert sorted(os.listdir(tmp_path / "stopped" / run / "checkpoints")) == ["0000001.pt"]
    proc = train_tiny(tmp_path / "data", tmp_path / "stopped", "--resume", "auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path / "stopped") == [run] and len(calls) == 4
    assert "(step 1)" in (tmp_path / "stopped" / run / "log.txt").read_text()
    whole, resumed = (torch.load(tmp_path / root / os.listdir(tmp_path / root)[0] / "checkpoints" / "0000004.pt",
                                 weights_only=True) for root in ("whole", "stopped"))
    for key in ("model", "ema"):
        assert all(torch.equal(whole[key][k], v) for k, v in resumed[key].items())
    assert all(torch.equal(whole["opt"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"])
               for i, state in resumed["opt"]["state"].items())
    assert resumed["scheduler"]["last_epoch"] == 4 and resumed["opt"]["param_groups"][0]["lr"] == 0.0


def test_a_resumed_training_with_another_setting_is_refused(tmp_path):
    """--resume of a run with a different --lr: one error line naming the flag, and the run's folder untouched."""
    make_image_folder(tmp_path / "data", num_classes=3, per_class=4, size=(8, 8))
    train_tiny(tmp_path / "data", tmp_path / "results", cwd=tmp_path).check_returncode()
    (run,) = os.listdir(tmp_path / "results")
    before = sorted(os.listdir(tmp_path / "results" / run / "checkpoints"))
    proc = train_tiny(tmp_path / "data", tmp_path / "results", "--lr", "2e-3", "--resume",
                      tmp_path / "results" / run, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --lr 0.002 differs from the resumed run's 0.001; resume with the original command"]
    assert sorted(os.listdir(tmp_path / "results" / run / "checkpoints")) == before


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
