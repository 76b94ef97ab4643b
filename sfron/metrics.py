"""
What the SFR-on paper reports (Huang et al., NeurIPS 2024): forget accuracy (FA), remain accuracy and FID,
computed offline. FID uses torchmetrics' FrechetInceptionDistance, with torch-fidelity's InceptionV3 from a local
weights file or any feature network (the digits classifier's penultimate layer for the embedded case); the
statistics of the real images can be cached to a file.
"""
import os

import numpy as np
import torch
import torch.nn as nn

from .files import atomic_torch_save, safe_torch_load
from .utils import UserError


def classification_report(logits, labels, forget_class):
    """
    From classifier logits (N, K) of generated images and the classes they were generated for (N,):
    forget_acc (share of forget-class images classified as the forget class), forget_top5, forget_prob (mean
    probability of the forget class), remain_acc and remain_acc_per_class on the other classes.
    """
    logits, labels = logits.float(), labels.long()
    pred = logits.argmax(1)
    report = {}
    forget = labels == forget_class
    if forget.any():
        top5 = logits[forget].topk(min(5, logits.shape[1]), dim=1).indices
        report["forget_acc"] = (pred[forget] == forget_class).float().mean().item()
        report["forget_top5"] = (top5 == forget_class).any(1).float().mean().item()
        report["forget_prob"] = logits[forget].softmax(1)[:, forget_class].mean().item()
        report["n_forget"] = int(forget.sum())
    remain = ~forget
    if remain.any():
        report["remain_acc"] = (pred[remain] == labels[remain]).float().mean().item()
        report["remain_acc_per_class"] = {int(c): (pred[labels == c] == c).float().mean().item()
                                          for c in labels[remain].unique().tolist()}
        report["n_remain"] = int(remain.sum())
    return report


@torch.no_grad()
def classify(classifier, images_uint8, batch_size, device):
    """Logits (N, K) for uint8 images (N, H, W, 3)."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = torch.from_numpy(images_uint8[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(classifier(x).float().cpu())
    return torch.cat(out)


class FeatureNet(nn.Module):
    """Wraps a network with a .features(x in [-1, 1]) method for torchmetrics (which passes uint8 images)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images_uint8):
        return self.net.features(images_uint8.float() / 127.5 - 1.0)


def make_fid(features, inception_weights=None):
    """A torchmetrics FID on InceptionV3 pool features ('inception', weights from a local file) or a FeatureNet."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    if features == "inception":
        if not inception_weights:
            raise UserError("FID with InceptionV3 needs --inception-weights: torch-fidelity's "
                            "weights-inception-2015-12-05-6726825d.pth as a local file (nothing is downloaded)")
        safe_torch_load(inception_weights, what="Inception weights")  # refuse anything but tensors up front
        return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                        feature_extractor_weights_path=inception_weights)
    return FrechetInceptionDistance(feature=features, reset_real_features=False)


def reference_statistics(metric, real_batches, cache_path, description):
    """
    The real-image FID statistics {sum, cov_sum, num_samples}: read from cache_path when it was made for the same
    description, otherwise computed from real_batches() (uint8 NCHW batches) and written there.
    """
    if cache_path and os.path.isfile(cache_path):
        cached = safe_torch_load(cache_path, what="FID reference statistics")
        if isinstance(cached, dict) and cached.get("description") == description:
            return cached["state"]
    metric.reset_real_features = True
    metric.reset()
    metric.reset_real_features = False
    for batch in real_batches():
        metric.update(batch.to(metric.device), real=True)
    if metric.real_features_num_samples < 2:
        raise UserError(f"FID needs at least two real images ({description})")
    state = {k: getattr(metric, f"real_features_{k}").detach().cpu().clone() for k in ("sum", "cov_sum", "num_samples")}
    if cache_path:
        atomic_torch_save({"description": description, "state": state}, cache_path)
    return state


def fid_against(metric, reference, fake_uint8_nhwc, batch_size):
    """FID of generated images (N, H, W, 3) uint8 against reference statistics (None for fewer than 2 images)."""
    if len(fake_uint8_nhwc) < 2:
        return None
    metric.reset()  # the fake statistics only (reset_real_features=False)
    for k, v in reference.items():
        setattr(metric, f"real_features_{k}", v.to(metric.device))
    for i in range(0, len(fake_uint8_nhwc), batch_size):
        batch = torch.from_numpy(fake_uint8_nhwc[i:i + batch_size]).permute(0, 3, 1, 2)
        metric.update(batch.to(metric.device), real=False)
    return float(metric.compute())


def load_samples(path):
    """Generated images (N, H, W, 3) uint8 and their class labels (N,) from an .npz (arr_0, arr_1)."""
    if not os.path.isfile(path):
        raise UserError(f"--samples {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a samples .npz with arr_0 (images) and arr_1 (labels): {e}") from None
    if labels is None:
        raise UserError(f"{path} has no arr_1 (class labels); make it with sample_ddp.py")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images, labels


def markdown_table(reports, columns=("forget_acc", "forget_top5", "remain_acc", "fid_remain", "fid_forget")):
    """A Markdown table of {model name: report} with one row per model."""
    def fmt(v):
        return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for name, r in reports.items()]
    return "\n".join(lines) + "\n"
