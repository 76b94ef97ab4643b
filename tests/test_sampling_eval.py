"""sample.py, sample_ddp.py and the evaluation metrics."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import make_checkpoint, make_image_folder, run_script
from sfron.metrics import FeatureNet, classification_report, fid_against, make_fid, reference_statistics


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    make_checkpoint(root / "a.pt", num_classes=5, seed=0)
    make_checkpoint(root / "b.pt", num_classes=5, seed=1)
    return root


def test_sample_grid_and_side_by_side_figure(ckpts):
    common = ("--model", "DiT-T/2", "--image-size", 8, "--num-classes", 5, "--vae", "none", "--cfg-scale", 4.0,
              "--num-sampling-steps", 20, "--seed", 3, "--class-labels", 0, 1, 2, 3)
    run_script("sample.py", *common, "--ckpt", ckpts / "a.pt", "--out", ckpts / "one.png", cwd=ckpts)
    one = np.asarray(Image.open(ckpts / "one.png"))
    assert one.shape == (2 + 10, 2 + 4 * 10, 3)  # a row of four 8x8 images with 2-pixel padding
    run_script("sample.py", *common, "--ckpt", ckpts / "a.pt", ckpts / "a.pt", "--out", ckpts / "twice.png",
               cwd=ckpts)
    twice = np.asarray(Image.open(ckpts / "twice.png"))
    w = one.shape[1]
    assert np.array_equal(twice[:, :w], one) and np.array_equal(twice[:, w + 6:], one)  # identical halves
    run_script("sample.py", *common, "--ckpt", ckpts / "a.pt", ckpts / "b.pt", "--out", ckpts / "ab.png",
               "--sampler", "ddim", cwd=ckpts)
    ab = np.asarray(Image.open(ckpts / "ab.png"))
    assert not np.array_equal(ab[:, :w], ab[:, w + 6:])
    bad = run_script("sample.py", *common[:-5], "--class-labels", 7, "--ckpt", ckpts / "a.pt", cwd=ckpts, check=False)
    assert bad.returncode == 1 and "--class-labels 7 is outside the 5 classes of the model" in bad.stderr


def test_sample_ddp_gives_the_same_images_with_one_and_two_processes(ckpts):
    common = ("--model", "DiT-T/2", "--ckpt", ckpts / "a.pt", "--num-sampling-steps", 10, "--cfg-scale", 2.0,
              "--samples-per-class", 3, "--class-labels", 1, 4, "--per-proc-batch-size", 2, "--global-seed", 5)
    run_script("sample_ddp.py", *common, "--sample-dir", ckpts / "np1", cwd=ckpts)
    run_script("sample_ddp.py", *common, "--sample-dir", ckpts / "np2", cwd=ckpts, nproc=2)
    (f1,) = [f for f in os.listdir(ckpts / "np1") if f.endswith(".npz")]
    assert f1 == "DiT-T-2-a-size-8-vae-none-cfg-2.0-seed-5.npz"
    one, two = np.load(ckpts / "np1" / f1), np.load(ckpts / "np2" / f1)
    assert one["arr_0"].shape == (6, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    assert one["arr_1"].tolist() == [1, 1, 1, 4, 4, 4]
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert len([f for f in os.listdir(ckpts / "np1" / f1[:-4]) if f.endswith(".png")]) == 6


def test_classification_metrics_equal_hand_counts():
    # forget class 2: 4 samples, one classified as 2 (top-1), two more have 2 in their top 5
    logits = torch.full((10, 8), -10.0)
    labels = torch.tensor([2, 2, 2, 2, 0, 0, 1, 1, 1, 3])
    preds = [2, 5, 6, 7, 0, 4, 1, 1, 0, 3]
    for i, p in enumerate(preds):
        logits[i, p] = 5.0
    logits[1, 2], logits[2, 2] = 1.0, 1.0   # second-best: in the top 5
    logits[3, 2] = -100.0                     # last of the 8 classes: not in the top 5
    report = classification_report(logits, labels, forget_class=2)
    assert report["forget_acc"] == pytest.approx(1 / 4)
    assert report["forget_top5"] == pytest.approx(3 / 4)
    assert report["remain_acc"] == pytest.approx(4 / 6)   # 0: 1/2, 1: 2/3, 3: 1/1
    assert report["remain_acc_per_class"] == pytest.approx({0: 0.5, 1: 2 / 3, 3: 1.0})
    assert report["n_forget"] == 4 and report["n_remain"] == 6
    p_forget = logits.softmax(1)[labels == 2, 2].mean().item()
    assert report["forget_prob"] == pytest.approx(p_forget)


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def features(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    real = (torch.rand(200, 3, 8, 8, generator=g) * 200).to(torch.uint8)
    metric = make_fid(FeatureNet(_Features()))
    ref = reference_statistics(metric, lambda: iter([real[:100], real[100:]]), None, "test")
    nhwc = real.permute(0, 2, 3, 1).numpy()
    same = fid_against(metric, ref, nhwc, batch_size=64)
    shifted = fid_against(metric, ref, np.clip(nhwc.astype(int) + 40, 0, 255).astype(np.uint8), batch_size=64)
    assert abs(same) < 1e-3 and shifted > 100 * max(abs(same), 1e-4) and shifted > 0.01


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def inception_weights(path):
    """A random-weight InceptionV3 state dict in torch-fidelity's layout (the real one is a download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: None
    original_load = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd: None
    try:
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = original
        fe.FeatureExtractorInceptionV3.load_state_dict = original_load
    torch.save(net.state_dict(), path)
    return path


def test_evaluate_reports_every_metric_offline(tmp_path, no_network, monkeypatch):
    import evaluate
    import torchvision
    make_image_folder(tmp_path / "data", num_classes=3, per_class=4, size=(16, 16))
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "resnet18.pt")
    inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8),
             arr_1=np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    args = evaluate.argparse.Namespace(
        samples=[str(tmp_path / "samples.npz")], names=["unlearned"], forget_class=1, classifier="resnet18",
        classifier_weights=str(tmp_path / "resnet18.pt"), num_classes=3, data_path=str(tmp_path / "data"),
        fid_features="inception", inception_weights=str(tmp_path / "inception.pth"), real_per_class=None,
        fid_cache=str(tmp_path / "cache"), batch_size=4, out=str(tmp_path / "report.json"))
    evaluate.main(args)
    report = json.load(open(tmp_path / "report.json"))
    for key in ("forget_acc", "forget_top5", "forget_prob", "remain_acc", "remain_acc_per_class", "fid_remain",
                "fid_forget"):
        assert key in report["unlearned"], key
    assert report["about"]["fid_features"].startswith("InceptionV3")
    assert sorted(os.listdir(tmp_path / "cache")) == ["fid_ref_forget_1.pt", "fid_ref_remain_1.pt"]
    assert "| unlearned |" in open(tmp_path / "report.md").read()
    evaluate.main(args)  # the second run reads the cached reference statistics
    assert json.load(open(tmp_path / "report.json"))["unlearned"]["fid_remain"] == pytest.approx(
        report["unlearned"]["fid_remain"], rel=1e-6)


def test_missing_weights_say_which_file_to_provide(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.array([0, 1]))
    proc = run_script("evaluate.py", "--samples", tmp_path / "s.npz", "--forget-class", 0, "--classifier",
                      "resnet50", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "--classifier-weights" in proc.stderr
    proc = run_script("evaluate.py", "--samples", tmp_path / "s.npz", "--forget-class", 0, "--classifier",
                      "resnet50", "--classifier-weights", tmp_path / "nope.pt", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "nope.pt" in proc.stderr
