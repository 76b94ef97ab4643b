"""sample.py, sample_ddp.py and the evaluation metrics."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import make_checkpoint, make_image_folder, run_in_process, run_script
from sfron.metrics import (classification_report, embed, feature_space, frechet_distance, image_set_metrics,
                           inception_score, reference_set)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    make_checkpoint(root / "a.pt", num_classes=5, seed=0)
    make_checkpoint(root / "b.pt", num_classes=5, seed=1)
    return root


def test_sample_grid_and_side_by_side_figure(ckpts):
    common = ("--model", "DiT-T/2", "--image-size", 8, "--num-classes", 5, "--vae", "none", "--cfg-scale", 4.0,
              "--num-sampling-steps", 20, "--seed", 3, "--class-labels", 0, 1, 2, 3)
    run_in_process("sample.py", *common, "--ckpt", ckpts / "a.pt", "--out", ckpts / "one.png", cwd=ckpts, check=True)
    one = np.asarray(Image.open(ckpts / "one.png"))
    assert one.shape == (2 + 10, 2 + 4 * 10, 3)  # a row of four 8x8 images with 2-pixel padding
    run_in_process("sample.py", *common, "--ckpt", ckpts / "a.pt", ckpts / "a.pt", "--out", ckpts / "twice.png",
                   cwd=ckpts, check=True)
    twice = np.asarray(Image.open(ckpts / "twice.png"))
    w = one.shape[1]
    assert np.array_equal(twice[:, :w], one) and np.array_equal(twice[:, w + 6:], one)  # identical halves
    run_in_process("sample.py", *common, "--ckpt", ckpts / "a.pt", ckpts / "b.pt", "--out", ckpts / "ab.png",
                   "--sampler", "ddim", cwd=ckpts, check=True)
    ab = np.asarray(Image.open(ckpts / "ab.png"))
    assert not np.array_equal(ab[:, :w], ab[:, w + 6:])
    bad = run_in_process("sample.py", *common[:-5], "--class-labels", 7, "--ckpt", ckpts / "a.pt", cwd=ckpts)
    assert bad.returncode == 1 and "--class-labels 7 is outside the 5 classes of the model" in bad.stderr


def test_sample_ddp_gives_the_same_images_with_one_and_two_processes(ckpts):
    common = ("--model", "DiT-T/2", "--ckpt", ckpts / "a.pt", "--num-sampling-steps", 10, "--cfg-scale", 2.0,
              "--samples-per-class", 3, "--class-labels", 1, 4, "--per-proc-batch-size", 2, "--global-seed", 5)
    run_in_process("sample_ddp.py", *common, "--sample-dir", ckpts / "np1", cwd=ckpts, check=True)
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
    space = feature_space("classifier", classifier=_Features())
    ref = reference_set(space, lambda: iter([real[:100], real[100:]]), None, "test", "cpu")
    same = image_set_metrics(embed(space, [real], "cpu")[0], ref)
    shifted = image_set_metrics(embed(space, [(real.int() + 40).clamp(0, 255).to(torch.uint8)], "cpu")[0], ref)
    assert abs(same["fid"]) < 1e-3 and shifted["fid"] > 100 * max(abs(same["fid"]), 1e-4) and shifted["fid"] > 0.01
    assert abs(same["kid"]) < 1e-3 < shifted["kid"]
    assert same["precision"] == same["recall"] == 1.0 and shifted["precision"] < 0.5


def test_inception_score_is_the_class_count_for_confident_balanced_logits():
    logits = torch.full((5000, 5), -30.0)
    logits[torch.arange(5000), torch.arange(5000) % 5] = 30.0  # every image sure of its class, the classes balanced
    mean, _ = inception_score(logits)  # over 10 random splits of 500: each split close to balanced
    assert mean == pytest.approx(5.0, rel=0.01)
    assert inception_score(logits[:, :1] * 0)[0] == pytest.approx(1.0)  # one class: nothing to tell apart


@pytest.fixture
def no_network(monkeypatch):
    connect = socket.socket.connect

    def refuse_internet(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError("network access attempted")
        return connect(sock, address)  # Unix sockets: data loader workers share tensors through them

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse_internet)
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
    torch.manual_seed(0)
    for module in net.modules():  # He initialisation: features neither vanish nor explode through 94 layers
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    net.fc.weight.data *= 20  # logits that differ between images: an Inception Score above 1
    torch.save(net.state_dict(), path)
    return path


def save_pngs(images_nhwc, folder, names):
    os.makedirs(folder, exist_ok=True)
    for image, name in zip(images_nhwc, names):
        Image.fromarray(image).save(os.path.join(folder, name))


def test_evaluate_equals_torch_fidelity_and_reads_adm_reference_batches(tmp_path, no_network):
    """evaluate.py's numbers are torch-fidelity's calculate_metrics on the same two image folders."""
    import evaluate
    import torch_fidelity
    import torchvision
    make_image_folder(tmp_path / "data", num_classes=3, per_class=4, size=(16, 16))
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "resnet18.pt")
    weights = inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 2, 1], 4)  # 8 remain samples first, then the 4 of the forget class 1
    images = rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    real = {f"{c}_{f}": np.asarray(Image.open(tmp_path / "data" / "train" / c / f))
            for c in ("class0", "class2") for f in sorted(os.listdir(tmp_path / "data" / "train" / c))}
    images[:4] = np.stack(list(real.values())[::2])  # half the remain samples look like real images
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=labels)
    # the same images as folders: generated remain samples, all samples, the real remain images in list order
    save_pngs(images[:8], tmp_path / "gen_remain", [f"{i:03d}.png" for i in range(8)])
    save_pngs(images, tmp_path / "gen_all", [f"{i:03d}.png" for i in range(12)])
    save_pngs(real.values(), tmp_path / "real_remain", real.keys())
    real_images = np.stack(list(real.values()))
    np.savez(tmp_path / "ref_images.npz", arr_0=real_images)  # an ADM batch without statistics: computed here

    argv = ["--samples", tmp_path / "samples.npz", "--names", "unlearned", "--forget-class", 1, "--classifier",
            "resnet18", "--classifier-weights", tmp_path / "resnet18.pt", "--num-classes", 3, "--data-path",
            tmp_path / "data", "--inception-weights", weights, "--fid-cache", tmp_path / "cache", "--batch-size", 8,
            "--ref-batch", tmp_path / "ref_images.npz", "--out", tmp_path / "report.json"]
    evaluate.main(evaluate.parse_args([str(a) for a in argv]))
    report = json.load(open(tmp_path / "report.json"))["unlearned"]
    # precision/recall in the Inception pool features, as the ADM evaluation (torch-fidelity's default: VGG16)
    kwargs = dict(cuda=False, verbose=False, feature_extractor="inception-v3-compat", feature_layer_prc="2048",
                  feature_extractor_weights_path=str(weights), cache=False, save_cpu_ram=True)
    fidelity = torch_fidelity.calculate_metrics(input1=str(tmp_path / "gen_remain"),
                                                input2=str(tmp_path / "real_remain"), fid=True, kid=True, prc=True,
                                                kid_subset_size=8, **kwargs)
    assert report["fid_remain"] == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-3)
    assert report["kid_remain"] == pytest.approx(fidelity["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert (report["precision_remain"], report["recall_remain"]) == (fidelity["precision"], fidelity["recall"])
    assert 0 < report["precision_remain"] < 1 and report["recall_remain"] > 0 and report["fid_remain"] > 0.1
    on_all = torch_fidelity.calculate_metrics(input1=str(tmp_path / "gen_all"), input2=str(tmp_path / "real_remain"),
                                              isc=True, fid=True, **kwargs)
    assert report["inception_score"] - 1 == pytest.approx(on_all["inception_score_mean"] - 1, rel=1e-3)
    assert report["inception_score"] > 1.001
    assert report["fid_ref_batch"] == pytest.approx(on_all["frechet_inception_distance"], rel=1e-3)
    for key in ("forget_acc", "forget_top5", "forget_prob", "forget_entropy", "remain_acc", "fid_forget"):
        assert report[key] is not None, key
    assert sorted(os.listdir(tmp_path / "cache")) == ["fid_ref_forget_1.pt", "fid_ref_remain_1.pt"]

    # an ADM-layout batch with its statistics (mu, sigma) gives the statistics, so the FID, of its images
    space = evaluate.feature_space("inception", str(weights))
    from_images = evaluate.read_ref_batch(str(tmp_path / "ref_images.npz"), space, 8, "cpu")
    np.savez(tmp_path / "ref_stats.npz", arr_0=real_images[:1], mu=from_images["mu"].numpy(),
             sigma=from_images["sigma"].numpy())
    from_stats = evaluate.read_ref_batch(str(tmp_path / "ref_stats.npz"), space, 8, "cpu")
    assert all(torch.equal(from_stats[k], from_images[k]) for k in ("mu", "sigma"))
    assert frechet_distance(from_stats, from_images) == pytest.approx(0, abs=1e-4)
    assert "| unlearned |" in open(tmp_path / "report.md").read()


def test_missing_weights_say_which_file_to_provide(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.array([0, 1]))
    proc = run_script("evaluate.py", "--samples", tmp_path / "s.npz", "--forget-class", 0, "--classifier",
                      "resnet50", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "--classifier-weights" in proc.stderr
    proc = run_script("evaluate.py", "--samples", tmp_path / "s.npz", "--forget-class", 0, "--classifier",
                      "resnet50", "--classifier-weights", tmp_path / "nope.pt", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "nope.pt" in proc.stderr


def test_forget_and_remain_metrics_of_known_predictions():
    """classification_report on logits whose softmax is known: accuracy, top-5, mean probability and entropy (nats)
    of the forget-class samples, and remain accuracy overall and per class."""
    import math
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1],      # generated for the forget class 1
                          [0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])  # for 0, 0 and 2
    report = classification_report(probs.log(), torch.tensor([1, 1, 0, 0, 2]), forget_class=1)
    entropy = [-sum(p * math.log(p) for p in row) for row in ([0.5, 0.25, 0.25], [0.1, 0.8, 0.1])]
    assert report["forget_acc"] == 0.5 and report["forget_top5"] == 1.0 and report["n_forget"] == 2
    assert report["forget_prob"] == pytest.approx((0.25 + 0.8) / 2)
    assert report["forget_entropy"] == pytest.approx(sum(entropy) / 2)   # 0.8392 nats
    assert report["remain_acc"] == pytest.approx(2 / 3) and report["remain_acc_per_class"] == {0: 0.5, 2: 1.0}
